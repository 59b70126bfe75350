"""Temperature policies: how the distillation temperature T moves during training.

A policy sees, once per micro-batch and before that batch's KD loss, the student's and the
teacher's cross-entropy on the response tokens and the training progress p in (0, 1], and returns
the temperature to use. Its whole state is a small dict saved beside every checkpoint, so a resumed
run continues the same trajectory.

Progress follows the DTS reference: with ``progress="epoch"`` the trainer passes
p = (epoch + 1) / num_epochs for the 0-based epoch (constant within an epoch); with
``progress="step"`` it passes p = (optimizer_step + 1) / max_steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any


def check_temperature_range(t_min: float, t_max: float, t_init: float | None = None) -> None:
    """Raise ``ValueError`` naming the ``DistillationConfig`` field of an invalid temperature bound."""
    if not t_min > 0:
        raise ValueError(f"temperature_min must be > 0, got {t_min}")
    if t_min > t_max:
        raise ValueError(f"temperature_min ({t_min}) must not exceed temperature_max ({t_max})")
    if t_init is not None and not t_min <= t_init <= t_max:
        raise ValueError(f"temperature_init ({t_init}) must lie in [temperature_min, temperature_max] = [{t_min}, {t_max}]")


def cosine_factor(progress: float) -> float:
    """S(p) = (1 + cos(pi p)) / 2: 1 at the start of training, 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TemperaturePolicy(ABC):
    """The interface the trainer uses: read ``temperature``, call ``update`` once per micro-batch."""

    temperature: float

    @abstractmethod
    def update(self, student_ce: float, teacher_ce: float, progress: float) -> float:
        """Advance the policy with this micro-batch's cross-entropies and return the temperature."""

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])


class ConstantTemperature(TemperaturePolicy):
    """Vanilla KD (Hinton et al.): one fixed T for the whole run."""

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature_init must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def update(self, student_ce: float, teacher_ce: float, progress: float) -> float:
        return self.temperature


class CosineTemperature(TemperaturePolicy):
    """Annealing baseline: T = T_min + (T_max - T_min) S(p), from T_max down to T_min."""

    def __init__(self, t_min: float, t_max: float):
        check_temperature_range(t_min, t_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.temperature = self.t_max

    def update(self, student_ce: float, teacher_ce: float, progress: float) -> float:
        self.temperature = self.t_min + (self.t_max - self.t_min) * cosine_factor(progress)
        return self.temperature


class DynamicTemperature(TemperaturePolicy):
    """The Dynamic Temperature Scheduler (DTS, arXiv 2511.13767), as the authors' code computes it.

    Each micro-batch, with the gap d = L_teacher - L_student of the two cross-entropies:

        a = d / (d + 1 + 1e-4)
        target = T_init * S(p) * (1.35 if a > 2 else a)   if a > 1
        target = T_init * S(p)                              otherwise
        T <- momentum * T + (1 - momentum) * clamp(target, T_min, T_max)

    a > 1 happens only when the student's CE exceeds the teacher's by more than 1 nat: the
    temperature is then raised above the cosine schedule (softer targets while the student lags).

    The paper's text writes the gap as L_student - L_teacher. With that sign a = d / (d + 1 + eps)
    is below 1 whenever the student is worse than the teacher (the usual case), so the adaptive
    branch would never fire and DTS would reduce to clamped cosine annealing. We keep the
    reference code's sign, which is the rule behind the published numbers.

    A zero denominator (d exactly -1 - 1e-4) is treated as the reference's float arithmetic
    treats it: d / 0 is -inf there, which takes the plain cosine branch.
    """

    EPS = 1e-4
    A_CAP_THRESHOLD = 2.0
    A_CAP = 1.35

    def __init__(self, t_init: float = 3.0, t_min: float = 1.0, t_max: float = 3.0, momentum: float = 0.9):
        check_temperature_range(t_min, t_max, t_init)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"temperature_momentum must be in [0, 1), got {momentum}")
        self.t_init, self.t_min, self.t_max = float(t_init), float(t_min), float(t_max)
        self.momentum = float(momentum)
        self.temperature = self.t_init

    def target(self, student_ce: float, teacher_ce: float, progress: float) -> float:
        """The clamped temperature the momentum average moves towards."""
        gap = teacher_ce - student_ce
        denominator = gap + 1.0 + self.EPS
        a = gap / denominator if denominator != 0.0 else -math.inf
        target = self.t_init * cosine_factor(progress)
        if a > 1.0:
            target *= self.A_CAP if a > self.A_CAP_THRESHOLD else a
        return min(max(target, self.t_min), self.t_max)

    def update(self, student_ce: float, teacher_ce: float, progress: float) -> float:
        target = self.target(student_ce, teacher_ce, progress)
        self.temperature = self.momentum * self.temperature + (1.0 - self.momentum) * target
        return self.temperature


_POLICY_FACTORIES = {
    "constant": lambda t_init, t_min, t_max, momentum: ConstantTemperature(t_init),
    "cosine": lambda t_init, t_min, t_max, momentum: CosineTemperature(t_min, t_max),
    "dts": DynamicTemperature,
}
TEMPERATURE_POLICIES = tuple(_POLICY_FACTORIES)


def make_temperature_policy(
    name: str, t_init: float, t_min: float, t_max: float, momentum: float
) -> TemperaturePolicy:
    """Build the policy ``name`` from the ``DistillationConfig`` fields; each checks those it uses."""
    if name not in _POLICY_FACTORIES:
        raise ValueError(f"temperature must be one of {TEMPERATURE_POLICIES}, got {name!r}")
    return _POLICY_FACTORIES[name](t_init, t_min, t_max, momentum)
