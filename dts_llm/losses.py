"""Token-level losses between causal-LM logits, computed in fp32 chunks with a fused gradient.

Every loss here looks only at positions that predict a response token: logits at position i are
scored against ``labels[:, i + 1]`` and positions whose label is ``-100`` (prompt, padding) are
skipped before any work is done. Rows are processed ``chunk_size`` at a time (by default in at most 16
chunks of at least 16 MiB per fp32 temporary) in fp32 whatever the model dtype, and the gradient with respect to the student logits is written during the forward
pass from its closed form. So beyond the two logits tensors a loss holds one gradient buffer the
size of the student logits (the unavoidable floor) plus O(chunk_size x vocab) temporaries, instead
of the several B x L x V copies that autograd through ``log_softmax`` keeps alive.

A temperature may be a float or a tensor (one value, or one per response token); a tensor that
requires grad (CTKD's learnt temperature) gets its exact derivative from the same pass.

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
import torch.autograd.forward_ad as forward_ad
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
    """Per-row loss values, the gradient with respect to the logits when asked for, optionally
    the per-row components (columns) the loss is made of, reported but not differentiated, and
    the per-row derivative with respect to the temperature when it is learnt (CTKD)."""

    value: Tensor
    grad: Tensor | None
    parts: Tensor | None = None
    temperature_grad: Tensor | None = None


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


def _row_runs(rows: Tensor) -> list[tuple[int, int]]:
    """Sorted flat row indices as maximal runs of consecutive rows, ``[(first, stop), ...]``.

    A causal LM's response positions form one or a few runs per sequence, so chunks are copied run
    by run (a slice and ``copy_``) instead of gathered index by index into a fresh tensor.
    """
    if rows.numel() == 0:
        return []
    breaks = ((rows[1:] != rows[:-1] + 1).nonzero(as_tuple=True)[0] + 1).tolist()
    starts, stops = [0, *breaks], [*breaks, rows.numel()]
    firsts = rows[starts].tolist()
    return [(first, first + stop - start) for first, start, stop in zip(firsts, starts, stops)]


def _chunks(runs: list[tuple[int, int]], chunk_size: int):
    """Consecutive chunks of ``chunk_size`` scored rows: ``(start, stop, pieces)``, with ``start:stop``
    the chunk's place in scored order and ``pieces`` the ``(offset in the chunk, first, stop)`` flat
    row ranges it covers."""
    start, filled, pieces = 0, 0, []
    for first, stop in runs:
        while first < stop:
            take = min(stop - first, chunk_size - filled)
            pieces.append((filled, first, first + take))
            filled, first = filled + take, first + take
            if filled == chunk_size:
                yield start, start + filled, pieces
                start, filled, pieces = start + filled, 0, []
    if filled:
        yield start, start + filled, pieces


def _copy_rows(flat: Tensor, pieces, buffer: Tensor, vocab_size: int) -> Tensor:
    """The chunk's rows of ``flat``, cut to the vocabulary, copied into ``buffer`` (fp32, reused
    across chunks: on the CPU a fresh chunk-sized tensor costs as much again as the pass filling it)."""
    for offset, first, stop in pieces:
        buffer[offset : offset + stop - first].copy_(flat[first:stop, :vocab_size])
    return buffer[: pieces[-1][0] + pieces[-1][2] - pieces[-1][1]]


def _chunk_buffer(flat: Tensor, rows: Tensor, chunk_size: int, vocab_size: int) -> Tensor:
    """The fp32 buffer ``_copy_rows`` fills for every chunk of ``rows``."""
    return flat.new_empty((min(chunk_size, rows.numel()), vocab_size), dtype=torch.float32)


def _write_rows(grad: Tensor, pieces, row_grad: Tensor, scale: Tensor | float) -> None:
    """Scale the chunk's gradient rows into their places in ``grad`` (one pass, no temporary)."""
    vocab_size = row_grad.size(-1)
    for offset, first, stop in pieces:
        torch.mul(row_grad[offset : offset + stop - first], scale, out=grad[first:stop, :vocab_size])


def _gradient_buffer(flat: Tensor, runs, vocab_size: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised gradient the size of ``flat`` with zeros wherever no scored row is written
    (unscored rows, columns beyond the vocabulary): each page is then written once."""
    grad = torch.empty(flat.shape, dtype=dtype, device=flat.device)
    done = 0
    for first, stop in runs:
        grad[done:first].zero_()
        done = stop
    grad[done:].zero_()
    if flat.size(-1) > vocab_size:
        grad[:, vocab_size:].zero_()
    return grad


def _log_softmax_(rows: Tensor) -> Tensor:
    """log_softmax over the last dimension, in place (no chunk-sized temporary)."""
    return torch.log_softmax(rows, -1, out=rows)


def _chunk_temperature(temperature: Tensor | float | None, start: int, stop: int) -> Tensor | float | None:
    """The temperature of rows ``start:stop``: a scalar as it is, a per-row temperature as a column."""
    if torch.is_tensor(temperature):
        temperature = temperature.detach()
        return temperature[start:stop, None] if temperature.dim() == 1 else temperature
    return temperature


@torch.no_grad()
def _sum_rows(
    student_logits, teacher_logits, temperature, rows, targets, row_terms, scale, vocab_size, chunk_size,
    need_grad: bool, need_temperature_grad: bool,
):
    """Sum over response rows of ``row_terms`` and its gradients, chunk by chunk, times ``scale``.

    ``row_terms(student_rows, teacher_rows, targets, temperature, need_grad, need_temperature_grad)``
    gets fp32 rows already cut to the vocabulary, which it may overwrite, and the chunk's temperature
    (a float, a 0-dim tensor or a ``[rows, 1]`` column), and returns ``TokenTerms``. The logits'
    gradient is scaled as it is written into its buffer. The chunk buffers are reused, and nothing
    else a chunk allocates outlives it. Returns (total, summed parts, d total / d student_logits,
    d total / d temperature); the temperature's gradient is summed for a scalar and per row for one
    temperature per row.
    """
    student_flat = student_logits.reshape(-1, student_logits.size(-1))
    teacher_flat = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.size(-1))
    runs = _row_runs(rows)
    student_buffer = _chunk_buffer(student_flat, rows, chunk_size, vocab_size)
    teacher_buffer = None if teacher_flat is None else _chunk_buffer(teacher_flat, rows, chunk_size, vocab_size)
    # fp16 cannot hold small unscaled gradients (its smallest normal is 6e-5): keep them in fp32
    # until backward applies the upstream (loss-scaled) gradient; autograd then casts back.
    grad_dtype = torch.float32 if student_logits.dtype == torch.float16 else student_logits.dtype
    grad = _gradient_buffer(student_flat, runs, vocab_size, grad_dtype) if need_grad else None
    temperature_grad = torch.zeros(rows.numel(), dtype=torch.float64, device=student_flat.device) if need_temperature_grad else None
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    parts = None
    for start, stop, pieces in _chunks(runs, chunk_size):
        terms = row_terms(
            _copy_rows(student_flat, pieces, student_buffer, vocab_size),
            None if teacher_flat is None else _copy_rows(teacher_flat, pieces, teacher_buffer, vocab_size),
            targets[start:stop],
            _chunk_temperature(temperature, start, stop),
            need_grad,
            need_temperature_grad,
        )
        total += terms.value.sum().float()
        if terms.parts is not None:
            parts = terms.parts.sum(0) if parts is None else parts + terms.parts.sum(0)
        if need_grad:
            _write_rows(grad, pieces, terms.grad, scale)
        if need_temperature_grad:
            temperature_grad[start:stop] = terms.temperature_grad
        del terms
    if need_temperature_grad:
        temperature_grad = temperature_grad * scale
        temperature_grad = temperature_grad.sum() if temperature.dim() == 0 else temperature_grad
    parts = torch.zeros((0,), device=total.device) if parts is None else parts * scale
    grad = None if grad is None else grad.view(student_logits.shape)
    return total * scale, parts, grad, temperature_grad


class _AttachGradients(torch.autograd.Function):
    """A loss whose gradients were computed with its value: backward only scales them.

    (The chunk loop runs outside the Function because forward-mode AD, which gives the temperature's
    gradient, does not run inside an ``autograd.Function``'s forward.)
    """

    @staticmethod
    def forward(ctx, student_logits, temperature, total, grad, temperature_grad):
        ctx.grads = (grad, temperature_grad)
        ctx.temperature_dtype = None if temperature is None else temperature.dtype
        return total.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("dts_llm losses support a single backward pass per forward")
        grad, temperature_grad = ctx.grads
        ctx.grads = None
        if grad is not None:
            grad = grad.mul_(grad_output)
        if temperature_grad is not None:
            temperature_grad = (temperature_grad * grad_output).to(ctx.temperature_dtype)
        return grad, temperature_grad, None, None, None


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
    temperature: Tensor | float | None = None,
    reduction: str,
    num_items_in_batch: Tensor | int | None,
    vocab_size: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """``row_terms`` summed over ``rows`` chunk by chunk, scaled by the reduction: (loss, parts).

    ``temperature`` reaches ``row_terms`` chunk by chunk, and its gradient comes back when it requires one.
    """
    scale = _scale(reduction, rows.numel(), num_items_in_batch)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), vocab_size)
    teacher_logits = None if teacher_logits is None else teacher_logits.detach()
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    learnt = temperature if torch.is_tensor(temperature) and temperature.requires_grad and torch.is_grad_enabled() else None
    total, parts, grad, temperature_grad = _sum_rows(
        student_logits, teacher_logits, temperature, rows, targets, row_terms, scale, vocab_size, chunk_size,
        need_grad, learnt is not None,
    )
    if need_grad or learnt is not None:
        total = _AttachGradients.apply(student_logits, learnt, total, grad, temperature_grad)
    return total, parts


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


def _cross_entropy_terms(log_probs: Tensor, targets: Tensor, need_grad: bool, overwrite: bool) -> TokenTerms:
    """-log p[y] per row from log-probabilities; gradient w.r.t. the logits p - onehot(y), written
    over ``log_probs`` when ``overwrite`` (else into a new tensor)."""
    value = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if not need_grad:
        return TokenTerms(value, None)
    grad = log_probs.exp_() if overwrite else log_probs.exp()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    return TokenTerms(value, grad)


def _sharpening_tangent(log_probs: Tensor) -> Tensor:
    """d/dc log_softmax(c s) at c = 1, for log_probs = log_softmax(s): s - E[s], i.e. lp - E[lp]."""
    return log_probs - (log_probs.exp() * log_probs).sum(-1, keepdim=True)


def _tempered_log_probs_(rows: Tensor, t, normalised: bool) -> Tensor:
    """log softmax(rows / t), in place. ``normalised`` rows are log-probabilities at T = 1 already:
    they are the logits shifted per row, which changes no softmax, so they are divided just the same."""
    if isinstance(t, float) and t == 1.0:
        return rows if normalised else _log_softmax_(rows)
    return _log_softmax_(rows.div_(t))


def _divergence_rows(
    terms_at_t,
    student_rows: Tensor,
    teacher_rows: Tensor,
    t,
    need_grad: bool,
    need_temperature_grad: bool,
    grad_weight: float = 1.0,
    *,
    normalised: bool = False,
) -> TokenTerms:
    """T^2 D(teacher, student) at temperature t per row, and ``grad_weight`` x its gradient w.r.t. z.

    d(T^2 D)/dz = T^2 dD/ds ds/dz = T dD/ds with s = z / T. ``t`` is a scalar or a ``[rows, 1]``
    column. The rows are logits, or log-probabilities at T = 1 when ``normalised``; both are consumed.

    With ``need_temperature_grad`` the divergence also runs in forward-mode AD along the direction
    that sharpens both distributions (logits times c, at c = 1): that gives
    d_scale = <dD/ds, s> + <dD/du, u> for s = z_s / T, u = z_t / T, and since s and u are z / T,
    d(T^2 D)/dT = 2 T D - T d_scale, exactly and for every divergence, in one extra pass. The two
    terms nearly cancel when the distributions are flat, and each sums a whole vocabulary: in fp32
    the rounding (~1e-6 per token at 50k) can exceed the true derivative, which Adam would follow
    as if it were signal, so this path runs in float64.
    """
    if need_temperature_grad:
        student_rows, teacher_rows = student_rows.double(), teacher_rows.double()
    s_logp = _tempered_log_probs_(student_rows, t, normalised)
    t_logp = _tempered_log_probs_(teacher_rows, t, normalised)
    t_values = t.view(-1) if torch.is_tensor(t) else t
    if not need_temperature_grad:
        terms = terms_at_t(s_logp, t_logp, need_grad)
        weight = grad_weight * t
        grad = terms.grad.mul_(weight) if need_grad and not (isinstance(weight, float) and weight == 1.0) else terms.grad
        return TokenTerms(terms.value * (t_values * t_values), grad)
    with forward_ad.dual_level():
        student_dual = forward_ad.make_dual(s_logp, _sharpening_tangent(s_logp))
        teacher_dual = forward_ad.make_dual(t_logp, _sharpening_tangent(t_logp))
        terms = terms_at_t(student_dual, teacher_dual, need_grad)
        value, d_scale = forward_ad.unpack_dual(terms.value)
        grad = forward_ad.unpack_dual(terms.grad).primal.mul_(grad_weight * t) if need_grad else None
    temperature_grad = t_values * (2.0 * value - d_scale)
    return TokenTerms(value * (t_values * t_values), grad, temperature_grad=temperature_grad)


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

    def row_terms(logit_rows, _, row_targets, _temperature, need_grad, _need_temperature_grad):
        return _cross_entropy_terms(_log_softmax_(logit_rows), row_targets, need_grad, overwrite=True)

    loss, _ = _chunked_loss(
        logits, None, rows, targets, row_terms,
        reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    return loss


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in batch or sequence shape"
        )


def _check_temperature(temperature: Tensor | float, num_rows: int) -> Tensor | float:
    """A positive float, 0-dim tensor, or one temperature per scored row (a learnt instance temperature)."""
    if not torch.is_tensor(temperature):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        return float(temperature)
    if temperature.dim() > 1 or (temperature.dim() == 1 and temperature.numel() != num_rows):
        raise ValueError(
            f"a temperature tensor must be a scalar or hold one value per scored token ({num_rows}), "
            f"got shape {tuple(temperature.shape)}"
        )
    if not bool((temperature.detach() > 0).all()):
        raise ValueError("every temperature must be positive")
    return temperature


def _tempered_divergence(divergence: str, jsd_beta: float, skew_lambda: float, normalised: bool):
    """``kd_rows``: T^2 x ``divergence`` at the rows' temperature, from logits or (``normalised``)
    log-probabilities at T = 1."""
    terms_at_t = divergence_terms(divergence, jsd_beta, skew_lambda)
    return functools.partial(_divergence_rows, terms_at_t, normalised=normalised)


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
    differentiable with respect to it.
    """
    _check_pair(student_logits, teacher_logits)
    kd_rows = _tempered_divergence(divergence, jsd_beta, skew_lambda, normalised=False)
    vocab_size = _vocab(vocab_size, student_logits, teacher_logits)
    rows, targets = response_rows(labels, student_logits)
    temperature = _check_temperature(temperature, rows.numel())

    def row_terms(student_rows, teacher_rows, _, t, need_grad, need_temperature_grad):
        return kd_rows(student_rows, teacher_rows, t, need_grad, need_temperature_grad)

    loss, _ = _chunked_loss(
        student_logits, teacher_logits, rows, targets, row_terms, temperature=temperature,
        reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, chunk_size=chunk_size,
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
    kd_rows,
    *,
    kd_reads_logits: bool,
    kd_ratio: float,
    temperature: Tensor | float | None,
    num_items_in_batch: Tensor | int | None,
    vocab_size: int | None,
    chunk_size: int | None,
    reduction: str,
    shift_labels: bool,
    teacher_cross_entropy: bool,
) -> DistillationTerms:
    """(1 - kd_ratio) CE + kd_ratio ``kd_rows`` in one chunked pass with one gradient buffer.

    ``kd_rows(student_rows, teacher_rows, t, need_grad, need_temperature_grad, grad_weight)``
    returns the KD term per row and ``grad_weight`` x its gradient w.r.t. the student logits. It
    gets the rows as log-probabilities at T = 1, which the CE terms are read from too (one
    log-softmax per model for both), or, if ``kd_reads_logits``, as logits.
    ``teacher_cross_entropy`` also reports the teacher's CE from the rows already in hand.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
    _check_pair(student_logits, teacher_logits)
    vocab_size = _vocab(vocab_size, student_logits, teacher_logits)
    rows, targets = _response_targets(labels, student_logits, vocab_size, shift_labels)
    if temperature is not None:
        temperature = _check_temperature(temperature, rows.numel())
    r = float(kd_ratio)

    def row_terms(student_rows, teacher_rows, row_targets, t, need_grad, need_temperature_grad):
        if kd_reads_logits:  # the KD term needs the logits intact: the CEs get their own log-softmax
            student_logp = student_rows.log_softmax(-1)
            teacher_logp = teacher_rows.log_softmax(-1) if teacher_cross_entropy else None
        else:
            student_rows, teacher_rows = _log_softmax_(student_rows), _log_softmax_(teacher_rows)
            student_logp, teacher_logp = student_rows, teacher_rows
        # r = 1: the CE is only logged
        ce = _cross_entropy_terms(student_logp, row_targets, need_grad and r < 1.0, overwrite=False)
        columns = [None, ce.value]
        if teacher_cross_entropy:
            columns.append(_cross_entropy_terms(teacher_logp, row_targets, False, overwrite=False).value)
        del student_logp, teacher_logp
        kd = kd_rows(student_rows, teacher_rows, t, need_grad, need_temperature_grad, r)
        columns[0] = kd.value
        grad = kd.grad if ce.grad is None else kd.grad.add_(ce.grad, alpha=1.0 - r)
        temperature_grad = None if kd.temperature_grad is None else r * kd.temperature_grad
        return TokenTerms((1.0 - r) * ce.value + r * kd.value, grad, torch.stack(columns, 1), temperature_grad)

    loss, parts = _chunked_loss(
        student_logits, teacher_logits, rows, targets, row_terms, temperature=temperature,
        reduction=reduction, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, chunk_size=chunk_size,
    )
    if parts.numel() == 0:  # no response token: every term is zero
        parts = torch.zeros(3 if teacher_cross_entropy else 2, device=loss.device)
    return DistillationTerms(loss, kd=parts[0], ce=parts[1], teacher_ce=parts[2] if teacher_cross_entropy else None)


def distillation_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
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
) -> DistillationTerms:
    """(1 - kd_ratio) CE + kd_ratio KD in one chunked pass with one gradient buffer.

    The same values as ``causal_lm_cross_entropy`` and ``distillation_loss`` mixed, for about the
    memory of one of them: the student's logits are read once and their gradient written once.
    ``shift_labels=False`` distils a classification head (logits ``[B, C]``, labels ``[B]``). A
    tensor ``temperature`` (scalar or per scored token) receives d loss / dT (CTKD).
    ``teacher_cross_entropy=True`` fills ``teacher_ce`` in the same pass, instead of another one.
    """
    return _mixed_objective(
        student_logits, teacher_logits, labels, _tempered_divergence(divergence, jsd_beta, skew_lambda, normalised=True),
        kd_reads_logits=False, kd_ratio=kd_ratio, temperature=temperature, num_items_in_batch=num_items_in_batch,
        vocab_size=vocab_size, chunk_size=chunk_size, reduction=reduction, shift_labels=shift_labels,
        teacher_cross_entropy=teacher_cross_entropy,
    )


def _scaled_teacher_mse_rows(teacher_scale: float):
    """``kd_rows`` of Annealing-KD: mean over the vocabulary of (z_s - teacher_scale z_t)^2."""

    def kd_rows(student_rows, teacher_rows, _t, need_grad, _need_temperature_grad, grad_weight=1.0):
        diff = teacher_rows.mul_(-teacher_scale).add_(student_rows)
        value = diff.square().mean(-1)
        return TokenTerms(value, diff.mul_(2.0 * grad_weight / diff.size(-1)) if need_grad else None)

    return kd_rows


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
    if not teacher_scale > 0:
        raise ValueError(f"teacher_scale must be positive, got {teacher_scale}")
    return _mixed_objective(
        student_logits, teacher_logits, labels, _scaled_teacher_mse_rows(float(teacher_scale)),
        kd_reads_logits=True, kd_ratio=kd_ratio, temperature=None, num_items_in_batch=num_items_in_batch,
        vocab_size=vocab_size, chunk_size=chunk_size, reduction=reduction, shift_labels=shift_labels,
        teacher_cross_entropy=teacher_cross_entropy,
    )


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
    _check_pair(student_logits, teacher_logits)
    vocab_size = _vocab(vocab_size, student_logits, teacher_logits)
    rows, _ = response_rows(labels, student_logits, shift_labels)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), vocab_size)
    student_flat = student_logits.reshape(-1, student_logits.size(-1))
    teacher_flat = teacher_logits.reshape(-1, teacher_logits.size(-1))
    student_buffer = _chunk_buffer(student_flat, rows, chunk_size, vocab_size)
    teacher_buffer = _chunk_buffer(teacher_flat, rows, chunk_size, vocab_size)
    log_vocab = math.log(vocab_size) if vocab_size > 1 else 1.0
    features = []
    for _, _, pieces in _chunks(_row_runs(rows), chunk_size):
        s_logp = _log_softmax_(_copy_rows(student_flat, pieces, student_buffer, vocab_size))
        t_logp = _log_softmax_(_copy_rows(teacher_flat, pieces, teacher_buffer, vocab_size))
        p, q = t_logp.exp(), s_logp.exp()
        teacher_entropy = -(p * t_logp).sum(-1)
        kl = (p * (t_logp - s_logp)).sum(-1)
        features.append(torch.stack([
            teacher_entropy / log_vocab,
            -(q * s_logp).sum(-1) / log_vocab,
            p.amax(-1),
            q.amax(-1),
            kl.clamp_min(0.0).log1p(),
        ], 1))
    return torch.cat(features) if features else torch.zeros((0, len(TOKEN_FEATURES)), device=student_logits.device)


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
