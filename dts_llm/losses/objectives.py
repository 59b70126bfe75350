"""The public objectives: each checks its inputs, picks its kernel and runs the chunk engine."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .chunks import ChunkReader, Kernel, Reader, Reads, chunked_loss, default_chunk_size, read_loss
from .divergences import divergence_terms
from .kernels import (
    CrossEntropy,
    KDTerm,
    MixedWithCrossEntropy,
    ScaledTeacherMSE,
    TemperedDivergence,
    TemperedEntropies,
)
from .rows import (
    check_kd_ratio,
    check_pair,
    check_temperature,
    response_rows,
    response_targets,
    scored_vocab,
)
from .topk import BucketedDivergence, TopKTeacher, refuse_compact


def causal_lm_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    num_items_in_batch: Tensor | int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    shift_labels: bool = True,
) -> Tensor:
    """Next-token cross-entropy over response tokens (``labels != -100``) in fp32 chunks.

    Averaged over those tokens (or divided by ``num_items_in_batch``), or summed with
    ``reduction="sum"``. ``shift_labels=False``: plain cross-entropy of a classification head.
    """
    vocab_size = scored_vocab(vocab_size, logits)
    rows, targets = response_targets(labels, logits, vocab_size, shift_labels)
    loss, _ = chunked_loss(
        CrossEntropy(),
        logits,
        None,
        rows,
        targets,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
    )
    return loss


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: Tensor | float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    num_items_in_batch: Tensor | int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """T^2 x divergence(teacher, student) at temperature T, averaged over response tokens.

    The teacher receives no gradient. Logits wider than ``vocab_size`` (padded embeddings) are cut
    to it; by default both are cut to the narrower of the two. ``temperature`` may be a tensor
    (a scalar, or one value per response token in ``response_rows`` order); the loss is then
    differentiable with respect to it. A ``TopKTeacher`` is refused: ``distillation_objective`` takes it.
    """
    refuse_compact(teacher_logits, "distillation_loss")
    check_pair(student_logits, teacher_logits)
    kernel = TemperedDivergence(divergence_terms(divergence, jsd_beta, skew_lambda), reads=Reads.LOGITS)
    vocab_size = scored_vocab(vocab_size, student_logits, teacher_logits)
    rows, targets = response_rows(labels, student_logits)
    temperature = check_temperature(temperature, rows.numel())
    loss, _ = chunked_loss(
        kernel,
        student_logits,
        teacher_logits,
        rows,
        targets,
        temperature=temperature,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
    )
    return loss


class DistillationTerms(NamedTuple):
    """The training objective and, detached, the two terms it mixes (and the teacher's CE when asked)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    teacher_ce: Tensor | None = None


def _mixed_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kd: KDTerm,
    *,
    kd_ratio: float,
    temperature: Tensor | float | None,
    num_items_in_batch: Tensor | int | None,
    vocab_size: int | None,
    chunk_size: int | None,
    reduction: str,
    shift_labels: bool,
    teacher_cross_entropy: bool,
    packed_teacher: bool = False,
) -> DistillationTerms:
    """(1 - kd_ratio) CE + kd_ratio ``kd`` in one chunked pass with one gradient buffer; a packed
    teacher's width is its own, not a vocabulary."""
    kd_ratio = check_kd_ratio(kd_ratio)
    check_pair(student_logits, teacher_logits)
    vocab_size = scored_vocab(vocab_size, student_logits, None if packed_teacher else teacher_logits)
    rows, targets = response_targets(labels, student_logits, vocab_size, shift_labels)
    if temperature is not None:
        temperature = check_temperature(temperature, rows.numel())
    kernel: Kernel = MixedWithCrossEntropy(kd, kd_ratio, teacher_cross_entropy)
    loss, parts = chunked_loss(
        kernel,
        student_logits,
        teacher_logits,
        rows,
        targets,
        temperature=temperature,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        packed_teacher=packed_teacher,
    )
    return mixed_terms(loss, parts, teacher_cross_entropy)


def mixed_terms(loss: Tensor, parts: Tensor, teacher_cross_entropy: bool) -> DistillationTerms:
    """A mix's terms from its loss and the parts ``MixedWithCrossEntropy`` reports (none: no response token)."""
    if parts.numel() == 0:  # no response token: every term is zero
        parts = torch.zeros(3 if teacher_cross_entropy else 2, device=loss.device)
    return DistillationTerms(loss, kd=parts[0], ce=parts[1], teacher_ce=parts[2] if teacher_cross_entropy else None)


def divergence_kernel(
    teacher: Tensor | TopKTeacher,
    divergence: str,
    jsd_beta: float,
    skew_lambda: float,
    temperature: Tensor | float,
    teacher_cross_entropy: bool,
    teacher_temperature_ratio: float,
) -> KDTerm:
    """The KD term of a distillation objective: over a ``TopKTeacher``'s k + 1 buckets (after refusing what its
    rows cannot give), or the divergence at T of dense rows read as log-probabilities, which the CE terms then
    share."""
    terms = divergence_terms(divergence, jsd_beta, skew_lambda)
    if not isinstance(teacher, TopKTeacher):
        return TemperedDivergence(terms, reads=Reads.LOG_PROBS, teacher_ratio=teacher_temperature_ratio)
    if teacher_temperature_ratio != 1.0:
        raise ValueError("teacher_temperature_ratio needs the teacher's dense logits, not a TopKTeacher")
    teacher.check(temperature, teacher_cross_entropy)
    return BucketedDivergence(terms, teacher.betas)


def distillation_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKTeacher,
    labels: Tensor,
    *,
    kd_ratio: float,
    divergence: str = "forward_kl",
    temperature: Tensor | float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    num_items_in_batch: Tensor | int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    shift_labels: bool = True,
    teacher_cross_entropy: bool = False,
    teacher_temperature_ratio: float = 1.0,
) -> DistillationTerms:
    """(1 - kd_ratio) CE + kd_ratio KD in one chunked pass with one gradient buffer.

    The same values as ``causal_lm_cross_entropy`` and ``distillation_loss`` mixed, for about the
    memory of one of them: the student's logits are read once and their gradient written once.
    ``shift_labels=False`` distils a classification head (logits ``[B, C]``, labels ``[B]``). A
    tensor ``temperature`` (scalar or per scored token) receives d loss / dT (CTKD).
    ``teacher_cross_entropy=True`` fills ``teacher_ce`` in the same pass, instead of another one.

    A ``TopKTeacher`` in place of the logits gives the KD over its k + 1 buckets (``topk``), at any
    temperature in its range (a float, or one per scored token), without ``teacher_ce`` or a learnt T.

    ``teacher_temperature_ratio`` r: the teacher's distribution at r T, the student's at T, the KD term
    times the student's T^2 (dense teacher logits only).
    """
    kd = divergence_kernel(
        teacher_logits,
        divergence,
        jsd_beta,
        skew_lambda,
        temperature,
        teacher_cross_entropy,
        teacher_temperature_ratio,
    )
    packed_teacher = isinstance(teacher_logits, TopKTeacher)
    if packed_teacher:
        teacher_logits = teacher_logits.packed
    return _mixed_objective(
        student_logits,
        teacher_logits,
        labels,
        kd,
        kd_ratio=kd_ratio,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        reduction=reduction,
        shift_labels=shift_labels,
        teacher_cross_entropy=teacher_cross_entropy,
        packed_teacher=packed_teacher,
    )


def annealing_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kd_ratio: float,
    teacher_scale: float,
    num_items_in_batch: Tensor | int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    shift_labels: bool = True,
    teacher_cross_entropy: bool = False,
) -> DistillationTerms:
    """(1 - kd_ratio) CE + kd_ratio MSE(z_s, teacher_scale z_t) (Annealing-KD, Jafari et al. 2021).

    The MSE is between raw logits, averaged over the vocabulary: Annealing-KD's first phase fits
    the teacher's logits scaled by Phi(T) = 1 - (T - 1) / T_max while T falls from T_max to 1.
    """
    refuse_compact(teacher_logits, "annealing_objective")
    return _mixed_objective(
        student_logits,
        teacher_logits,
        labels,
        ScaledTeacherMSE(float(teacher_scale)),
        kd_ratio=kd_ratio,
        temperature=None,
        num_items_in_batch=num_items_in_batch,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        reduction=reduction,
        shift_labels=shift_labels,
        teacher_cross_entropy=teacher_cross_entropy,
    )


def dense_pair_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int | None, where: str) -> int:
    """The vocabulary scored by a per-token reading of both distributions, after refusing a compact teacher or
    logits that do not pair."""
    refuse_compact(teacher_logits, where)
    check_pair(student_logits, teacher_logits)
    return scored_vocab(vocab_size, student_logits, teacher_logits)


TOKEN_FEATURES = ("teacher_entropy", "student_entropy", "teacher_top1", "student_top1", "log1p_kl")


@torch.no_grad()
def token_features(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    shift_labels: bool = True,
) -> Tensor:
    """``[tokens, 5]`` features of the two distributions at T = 1 for each scored token, in
    ``response_rows`` order: entropies over log V, top-1 probabilities, log(1 + KL(p || q)).

    What CTKD's instance temperature sees in place of the concatenated logits (2 x 50k values per
    token would be wider than the model); every feature lies in [0, 1] or grows slowly.
    """
    vocab_size = dense_pair_vocab(student_logits, teacher_logits, vocab_size, "token_features")
    rows, _ = response_rows(labels, student_logits, shift_labels)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), vocab_size)
    reader = ChunkReader(student_logits, teacher_logits, rows, vocab_size, chunk_size)
    return read_token_features(reader, vocab_size, student_logits.device)


@torch.no_grad()
def read_token_features(reader: ChunkReader | Reader, vocab_size: int, device) -> Tensor:
    """``token_features`` of the rows ``reader`` gives."""
    log_vocab = math.log(vocab_size) if vocab_size > 1 else 1.0
    features = []
    for _, _, _, student_logp, teacher_logp in reader.read(Reads.LOG_PROBS):
        p, q = teacher_logp.exp(), student_logp.exp()
        teacher_entropy = -(p * teacher_logp).sum(-1)
        kl = (p * (teacher_logp - student_logp)).sum(-1)
        features.append(
            torch.stack(
                [
                    teacher_entropy / log_vocab,
                    -(q * student_logp).sum(-1) / log_vocab,
                    p.amax(-1),
                    q.amax(-1),
                    kl.clamp_min(0.0).log1p(),
                ],
                1,
            )
        )
    return torch.cat(features) if features else torch.zeros((0, len(TOKEN_FEATURES)), device=device)


@torch.no_grad()
def token_cross_entropies(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    shift_labels: bool = True,
) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's CE of each scored token (``[tokens, 2]``, in ``response_rows``
    order) and the sequence each token belongs to: what instance-wise DTS reads."""
    vocab_size = dense_pair_vocab(student_logits, teacher_logits, vocab_size, "token_cross_entropies")
    rows, targets = response_targets(labels, student_logits, vocab_size, shift_labels)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), vocab_size)
    reader = ChunkReader(student_logits, teacher_logits, rows, vocab_size, chunk_size)
    return read_token_cross_entropies(reader, targets), sequence_of(rows, labels)


@torch.no_grad()
def read_token_cross_entropies(reader: ChunkReader | Reader, targets: Tensor) -> Tensor:
    """``[tokens, 2]``: the student's and the teacher's CE of each row ``reader`` gives."""
    columns = [
        -torch.cat(
            [student_logp.gather(1, targets[start:stop, None]), teacher_logp.gather(1, targets[start:stop, None])], 1
        )
        for start, stop, _, student_logp, teacher_logp in reader.read(Reads.LOG_PROBS)
    ]
    return torch.cat(columns) if columns else torch.zeros((0, 2), device=targets.device)


def sequence_of(rows: Tensor, labels: Tensor) -> Tensor:
    """The sequence (batch row) of each scored flat row; a classifier's rows are their own sequences."""
    return rows // labels.size(1) if labels.dim() == 2 else rows


def regression_objective(
    student_scores: Tensor, teacher_scores: Tensor, labels: Tensor, *, kd_ratio: float, reduction: str = "mean"
) -> DistillationTerms:
    """(1 - kd_ratio) MSE(student, label) + kd_ratio MSE(student, teacher) for a regression head.

    A score has no distribution to soften, so no temperature (STS-B). ``ce`` holds the MSE to the
    labels, ``kd`` the MSE to the teacher; ``reduction="sum"`` sums over examples.
    """
    kd_ratio = check_kd_ratio(kd_ratio)
    if student_scores.shape != labels.shape or teacher_scores.shape != labels.shape:
        raise ValueError(
            f"scores {tuple(student_scores.shape)} / {tuple(teacher_scores.shape)} "
            f"do not match labels {tuple(labels.shape)}"
        )
    student = student_scores.float()
    to_labels = (student - labels.float()).square()
    to_teacher = (student - teacher_scores.detach().float()).square()
    reduce = torch.sum if reduction == "sum" else torch.mean
    mse, kd = reduce(to_labels), reduce(to_teacher)
    return DistillationTerms((1.0 - kd_ratio) * mse + kd_ratio * kd, kd=kd.detach(), ce=mse.detach())


@torch.no_grad()
def tempered_entropies(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: Tensor | float,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    shift_labels: bool = True,
    teacher_temperature_ratio: float = 1.0,
) -> Tensor:
    """``[teacher, student]``: each distribution's entropy at T (a float, or one per scored token; the
    teacher's at ``teacher_temperature_ratio`` x T) summed over the scored tokens, in one no-grad
    chunked pass: how soft the targets the student sees are."""
    vocab_size = dense_pair_vocab(student_logits, teacher_logits, vocab_size, "tempered_entropies")
    rows, targets = response_targets(labels, student_logits, vocab_size, shift_labels)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), vocab_size)
    reader = ChunkReader(student_logits, teacher_logits, rows, vocab_size, chunk_size)
    return read_tempered_entropies(reader, targets, temperature, teacher_temperature_ratio)


@torch.no_grad()
def read_tempered_entropies(
    reader: ChunkReader | Reader, targets: Tensor, temperature: Tensor | float, teacher_temperature_ratio: float
) -> Tensor:
    """``tempered_entropies`` of the rows ``reader`` gives."""
    kernel = TemperedEntropies(teacher_temperature_ratio)
    _, parts = read_loss(kernel, reader, (), targets, temperature=temperature, scale=1.0)
    return parts if parts.numel() else torch.zeros(2, device=targets.device)
