"""The distillation objective from hidden states and output heads: logits a chunk of rows at a time.

A step that hands the loss its logits holds the student's (B x L x V), their gradient and the
teacher's: at today's vocabularies the largest tensors of the step. Here the loss gets the two
models' final hidden states and their output heads instead; each chunk of scored rows is projected
to the vocabulary (``HeadReader``), the same kernels as the logits path give its values and its
gradient w.r.t. those logits, and that gradient is turned at once into the gradients w.r.t. the
hidden rows (g W) and the head (g^T h, and the bias's column sums) (``HeadGradients``). Nothing
larger than a chunk of rows x V is ever made; the gradients are computed in the forward pass and
backward only scales them, as on the logits path. The no-grad readings the temperature policies take
(both CEs, each token's CEs and features, the entropies at T) run the logits path's code on the same
projected chunks.

A chunk is projected in the head's dtype (what ``nn.Linear`` would compute) and read in fp32; the
head's gradient is accumulated in the head's dtype, one rounding per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunks import Reads, _log_softmax_, _scale, default_chunk_size, read_loss
from .kernels import KDTerm, MixedWithCrossEntropy, ScaledTeacherMSE
from .objectives import (
    DistillationTerms,
    divergence_kernel,
    mixed_terms,
    read_tempered_entropies,
    read_token_cross_entropies,
    read_token_features,
    sequence_of,
)
from .rows import check_kd_ratio, check_pair, check_temperature, response_targets
from .topk import TopKTeacher, refuse_compact

# Rows per chunk at least (the scored rows permitting): each chunk re-reads the heads (V x H) for four
# matmuls and adds into the whole head gradient, so short chunks spend their time there. On 2 CPU cores
# (V = 50257 / 151936, H = 256, 1536 rows) 96-row chunks took 1.7x / 1.4x the time of 512-row ones.
MIN_FUSED_CHUNK_ROWS = 512


def fused_chunk_size(num_rows: int, vocab_size: int) -> int:
    """``default_chunk_size``, raised to ``MIN_FUSED_CHUNK_ROWS`` rows: still one chunk x V, never N x V."""
    return max(1, min(num_rows, max(default_chunk_size(num_rows, vocab_size), MIN_FUSED_CHUNK_ROWS)))


class OutputHead(NamedTuple):
    """A model's output head as the loss applies it: logits = hidden @ weight.T + bias, the weight
    ``[V, H]`` (a tied input embedding is the same tensor), possibly wider than the scored vocabulary."""

    weight: Tensor
    bias: Tensor | None = None


def _project(hidden: Tensor, head: OutputHead, vocab_size: int, out: Tensor) -> Tensor:
    """``hidden``'s logits over the first ``vocab_size`` tokens, written into the fp32 rows ``out``."""
    weight = head.weight[:vocab_size]
    bias = None if head.bias is None else head.bias[:vocab_size]
    hidden = hidden.to(weight.dtype)
    if weight.dtype != out.dtype:
        return out.copy_(F.linear(hidden, weight, bias))
    if bias is None:
        return torch.mm(hidden, weight.T, out=out)
    return torch.addmm(bias, hidden, weight.T, out=out)


class HeadReader:
    """The scored rows' logits, projected chunk by chunk into two fp32 buffers reused for every chunk.

    ``student`` and ``teacher`` are the models' hidden states at the scored rows (``[N, H]``, ``[N, H_t]``);
    without a ``teacher_head`` the teacher's rows are a compact teacher's packed rows, read as stored.
    """

    def __init__(
        self,
        student: Tensor,
        student_head: OutputHead,
        teacher: Tensor | None,
        teacher_head: OutputHead | None,
        vocab_size: int,
        chunk_size: int,
    ):
        self.student, self.student_head, self.teacher, self.teacher_head = student, student_head, teacher, teacher_head
        self.vocab_size, self.chunk_size = vocab_size, chunk_size
        rows = min(chunk_size, len(student))
        self.student_buffer = student.new_empty((rows, vocab_size), dtype=torch.float32)
        projected = teacher is not None and teacher_head is not None
        self.teacher_buffer = student.new_empty((rows, vocab_size), dtype=torch.float32) if projected else None

    @torch.no_grad()
    def read(self, reads: Reads) -> Iterator[tuple[int, int, list, Tensor, Tensor | None]]:
        """``(start, stop, [], student_rows, teacher_rows)`` per chunk, as ``ChunkReader.read`` gives them."""
        for start in range(0, len(self.student), self.chunk_size):
            stop = min(start + self.chunk_size, len(self.student))
            student = _project(
                self.student[start:stop], self.student_head, self.vocab_size, self.student_buffer[: stop - start]
            )
            teacher = None
            if self.teacher_buffer is not None:
                teacher = _project(
                    self.teacher[start:stop], self.teacher_head, self.vocab_size, self.teacher_buffer[: stop - start]
                )
            if reads is Reads.LOG_PROBS:
                student = _log_softmax_(student)
                teacher = None if teacher is None else _log_softmax_(teacher)
            if self.teacher is not None and self.teacher_buffer is None:
                teacher = self.teacher[start:stop].float()  # packed rows: the bucketed kernel reads them as stored
            yield start, stop, [], student, teacher

    def gradient_sink(self) -> HeadGradients:
        return HeadGradients(self.student, self.student_head, self.vocab_size)


class HeadGradients:
    """The gradients w.r.t. the student's hidden rows, head weight and bias (each only if it requires
    one), accumulated from each chunk's gradient w.r.t. its logits; the padded rows of a head wider
    than the vocabulary get exact zeros."""

    def __init__(self, hidden: Tensor, head: OutputHead, vocab_size: int):
        self.hidden, self.head, self.vocab_size = hidden, head, vocab_size
        weight, bias = head
        self.hidden_grad = torch.empty_like(hidden) if hidden.requires_grad else None
        self.weight_grad = torch.zeros_like(weight) if weight.requires_grad else None
        self.bias_grad = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None

    @torch.no_grad()
    def add(self, start: int, stop: int, pieces: list, row_grad: Tensor, scale: Tensor | float) -> None:
        weight = self.head.weight[: self.vocab_size]
        grad = row_grad.mul_(scale).to(weight.dtype)
        if self.hidden_grad is not None:
            self.hidden_grad[start:stop] = grad @ weight
        if self.weight_grad is not None:
            hidden = self.hidden[start:stop].to(weight.dtype)
            self.weight_grad[: self.vocab_size].addmm_(grad.T, hidden)
        if self.bias_grad is not None:
            self.bias_grad[: self.vocab_size] += grad.sum(0).to(self.bias_grad.dtype)

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.hidden_grad, self.weight_grad, self.bias_grad


class _ScoredRows(NamedTuple):
    student: Tensor
    teacher: Tensor | None
    rows: Tensor
    targets: Tensor
    vocab_size: int


def _scored_rows(
    student_hidden: Tensor,
    student_head: OutputHead,
    teacher_hidden: Tensor | None,
    teacher_head: OutputHead | None,
    labels: Tensor,
    vocab_size: int | None,
    shift_labels: bool,
) -> _ScoredRows:
    """Both models' hidden states at the scored rows (a differentiable gather of the student's), their
    targets and the vocabulary scored: ``vocab_size``, by default the narrower head's."""
    heads = [student_head] if teacher_head is None else [student_head, teacher_head]
    widest_common = min(head.weight.size(0) for head in heads)
    if vocab_size is not None and vocab_size > widest_common:
        raise ValueError(f"vocab_size={vocab_size} exceeds the head width {widest_common}")
    vocab_size = vocab_size or widest_common
    if teacher_hidden is not None:
        check_pair(student_hidden, teacher_hidden)
    rows, targets = response_targets(labels, student_hidden, vocab_size, shift_labels)

    def gather(hidden: Tensor) -> Tensor:
        return hidden.reshape(-1, hidden.size(-1)).index_select(0, rows)

    teacher = None if teacher_hidden is None else gather(teacher_hidden.detach())
    return _ScoredRows(gather(student_hidden), teacher, rows, targets, vocab_size)


def fused_distillation_objective(
    student_hidden: Tensor,
    student_head: OutputHead,
    teacher_hidden: Tensor | TopKTeacher,
    teacher_head: OutputHead | None,
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
    """``distillation_objective`` of the logits ``hidden @ head.weight.T + head.bias``, without them.

    ``student_hidden`` / ``teacher_hidden``: the models' final hidden states (after the final norm),
    ``[B, L, H]`` (``[B, L, H_t]``) beside ``labels`` ``[B, L]``, or rows beside per-row labels with
    ``shift_labels=False``. The loss is differentiable w.r.t. the student's hidden states, head weight
    and bias, and a learnt ``temperature``; the teacher gets no gradient. A ``TopKTeacher`` (a compact teacher
    cache's rows, ``teacher_head`` None) in place of the teacher's hidden states gives the KD over its k + 1
    buckets, as ``distillation_objective`` does with it: only the student's logits are projected.
    """
    kd = divergence_kernel(
        teacher_hidden,
        divergence,
        jsd_beta,
        skew_lambda,
        temperature,
        teacher_cross_entropy,
        teacher_temperature_ratio,
    )
    if isinstance(teacher_hidden, TopKTeacher):
        packed = teacher_hidden.packed
        scored = _scored_rows(student_hidden, student_head, None, None, labels, vocab_size, shift_labels)
        scored = scored._replace(teacher=packed.reshape(-1, packed.size(-1)).index_select(0, scored.rows))
    else:
        scored = _scored_rows(
            student_hidden, student_head, teacher_hidden, teacher_head, labels, vocab_size, shift_labels
        )
    return _fused_mixed_objective(
        kd, scored, student_head, teacher_head, kd_ratio, temperature, num_items_in_batch, chunk_size, reduction,
        teacher_cross_entropy,
    )  # fmt: skip


def fused_annealing_objective(
    student_hidden: Tensor,
    student_head: OutputHead,
    teacher_hidden: Tensor,
    teacher_head: OutputHead,
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
    """``annealing_objective`` (Annealing-KD's MSE to the scaled teacher logits, mixed with CE) of the logits
    through the heads, without them: each chunk's raw logits meet as on the logits path."""
    refuse_compact(teacher_hidden, "fused_annealing_objective")
    scored = _scored_rows(student_hidden, student_head, teacher_hidden, teacher_head, labels, vocab_size, shift_labels)
    return _fused_mixed_objective(
        ScaledTeacherMSE(float(teacher_scale)), scored, student_head, teacher_head, kd_ratio, None, num_items_in_batch,
        chunk_size, reduction, teacher_cross_entropy,
    )  # fmt: skip


def _fused_mixed_objective(
    kd: KDTerm,
    scored: _ScoredRows,
    student_head: OutputHead,
    teacher_head: OutputHead | None,
    kd_ratio: float,
    temperature: Tensor | float | None,
    num_items_in_batch: Tensor | int | None,
    chunk_size: int | None,
    reduction: str,
    teacher_cross_entropy: bool,
) -> DistillationTerms:
    """(1 - kd_ratio) CE + kd_ratio ``kd`` over the scored rows, projected a chunk at a time."""
    kd_ratio = check_kd_ratio(kd_ratio)
    num_rows = len(scored.targets)
    if temperature is not None:
        temperature = check_temperature(temperature, num_rows)
    chunk_size = chunk_size or fused_chunk_size(num_rows, scored.vocab_size)
    reader = HeadReader(scored.student, student_head, scored.teacher, teacher_head, scored.vocab_size, chunk_size)
    loss, parts = read_loss(
        MixedWithCrossEntropy(kd, kd_ratio, teacher_cross_entropy),
        reader,
        (scored.student, *student_head),
        scored.targets,
        temperature=temperature,
        scale=_scale(reduction, num_rows, num_items_in_batch),
    )
    return mixed_terms(loss, parts, teacher_cross_entropy)


class _NoGradPass(NamedTuple):
    reader: HeadReader
    scored: _ScoredRows


def _no_grad_pass(
    student_hidden: Tensor,
    student_head: OutputHead,
    teacher_hidden: Tensor | None,
    teacher_head: OutputHead | None,
    labels: Tensor,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    shift_labels: bool = True,
) -> _NoGradPass:
    """The reader of a no-grad pass over both models' scored rows (the arguments of every function below), and
    those rows."""
    scored = _scored_rows(student_hidden, student_head, teacher_hidden, teacher_head, labels, vocab_size, shift_labels)
    chunk_size = chunk_size or fused_chunk_size(len(scored.targets), scored.vocab_size)
    reader = HeadReader(scored.student, student_head, scored.teacher, teacher_head, scored.vocab_size, chunk_size)
    return _NoGradPass(reader, scored)


@torch.no_grad()
def fused_cross_entropies(*heads_and_labels, **sizes) -> tuple[Tensor, Tensor | None]:
    """The student's and the teacher's (None without one) cross-entropy summed over the scored rows, from the
    same chunked projection: what DTS reads before the loss runs. Arguments: ``_no_grad_pass``'s."""
    reader, scored = _no_grad_pass(*heads_and_labels, **sizes)
    sums = torch.zeros(2, dtype=torch.float32, device=scored.targets.device)
    for start, stop, _, student, teacher in reader.read(Reads.LOG_PROBS):
        targets = scored.targets[start:stop, None]
        sums[0] -= student.gather(1, targets).sum()
        if teacher is not None:
            sums[1] -= teacher.gather(1, targets).sum()
    return sums[0], None if scored.teacher is None else sums[1]


@torch.no_grad()
def fused_token_features(*heads_and_labels, **sizes) -> Tensor:
    """``token_features`` (CTKD's instance temperature reads them) from the hidden states."""
    reader, scored = _no_grad_pass(*heads_and_labels, **sizes)
    return read_token_features(reader, scored.vocab_size, scored.targets.device)


@torch.no_grad()
def fused_token_cross_entropies(*heads_and_labels, **sizes) -> tuple[Tensor, Tensor]:
    """``token_cross_entropies`` (instance-wise DTS and AdaKD read them) from the hidden states."""
    reader, scored = _no_grad_pass(*heads_and_labels, **sizes)
    return read_token_cross_entropies(reader, scored.targets), sequence_of(scored.rows, heads_and_labels[-1])


@torch.no_grad()
def fused_tempered_entropies(
    *heads_and_labels, temperature, teacher_temperature_ratio: float = 1.0, **sizes
) -> Tensor:
    """``tempered_entropies`` (what ``log_entropy`` logs) from the hidden states."""
    reader, scored = _no_grad_pass(*heads_and_labels, **sizes)
    return read_tempered_entropies(reader, scored.targets, temperature, teacher_temperature_ratio)
