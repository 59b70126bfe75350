"""Temperature policies: how the distillation temperature T moves during training.

Every policy has one interface: ``step(context)`` on each training micro-batch, before that batch's
KD loss, and ``current(context)`` on an evaluation batch, each returning the temperature to use. The
``TemperatureContext`` offers what a policy may read: the training progress p, the fractional epoch,
and, computed only when a policy reads them, the student's and the teacher's cross-entropy on the
response tokens (a pass over the logits) and CTKD's token features.

A scheduled policy's whole state is a small dict saved beside every checkpoint as JSON, so a resumed
run continues the same trajectory. A learnt policy (CTKD) is a small ``nn.Module``: its parameters
are trained by the trainer's optimizer, through a gradient reversal layer, to *raise* the KD loss the
student lowers, and saved as safetensors.

Progress p runs from 0 at the first optimizer step to 1 at the last: with ``progress="step"`` (the
default) the trainer passes p = step / (max_steps - 1) for the 0-based step, so a schedule starts at
its start value whatever the run's length; with ``progress="epoch"`` (the DTS reference) it passes
p = (epoch + 1) / num_epochs for the 0-based epoch, constant within an epoch, which for a run of one
epoch or less is 1 throughout.
"""

from __future__ import annotations

from ..losses import TOKEN_FEATURES
from .ctkd import (
    GlobalTemperature,
    GradientReversal,
    InstanceTemperature,
    LearnedTemperature,
    check_ctkd_settings,
    check_hidden_size,
    ctkd_lambda,
)
from .difficulty import DifficultyTemperature
from .instance_dts import InstanceDynamicTemperature
from .policy import (
    LEARNED_TEMPERATURE_NAME,
    TEMPERATURE_STATE_NAME,
    ScheduledTemperature,
    TemperatureContext,
    TemperaturePolicy,
)
from .scheduled import (
    AnnealingTemperature,
    ConstantTemperature,
    CosineTemperature,
    DTSStep,
    DTSWindow,
    DynamicTemperature,
    PaperDynamicTemperature,
    check_annealing_settings,
    check_constant_temperature,
    check_momentum,
    check_temperature_range,
    cosine_factor,
)

__all__ = [
    "DTS_POLICIES",
    "LEARNED_TEMPERATURE_NAME",
    "POLICY_SETTINGS",
    "TEMPERATURE_POLICIES",
    "TEMPERATURE_STATE_NAME",
    "AnnealingTemperature",
    "ConstantTemperature",
    "CosineTemperature",
    "DTSStep",
    "DTSWindow",
    "DifficultyTemperature",
    "DynamicTemperature",
    "GlobalTemperature",
    "GradientReversal",
    "InstanceDynamicTemperature",
    "InstanceTemperature",
    "LearnedTemperature",
    "PaperDynamicTemperature",
    "ScheduledTemperature",
    "TemperatureContext",
    "TemperaturePolicy",
    "check_annealing_settings",
    "check_constant_temperature",
    "check_ctkd_settings",
    "check_hidden_size",
    "check_momentum",
    "check_temperature_range",
    "cosine_factor",
    "ctkd_lambda",
    "make_temperature_policy",
    "reads_progress",
]


# The DTS rule's variants (docs/temperature-policies.md): the same settings, the same checks.
DTS_POLICIES = ("dts", "dts_paper", "dts_sequence", "dts_token")
DTS_SETTINGS = (
    "temperature_init",
    "temperature_min",
    "temperature_max",
    "temperature_momentum",
    "temperature_progress",
)
# The DistillationConfig fields that decide each policy's trajectory: saved with a checkpoint and
# compared on resume. `temperature_progress` belongs to the policies whose rule reads the progress.
POLICY_SETTINGS = {
    "constant": ("temperature_init",),
    "cosine": ("temperature_min", "temperature_max", "temperature_progress"),
    "dts": DTS_SETTINGS,
    "dts_paper": DTS_SETTINGS,
    "dts_sequence": DTS_SETTINGS,
    "dts_token": DTS_SETTINGS,
    "adakd": ("temperature_init", "temperature_min", "temperature_max"),
    "annealing": ("temperature_max", "annealing_fraction", "temperature_progress"),
    "ctkd": ("temperature_init", "ctkd_t_start", "ctkd_t_range", "ctkd_lambda_max", "ctkd_lambda_epochs"),
    "ctkd_instance": (
        "temperature_init",
        "ctkd_t_start",
        "ctkd_t_range",
        "ctkd_lambda_max",
        "ctkd_lambda_epochs",
        "ctkd_hidden_size",
    ),
}
TEMPERATURE_POLICIES = tuple(POLICY_SETTINGS)


def reads_progress(name: str) -> bool:
    """Whether the policy ``name`` follows the training progress (and so ``temperature_progress``)."""
    return "temperature_progress" in POLICY_SETTINGS[name]


def make_temperature_policy(
    name: str,
    *,
    temperature_init: float = 3.0,
    temperature_min: float = 1.0,
    temperature_max: float = 3.0,
    temperature_momentum: float = 0.9,
    annealing_fraction: float = 0.5,
    ctkd_t_start: float = 1.0,
    ctkd_t_range: float = 20.0,
    ctkd_lambda_max: float = 1.0,
    ctkd_lambda_epochs: float = 10.0,
    ctkd_hidden_size: int = 64,
) -> TemperaturePolicy:
    """Build the policy ``name`` from the ``DistillationConfig`` settings of the same names (defaults as there)."""
    ctkd = (temperature_init, ctkd_t_start, ctkd_t_range, ctkd_lambda_max, ctkd_lambda_epochs)
    if name == "constant":
        return ConstantTemperature(temperature_init)
    if name == "cosine":
        return CosineTemperature(temperature_min, temperature_max)
    dts = (temperature_init, temperature_min, temperature_max, temperature_momentum)
    if name in ("dts", "dts_paper"):
        return (DynamicTemperature if name == "dts" else PaperDynamicTemperature)(*dts)
    if name in ("dts_sequence", "dts_token"):
        return InstanceDynamicTemperature(name.removeprefix("dts_"), *dts)
    if name == "adakd":
        return DifficultyTemperature(temperature_init, temperature_min, temperature_max)
    if name == "annealing":
        return AnnealingTemperature(temperature_max, annealing_fraction)
    if name == "ctkd":
        return GlobalTemperature(*ctkd)
    if name == "ctkd_instance":
        return InstanceTemperature(*ctkd, len(TOKEN_FEATURES), ctkd_hidden_size)
    raise ValueError(f"temperature_policy must be one of {TEMPERATURE_POLICIES}, got {name!r}")
