"""Scheduled policies: T follows a rule of the progress (and, for DTS, of the two cross-entropies)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .policy import ScheduledTemperature, TemperatureContext


def check_temperature_range(t_min: float, t_max: float, t_init: float | None = None) -> None:
    """Raise ``ValueError`` naming the ``DistillationConfig`` field of an invalid temperature bound."""
    if not t_min > 0:
        raise ValueError(f"temperature_min must be > 0, got {t_min}")
    if t_min > t_max:
        raise ValueError(f"temperature_min ({t_min}) must not exceed temperature_max ({t_max})")
    if t_init is not None and not t_min <= t_init <= t_max:
        raise ValueError(
            f"temperature_init ({t_init}) must lie in [temperature_min, temperature_max] = [{t_min}, {t_max}]"
        )


def check_constant_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature_init must be > 0, got {temperature}")


def check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"temperature_momentum must be in [0, 1), got {momentum}")


def check_annealing_settings(t_max: float, fraction: float) -> None:
    if not t_max >= 1.0:
        raise ValueError(f"temperature_max must be >= 1 for annealing, got {t_max}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"annealing_fraction must be in (0, 1], got {fraction}")


def cosine_factor(progress: float) -> float:
    """S(p) = (1 + cos(pi p)) / 2: 1 at the start of training, 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ConstantTemperature(ScheduledTemperature):
    """Vanilla KD (Hinton et al.): one fixed T for the whole run."""

    def __init__(self, temperature: float):
        check_constant_temperature(temperature)
        self.temperature = float(temperature)

    def update(self, student_ce: float | None, teacher_ce: float | None, progress: float) -> float:
        return self.temperature

    def step(self, context: TemperatureContext) -> float:
        return self.temperature


class CosineTemperature(ScheduledTemperature):
    """Annealing baseline: T = T_min + (T_max - T_min) S(p), from T_max down to T_min."""

    def __init__(self, t_min: float, t_max: float):
        check_temperature_range(t_min, t_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.temperature = self.t_max

    def update(self, student_ce: float | None, teacher_ce: float | None, progress: float) -> float:
        self.temperature = self.t_min + (self.t_max - self.t_min) * cosine_factor(progress)
        return self.temperature

    def step(self, context: TemperatureContext) -> float:
        return self.update(None, None, context.progress)


class DTSStep(NamedTuple):
    """What one DTS update computed: the gap d, the adaptive scale a, whether its branch fired (a > 1),
    S(p), and the clamped target (floats, or tensors of one value per sequence or token)."""

    gap: float | Tensor
    a: float | Tensor
    fired: bool | Tensor
    cosine: float
    target: float | Tensor


class DTSWindow:
    """The DTS diagnostics of one logging window: each quantity's mean over the window's updates, and
    the fraction of them in which the adaptive branch fired. Every process computes the same values
    (from the CEs summed over processes), so no collective is needed."""

    NAMES = ("dts_gap", "dts_a", "dts_fired", "dts_cosine")

    def __init__(self):
        self.sums, self.count = [0.0] * len(self.NAMES), 0

    def add(self, step: DTSStep) -> None:
        for i, value in enumerate((step.gap, step.a, float(step.fired), step.cosine)):
            self.sums[i] += value
        self.count += 1

    def flush(self) -> dict[str, float]:
        """The window's means (nothing when no update happened in it); then start a new window."""
        count, sums = self.count, self.sums
        self.sums, self.count = [0.0] * len(self.NAMES), 0
        return {name: total / count for name, total in zip(self.NAMES, sums, strict=True)} if count else {}


class DynamicTemperature(ScheduledTemperature):
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

    Each logging step logs the rule's quantities beside the temperature, averaged over the window's
    updates: ``dts_gap`` (d), ``dts_a`` (a), ``dts_fired`` (the fraction of updates with a > 1) and
    ``dts_cosine`` (S(p)).

    A zero denominator (d exactly -1 - 1e-4) is treated as the reference's float arithmetic
    treats it: d / 0 is -inf there, which takes the plain cosine branch.
    """

    EPS = 1e-4
    A_CAP_THRESHOLD = 2.0
    A_CAP = 1.35

    def __init__(self, t_init: float = 3.0, t_min: float = 1.0, t_max: float = 3.0, momentum: float = 0.9):
        check_temperature_range(t_min, t_max, t_init)
        check_momentum(momentum)
        self.t_init, self.t_min, self.t_max = float(t_init), float(t_min), float(t_max)
        self.momentum = float(momentum)
        self.temperature = self.t_init
        self.window = DTSWindow()

    def rules(self, student_ce: Tensor, teacher_ce: Tensor, progress: float) -> DTSStep:
        """The rule elementwise on float64 tensors of CEs: one DTS per batch, sequence or token.

        d / 0 is -inf for the only zero denominator (d = -1 - 1e-4), as in the reference's floats.
        """
        gap = self.gap(student_ce, teacher_ce)
        a = gap / (gap + 1.0 + self.EPS)
        cosine = cosine_factor(progress)
        fired = a > 1.0
        scale = torch.where(fired, torch.where(a > self.A_CAP_THRESHOLD, self.A_CAP, a), 1.0)
        return DTSStep(gap, a, fired, cosine, (self.t_init * cosine * scale).clamp(self.t_min, self.t_max))

    def rule(self, student_ce: float, teacher_ce: float, progress: float) -> DTSStep:
        """One application of the rule, with the quantities it went through (logged as diagnostics)."""
        step = self.rules(*(torch.tensor(ce, dtype=torch.float64) for ce in (student_ce, teacher_ce)), progress)
        return DTSStep(step.gap.item(), step.a.item(), bool(step.fired), step.cosine, step.target.item())

    @staticmethod
    def gap(student_ce: float, teacher_ce: float) -> float:
        """d, with the reference code's sign."""
        return teacher_ce - student_ce

    def target(self, student_ce: float, teacher_ce: float, progress: float) -> float:
        """The clamped temperature the momentum average moves towards."""
        return self.rule(student_ce, teacher_ce, progress).target

    def update(self, student_ce: float, teacher_ce: float, progress: float) -> float:
        step = self.rule(student_ce, teacher_ce, progress)
        self.window.add(step)
        self.temperature = self.momentum * self.temperature + (1.0 - self.momentum) * step.target
        return self.temperature

    def step(self, context: TemperatureContext) -> float:
        """Update from this micro-batch's CEs; one without a scored token on any process changes nothing."""
        cross_entropies = context.cross_entropies
        if cross_entropies is None:
            return self.temperature
        return self.update(*cross_entropies, context.progress)

    def logged_values(self, epoch: float) -> dict[str, float]:
        """The rule's quantities averaged over the micro-batches of the logging window (see ``DTSWindow``)."""
        return self.window.flush()


class PaperDynamicTemperature(DynamicTemperature):
    """DTS with the gap as the paper's text writes it, d = L_student - L_teacher (policy ``dts_paper``).

    a = d / (d + 1 + 1e-4) exceeds 1 only when the denominator is negative, d < -1 - 1e-4: the student
    beats the teacher by more than 1 nat. While the student lags (d > 0) a < 1, the branch never fires
    and the rule is the clamped cosine T_init S(p) under the momentum average; ``dts_fired`` shows it.
    """

    @staticmethod
    def gap(student_ce: float, teacher_ce: float) -> float:
        return student_ce - teacher_ce


class AnnealingTemperature(ScheduledTemperature):
    """Annealing-KD's schedule (Jafari et al., EACL 2021): two phases instead of a softened KL.

    Phase 1 (the first ``fraction`` of training) fits the student's logits to the teacher's scaled by
    Phi(T) = 1 - (T - 1) / T_max (an MSE, no CE), with T stepping down 1 at a time from T_max to 1
    over ``ceil(T_max)`` equal stages; phase 2 trains on the labels alone (CE). The teacher's targets
    thus start flat (Phi = 1 / T_max) and sharpen to its own logits. The schedule decides T and the
    phase; ``dts_llm.objectives.AnnealingObjective`` turns them into the loss.
    """

    def __init__(self, t_max: float, fraction: float):
        check_annealing_settings(t_max, fraction)
        self.t_max, self.fraction = float(t_max), float(fraction)
        self.temperature = self.t_max
        self.distilling = True

    @property
    def teacher_scale(self) -> float:
        """Phi(T): the factor on the teacher's logits in phase 1."""
        return 1.0 - (self.temperature - 1.0) / self.t_max

    def update(self, student_ce: float | None, teacher_ce: float | None, progress: float) -> float:
        self.distilling = progress <= self.fraction
        stages = math.ceil(self.t_max)
        stage = min(max(math.ceil(progress / self.fraction * stages) - 1, 0), stages - 1)
        self.temperature = max(self.t_max - stage, 1.0) if self.distilling else 1.0
        return self.temperature

    def step(self, context: TemperatureContext) -> float:
        return self.update(None, None, context.progress)

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "distilling": self.distilling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature, self.distilling = float(state["temperature"]), bool(state["distilling"])
