"""Token-level losses between causal-LM logits, computed in fp32 chunks with a fused gradient.

Every loss here looks only at positions that predict a response token: logits at position i are
scored against ``labels[:, i + 1]`` and positions whose label is ``-100`` (prompt, padding) are
skipped before any work is done. Rows are processed ``chunk_size`` at a time (by default in at most 16
chunks of at least 16 MiB per fp32 temporary) in fp32 whatever the model dtype, and the gradient with respect to the student logits is written during the forward
pass from its closed form. So beyond the two logits tensors a loss holds one gradient buffer the
size of the student logits (the unavoidable floor) plus O(chunk_size x vocab) temporaries, instead
of the several B x L x V copies that autograd through ``log_softmax`` keeps alive.

All divergences are multiplied by T^2 (Hinton et al.) so that their gradient scale does not shrink
as the temperature grows, and are normalised by the number of response tokens, or by
``num_items_in_batch`` when the Trainer passes it, so that gradient accumulation matches one large
batch.

``forward_kl`` is the true KL(p_teacher || p_student). MiniLLM and the DTS reference code use the
soft cross-entropy -sum p log q instead; the two differ by the teacher entropy, which does not
depend on the student, so their gradients are identical and only the logged value differs (KL is
zero when the student matches the teacher, which makes it the readable one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100
MIN_CHUNK_ELEMENTS = 1 << 22  # fp32 values in one temporary: 16 MiB
MAX_CHUNK_ELEMENTS = 1 << 24  # 64 MiB
MAX_CHUNKS = 16


def default_chunk_size(num_rows: int, vocab_size: int) -> int:
    """Rows per chunk: 16 chunks, with each fp32 temporary kept between 16 and 64 MiB.

    Few iterations keep Python off the critical path on a GPU; the bounds keep the temporaries
    small next to the logits for short batches and bounded for long ones.
    """
    rows = min(math.ceil(num_rows / MAX_CHUNKS), MAX_CHUNK_ELEMENTS // vocab_size)
    return max(1, MIN_CHUNK_ELEMENTS // vocab_size, rows)


class TokenTerms(NamedTuple):
    """Per-row loss values, the gradient with respect to the logits when asked for, and optionally
    the per-row components (columns) the loss is made of, reported but not differentiated."""

    value: Tensor
    grad: Tensor | None
    parts: Tensor | None = None


def response_rows(labels: Tensor, logits: Tensor, shift_labels: bool = True) -> tuple[Tensor, Tensor]:
    """Flat row indices into ``logits.view(-1, V)`` that predict a response token, and those tokens.

    With ``shift_labels=False`` each row is scored against its own label (a classification head's
    logits ``[B, C]`` against ``labels[B]``) instead of the next position's.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} in batch and length")
    if not shift_labels:
        flat = labels.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        return rows, flat[rows]
    batch, length = labels.shape
    targets = labels[:, 1:]
    b, i = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return b * length + i, targets[b, i]


def _softmax_grad(q: Tensor, dloss_dq: Tensor) -> Tensor:
    """Chain rule through softmax: d/ds_j = q_j (g_j - sum_k q_k g_k), with q = softmax(s)."""
    return q * (dloss_dq - (q * dloss_dq).sum(-1, keepdim=True))


def _mix_log(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stable for probabilities given as logs."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(s_logp: Tensor, t_logp: Tensor, need_grad: bool) -> TokenTerms:
    """KL(p || q): mode-covering; the classic KD objective. Overwrites its inputs to save memory."""
    p = t_logp.exp()
    value = t_logp.sub_(s_logp).mul_(p).sum(-1)
    return TokenTerms(value, s_logp.exp_().sub_(p) if need_grad else None)


def reverse_kl(s_logp: Tensor, t_logp: Tensor, need_grad: bool) -> TokenTerms:
    """KL(q || p): mode-seeking, as in MiniLLM's objective (here off-policy, on the data)."""
    q = s_logp.exp()
    log_ratio = s_logp - t_logp
    value = (q * log_ratio).sum(-1)
    return TokenTerms(value, q * (log_ratio - value[:, None]) if need_grad else None)


def generalized_jsd(s_logp: Tensor, t_logp: Tensor, need_grad: bool, beta: float) -> TokenTerms:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (TRL/GKD's convention)."""
    if beta == 0.0:
        return forward_kl(s_logp, t_logp, need_grad)
    if beta == 1.0:
        return reverse_kl(s_logp, t_logp, need_grad)
    p, q = t_logp.exp(), s_logp.exp()
    log_m = _mix_log(t_logp, s_logp, beta)
    kl_q_m = (q * (s_logp - log_m)).sum(-1)
    value = beta * (p * (t_logp - log_m)).sum(-1) + (1.0 - beta) * kl_q_m
    if not need_grad:
        return TokenTerms(value, None)
    return TokenTerms(value, (1.0 - beta) * q * (s_logp - log_m - kl_q_m[:, None]))


def skew_forward_kl(s_logp: Tensor, t_logp: Tensor, need_grad: bool, lam: float) -> TokenTerms:
    """KL(p || lam p + (1 - lam) q), DistiLLM's skew KL: bounded gradient when q << p."""
    p, q = t_logp.exp(), s_logp.exp()
    log_r = _mix_log(t_logp, s_logp, lam)
    value = (p * (t_logp - log_r)).sum(-1)
    if not need_grad:
        return TokenTerms(value, None)
    return TokenTerms(value, _softmax_grad(q, -(1.0 - lam) * (t_logp - log_r).exp()))


def skew_reverse_kl(s_logp: Tensor, t_logp: Tensor, need_grad: bool, lam: float) -> TokenTerms:
    """KL(q || lam q + (1 - lam) p), DistiLLM's skew reverse KL."""
    q = s_logp.exp()
    log_r = _mix_log(s_logp, t_logp, lam)
    value = (q * (s_logp - log_r)).sum(-1)
    if not need_grad:
        return TokenTerms(value, None)
    return TokenTerms(value, _softmax_grad(q, s_logp - log_r - lam * (s_logp - log_r).exp()))


def total_variation(s_logp: Tensor, t_logp: Tensor, need_grad: bool) -> TokenTerms:
    """0.5 sum |p - q| (DistiLLM's TVD); the subgradient is taken as 0 where p == q."""
    q = s_logp.exp()
    diff = q - t_logp.exp()
    value = 0.5 * diff.abs().sum(-1)
    return TokenTerms(value, _softmax_grad(q, 0.5 * diff.sign()) if need_grad else None)


DIVERGENCES: dict[str, Callable[..., TokenTerms]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": total_variation,
}


class _ChunkedTokenLoss(torch.autograd.Function):
    """Sum over response rows of ``row_terms``, with d(sum)/d(student_logits) written in forward.

    ``row_terms(student_rows, teacher_rows, targets, need_grad)`` gets fp32 rows already cut to
    the vocabulary, which it may overwrite, and returns ``TokenTerms``. The sum, its gradient and
    the summed parts are multiplied by ``scale`` (the gradient in place, and not at all when
    ``scale`` is 1). No chunk's buffers outlive its iteration. Returns (loss, parts); the parts are
    not differentiable.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, targets, row_terms, scale, vocab_size, chunk_size):
        need_grad = ctx.needs_input_grad[0]
        unit_scale = isinstance(scale, float) and scale == 1.0
        student_flat = student_logits.reshape(-1, student_logits.size(-1))
        teacher_flat = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.size(-1))
        # fp16 cannot hold small unscaled gradients (its smallest normal is 6e-5): keep them in fp32
        # until backward applies the upstream (loss-scaled) gradient; autograd then casts back.
        grad_dtype = torch.float32 if student_logits.dtype == torch.float16 else student_logits.dtype
        grad = torch.zeros(student_flat.shape, dtype=grad_dtype, device=student_flat.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        parts = None
        for start in range(0, rows.numel(), chunk_size):
            chunk = rows[start : start + chunk_size]
            terms = row_terms(
                student_flat.index_select(0, chunk)[:, :vocab_size].float(),
                None if teacher_flat is None else teacher_flat.index_select(0, chunk)[:, :vocab_size].float(),
                targets[start : start + chunk_size],
                need_grad,
            )
            total += terms.value.sum()
            if terms.parts is not None:
                parts = terms.parts.sum(0) if parts is None else parts + terms.parts.sum(0)
            if need_grad:
                row_grad = terms.grad if unit_scale else terms.grad.mul_(scale)
                grad[:, :vocab_size].index_copy_(0, chunk, row_grad.to(grad.dtype))
            del terms
        ctx.grad = None if grad is None else grad.view(student_logits.shape)
        parts = torch.zeros((0,), device=total.device) if parts is None else parts * scale
        ctx.mark_non_differentiable(parts)
        return total * scale, parts

    @staticmethod
    def backward(ctx, grad_output, _):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("dts_llm losses support a single backward pass per forward")
        return grad.mul_(grad_output), None, None, None, None, None, None, None


def divergence_terms(name: str, jsd_beta: float, skew_lambda: float) -> Callable[..., TokenTerms]:
    """The divergence ``name`` with its mixing weight bound, after checking the weight's range."""
    if name not in DIVERGENCES:
        raise ValueError(f"kd_loss must be one of {list(DIVERGENCES)}, got {name!r}")
    if name == "jsd":
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        return functools.partial(generalized_jsd, beta=jsd_beta)
    if name.startswith("skew_"):
        if not 0.0 < skew_lambda < 1.0:
            raise ValueError(f"skew_lambda must be in (0, 1), got {skew_lambda}")
        return functools.partial(DIVERGENCES[name], lam=skew_lambda)
    return DIVERGENCES[name]


def _scale(reduction: str, num_tokens: int, num_items_in_batch: Tensor | int | None) -> Tensor | float:
    """1 for a sum, else 1 / (tokens to average over), never 1 / 0: an empty batch gives 0, not NaN."""
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items_in_batch is None:
        return 1.0 / max(num_tokens, 1)
    if torch.is_tensor(num_items_in_batch):
        return 1.0 / num_items_in_batch.float().clamp_min(1.0)
    return 1.0 / max(num_items_in_batch, 1)


def _chunked_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    row_terms,
    *,
    reduction: str,
    num_items_in_batch: Tensor | int | None,
    vocab_size: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """``row_terms`` summed over ``rows`` chunk by chunk, scaled by the reduction: (loss, parts)."""
    scale = _scale(reduction, rows.numel(), num_items_in_batch)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), vocab_size)
    teacher_logits = None if teacher_logits is None else teacher_logits.detach()
    return _ChunkedTokenLoss.apply(
        student_logits, teacher_logits, rows, targets, row_terms, scale, vocab_size, chunk_size
    )


def _vocab(vocab_size: int | None, *logits: Tensor | None) -> int:
    widest_common = min(x.size(-1) for x in logits if x is not None)
    if vocab_size is None:
        return widest_common
    if vocab_size > widest_common:
        raise ValueError(f"vocab_size={vocab_size} exceeds the logits width {widest_common}")
    return vocab_size


def _response_targets(labels: Tensor, logits: Tensor, vocab_size: int, shift_labels: bool) -> tuple[Tensor, Tensor]:
    """``response_rows``, after checking that every target is a token of the vocabulary."""
    rows, targets = response_rows(labels, logits, shift_labels)
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < vocab_size:
        raise ValueError(
            f"label ids span [{int(targets.min())}, {int(targets.max())}], outside the vocabulary [0, {vocab_size})"
        )
    return rows, targets


def _cross_entropy_rows(logit_rows: Tensor, targets: Tensor, need_grad: bool) -> TokenTerms:
    """-log softmax(z)[y] per row; gradient softmax(z) - onehot(y). Leaves ``logit_rows`` intact."""
    log_probs = logit_rows.log_softmax(-1)
    value = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if not need_grad:
        return TokenTerms(value, None)
    grad = log_probs.exp_()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    return TokenTerms(value, grad)


def _divergence_rows(terms_at_t, student_rows: Tensor, teacher_rows: Tensor, t: float, need_grad: bool) -> TokenTerms:
    """T^2 D(teacher, student) at temperature t per row; gradient w.r.t. z up to the factor T.

    d(T^2 D)/dz = T^2 dD/ds ds/dz = T dD/ds with s = z / T, so the caller multiplies by T. Consumes
    both row tensors.
    """
    s_logp = student_rows.div_(t).log_softmax(-1)
    del student_rows
    t_logp = teacher_rows.div_(t).log_softmax(-1)
    del teacher_rows
    terms = terms_at_t(s_logp, t_logp, need_grad)
    return TokenTerms(terms.value * (t * t), terms.grad)


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
    vocab_size = _vocab(vocab_size, logits)
    rows, targets = _response_targets(labels, logits, vocab_size, shift_labels)

    def row_terms(logit_rows, _, row_targets, need_grad):
        return _cross_entropy_rows(logit_rows, row_targets, need_grad)

    loss, _ = _chunked_loss(
        logits, None, rows, targets, row_terms,
        reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    return loss


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in batch or sequence shape"
        )


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    num_items_in_batch: Tensor | int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """T^2 x divergence(teacher, student) at temperature T, averaged over response tokens.

    The teacher receives no gradient. Logits wider than ``vocab_size`` (padded embeddings) are cut
    to it; by default both are cut to the narrower of the two.
    """
    _check_pair(student_logits, teacher_logits, temperature)
    terms_at_t = divergence_terms(divergence, jsd_beta, skew_lambda)
    vocab_size = _vocab(vocab_size, student_logits, teacher_logits)
    rows, targets = response_rows(labels, student_logits)
    t = float(temperature)

    def row_terms(student_rows, teacher_rows, _, need_grad):
        kd = _divergence_rows(terms_at_t, student_rows, teacher_rows, t, need_grad)
        return TokenTerms(kd.value, kd.grad.mul_(t) if need_grad else None)

    loss, _ = _chunked_loss(
        student_logits, teacher_logits, rows, targets, row_terms,
        reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    return loss


class DistillationTerms(NamedTuple):
    """The training objective and, detached, the two terms it mixes."""

    loss: Tensor
    kd: Tensor
    ce: Tensor


def distillation_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kd_ratio: float,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    num_items_in_batch: Tensor | int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    shift_labels: bool = True,
) -> DistillationTerms:
    """(1 - kd_ratio) CE + kd_ratio KD in one chunked pass with one gradient buffer.

    The same values as ``causal_lm_cross_entropy`` and ``distillation_loss`` mixed, for about the
    memory of one of them: the student's logits are read once and their gradient written once.
    ``shift_labels=False`` distils a classification head (logits ``[B, C]``, labels ``[B]``).
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
    _check_pair(student_logits, teacher_logits, temperature)
    terms_at_t = divergence_terms(divergence, jsd_beta, skew_lambda)
    vocab_size = _vocab(vocab_size, student_logits, teacher_logits)
    rows, targets = _response_targets(labels, student_logits, vocab_size, shift_labels)
    t, r = float(temperature), float(kd_ratio)

    def row_terms(student_rows, teacher_rows, row_targets, need_grad):
        ce = _cross_entropy_rows(student_rows, row_targets, need_grad)
        kd = _divergence_rows(terms_at_t, student_rows, teacher_rows, t, need_grad)
        grad = kd.grad.mul_(r * t).add_(ce.grad, alpha=1.0 - r) if need_grad else None
        return TokenTerms((1.0 - r) * ce.value + r * kd.value, grad, torch.stack([kd.value, ce.value], 1))

    loss, parts = _chunked_loss(
        student_logits, teacher_logits, rows, targets, row_terms,
        reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    if parts.numel() == 0:  # no response token: every term is zero
        parts = torch.zeros(2, device=loss.device)
    return DistillationTerms(loss, kd=parts[0], ce=parts[1])


def regression_objective(
    student_scores: Tensor, teacher_scores: Tensor, labels: Tensor, *, kd_ratio: float, reduction: str = "mean"
) -> DistillationTerms:
    """(1 - kd_ratio) MSE(student, label) + kd_ratio MSE(student, teacher) for a regression head.

    A score has no distribution to soften, so no temperature (STS-B). ``ce`` holds the MSE to the
    labels, ``kd`` the MSE to the teacher; ``reduction="sum"`` sums over examples.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
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
