"""Chunked fused losses against a dense float64 reference differentiated by autograd.

``dts_llm.losses`` writes the gradient with respect to the student logits from its closed form,
chunk by chunk (and a learnt temperature's by forward-mode AD), then attaches them to the loss. Everything here
checks values and gradients against a plain implementation (`references.py`: shift, log_softmax of
logits / T, divergence at every position, mask, mean, x T^2), never against the module's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import (
    CONFIG_IDS,
    CONFIGS,
    GRAD_TOL,
    NAMES,
    VALUE_TOL,
    B,
    L,
    V,
    assert_matches_reference,
    kl,
    make_labels,
    make_logits,
    masked_positions,
    reference_cross_entropy,
    reference_distillation,
    reference_objective,
    reference_per_token_distillation,
    reference_token_divergence,
    student_teacher,
    value_and_grad,
)

from dts_llm.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    TOKEN_FEATURES,
    annealing_objective,
    causal_lm_cross_entropy,
    distillation_loss,
    distillation_objective,
    response_rows,
    tempered_entropies,
    token_cross_entropies,
    token_features,
)
from dts_llm.losses.chunks import Reads, chunked_loss
from dts_llm.losses.kernels import MixedWithCrossEntropy, TemperedDivergence


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------
# Distillation loss: values and gradients
# --------------------------------------------------------------------------------------------


def test_divergence_registry_is_the_tested_set():
    assert set(DIVERGENCES) == set(NAMES)
    assert IGNORE_INDEX == -100


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 256])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("divergence, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_distillation_matches_dense_reference(divergence, kwargs, temperature, chunk_size):
    student, teacher = student_teacher()
    labels = make_labels()
    ours, grad = assert_matches_reference(
        student, teacher, labels, divergence=divergence, temperature=temperature, chunk_size=chunk_size, **kwargs
    )
    assert ours > 0
    assert grad.abs().sum() > 0
    # Positions that predict no response token get exactly zero gradient.
    assert torch.all(grad[masked_positions(labels)] == 0)


@pytest.mark.parametrize("divergence", NAMES)
def test_distillation_is_zero_when_student_equals_teacher(divergence):
    student, _ = student_teacher()
    loss, grad = value_and_grad(distillation_loss, student, student.clone(), make_labels(), divergence=divergence)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("num_items", [23, torch.tensor(23)], ids=["int", "tensor"])
def test_num_items_in_batch_normalisation(divergence, num_items):
    student, teacher = student_teacher()
    labels = make_labels()
    ours, _ = assert_matches_reference(
        student, teacher, labels, divergence=divergence, temperature=2.5, num_items_in_batch=num_items, chunk_size=3
    )
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert tokens != 23
    mean = distillation_loss(student, teacher, labels, divergence=divergence, temperature=2.5)
    torch.testing.assert_close(ours, mean * tokens / 23, **VALUE_TOL)


@pytest.mark.parametrize("divergence", NAMES)
def test_sum_reduction(divergence):
    student, teacher = student_teacher()
    labels = make_labels()
    ours, _ = assert_matches_reference(
        student, teacher, labels, divergence=divergence, temperature=0.7, reduction="sum", chunk_size=7
    )
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    mean = distillation_loss(student, teacher, labels, divergence=divergence, temperature=0.7)
    torch.testing.assert_close(ours, mean * tokens, **VALUE_TOL)
    # num_items_in_batch does not apply to a sum.
    summed = distillation_loss(
        student, teacher, labels, divergence=divergence, temperature=0.7, reduction="sum", num_items_in_batch=5
    )
    torch.testing.assert_close(summed, ours, **VALUE_TOL)


@pytest.mark.parametrize("divergence", NAMES)
def test_upstream_gradient_scales_the_result(divergence):
    student, teacher = student_teacher()
    labels = make_labels()
    ours, grad = value_and_grad(lambda s: -2.5 * distillation_loss(s, teacher, labels, divergence=divergence), student)
    ref, ref_grad = value_and_grad(
        lambda s: -2.5 * reference_distillation(s, teacher, labels, divergence=divergence),
        student,
        dtype=torch.float64,
    )
    torch.testing.assert_close(ours.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)


@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("vocab_size", [V, None], ids=["explicit", "default"])
def test_padded_vocabularies_are_cut(divergence, vocab_size):
    """Student V+5, teacher V+2 columns (padded embeddings): cut to vocab_size, or to the narrower
    width (V+2) by default; the extra student columns get exactly zero gradient."""
    student, teacher = student_teacher(V + 5, V + 2)
    labels = make_labels()
    _, grad = assert_matches_reference(
        student, teacher, labels, divergence=divergence, temperature=2.5, vocab_size=vocab_size, chunk_size=3
    )
    used = V if vocab_size is not None else V + 2
    assert grad.shape == student.shape
    assert torch.all(grad[..., used:] == 0)
    assert grad[..., :used].abs().sum() > 0
    # Changing what lies beyond the cut changes nothing.
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[..., used:] += 100.0
    noisy_teacher[..., used:] -= 100.0
    kwargs = {"divergence": divergence, "temperature": 2.5, "vocab_size": vocab_size}
    noisy = distillation_loss(noisy_student, noisy_teacher, labels, **kwargs)
    assert torch.equal(noisy, distillation_loss(student, teacher, labels, **kwargs))


@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("reduction, num_items", [("mean", None), ("mean", torch.tensor(0)), ("sum", None)])
def test_no_response_token_gives_exact_zero(divergence, reduction, num_items):
    student, teacher = student_teacher()
    labels = make_labels()
    labels[:, 1:] = IGNORE_INDEX  # labels[:, 0] is never predicted, so this leaves nothing.
    kwargs = {"divergence": divergence, "reduction": reduction, "num_items_in_batch": num_items}
    loss, grad = value_and_grad(distillation_loss, student, teacher, labels, **kwargs)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", NAMES)
def test_half_precision_logits(divergence, dtype):
    student, teacher = student_teacher()
    labels = make_labels()
    kwargs = {"divergence": divergence, "temperature": 2.5}
    low_student, low_teacher = student.to(dtype), teacher.to(dtype)
    loss, grad = value_and_grad(distillation_loss, low_student, low_teacher, labels, chunk_size=3, **kwargs)
    assert grad.dtype == dtype
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    # Computed in fp32 from the rounded inputs: as exact as fp32 on those inputs ...
    ref, ref_grad = value_and_grad(
        reference_distillation, low_student, low_teacher, labels, dtype=torch.float64, **kwargs
    )
    torch.testing.assert_close(loss.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-5)  # gradient stored in `dtype`
    # ... and close to the fp32 result on the unrounded logits.
    full, full_grad = value_and_grad(distillation_loss, student, teacher, labels, **kwargs)
    torch.testing.assert_close(loss, full, rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(grad.float(), full_grad, rtol=0, atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 2.5])
@pytest.mark.parametrize("divergence", NAMES)
def test_huge_logits_stay_finite(divergence, temperature, dtype):
    g = torch.Generator().manual_seed(3)
    student = ((torch.rand(B, L, V, generator=g) * 2 - 1) * 1e4).to(dtype)
    teacher = ((torch.rand(B, L, V, generator=g) * 2 - 1) * 1e4).to(dtype)
    labels = make_labels()
    kwargs = {"divergence": divergence, "temperature": temperature}
    loss, grad = value_and_grad(distillation_loss, student, teacher, labels, chunk_size=3, **kwargs)
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(grad))
    ref, ref_grad = value_and_grad(reference_distillation, student, teacher, labels, dtype=torch.float64, **kwargs)
    assert torch.isfinite(ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    # Gradient entries are bounded by ~ 2 T / tokens; fp32 log-probs of size 1e4 lose ~1e-3.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("divergence", NAMES)
def test_large_common_offset_is_harmless(divergence):
    """Softmax is shift invariant: logits around 1e4 give the result of the same logits around 0,
    up to the fp32 spacing of 1e4 (~1e-3)."""
    student, teacher = student_teacher()
    labels = make_labels()
    shifted = value_and_grad(distillation_loss, student + 1e4, teacher - 1e4, labels, divergence=divergence)
    expected = value_and_grad(
        reference_distillation, student, teacher, labels, divergence=divergence, dtype=torch.float64
    )
    for ours, ref in zip(shifted, expected, strict=False):
        assert torch.all(torch.isfinite(ours))
        torch.testing.assert_close(ours.double(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("divergence", NAMES)
def test_teacher_gets_no_gradient(divergence):
    student, teacher = student_teacher()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = distillation_loss(student, teacher, make_labels(), divergence=divergence)
    grad_student, grad_teacher = torch.autograd.grad(loss, [student, teacher], allow_unused=True)
    assert grad_teacher is None or torch.all(grad_teacher == 0)
    assert grad_student.abs().sum() > 0
    loss = distillation_loss(student, teacher, make_labels(), divergence=divergence)
    loss.backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)


@pytest.mark.parametrize("divergence", NAMES)
def test_no_grad_and_eval_paths(divergence):
    student, teacher = student_teacher()
    labels = make_labels()
    expected = reference_distillation(student, teacher, labels, divergence=divergence, temperature=2.5)
    # Student that does not require grad (evaluation without a no_grad context).
    plain = distillation_loss(student, teacher, labels, divergence=divergence, temperature=2.5, chunk_size=3)
    assert not plain.requires_grad
    torch.testing.assert_close(plain.double(), expected, **VALUE_TOL)
    # Student that requires grad, inside torch.no_grad().
    with torch.no_grad():
        leaf = student.clone().requires_grad_(True)
        inside = distillation_loss(leaf, teacher, labels, divergence=divergence, temperature=2.5, chunk_size=3)
    assert not inside.requires_grad
    torch.testing.assert_close(inside.double(), expected, **VALUE_TOL)
    # inference_mode too.
    with torch.inference_mode():
        inferred = distillation_loss(student, teacher, labels, divergence=divergence, temperature=2.5)
    torch.testing.assert_close(inferred.double(), expected, **VALUE_TOL)


@pytest.mark.parametrize("divergence", NAMES)
def test_float64_inputs_are_supported(divergence):
    student, teacher = student_teacher()
    labels = make_labels()
    kwargs = {"divergence": divergence, "temperature": 0.7}
    loss, grad = value_and_grad(distillation_loss, student.double(), teacher.double(), labels, **kwargs)
    ref, ref_grad = value_and_grad(reference_distillation, student.double(), teacher, labels, **kwargs)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(loss.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)


@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_gradient_accumulation_matches_full_batch(divergence, as_tensor):
    """Two micro-batches (1 and 2 sequences, different token counts), each divided by the token
    count of the whole batch, sum to the full-batch loss and gradient."""
    student, teacher = student_teacher()
    labels = make_labels()
    total = int((labels[:, 1:] != IGNORE_INDEX).sum())
    num_items = torch.tensor(total) if as_tensor else total
    kwargs = {"divergence": divergence, "temperature": 2.5, "chunk_size": 3}

    full, full_grad = value_and_grad(distillation_loss, student, teacher, labels, **kwargs)
    parts = [
        value_and_grad(
            distillation_loss, student[part], teacher[part], labels[part], num_items_in_batch=num_items, **kwargs
        )
        for part in (slice(0, 1), slice(1, 3))
    ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full, **VALUE_TOL)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, **GRAD_TOL)


@pytest.mark.parametrize(
    "layout",
    [
        lambda x: torch.cat([x, torch.randn(B, L, 4)], dim=-1)[..., :V],  # padded vocabulary sliced off
        lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),  # sequence-major storage
    ],
    ids=["sliced", "transposed"],
)
def test_non_contiguous_student_logits(layout):
    student, teacher = student_teacher()
    labels = make_labels()
    expected, expected_grad = value_and_grad(distillation_loss, student, teacher, labels, divergence="reverse_kl")
    strided = layout(student)
    assert not strided.is_contiguous()
    loss, grad = value_and_grad(distillation_loss, strided, teacher, labels, divergence="reverse_kl")
    torch.testing.assert_close(loss, expected, **VALUE_TOL)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOL)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(
    "loss",
    [
        lambda s, t, labels, temperature: distillation_loss(
            s, t, labels, divergence="forward_kl", temperature=temperature, chunk_size=4
        ),
        lambda s, t, labels, temperature: distillation_loss(
            s, t, labels, divergence="jsd", temperature=temperature, chunk_size=4
        ),
        lambda s, t, labels, temperature: (
            distillation_objective(
                s, t, labels, kd_ratio=0.5, temperature=temperature, chunk_size=4, teacher_cross_entropy=True
            ).loss
        ),
        lambda s, t, labels, temperature: (
            annealing_objective(s, t, labels, kd_ratio=0.5, teacher_scale=1 / temperature, chunk_size=4).loss
        ),
        lambda s, t, labels, temperature: causal_lm_cross_entropy(s, labels, chunk_size=4),
        lambda s, t, labels, temperature: token_features(s, t, labels, chunk_size=4).sum(),
    ],
    ids=["forward_kl", "jsd", "objective", "annealing", "cross_entropy", "token_features"],
)
def test_the_losses_never_write_into_the_logits_they_are_given(loss, temperature):
    """Rows are log-softmaxed in place, but in buffers: the model's logits stay as they were."""
    student, teacher = student_teacher(student_width=V + 4, teacher_width=V + 2)  # cut to V: strided rows
    labels = make_labels()
    leaf, teacher_in = student.clone().requires_grad_(True), teacher.clone()
    value = loss(leaf, teacher_in, labels, temperature)
    if value.requires_grad:
        value.backward()
    assert torch.isfinite(value)
    assert torch.equal(leaf.detach(), student) and torch.equal(teacher_in, teacher)
    torch.testing.assert_close(loss(leaf.detach(), teacher, labels, temperature), value.detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 256])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_items_in_batch": 23}, {"num_items_in_batch": torch.tensor(23)}, {"reduction": "sum"}],
    ids=["mean", "num_items-int", "num_items-tensor", "sum"],
)
def test_cross_entropy_matches_torch(kwargs, chunk_size):
    logits = make_logits(seed=4)
    labels = make_labels()
    ours, grad = value_and_grad(causal_lm_cross_entropy, logits, labels, chunk_size=chunk_size, **kwargs)
    ref, ref_grad = value_and_grad(reference_cross_entropy, logits, labels, dtype=torch.float64, **kwargs)
    torch.testing.assert_close(ours.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    assert torch.all(grad[masked_positions(labels)] == 0)


def test_cross_entropy_mean_equals_torch_mean():
    """The plain mean also equals F.cross_entropy's own mean over ignore_index, in fp32."""
    logits = make_logits(seed=4).requires_grad_(True)
    labels = make_labels()
    ours = causal_lm_cross_entropy(logits, labels)
    torch_loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ours, torch_loss, **VALUE_TOL)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    (torch_grad,) = torch.autograd.grad(torch_loss, logits)
    torch.testing.assert_close(ours_grad, torch_grad, **GRAD_TOL)


@pytest.mark.parametrize("vocab_size", [V, None], ids=["explicit", "default"])
def test_cross_entropy_padded_vocabulary(vocab_size):
    logits = make_logits(V + 5, seed=4)
    labels = make_labels()
    ours, grad = value_and_grad(causal_lm_cross_entropy, logits, labels, vocab_size=vocab_size, chunk_size=3)
    ref, ref_grad = value_and_grad(reference_cross_entropy, logits, labels, vocab_size=vocab_size, dtype=torch.float64)
    torch.testing.assert_close(ours.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    if vocab_size is not None:
        assert torch.all(grad[..., vocab_size:] == 0)


def test_cross_entropy_without_response_tokens_is_zero():
    logits = make_logits(seed=4)
    labels = torch.full((B, L), IGNORE_INDEX)
    labels[:, 0] = 3  # never predicted
    loss, grad = value_and_grad(causal_lm_cross_entropy, logits, labels)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_half_precision(dtype):
    logits = make_logits(seed=4)
    labels = make_labels()
    low = logits.to(dtype)
    loss, grad = value_and_grad(causal_lm_cross_entropy, low, labels, chunk_size=3)
    assert grad.dtype == dtype
    ref, ref_grad = value_and_grad(reference_cross_entropy, low, labels, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-5)
    full = causal_lm_cross_entropy(logits, labels)
    torch.testing.assert_close(loss, full, rtol=3e-2, atol=1e-3)


def test_cross_entropy_huge_logits():
    g = torch.Generator().manual_seed(3)
    logits = (torch.rand(B, L, V, generator=g) * 2 - 1) * 1e4
    labels = make_labels()
    loss, grad = value_and_grad(causal_lm_cross_entropy, logits, labels)
    ref, ref_grad = value_and_grad(reference_cross_entropy, logits, labels, dtype=torch.float64)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3)


def test_cross_entropy_gradient_accumulation():
    logits = make_logits(seed=4)
    labels = make_labels()
    total = int((labels[:, 1:] != IGNORE_INDEX).sum())
    full, full_grad = value_and_grad(causal_lm_cross_entropy, logits, labels)
    parts = [
        value_and_grad(causal_lm_cross_entropy, logits[part], labels[part], num_items_in_batch=total)
        for part in (slice(0, 1), slice(1, 3))
    ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full, **VALUE_TOL)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, **GRAD_TOL)


def test_response_rows_picks_shifted_targets():
    labels = make_labels()
    rows, targets = response_rows(labels, torch.zeros(B, L, V))
    b, i = rows // L, rows % L
    expected = [(bb, ii) for bb in range(B) for ii in range(L - 1) if labels[bb, ii + 1] != IGNORE_INDEX]
    assert list(zip(b.tolist(), i.tolist(), strict=False)) == expected
    assert targets.tolist() == [labels[bb, ii + 1].item() for bb, ii in expected]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _distill(teacher_logits=None, **kwargs):
    student, teacher = student_teacher()
    return distillation_loss(student, teacher if teacher_logits is None else teacher_logits, make_labels(), **kwargs)


@pytest.mark.parametrize(
    "overrides",
    [
        {"divergence": "kl"},
        {"divergence": "jsd", "jsd_beta": -0.1},
        {"divergence": "jsd", "jsd_beta": 1.1},
        {"divergence": "skew_forward_kl", "skew_lambda": 0.0},
        {"divergence": "skew_forward_kl", "skew_lambda": 1.0},
        {"divergence": "skew_reverse_kl", "skew_lambda": 0.0},
        {"divergence": "skew_reverse_kl", "skew_lambda": 1.0},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"vocab_size": V + 1},
        {"reduction": "none"},
        {"teacher_logits": make_logits(seed=2, length=L - 1)},
        {"teacher_logits": make_logits(seed=2, batch=B - 1)},
    ],
    ids=lambda o: "-".join(f"{k}={v if not torch.is_tensor(v) else tuple(v.shape)}" for k, v in o.items()),
)
def test_distillation_rejects_invalid_arguments(overrides):
    with pytest.raises(ValueError):
        _distill(**overrides)


def test_vocab_size_beyond_the_narrower_logits_is_rejected():
    student, teacher = student_teacher(V + 5, V + 2)
    with pytest.raises(ValueError):
        distillation_loss(student, teacher, make_labels(), vocab_size=V + 3)


@pytest.mark.parametrize("bad_id", [V, V + 3, -7])
def test_cross_entropy_rejects_labels_outside_vocab(bad_id):
    labels = make_labels()
    labels[1, 4] = bad_id
    with pytest.raises(ValueError):
        causal_lm_cross_entropy(make_logits(seed=4), labels)


def test_cross_entropy_rejects_invalid_arguments():
    logits, labels = make_logits(seed=4), make_labels()
    with pytest.raises(ValueError):
        causal_lm_cross_entropy(logits, labels, vocab_size=V + 1)
    with pytest.raises(ValueError):
        causal_lm_cross_entropy(logits, labels, reduction="mean_per_row")
    with pytest.raises(ValueError):  # an id valid for the logits but not for the cut vocabulary
        causal_lm_cross_entropy(logits, torch.where(labels == IGNORE_INDEX, labels, V - 1), vocab_size=V - 1)


@pytest.mark.parametrize("length", [L - 1, L + 1])
@pytest.mark.parametrize("loss", ["distillation", "cross_entropy"])
def test_labels_shape_must_match_logits(loss, length):
    """Labels whose shape differs from the logits' batch/sequence shape index the wrong rows."""
    student, teacher = student_teacher()
    labels = torch.randint(0, V, (B, length))
    with pytest.raises(ValueError):
        if loss == "distillation":
            distillation_loss(student, teacher, labels)
        else:
            causal_lm_cross_entropy(student, labels)


# --------------------------------------------------------------------------------------------
# The fused training objective: (1 - r) CE + r KD in one pass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [2, 256])
@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("divergence, kwargs", [("forward_kl", {}), ("jsd", {"jsd_beta": 0.3}), ("tvd", {})])
def test_objective_matches_the_mix_of_its_terms(divergence, kwargs, kd_ratio, chunk_size):
    student, teacher = student_teacher()
    labels = make_labels()
    settings = dict(divergence=divergence, temperature=2.5, **kwargs)
    leaf = student.clone().requires_grad_(True)
    terms = distillation_objective(leaf, teacher, labels, kd_ratio=kd_ratio, chunk_size=chunk_size, **settings)
    (grad,) = torch.autograd.grad(terms.loss, leaf)
    ref_leaf = student.double().requires_grad_(True)
    ref = reference_objective(ref_leaf, teacher, labels, kd_ratio=kd_ratio, **settings)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(terms.loss.double(), ref.detach(), **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    kd = reference_distillation(student, teacher, labels, **settings)
    ce = reference_cross_entropy(student, labels)
    torch.testing.assert_close(terms.kd.double(), kd, **VALUE_TOL)
    torch.testing.assert_close(terms.ce.double(), ce, **VALUE_TOL)
    assert not terms.kd.requires_grad and not terms.ce.requires_grad


def test_objective_sum_reduction_and_empty_batch():
    student, teacher = student_teacher()
    labels = make_labels()
    mean = distillation_objective(student, teacher, labels, kd_ratio=0.5, temperature=2.0)
    total = distillation_objective(student, teacher, labels, kd_ratio=0.5, temperature=2.0, reduction="sum")
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total.loss, mean.loss * count)
    torch.testing.assert_close(total.kd, mean.kd * count)
    leaf = student.clone().requires_grad_(True)
    empty = distillation_objective(leaf, teacher, torch.full_like(labels, IGNORE_INDEX), kd_ratio=0.5)
    (grad,) = torch.autograd.grad(empty.loss, leaf)
    assert empty.loss.item() == empty.kd.item() == empty.ce.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_fp16_gradient_keeps_small_values_under_loss_scaling():
    """AMP multiplies the loss by a large scale so that small fp16 gradients survive; the fused
    gradient must be scaled before it is rounded to fp16, as autograd would do."""
    student, teacher = student_teacher(scale=6.0)
    labels = make_labels()
    loss_scale = 2.0**16
    half = student.half().requires_grad_(True)
    (grad,) = torch.autograd.grad(distillation_loss(half, teacher.half(), labels) * loss_scale, half)
    assert grad.dtype == torch.float16
    full = student.half().float().requires_grad_(True)
    (expected,) = torch.autograd.grad(distillation_loss(full, teacher.half().float(), labels) * loss_scale, full)
    tiny = (expected.abs() > 0) & (expected.abs() < 2.0**-10 * loss_scale)
    assert tiny.any()
    torch.testing.assert_close(grad.float()[tiny], expected[tiny], rtol=2e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# A learnt temperature (CTKD): d loss / dT, for one T or one T per response token
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [3, 256])
@pytest.mark.parametrize("divergence, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_a_scalar_tensor_temperature_gets_the_dense_gradient(divergence, kwargs, chunk_size):
    student, teacher = student_teacher()
    labels = make_labels()
    settings = dict(divergence=divergence, **kwargs)
    leaf, temperature = student.clone().requires_grad_(True), torch.tensor(2.3, requires_grad=True)
    terms = distillation_objective(
        leaf, teacher, labels, kd_ratio=0.7, temperature=temperature, chunk_size=chunk_size, **settings
    )
    grad, temperature_grad = torch.autograd.grad(terms.loss * 3.0, (leaf, temperature))
    ref_leaf = student.double().requires_grad_(True)
    ref_temperature = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    ref = reference_objective(ref_leaf, teacher, labels, kd_ratio=0.7, temperature=ref_temperature, **settings)
    ref_grad, ref_temperature_grad = torch.autograd.grad(ref * 3.0, (ref_leaf, ref_temperature))
    torch.testing.assert_close(terms.loss.double(), ref.detach(), **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    torch.testing.assert_close(temperature_grad.double(), ref_temperature_grad, **GRAD_TOL)
    assert temperature_grad.abs() > 1e-4  # the check has something to compare


@pytest.mark.parametrize("chunk_size", [3, 256])
@pytest.mark.parametrize("divergence, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_one_temperature_per_token_gets_its_own_dense_gradient(divergence, kwargs, chunk_size):
    student, teacher = student_teacher()
    labels = make_labels()
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    values = torch.linspace(0.7, 6.0, count)
    temperatures = values.clone().requires_grad_(True)
    leaf = student.clone().requires_grad_(True)
    loss = distillation_loss(
        leaf, teacher, labels, divergence=divergence, temperature=temperatures, chunk_size=chunk_size, **kwargs
    )
    grad, temperature_grad = torch.autograd.grad(loss, (leaf, temperatures))
    ref_temperatures = values.double().requires_grad_(True)
    ref_leaf = student.double().requires_grad_(True)
    ref = reference_per_token_distillation(
        ref_leaf, teacher, labels, ref_temperatures, divergence=divergence, **kwargs
    )
    ref_grad, ref_temperature_grad = torch.autograd.grad(ref, (ref_leaf, ref_temperatures))
    torch.testing.assert_close(loss.double(), ref.detach(), **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    torch.testing.assert_close(temperature_grad.double(), ref_temperature_grad, **GRAD_TOL)
    assert temperature_grad.shape == (count,)


def test_a_temperature_tensor_without_grad_gives_the_float_result():
    student, teacher = student_teacher()
    labels = make_labels()
    as_float = value_and_grad(distillation_loss, student, teacher, labels, temperature=2.0)
    as_tensor = value_and_grad(distillation_loss, student, teacher, labels, temperature=torch.tensor(2.0))
    for a, b in zip(as_float, as_tensor, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["too few", "a matrix", "negative", "zero for one token"])
def test_bad_temperature_tensors_are_refused(kind):
    student, teacher = student_teacher()
    labels = make_labels()
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    temperature = {
        "too few": torch.ones(count - 1),
        "a matrix": torch.ones(count, 1),
        "negative": torch.tensor(-1.0),
        "zero for one token": torch.cat([torch.ones(count - 1), torch.zeros(1)]),
    }[kind]
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, labels, temperature=temperature)


# --------------------------------------------------------------------------------------------
# Annealing-KD's objective and the instance temperature's features
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kd_ratio", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("teacher_scale", [0.25, 1.0])
def test_annealing_objective_is_ce_mixed_with_mse_to_the_scaled_teacher_logits(kd_ratio, teacher_scale):
    student, teacher = student_teacher()
    labels = make_labels()
    leaf = student.clone().requires_grad_(True)
    terms = annealing_objective(leaf, teacher, labels, kd_ratio=kd_ratio, teacher_scale=teacher_scale, chunk_size=4)
    (grad,) = torch.autograd.grad(terms.loss, leaf)
    ref_leaf = student.double().requires_grad_(True)
    mask = labels[:, 1:] != IGNORE_INDEX
    mse = (ref_leaf[:, :-1] - teacher_scale * teacher[:, :-1].double()).square().mean(-1)
    ref_mse = torch.where(mask, mse, 0.0).sum() / mask.sum()
    ref = (1 - kd_ratio) * reference_cross_entropy(ref_leaf, labels) + kd_ratio * ref_mse
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(terms.loss.double(), ref.detach(), **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    torch.testing.assert_close(terms.kd.double(), ref_mse.detach(), **VALUE_TOL)


def test_token_features_match_a_dense_computation():
    student, teacher = student_teacher()
    labels = make_labels()
    features = token_features(student, teacher, labels, chunk_size=4)
    mask = labels[:, 1:] != IGNORE_INDEX
    log_q = student[:, :-1].double().log_softmax(-1)[mask]
    log_p = teacher[:, :-1].double().log_softmax(-1)[mask]
    expected = torch.stack(
        [
            -(log_p.exp() * log_p).sum(-1) / math.log(V),
            -(log_q.exp() * log_q).sum(-1) / math.log(V),
            log_p.exp().max(-1).values,
            log_q.exp().max(-1).values,
            kl(log_p, log_q).log1p(),
        ],
        1,
    )
    assert features.shape == (int(mask.sum()), len(TOKEN_FEATURES))
    torch.testing.assert_close(features.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_token", [False, True])
def test_tempered_entropies_match_a_dense_computation(per_token):
    student, teacher = student_teacher()
    labels = make_labels()
    mask = labels[:, 1:] != IGNORE_INDEX
    temperature = torch.linspace(0.5, 4.0, int(mask.sum())) if per_token else 2.5
    got = tempered_entropies(student, teacher, labels, temperature, chunk_size=4)
    column = temperature[:, None].double() if per_token else temperature

    def entropy(logits):
        log_probs = (logits[:, :-1].double()[mask] / column).log_softmax(-1)
        return -(log_probs.exp() * log_probs).sum()

    torch.testing.assert_close(got.double(), torch.stack([entropy(teacher), entropy(student)]), **VALUE_TOL)


def test_token_cross_entropies_match_a_dense_computation():
    student, teacher = student_teacher()
    labels = make_labels()
    values, sequences = token_cross_entropies(student, teacher, labels, chunk_size=4)
    mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][mask]

    def token_ce(logits):
        return -logits[:, :-1].double()[mask].log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    torch.testing.assert_close(values.double(), torch.stack([token_ce(student), token_ce(teacher)], 1), **VALUE_TOL)
    assert sequences.tolist() == mask.nonzero()[:, 0].tolist()


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_decoupled_temperatures_take_the_teacher_at_ratio_times_t_and_scale_by_the_students_t2(divergence, per_token):
    student, teacher = student_teacher()
    labels = make_labels()
    mask = labels[:, 1:] != IGNORE_INDEX
    temperature = torch.linspace(0.8, 3.0, int(mask.sum())) if per_token else 2.0
    column = temperature[:, None].double() if per_token else temperature

    def objective(leaf):
        return distillation_objective(
            leaf, teacher, labels, kd_ratio=1.0, divergence=divergence, temperature=temperature,
            teacher_temperature_ratio=1.5, chunk_size=4,
        ).loss  # fmt: skip

    def reference(leaf):
        log_q = (leaf[:, :-1][mask] / column).log_softmax(-1)
        log_p = (teacher[:, :-1].double()[mask] / (1.5 * column)).log_softmax(-1)
        per_token_kd = reference_token_divergence(log_q, log_p, divergence) * torch.as_tensor(column).flatten() ** 2
        return per_token_kd.sum() / mask.sum()

    ours, grad = value_and_grad(objective, student)
    ref, ref_grad = value_and_grad(reference, student, dtype=torch.float64)
    torch.testing.assert_close(ours.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    entropies = tempered_entropies(student, teacher, labels, temperature, teacher_temperature_ratio=1.5)
    log_p = (teacher[:, :-1].double()[mask] / (1.5 * column)).log_softmax(-1)
    torch.testing.assert_close(entropies[0].double(), -(log_p.exp() * log_p).sum(), **VALUE_TOL)


@pytest.mark.parametrize("objective", ["distillation", "annealing"])
def test_the_objective_reports_the_teachers_cross_entropy_from_its_own_pass(objective):
    student, teacher = student_teacher()
    labels = make_labels()
    settings = {"kd_ratio": 0.5, "chunk_size": 4, "teacher_cross_entropy": True}
    if objective == "distillation":
        terms = distillation_objective(student, teacher, labels, temperature=2.0, **settings)
        without = distillation_objective(student, teacher, labels, temperature=2.0, kd_ratio=0.5, chunk_size=4)
    else:
        terms = annealing_objective(student, teacher, labels, teacher_scale=0.5, **settings)
        without = annealing_objective(student, teacher, labels, teacher_scale=0.5, kd_ratio=0.5, chunk_size=4)
    torch.testing.assert_close(terms.teacher_ce.double(), reference_cross_entropy(teacher, labels), **VALUE_TOL)
    assert without.teacher_ce is None
    for name in ("loss", "kd", "ce"):  # asking for it changes nothing else
        torch.testing.assert_close(getattr(terms, name), getattr(without, name), rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reads", list(Reads))
@pytest.mark.parametrize("kd_ratio", [None, 0.5])
def test_a_divergence_kernel_is_right_whichever_rows_it_reads(reads, temperature, kd_ratio):
    """The chunk engine hands a kernel what its ``reads`` says, alone or mixed with the CE, so no
    pairing can score raw logits as log-probabilities (as the flag pair it replaced could)."""
    student, teacher = student_teacher()
    labels = make_labels()
    rows, targets = response_rows(labels, student)
    kd = TemperedDivergence(DIVERGENCES["forward_kl"], reads=reads)
    kernel = kd if kd_ratio is None else MixedWithCrossEntropy(kd, kd_ratio, teacher_cross_entropy=False)

    def loss(leaf):
        sizes = {"vocab_size": V, "chunk_size": 4, "num_items_in_batch": None, "reduction": "mean"}
        return chunked_loss(kernel, leaf, teacher, rows, targets, temperature=temperature, **sizes)[0]

    def reference(leaf):
        if kd_ratio is None:
            return reference_distillation(leaf, teacher, labels, temperature=temperature)
        return reference_objective(leaf, teacher, labels, kd_ratio=kd_ratio, temperature=temperature)

    ours, ours_grad = value_and_grad(loss, student)
    ref, ref_grad = value_and_grad(reference, student, dtype=torch.float64)
    torch.testing.assert_close(ours.double(), ref, **VALUE_TOL)
    torch.testing.assert_close(ours_grad.double(), ref_grad, **GRAD_TOL)
