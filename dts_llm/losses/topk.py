"""Distilling from a compact teacher: the divergence over k + 1 buckets, the teacher's top-k tokens and the rest.

The student is read in full: its top-k log-probabilities at the teacher's ids and its tail bucket,
the log of the mass it puts on every other token. Any divergence of ``divergences`` then runs on
the k + 1 buckets as on a small vocabulary, and its gradient reaches the student's full logits by
the chain rule: a top-k column takes its bucket's gradient, a tail column j takes the tail bucket's
gradient times q_j / Q_tail (the tail's share of it). The bucketed value is the divergence between
the coarsened distributions: by the data-processing inequality it is at most the full one for every
f-divergence, which all six of ``DIVERGENCES`` are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .chunks import Chunk, Reads, TokenTerms
from .compact import CompactLayout, compact_teacher_rows, teacher_bucket_log_probs
from .divergences import Divergence
from .kernels import squared, tempered_log_probs

RANGE_SLACK = 1e-9  # relative: 1 / (1 / T) need not give T back to the last bit


@dataclass(frozen=True, eq=False)
class TopKTeacher:
    """A compact teacher, accepted by ``distillation_objective`` in place of dense teacher logits.

    ``packed`` is ``[B, L, CompactLayout(k, len(betas)).width]``, aligned position for position with
    the student's logits as dense teacher logits would be (rows at unscored positions are ignored);
    ``betas`` the ascending inverse-temperature grid it was packed at, which bounds the temperatures
    it can be read at. Its ids index the student's vocabulary.
    """

    packed: Tensor
    betas: Tensor
    k: int

    def __post_init__(self):
        if self.betas.dim() != 1 or self.betas.numel() < 2 or not bool((self.betas.diff() > 0).all()):
            raise ValueError("betas must be an ascending 1-dim grid of at least 2 inverse temperatures")
        if self.packed.size(-1) != self.layout.width:
            raise ValueError(
                f"packed rows of width {self.packed.size(-1)} do not hold k={self.k} over {self.betas.numel()} "
                f"inverse temperatures (width {self.layout.width})"
            )

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, betas: Tensor) -> TopKTeacher:
        """Dense teacher logits ``[..., V]`` packed (what the offline cache stores, built in memory)."""
        rows = compact_teacher_rows(logits.reshape(-1, logits.size(-1)), k, betas)
        return cls(rows.view(*logits.shape[:-1], -1), betas, k)

    @property
    def layout(self) -> CompactLayout:
        return CompactLayout(self.k, self.betas.numel())

    @property
    def temperature_range(self) -> tuple[float, float]:
        return 1.0 / float(self.betas[-1]), 1.0 / float(self.betas[0])

    def check(self, temperature: Tensor | float, teacher_cross_entropy: bool) -> None:
        """Refuse what a compact teacher cannot give: the teacher's CE, d loss / dT, a T off its grid."""
        if teacher_cross_entropy:
            raise ValueError(
                "teacher_cross_entropy=True needs the teacher's log-probability of every label, which a "
                "TopKTeacher does not hold for labels outside its top-k: the cache stores it on its own"
            )
        if torch.is_tensor(temperature) and temperature.requires_grad:
            raise ValueError(
                "a learnt temperature (CTKD, a tensor that requires grad) needs d loss / dT through the teacher's "
                "whole distribution, which a TopKTeacher does not hold; pass a detached temperature or dense logits"
            )
        beta = 1.0 / torch.as_tensor(temperature, dtype=torch.float64).detach()
        lowest, highest = float(self.betas[0]) * (1 - RANGE_SLACK), float(self.betas[-1]) * (1 + RANGE_SLACK)
        if beta.numel() and not bool(((beta >= lowest) & (beta <= highest)).all()):
            t_min, t_max = self.temperature_range
            raise ValueError(
                f"temperature {_span(temperature)} is outside the TopKTeacher's range [{t_min:g}, {t_max:g}] "
                "(the grid its tail was stored at)"
            )


def _span(temperature: Tensor | float) -> str:
    if torch.is_tensor(temperature) and temperature.numel() > 1:
        return f"[{float(temperature.min()):g}, {float(temperature.max()):g}]"
    return f"{float(temperature):g}"


def refuse_compact(teacher: object, where: str) -> None:
    """Refuse a TopKTeacher where dense teacher logits are needed."""
    if isinstance(teacher, TopKTeacher):
        raise TypeError(
            f"{where} needs the teacher's dense logits; a TopKTeacher holds only its top-k tokens "
            "(use distillation_objective with it)"
        )


@dataclass(frozen=True)
class BucketedDivergence:
    """T^2 D over the k + 1 buckets at the chunk's temperature per row, and ``grad_weight`` x its gradient
    w.r.t. the student's logits (x T, as ``TemperedDivergence``). The student's rows (log-probabilities
    at T = 1) are consumed; the teacher's arrive packed. With k = V there is no tail bucket.
    """

    divergence: Divergence
    betas: Tensor
    reads: ClassVar[Reads] = Reads.LOG_PROBS

    def __call__(self, chunk: Chunk, grad_weight: float = 1.0) -> TokenTerms:
        temperature = chunk.temperature
        layout = CompactLayout.of(chunk.teacher, self.betas.numel())
        ids = layout.token_ids(chunk.teacher)
        student_logp = tempered_log_probs(chunk.student, temperature, self.reads)
        teacher_buckets = teacher_bucket_log_probs(chunk.teacher, self.betas, temperature)
        has_tail = student_logp.size(-1) > layout.k
        student_top = student_logp.gather(1, ids)
        if has_tail:
            tail_logp = student_logp.scatter_(1, ids, -math.inf)
            student_tail = tail_logp.logsumexp(-1, keepdim=True)
            student_buckets = torch.cat([student_top, student_tail], 1)
        else:
            student_buckets, teacher_buckets = student_top, teacher_buckets[:, : layout.k]
        terms = self.divergence(student_buckets, teacher_buckets, chunk.need_grad)
        value = terms.value * squared(temperature)
        if not chunk.need_grad:
            return TokenTerms(value, None)
        bucket_grad = terms.grad.mul_(grad_weight * temperature)
        if has_tail:  # d/dz_j = g_tail q_j / Q_tail off the top-k (exp(-inf) = 0 on it)
            grad = tail_logp.sub_(student_tail).exp_().mul_(bucket_grad[:, layout.k :])
        else:
            grad = student_logp.zero_()
        return TokenTerms(value, grad.scatter_(1, ids, bucket_grad[:, : layout.k]))
