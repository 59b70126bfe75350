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

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .losses import TOKEN_FEATURES

TEMPERATURE_STATE_NAME = "temperature_policy.json"
LEARNED_TEMPERATURE_NAME = "temperature_policy.safetensors"


def check_temperature_range(t_min: float, t_max: float, t_init: float | None = None) -> None:
    """Raise ``ValueError`` naming the ``DistillationConfig`` field of an invalid temperature bound."""
    if not t_min > 0:
        raise ValueError(f"temperature_min must be > 0, got {t_min}")
    if t_min > t_max:
        raise ValueError(f"temperature_min ({t_min}) must not exceed temperature_max ({t_max})")
    if t_init is not None and not t_min <= t_init <= t_max:
        raise ValueError(f"temperature_init ({t_init}) must lie in [temperature_min, temperature_max] = [{t_min}, {t_max}]")


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


def check_ctkd_settings(t_init: float, t_start: float, t_range: float, lambda_max: float, lambda_epochs: float) -> None:
    """Raise ``ValueError`` naming the field of an invalid CTKD setting (shared by both CTKD policies)."""
    if not t_start > 0:
        raise ValueError(f"ctkd_t_start must be > 0, got {t_start}")
    if not t_range > 0:
        raise ValueError(f"ctkd_t_range must be > 0, got {t_range}")
    if not t_start < t_init < t_start + t_range:
        raise ValueError(
            f"temperature_init ({t_init}) must lie strictly inside (ctkd_t_start, ctkd_t_start + ctkd_t_range)"
            f" = ({t_start}, {t_start + t_range}) for a CTKD temperature"
        )
    if not lambda_max >= 0:
        raise ValueError(f"ctkd_lambda_max must be >= 0, got {lambda_max}")
    if not lambda_epochs >= 0:
        raise ValueError(f"ctkd_lambda_epochs must be >= 0, got {lambda_epochs}")


def check_hidden_size(hidden_size: int) -> None:
    if not hidden_size >= 1:
        raise ValueError(f"ctkd_hidden_size must be >= 1, got {hidden_size}")


def cosine_factor(progress: float) -> float:
    """S(p) = (1 + cos(pi p)) / 2: 1 at the start of training, 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TemperatureContext:
    """What a policy may read at one batch. The cross-entropies and the token features cost a pass
    over the logits: they are computed on first reading, so a policy that ignores them costs nothing.

    ``cross_entropies`` are the student's and the teacher's token-mean CE over every process, or None
    when no process has a scored token in this micro-batch.
    """

    def __init__(
        self,
        epoch: float,
        progress: Callable[[], float],
        cross_entropies: Callable[[], tuple[float, float] | None],
        features: Callable[[], Tensor],
    ):
        self.epoch = epoch
        self._progress, self._cross_entropies, self._features = progress, cross_entropies, features

    @cached_property
    def progress(self) -> float:
        return self._progress()

    @cached_property
    def cross_entropies(self) -> tuple[float, float] | None:
        return self._cross_entropies()

    @cached_property
    def features(self) -> Tensor:
        return self._features()


class TemperaturePolicy(ABC):
    """The one interface the trainer uses: ``step`` on a training micro-batch, ``current`` on an
    evaluation batch; the policy's own parameters (none unless learnt), extra values to log, and its
    checkpoint file."""

    @abstractmethod
    def step(self, context: TemperatureContext) -> float | Tensor:
        """Advance the policy on this training micro-batch and return its temperature."""

    @abstractmethod
    def current(self, context: TemperatureContext) -> float | Tensor:
        """The temperature of an evaluation batch, leaving the policy as it is."""

    def parameters(self):
        """Parameters the trainer's optimizer trains: none for a scheduled policy."""
        return iter(())

    def to(self, device) -> TemperaturePolicy:
        return self

    def logged_values(self, epoch: float) -> dict[str, float]:
        """Values logged beside the temperature at each logging step."""
        return {}

    @abstractmethod
    def save(self, folder: str, settings: dict[str, Any]) -> None:
        """Write the policy's state, and the ``settings`` that decide its trajectory, into a checkpoint folder."""

    @abstractmethod
    def load(self, folder: str, device) -> None:
        """Restore the state saved by ``save``."""


class ScheduledTemperature(TemperaturePolicy):
    """A policy whose temperature follows a rule (no parameters); its state is a small JSON dict."""

    temperature: float

    def current(self, context: TemperatureContext) -> float:
        return self.temperature

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])

    def save(self, folder: str, settings: dict[str, Any]) -> None:
        with open(os.path.join(folder, TEMPERATURE_STATE_NAME), "w") as f:
            json.dump({"settings": settings, "state": self.state_dict()}, f)

    def load(self, folder: str, device) -> None:
        with open(os.path.join(folder, TEMPERATURE_STATE_NAME)) as f:
            saved = json.load(f)
        # Checkpoints of dts-llm 0.1 hold the policy's state alone.
        self.load_state_dict(saved["state"] if "settings" in saved else saved)


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

    def step(self, context: TemperatureContext) -> float:
        """Update from this micro-batch's CEs; one without a scored token on any process changes nothing."""
        cross_entropies = context.cross_entropies
        if cross_entropies is None:
            return self.temperature
        return self.update(*cross_entropies, context.progress)


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


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -weight, so what follows is maximised."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.weight * grad, None


def ctkd_lambda(epoch: float, lambda_max: float, epochs: float) -> float:
    """CTKD's curriculum for the adversarial weight: a cosine from 0 to ``lambda_max`` over the first
    ``epochs`` (fractional) epochs, then held. CTKD writes it as a decay from 0 to -1 and reverses by
    multiplying with it; here the weight is positive and the reversal layer supplies the sign."""
    if epochs <= 0:
        return lambda_max
    return lambda_max * (1.0 - math.cos(math.pi * min(epoch / epochs, 1.0))) / 2.0


class LearnedTemperature(nn.Module, TemperaturePolicy):
    """CTKD (Li et al., AAAI 2023): T = t_start + t_range sigmoid(theta), theta learnt adversarially.

    ``forward(epoch, features)`` returns the temperature tensor for this batch; its gradient reaches
    the parameters reversed and scaled by ``ctkd_lambda(epoch)``, so the trainer's optimizer step,
    which lowers the student's loss, raises the KD loss through T: a curriculum from easy to hard.
    """

    def __init__(self, t_init: float, t_start: float, t_range: float, lambda_max: float, lambda_epochs: float):
        super().__init__()
        check_ctkd_settings(t_init, t_start, t_range, lambda_max, lambda_epochs)
        self.t_start, self.t_range = float(t_start), float(t_range)
        self.lambda_max, self.lambda_epochs = float(lambda_max), float(lambda_epochs)
        fraction = (t_init - t_start) / t_range
        self.initial_logit = math.log(fraction / (1.0 - fraction))

    def adversarial_weight(self, epoch: float) -> float:
        return ctkd_lambda(epoch, self.lambda_max, self.lambda_epochs)

    def logged_values(self, epoch: float) -> dict[str, float]:
        return {"ctkd_lambda": self.adversarial_weight(epoch)}

    def current(self, context: TemperatureContext) -> Tensor:
        return self.step(context)

    def _temperature(self, logits: Tensor, epoch: float) -> Tensor:
        reversed_logits = GradientReversal.apply(logits, self.adversarial_weight(epoch))
        return self.t_start + self.t_range * torch.sigmoid(reversed_logits)

    def save(self, folder: str, settings: dict[str, Any]) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(folder, LEARNED_TEMPERATURE_NAME), metadata={"settings": json.dumps(settings)})

    def load(self, folder: str, device) -> None:
        self.load_state_dict(load_file(os.path.join(folder, LEARNED_TEMPERATURE_NAME), device=str(device)))


class GlobalTemperature(LearnedTemperature):
    """CTKD's global temperature: one learnt scalar for every token."""

    def __init__(self, t_init: float, t_start: float, t_range: float, lambda_max: float, lambda_epochs: float):
        super().__init__(t_init, t_start, t_range, lambda_max, lambda_epochs)
        self.logit = nn.Parameter(torch.tensor(self.initial_logit))

    def forward(self, epoch: float, features: Tensor | None = None) -> Tensor:
        return self._temperature(self.logit, epoch)

    def step(self, context: TemperatureContext) -> Tensor:
        return self(context.epoch)


class InstanceTemperature(LearnedTemperature):
    """CTKD's instance temperature: one T per token from a small MLP over ``losses.token_features``.

    The last layer starts at zero weight and the initial logit as bias, so every token starts at
    ``t_init`` and the MLP learns where to depart from it.
    """

    def __init__(
        self, t_init: float, t_start: float, t_range: float, lambda_max: float, lambda_epochs: float,
        num_features: int, hidden_size: int,
    ):
        super().__init__(t_init, t_start, t_range, lambda_max, lambda_epochs)
        check_hidden_size(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, self.initial_logit)

    def forward(self, epoch: float, features: Tensor | None = None) -> Tensor:
        if features is None:
            raise ValueError("the instance temperature needs the tokens' features")
        return self._temperature(self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1), epoch)

    def step(self, context: TemperatureContext) -> Tensor:
        return self(context.epoch, context.features)


# The DistillationConfig fields that decide each policy's trajectory: saved with a checkpoint and
# compared on resume. `temperature_progress` belongs to the policies whose rule reads the progress.
POLICY_SETTINGS = {
    "constant": ("temperature_init",),
    "cosine": ("temperature_min", "temperature_max", "temperature_progress"),
    "dts": ("temperature_init", "temperature_min", "temperature_max", "temperature_momentum", "temperature_progress"),
    "annealing": ("temperature_max", "annealing_fraction", "temperature_progress"),
    "ctkd": ("temperature_init", "ctkd_t_start", "ctkd_t_range", "ctkd_lambda_max", "ctkd_lambda_epochs"),
    "ctkd_instance": (
        "temperature_init", "ctkd_t_start", "ctkd_t_range", "ctkd_lambda_max", "ctkd_lambda_epochs", "ctkd_hidden_size"
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
    if name == "dts":
        return DynamicTemperature(temperature_init, temperature_min, temperature_max, temperature_momentum)
    if name == "annealing":
        return AnnealingTemperature(temperature_max, annealing_fraction)
    if name == "ctkd":
        return GlobalTemperature(*ctkd)
    if name == "ctkd_instance":
        return InstanceTemperature(*ctkd, len(TOKEN_FEATURES), ctkd_hidden_size)
    raise ValueError(f"temperature_policy must be one of {TEMPERATURE_POLICIES}, got {name!r}")
