"""dts-llm: instruction distillation of causal LMs with the Dynamic Temperature Scheduler."""

from .losses import causal_lm_cross_entropy, distillation_loss
from .temperature import ConstantTemperature, CosineTemperature, DynamicTemperature, TemperaturePolicy
from .trainer import DistillationConfig, DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "ConstantTemperature",
    "CosineTemperature",
    "DistillationConfig",
    "DistillationTrainer",
    "DynamicTemperature",
    "TemperaturePolicy",
    "causal_lm_cross_entropy",
    "distillation_loss",
]
