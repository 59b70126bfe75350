"""The objective the trainer minimises on a classifier's or causal LM's logits (or, with ``fused_head``, on
the models' final hidden states): the loss the config chooses, bound to its settings. Annealing-KD is its
own objective, driven by its schedule's phase."""

from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor

from .config import DistillationConfig
from .fused_step import FusedHeads
from .losses import (
    annealing_objective,
    causal_lm_cross_entropy,
    distillation_objective,
    tempered_entropies,
    token_cross_entropies,
    token_features,
)
from .temperature import AnnealingTemperature, TemperaturePolicy


class DistillationObjective:
    """(1 - kd_ratio) CE + kd_ratio x the divergence at the policy's temperature (times T^2; the teacher's
    distribution at ``teacher_temperature_ratio`` x T); with ``heads``, of the hidden states through them."""

    def __init__(self, args: DistillationConfig, heads: FusedHeads | None = None):
        self.kd_ratio, self.divergence = args.kd_ratio, args.divergence
        self.jsd_beta, self.skew_lambda = args.jsd_beta, args.skew_lambda
        self.teacher_temperature_ratio = args.teacher_temperature_ratio
        self.loss = distillation_objective if heads is None else heads.objective

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, temperature, **common):
        return self.loss(
            student_logits,
            teacher_logits,
            kd_ratio=self.kd_ratio,
            divergence=self.divergence,
            temperature=temperature,
            jsd_beta=self.jsd_beta,
            skew_lambda=self.skew_lambda,
            teacher_temperature_ratio=self.teacher_temperature_ratio,
            **common,
        )


class AnnealingObjective:
    """Annealing-KD: an MSE to the teacher's logits scaled by the schedule's Phi(T) while it is in its
    first phase, then CE alone; the schedule, stepped as the temperature policy, decides both; with ``heads``, of
    the hidden states through them."""

    def __init__(self, schedule: AnnealingTemperature, heads: FusedHeads | None = None):
        self.schedule = schedule
        self.loss = annealing_objective if heads is None else heads.annealing_objective

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, temperature, **common):
        kd_ratio = 1.0 if self.schedule.distilling else 0.0
        return self.loss(
            student_logits, teacher_logits, kd_ratio=kd_ratio, teacher_scale=self.schedule.teacher_scale, **common
        )


def make_objective(args: DistillationConfig, policy: TemperaturePolicy, heads: FusedHeads | None = None):
    """The objective of ``args``; Annealing-KD's reads ``policy``, its schedule; ``heads``: the fused head's."""
    if args.temperature_policy == "annealing":
        return AnnealingObjective(policy, heads)
    return DistillationObjective(args, heads)


def cross_entropy_sums(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, **sizes):
    """The student's and (given its logits) the teacher's CE summed over the scored labels (no graph; what
    DTS reads), as ``FusedHeads.cross_entropy_sums`` gives them from hidden states."""
    student = causal_lm_cross_entropy(student_logits, labels, reduction="sum", **sizes)
    if teacher_logits is None:
        return student, None
    return student, causal_lm_cross_entropy(teacher_logits, labels, reduction="sum", **sizes)


# The no-grad passes over both models' outputs that the policies and log_entropy read, on the logits;
# `dts_llm.fused_step.FusedHeads` offers the same on hidden states.
LOGITS_PASSES = SimpleNamespace(
    cross_entropy_sums=cross_entropy_sums,
    token_features=token_features,
    token_cross_entropies=token_cross_entropies,
    tempered_entropies=tempered_entropies,
)
