"""Divergences between the teacher's and the student's token distributions, in closed form.

Each takes both models' log-probabilities per row (``[rows, V]``) and returns the divergence per
row and, when asked, its gradient with respect to the student's logits at that temperature, so
that no autograd graph over the vocabulary is ever built.

``forward_kl`` is the true KL(p_teacher || p_student). MiniLLM and the DTS reference code use the
soft cross-entropy -sum p log q instead; the two differ by the teacher entropy, which does not
depend on the student, so their gradients are identical and only the logged value differs (KL is
zero when the student matches the teacher, which makes it the readable one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .chunks import TokenTerms

Divergence = Callable[[Tensor, Tensor, bool], TokenTerms]


def _softmax_grad(q: Tensor, dloss_dq: Tensor) -> Tensor:
    """Chain rule through softmax: d/ds_j = q_j (g_j - sum_k q_k g_k), with q = softmax(s)."""
    return q * (dloss_dq - (q * dloss_dq).sum(-1, keepdim=True))


def _mix_log(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), stable for probabilities given as logs."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(student_logp: Tensor, teacher_logp: Tensor, need_grad: bool) -> TokenTerms:
    """KL(p || q): mode-covering; the classic KD objective. Overwrites its inputs to save memory."""
    p = teacher_logp.exp()
    value = teacher_logp.sub_(student_logp).mul_(p).sum(-1)
    return TokenTerms(value, student_logp.exp_().sub_(p) if need_grad else None)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor, need_grad: bool) -> TokenTerms:
    """KL(q || p): mode-seeking, as in MiniLLM's objective (here off-policy, on the data)."""
    q = student_logp.exp()
    log_ratio = student_logp - teacher_logp
    value = (q * log_ratio).sum(-1)
    return TokenTerms(value, q * (log_ratio - value[:, None]) if need_grad else None)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, need_grad: bool, beta: float) -> TokenTerms:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (TRL/GKD's convention)."""
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp, need_grad)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp, need_grad)
    p, q = teacher_logp.exp(), student_logp.exp()
    log_m = _mix_log(teacher_logp, student_logp, beta)
    kl_q_m = (q * (student_logp - log_m)).sum(-1)
    value = beta * (p * (teacher_logp - log_m)).sum(-1) + (1.0 - beta) * kl_q_m
    if not need_grad:
        return TokenTerms(value, None)
    return TokenTerms(value, (1.0 - beta) * q * (student_logp - log_m - kl_q_m[:, None]))


def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, need_grad: bool, lam: float) -> TokenTerms:
    """KL(p || lam p + (1 - lam) q), DistiLLM's skew KL: bounded gradient when q << p."""
    p, q = teacher_logp.exp(), student_logp.exp()
    log_r = _mix_log(teacher_logp, student_logp, lam)
    value = (p * (teacher_logp - log_r)).sum(-1)
    if not need_grad:
        return TokenTerms(value, None)
    return TokenTerms(value, _softmax_grad(q, -(1.0 - lam) * (teacher_logp - log_r).exp()))


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, need_grad: bool, lam: float) -> TokenTerms:
    """KL(q || lam q + (1 - lam) p), DistiLLM's skew reverse KL."""
    q = student_logp.exp()
    log_r = _mix_log(student_logp, teacher_logp, lam)
    value = (q * (student_logp - log_r)).sum(-1)
    if not need_grad:
        return TokenTerms(value, None)
    return TokenTerms(value, _softmax_grad(q, student_logp - log_r - lam * (student_logp - log_r).exp()))


def total_variation(student_logp: Tensor, teacher_logp: Tensor, need_grad: bool) -> TokenTerms:
    """0.5 sum |p - q| (DistiLLM's TVD); the subgradient is taken as 0 where p == q."""
    q = student_logp.exp()
    diff = q - teacher_logp.exp()
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


def divergence_terms(name: str, jsd_beta: float, skew_lambda: float) -> Divergence:
    """The divergence ``name`` with its mixing weight bound, after checking the weight's range."""
    if name not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {name!r}")
    if name == "jsd":
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        return functools.partial(generalized_jsd, beta=jsd_beta)
    if name.startswith("skew_"):
        if not 0.0 < skew_lambda < 1.0:
            raise ValueError(f"skew_lambda must be in (0, 1), got {skew_lambda}")
        return functools.partial(DIVERGENCES[name], lam=skew_lambda)
    return DIVERGENCES[name]
