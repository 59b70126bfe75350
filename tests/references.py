"""The dense float64 references the loss tests compare with (written plainly here: shift, log_softmax of
logits / T, the divergence at every position, mask, mean, x T^2, never the library's helpers), and the
shapes, tolerances and inputs those tests share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dts_llm.losses import IGNORE_INDEX, distillation_loss

B, L, V = 3, 9, 41

# fp32 arithmetic inside the implementation, float64 in the reference.
VALUE_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-7}

NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]

# (divergence, keyword arguments): every divergence, with several mixing weights where it has one.
CONFIGS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    *[("jsd", {"jsd_beta": beta}) for beta in (0.0, 0.1, 0.5, 0.9, 1.0)],
    *[("skew_forward_kl", {"skew_lambda": lam}) for lam in (0.1, 0.5, 0.9)],
    *[("skew_reverse_kl", {"skew_lambda": lam}) for lam in (0.1, 0.5, 0.9)],
    ("tvd", {}),
]
CONFIG_IDS = [name + "".join(f"-{v}" for v in kwargs.values()) for name, kwargs in CONFIGS]


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1.0 - weight_a))


def reference_token_divergence(log_q, log_p, divergence, jsd_beta=0.5, skew_lambda=0.1):
    """Per-position divergence between teacher p and student q (log-probabilities)."""
    if divergence == "forward_kl":
        return kl(log_p, log_q)
    if divergence == "reverse_kl":
        return kl(log_q, log_p)
    if divergence == "jsd":
        if jsd_beta == 0.0:
            return kl(log_p, log_q)
        if jsd_beta == 1.0:
            return kl(log_q, log_p)
        log_m = _log_mix(log_p, log_q, jsd_beta)
        return jsd_beta * kl(log_p, log_m) + (1.0 - jsd_beta) * kl(log_q, log_m)
    if divergence == "skew_forward_kl":
        return kl(log_p, _log_mix(log_p, log_q, skew_lambda))
    if divergence == "skew_reverse_kl":
        return kl(log_q, _log_mix(log_q, log_p, skew_lambda))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise AssertionError(divergence)


def _normalise(total, mask, num_items_in_batch, reduction):
    if reduction == "sum":
        return total
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return total / max(float(denominator), 1.0)


def reference_distillation(
    student,
    teacher,
    labels,
    *,
    divergence="forward_kl",
    temperature=1.0,
    jsd_beta=0.5,
    skew_lambda=0.1,
    num_items_in_batch=None,
    vocab_size=None,
    reduction="mean",
):
    vocab = vocab_size if vocab_size is not None else min(student.size(-1), teacher.size(-1))
    log_q = (student[:, :-1, :vocab].double() / temperature).log_softmax(-1)
    log_p = (teacher[:, :-1, :vocab].double() / temperature).log_softmax(-1)
    per_token = reference_token_divergence(log_q, log_p, divergence, jsd_beta, skew_lambda)
    mask = labels[:, 1:] != IGNORE_INDEX
    total = torch.where(mask, per_token, 0.0).sum() * temperature**2
    return _normalise(total, mask, num_items_in_batch, reduction)


def reference_cross_entropy(logits, labels, *, num_items_in_batch=None, vocab_size=None, reduction="mean"):
    vocab = vocab_size if vocab_size is not None else logits.size(-1)
    shifted = logits[:, :-1, :vocab].double().reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return _normalise(total, targets != IGNORE_INDEX, num_items_in_batch, reduction)


# --------------------------------------------------------------------------------------------
# Data and helpers
# --------------------------------------------------------------------------------------------


def make_labels(vocab: int = V, seed: int = 0) -> torch.Tensor:
    """B x L labels: row 0 prompt | response | right padding; row 1 no prompt, labels[0] valid
    (it is never predicted); row 2 prompt | response | a masked token | response | padding."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (B, L), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[0, 7:] = IGNORE_INDEX
    labels[2, :4] = IGNORE_INDEX
    labels[2, 5] = IGNORE_INDEX
    labels[2, 8:] = IGNORE_INDEX
    return labels


def make_logits(width: int = V, *, seed: int, scale: float = 3.0, batch: int = B, length: int = L):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, width, generator=g) * scale


def student_teacher(student_width: int = V, teacher_width: int = V, scale: float = 3.0):
    return make_logits(student_width, seed=1, scale=scale), make_logits(teacher_width, seed=2, scale=scale)


def value_and_grad(loss_fn, student, *args, dtype=None, **kwargs):
    """The loss and its gradient w.r.t. a fresh leaf copy of ``student`` (cast to ``dtype``)."""
    leaf = student.detach().to(dtype or student.dtype).requires_grad_(True)
    loss = loss_fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def assert_matches_reference(student, teacher, labels, **kwargs):
    """Ours (fp32 leaf) against the float64 reference: value and gradient."""
    chunk_size = kwargs.pop("chunk_size", 256)
    originals = student.clone(), teacher.clone(), labels.clone()
    ours, ours_grad = value_and_grad(distillation_loss, student, teacher, labels, chunk_size=chunk_size, **kwargs)
    for before, after in zip(originals, (student, teacher, labels), strict=False):
        assert torch.equal(before, after), "the loss modified its inputs"
    ref, ref_grad = value_and_grad(reference_distillation, student, teacher, labels, dtype=torch.float64, **kwargs)
    torch.testing.assert_close(ours.double(), ref, **VALUE_TOL)
    assert ours_grad.dtype == student.dtype
    torch.testing.assert_close(ours_grad.double(), ref_grad, **GRAD_TOL)
    return ours, ours_grad


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """B x L bool: logit positions that predict no response token (including the last position)."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return ~predicts


def reference_objective(student, teacher, labels, *, kd_ratio, vocab_size=None, reduction="mean", **kwargs):
    """(1 - r) CE + r T^2 D of float64 logits, both cut to ``vocab_size``."""
    ce = reference_cross_entropy(student, labels, vocab_size=vocab_size, reduction=reduction)
    kd = reference_distillation(student, teacher, labels, vocab_size=vocab_size, reduction=reduction, **kwargs)
    return (1 - kd_ratio) * ce + kd_ratio * kd


def reference_per_token_distillation(
    student, teacher, labels, temperatures, *, divergence, jsd_beta=0.5, skew_lambda=0.1
):
    """Mean over response tokens of T_i^2 D at T_i, with the T_i in row-major response order."""
    mask = labels[:, 1:] != IGNORE_INDEX
    grid = torch.ones(mask.shape, dtype=torch.float64).masked_scatter(mask, temperatures)
    log_q = (student[:, :-1].double() / grid[..., None]).log_softmax(-1)
    log_p = (teacher[:, :-1].double() / grid[..., None]).log_softmax(-1)
    per_token = reference_token_divergence(log_q, log_p, divergence, jsd_beta, skew_lambda) * grid**2
    return torch.where(mask, per_token, 0.0).sum() / mask.sum()
