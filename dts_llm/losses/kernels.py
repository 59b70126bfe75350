"""The kernels: what each objective computes on one chunk of rows, value and gradient together.

A kernel's ``reads`` says whether the chunk engine hands it logits or log-probabilities at T = 1,
and the same attribute tells the kernel how to read its rows, so the two cannot disagree.
A KD term also takes ``grad_weight``, its weight in a mix, applied to its gradient as it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .chunks import Chunk, Reads, TokenTerms, _log_softmax_
from .divergences import Divergence


class KDTerm(Protocol):
    """A kernel whose gradient can be weighted as it is written (the KD side of a mix)."""

    reads: Reads

    def __call__(self, chunk: Chunk, grad_weight: float = 1.0) -> TokenTerms: ...


def _cross_entropy_terms(log_probs: Tensor, targets: Tensor, need_grad: bool, overwrite: bool) -> TokenTerms:
    """-log p[y] per row from log-probabilities; gradient w.r.t. the logits p - onehot(y), written
    over ``log_probs`` when ``overwrite`` (else into a new tensor)."""
    value = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if not need_grad:
        return TokenTerms(value, None)
    grad = log_probs.exp_() if overwrite else log_probs.exp()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    return TokenTerms(value, grad)


class CrossEntropy:
    """The student's next-token cross-entropy, its gradient written over the chunk's log-probabilities."""

    reads: ClassVar[Reads] = Reads.LOG_PROBS

    def __call__(self, chunk: Chunk) -> TokenTerms:
        return _cross_entropy_terms(chunk.student, chunk.targets, chunk.need_grad, overwrite=True)


def tempered_log_probs(rows: Tensor, temperature: Tensor | float, reads: Reads) -> Tensor:
    """log softmax(rows / temperature), in place, for rows holding what ``reads`` says. Log-probabilities
    at T = 1 are the logits shifted per row, which changes no softmax, so they are divided just the same."""
    if isinstance(temperature, float) and temperature == 1.0:
        return rows if reads is Reads.LOG_PROBS else _log_softmax_(rows)
    return _log_softmax_(rows.div_(temperature))


def _sharpening_tangent(log_probs: Tensor) -> Tensor:
    """d/dc log_softmax(c s) at c = 1, for log_probs = log_softmax(s): s - E[s], i.e. lp - E[lp]."""
    return log_probs - (log_probs.exp() * log_probs).sum(-1, keepdim=True)


@dataclass(frozen=True)
class TemperedDivergence:
    """T^2 D(teacher, student) at the chunk's temperature per row, and ``grad_weight`` x its gradient
    w.r.t. the logits z: d(T^2 D)/dz = T^2 dD/ds ds/dz = T dD/ds with s = z / T.

    The rows (logits, or log-probabilities at T = 1, as ``reads`` says) are consumed. With a learnt
    temperature the divergence also runs in forward-mode AD along the direction that sharpens both
    distributions (logits times c, at c = 1): that gives d_scale = <dD/ds, s> + <dD/du, u> for
    s = z_s / T, u = z_t / T, and since s and u are z / T, d(T^2 D)/dT = 2 T D - T d_scale, exactly
    and for every divergence, in one extra pass. The two terms nearly cancel when the distributions
    are flat, and each sums a whole vocabulary: in fp32 the rounding (~1e-6 per token at 50k) can
    exceed the true derivative, which Adam would follow as if it were signal, so this path runs in
    float64.

    With ``teacher_ratio`` r the teacher's distribution is taken at r T and the student's at T (decoupled
    temperatures); the factor stays the student's T^2, the T its logits are divided by.
    """

    divergence: Divergence
    reads: Reads
    teacher_ratio: float = 1.0

    def __call__(self, chunk: Chunk, grad_weight: float = 1.0) -> TokenTerms:
        student_rows, teacher_rows, temperature = chunk.student, chunk.teacher, chunk.temperature
        if chunk.need_temperature_grad:
            student_rows, teacher_rows = student_rows.double(), teacher_rows.double()
        student_logp = tempered_log_probs(student_rows, temperature, self.reads)
        teacher_t = teacher_temperature(temperature, self.teacher_ratio)
        teacher_logp = tempered_log_probs(teacher_rows, teacher_t, self.reads)
        if chunk.need_temperature_grad:
            return self._with_temperature_grad(student_logp, teacher_logp, temperature, chunk.need_grad, grad_weight)
        terms = self.divergence(student_logp, teacher_logp, chunk.need_grad)
        weight = grad_weight * temperature
        unweighted = isinstance(weight, float) and weight == 1.0
        grad = terms.grad.mul_(weight) if chunk.need_grad and not unweighted else terms.grad
        return TokenTerms(terms.value * squared(temperature), grad)

    def _with_temperature_grad(
        self, student_logp: Tensor, teacher_logp: Tensor, temperature: Tensor, need_grad: bool, grad_weight: float
    ) -> TokenTerms:
        """The terms, and d(T^2 D)/dT per row from one forward-mode pass along the sharpening direction."""
        with forward_ad.dual_level():
            student_dual = forward_ad.make_dual(student_logp, _sharpening_tangent(student_logp))
            teacher_dual = forward_ad.make_dual(teacher_logp, _sharpening_tangent(teacher_logp))
            terms = self.divergence(student_dual, teacher_dual, need_grad)
            value, d_scale = forward_ad.unpack_dual(terms.value)
            grad = forward_ad.unpack_dual(terms.grad).primal.mul_(grad_weight * temperature) if need_grad else None
        temperature_grad = temperature.view(-1) * (2.0 * value - d_scale)
        return TokenTerms(value * squared(temperature), grad, temperature_grad=temperature_grad)


def teacher_temperature(temperature: Tensor | float, ratio: float) -> Tensor | float:
    """The teacher's T: ``ratio`` times the student's (the same T, untouched, for ratio 1)."""
    return temperature if ratio == 1.0 else temperature * ratio


def squared(temperature: Tensor | float) -> Tensor | float:
    """T^2 per row (a column temperature flattened to match the per-row values)."""
    per_row = temperature.view(-1) if torch.is_tensor(temperature) else temperature
    return per_row * per_row


@dataclass(frozen=True)
class ScaledTeacherMSE:
    """Annealing-KD's term: mean over the vocabulary of (z_s - teacher_scale z_t)^2, on raw logits."""

    teacher_scale: float
    reads: ClassVar[Reads] = Reads.LOGITS

    def __post_init__(self):
        if not self.teacher_scale > 0:
            raise ValueError(f"teacher_scale must be positive, got {self.teacher_scale}")

    def __call__(self, chunk: Chunk, grad_weight: float = 1.0) -> TokenTerms:
        diff = chunk.teacher.mul_(-self.teacher_scale).add_(chunk.student)
        value = diff.square().mean(-1)
        return TokenTerms(value, diff.mul_(2.0 * grad_weight / diff.size(-1)) if chunk.need_grad else None)


@dataclass(frozen=True)
class MixedWithCrossEntropy:
    """(1 - kd_ratio) CE + kd_ratio ``kd`` per row, one gradient for both; the parts are the KD and
    CE values (and the teacher's CE when asked), read from the rows already in hand.

    It reads what its KD term reads: log-probabilities, which the CEs then share (one log-softmax
    per model for both), or logits, which the KD term needs intact (the CEs get their own).
    """

    kd: KDTerm
    kd_ratio: float
    teacher_cross_entropy: bool

    @property
    def reads(self) -> Reads:
        return self.kd.reads

    def __call__(self, chunk: Chunk) -> TokenTerms:
        kd_ratio = self.kd_ratio
        student_logp, teacher_logp = self._log_probs(chunk)
        # kd_ratio = 1: the CE is only logged
        ce = _cross_entropy_terms(student_logp, chunk.targets, chunk.need_grad and kd_ratio < 1.0, overwrite=False)
        columns = [ce.value]
        if self.teacher_cross_entropy:
            columns.append(_cross_entropy_terms(teacher_logp, chunk.targets, False, overwrite=False).value)
        del student_logp, teacher_logp
        kd = self.kd(chunk, kd_ratio)
        grad = kd.grad if ce.grad is None else kd.grad.add_(ce.grad, alpha=1.0 - kd_ratio)
        temperature_grad = None if kd.temperature_grad is None else kd_ratio * kd.temperature_grad
        value = (1.0 - kd_ratio) * ce.value + kd_ratio * kd.value
        return TokenTerms(value, grad, torch.stack([kd.value, *columns], 1), temperature_grad)

    def _log_probs(self, chunk: Chunk) -> tuple[Tensor, Tensor | None]:
        """The student's and (when its CE is reported) the teacher's log-probabilities at T = 1."""
        if self.reads is Reads.LOG_PROBS:
            return chunk.student, chunk.teacher
        teacher_logp = chunk.teacher.log_softmax(-1) if self.teacher_cross_entropy else None
        return chunk.student.log_softmax(-1), teacher_logp


@dataclass(frozen=True)
class TemperedEntropies:
    """Per row, the teacher's entropy at ``teacher_ratio`` x the chunk's temperature and the student's at
    that temperature, as parts (no loss, no gradient)."""

    teacher_ratio: float = 1.0
    reads: ClassVar[Reads] = Reads.LOGITS

    def __call__(self, chunk: Chunk) -> TokenTerms:
        probs = torch.empty_like(chunk.student)
        entropies = []
        teacher_t = teacher_temperature(chunk.temperature, self.teacher_ratio)
        for rows, temperature in ((chunk.teacher, teacher_t), (chunk.student, chunk.temperature)):
            log_probs = tempered_log_probs(rows, temperature, Reads.LOGITS)
            # -sum p log p as one batched dot product: no product tensor the size of the chunk
            entropies.append(-(torch.exp(log_probs, out=probs)[:, None, :] @ log_probs[:, :, None]).flatten())
        parts = torch.stack(entropies, 1)
        return TokenTerms(parts.new_zeros(len(parts)), None, parts)
