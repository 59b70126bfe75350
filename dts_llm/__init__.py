"""dts-llm: instruction distillation of causal LMs with the Dynamic Temperature Scheduler."""

from .config import DistillationConfig
from .losses import causal_lm_cross_entropy, distillation_loss
from .temperature import (
    AnnealingTemperature,
    ConstantTemperature,
    CosineTemperature,
    DynamicTemperature,
    GlobalTemperature,
    InstanceTemperature,
    TemperaturePolicy,
)
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "AnnealingTemperature",
    "ConstantTemperature",
    "CosineTemperature",
    "DistillationConfig",
    "DistillationTrainer",
    "DynamicTemperature",
    "GlobalTemperature",
    "InstanceTemperature",
    "TemperaturePolicy",
    "causal_lm_cross_entropy",
    "distillation_loss",
]
