"""The fused-head objective (hidden states and output heads in, no logits tensor) against the float64
dense reference through the same heads, and against the logits path it replaces."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import chat_tokenizer, tiny_chat_model, tiny_gpt2
from references import (
    NAMES,
    VALUE_TOL,
    make_labels,
    reference_cross_entropy,
    reference_objective,
    reference_per_token_distillation,
)
from transformers import GPT2LMHeadModel

from dts_llm import DistillationConfig, DistillationTrainer
from dts_llm.errors import UserError
from dts_llm.fused_step import fused_heads
from dts_llm.heads import CAUSAL_LM
from dts_llm.losses import (
    IGNORE_INDEX,
    annealing_objective,
    distillation_objective,
    tempered_entropies,
    token_cross_entropies,
    token_features,
)
from dts_llm.losses.compact import inverse_temperature_grid
from dts_llm.losses.fused import (
    OutputHead,
    fused_annealing_objective,
    fused_cross_entropies,
    fused_distillation_objective,
    fused_tempered_entropies,
    fused_token_cross_entropies,
    fused_token_features,
)
from dts_llm.losses.topk import TopKTeacher

B, L, V, H, H_T = 3, 9, 41, 12, 16
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("single_thread")


def tensor(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class Case:
    """Hidden states and heads of a student and a teacher; heads ``pad`` rows wider than V; with ``tied``
    the student's head weight also makes its hidden states (an input embedding)."""

    def __init__(self, pad: int = 0, bias: bool = True, tied: bool = False, dtype=torch.float32):
        self.labels = make_labels()
        self.inputs = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(5))
        self.mixer = tensor(H, H, seed=6, scale=0.5)
        self.hidden = tensor(B, L, H, seed=1).to(dtype)
        self.weight = tensor(V + pad, H, seed=2, scale=0.6).to(dtype)
        self.bias = tensor(V + pad, seed=3).to(dtype) if bias else None
        self.teacher_hidden = tensor(B, L, H_T, seed=4).to(dtype)
        self.teacher_head = OutputHead(
            tensor(V + 2 * pad, H_T, seed=7, scale=0.6).to(dtype), tensor(V, seed=8).to(dtype)
        )
        self.tied = tied

    def leaves(self, dtype=None):
        """Fresh leaves (hidden states, weight, bias) of the student, cast to ``dtype``."""
        cast = [
            None if x is None else x.detach().to(dtype or x.dtype).requires_grad_()
            for x in (self.hidden, self.weight, self.bias)
        ]
        return cast

    def student_hidden(self, hidden, weight):
        """The student's hidden states; with a tied head they also read its weight as an embedding."""
        return torch.tanh(weight[self.inputs] @ self.mixer.to(weight.dtype)) + hidden if self.tied else hidden

    def teacher_logits(self, dtype):
        weight, bias = self.teacher_head
        return self.teacher_hidden.to(dtype) @ weight.to(dtype).T + F.pad(bias.to(dtype), (0, weight.size(0) - V))


def fused(case: Case, leaves, **kwargs):
    hidden, weight, bias = leaves
    return fused_distillation_objective(
        case.student_hidden(hidden, weight),
        OutputHead(weight, bias),
        case.teacher_hidden,
        case.teacher_head,
        case.labels,
        **kwargs,
    )


def through_logits(case: Case, leaves, objective, dtype=None, **kwargs):
    """``objective`` on the logits the heads make, in ``dtype`` (the leaves' own by default)."""
    hidden, weight, bias = leaves
    logits = F.linear(case.student_hidden(hidden, weight), weight, bias)
    return objective(logits, case.teacher_logits(dtype or logits.dtype), case.labels, **kwargs)


def grads(loss, leaves):
    present = [x for x in leaves if x is not None]
    return torch.autograd.grad(loss, present)


CHUNKS = [1, 4, None]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("divergence", NAMES)
def test_values_and_gradients_match_the_float64_reference_and_the_logits_path(divergence, temperature):
    case = Case(pad=5, tied=divergence in ("forward_kl", "jsd"))
    settings = {"kd_ratio": 0.6, "divergence": divergence, "temperature": temperature, "vocab_size": V}
    chunk_size = CHUNKS[NAMES.index(divergence) % 3]
    leaves = case.leaves()
    terms = fused(case, leaves, chunk_size=chunk_size, teacher_cross_entropy=True, **settings)
    ours = grads(terms.loss * 3.0, leaves)

    reference_leaves = case.leaves(torch.float64)
    reference = through_logits(case, reference_leaves, reference_objective, **settings)
    expected = grads(reference * 3.0, reference_leaves)
    torch.testing.assert_close(terms.loss.double(), reference.detach(), **VALUE_TOL)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL)
    assert not ours[1][V:].any(), "the padded rows of the head get no gradient"

    logits_leaves = case.leaves()
    unfused = through_logits(case, logits_leaves, distillation_objective, teacher_cross_entropy=True, **settings)
    for got, want in zip(ours, grads(unfused.loss * 3.0, logits_leaves), strict=True):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    for name in ("loss", "kd", "ce", "teacher_ce"):
        torch.testing.assert_close(getattr(terms, name), getattr(unfused, name), **VALUE_TOL)


@pytest.mark.parametrize("divergence", NAMES)
def test_a_compact_teachers_rows_meet_the_projected_student_as_on_the_logits_path(divergence):
    """A TopKTeacher (k = 8 of 41 tokens, T in its grid, one T per token for half the divergences) in place of
    the teacher's hidden states: the same bucketed KD, values and gradients, as with the student's logits."""
    case = Case(pad=3)
    count = int((case.labels[:, 1:] != IGNORE_INDEX).sum())
    per_token = NAMES.index(divergence) % 2 == 1
    temperature = torch.linspace(1.2, 2.8, count) if per_token else 2.0
    topk = TopKTeacher.from_logits(
        case.teacher_logits(torch.float32)[..., :V], k=8, betas=inverse_temperature_grid(1, 3)
    )
    settings = {"kd_ratio": 0.6, "divergence": divergence, "temperature": temperature, "vocab_size": V}
    leaves = case.leaves()
    hidden, weight, bias = leaves
    terms = fused_distillation_objective(
        hidden, OutputHead(weight, bias), topk, None, case.labels, chunk_size=4, **settings
    )
    logits_leaves = case.leaves()
    unfused = through_logits(
        case, logits_leaves, lambda s, t, labels, **k: distillation_objective(s, topk, labels, **k), **settings
    )
    for got, want in zip(grads(terms.loss, leaves), grads(unfused.loss, logits_leaves), strict=True):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(getattr(terms, name), getattr(unfused, name), **VALUE_TOL)
    with pytest.raises(ValueError, match="teacher_cross_entropy=True needs"):
        fused_distillation_objective(
            hidden, OutputHead(weight, bias), topk, None, case.labels, teacher_cross_entropy=True, **settings
        )


@pytest.mark.parametrize("per_token", [False, True], ids=["scalar", "per-token"])
@pytest.mark.parametrize("divergence", NAMES)
def test_a_learnt_temperature_gets_the_dense_gradient(divergence, per_token):
    case = Case()
    count = int((case.labels[:, 1:] != IGNORE_INDEX).sum())
    values = torch.linspace(0.7, 4.0, count) if per_token else torch.tensor(2.3)
    temperature = values.clone().requires_grad_()
    leaves = case.leaves()
    terms = fused(case, leaves, kd_ratio=0.7, divergence=divergence, temperature=temperature, chunk_size=5)
    ours = grads(terms.loss, [*leaves, temperature])

    reference_leaves = case.leaves(torch.float64)
    reference_temperature = values.double().requires_grad_()
    if per_token:
        reference = through_logits(
            case, reference_leaves, reference_per_token_distillation, temperatures=reference_temperature,
            divergence=divergence,
        )  # fmt: skip
        ce = through_logits(case, reference_leaves, lambda s, t, labels: reference_cross_entropy(s, labels))
        reference = 0.3 * ce + 0.7 * reference
    else:
        reference = through_logits(
            case, reference_leaves, reference_objective, kd_ratio=0.7, divergence=divergence,
            temperature=reference_temperature,
        )  # fmt: skip
    expected = grads(reference, [*reference_leaves, reference_temperature])
    torch.testing.assert_close(terms.loss.double(), reference.detach(), **VALUE_TOL)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL)
    assert ours[-1].shape == values.shape and ours[-1].abs().max() > 1e-4


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tvd"])
def test_bf16_heads_match_the_bf16_logits_path(divergence):
    case = Case(pad=3, dtype=torch.bfloat16)
    settings = {"kd_ratio": 0.5, "divergence": divergence, "temperature": 2.5, "vocab_size": V, "chunk_size": 4}
    leaves = case.leaves()
    terms = fused(case, leaves, **settings)
    ours = grads(terms.loss, leaves)
    assert all(g.dtype == torch.bfloat16 for g in ours)
    logits_leaves = case.leaves()
    unfused = through_logits(case, logits_leaves, distillation_objective, **settings)
    torch.testing.assert_close(terms.loss, unfused.loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(ours, grads(unfused.loss, logits_leaves), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-3)
    reference_leaves = case.leaves(torch.float64)
    reference = through_logits(
        case, reference_leaves, reference_objective, **{k: v for k, v in settings.items() if k != "chunk_size"}
    )
    torch.testing.assert_close(terms.loss.double(), reference.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kd_ratio", [0.0, 0.4, 1.0])
def test_annealing_kds_mse_of_the_projected_logits_matches_the_reference_and_the_logits_path(kd_ratio):
    """Annealing-KD's (1 - r) CE + r mean_v (z_s - s z_t)^2 of the raw logits both heads make, a padded head cut
    to V, chunk by chunk: values and gradients as a float64 dense computation and as ``annealing_objective``."""
    case = Case(pad=3)
    settings = {"kd_ratio": kd_ratio, "teacher_scale": 0.4, "vocab_size": V}
    leaves = case.leaves()
    hidden, weight, bias = leaves
    terms = fused_annealing_objective(
        hidden, OutputHead(weight, bias), case.teacher_hidden, case.teacher_head, case.labels, chunk_size=4, **settings
    )
    ours = grads(terms.loss, leaves)

    def reference(student, teacher, labels, *, kd_ratio, teacher_scale, vocab_size):
        student, teacher = student[..., :vocab_size], teacher[..., :vocab_size].double()
        mask = labels[:, 1:] != IGNORE_INDEX
        mse = (student[:, :-1] - teacher_scale * teacher[:, :-1]).square().mean(-1)
        mse = torch.where(mask, mse, 0.0).sum() / mask.sum()
        return (1 - kd_ratio) * reference_cross_entropy(student, labels) + kd_ratio * mse, mse

    reference_leaves = case.leaves(torch.float64)
    expected, expected_mse = through_logits(case, reference_leaves, reference, **settings)
    torch.testing.assert_close(terms.loss.double(), expected.detach(), **VALUE_TOL)
    torch.testing.assert_close(terms.kd.double(), expected_mse.detach(), **VALUE_TOL)
    for got, want in zip(ours, grads(expected, reference_leaves), strict=True):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL)

    logits_leaves = case.leaves()
    unfused = through_logits(case, logits_leaves, annealing_objective, chunk_size=4, **settings)
    for got, want in zip(ours, grads(unfused.loss, logits_leaves), strict=True):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    with pytest.raises(ValueError, match="teacher_scale must be positive"):
        fused_annealing_objective(hidden, OutputHead(weight), case.teacher_hidden, case.teacher_head, case.labels,
                                  kd_ratio=1.0, teacher_scale=0.0)  # fmt: skip


def test_gradient_accumulation_normalisation_and_sum_reduction():
    case = Case()
    settings = {"kd_ratio": 0.5, "temperature": 2.0, "chunk_size": 3}
    leaves = case.leaves()
    summed = fused(case, leaves, reduction="sum", **settings)
    normalised = fused(case, leaves, num_items_in_batch=torch.tensor(40), **settings)
    torch.testing.assert_close(normalised.loss, summed.loss / 40)
    for a, b in zip(grads(normalised.loss, leaves), grads(summed.loss, leaves), strict=True):
        torch.testing.assert_close(a * 40, b)


def test_a_frozen_head_gets_no_gradient_and_no_response_token_gives_zero():
    case = Case(bias=False)
    hidden, weight, _ = case.leaves()
    weight.requires_grad_(False)
    terms = fused(case, (hidden, weight, None), kd_ratio=0.5, temperature=2.0)
    assert weight.grad is None and terms.loss.requires_grad
    (hidden_grad,) = torch.autograd.grad(terms.loss, hidden)
    assert hidden_grad.abs().sum() > 0
    case.labels = torch.full((B, L), IGNORE_INDEX)
    leaves = case.leaves()
    empty = fused(case, leaves, kd_ratio=0.5, temperature=2.0)
    assert empty.loss == 0 and all(not g.any() for g in grads(empty.loss, leaves))


def test_the_no_grad_passes_match_the_logits_paths():
    """Token features (CTKD per token), token CEs (per-token DTS, AdaKD) and entropies at T (log_entropy)."""
    case = Case(pad=3)
    heads = (case.hidden, OutputHead(case.weight, case.bias), case.teacher_hidden, case.teacher_head, case.labels)
    logits = (F.linear(case.hidden, case.weight, case.bias), case.teacher_logits(torch.float32), case.labels)
    sizes = {"vocab_size": V, "chunk_size": 4}
    torch.testing.assert_close(fused_token_features(*heads, **sizes), token_features(*logits, **sizes))
    fused_ces, logits_ces = fused_token_cross_entropies(*heads, **sizes), token_cross_entropies(*logits, **sizes)
    for got, want in zip(fused_ces, logits_ces, strict=True):
        torch.testing.assert_close(got, want)
    count = int((case.labels[:, 1:] != IGNORE_INDEX).sum())
    for temperature in (2.5, torch.linspace(0.7, 3.0, count)):
        settings = {**sizes, "teacher_temperature_ratio": 1.5}
        got = fused_tempered_entropies(*heads, temperature=temperature, **settings)
        torch.testing.assert_close(got, tempered_entropies(*logits, temperature, **settings))


def test_cross_entropy_sums_match_the_reference():
    case = Case(pad=2)
    student, teacher = fused_cross_entropies(
        case.hidden, OutputHead(case.weight, case.bias), case.teacher_hidden, case.teacher_head, case.labels,
        vocab_size=V, chunk_size=4,
    )  # fmt: skip
    logits = F.linear(case.hidden, case.weight, case.bias)
    sums = {"reduction": "sum", "vocab_size": V}
    torch.testing.assert_close(student.double(), reference_cross_entropy(logits, case.labels, **sums), **VALUE_TOL)
    expected = reference_cross_entropy(case.teacher_logits(torch.float64), case.labels, **sums)
    torch.testing.assert_close(teacher.double(), expected, **VALUE_TOL)


# --------------------------------------------------------------------------------------------
# The trainer's fused_head step
# --------------------------------------------------------------------------------------------

TRAJECTORY = ("loss", "kd_loss", "ce_loss", "teacher_ce_loss", "temperature", "grad_norm")


def student_model(tokenizer, tied: bool, extra_vocab: int):
    model = tiny_gpt2(tokenizer, extra_vocab=extra_vocab)
    if tied:
        return model
    model.config.tie_word_embeddings = False
    torch.manual_seed(1)
    untied = GPT2LMHeadModel(model.config)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    return untied


def trained(
    tmp_path,
    tokenizer,
    train_dataset,
    eval_dataset,
    *,
    fused,
    tied=True,
    extra_vocab=0,
    peft=None,
    qwen2=False,
    **more,
):
    args = DistillationConfig(
        output_dir=str(tmp_path / f"fused-{fused}"), per_device_train_batch_size=8, optim="sgd", learning_rate=0.5,
        max_steps=3, logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True, fused_head=fused,
        **more,
    )  # fmt: skip
    if qwen2:  # the GPT-2 BPE plus ChatML's tokens: the datasets' ids are its own
        tokenizer = chat_tokenizer()
        student, teacher = tiny_chat_model("qwen2", tokenizer), tiny_chat_model("qwen2", tokenizer, width=48, seed=3)
    else:
        student = student_model(tokenizer, tied, extra_vocab)
        teacher = tiny_gpt2(tokenizer, width=48, seed=3, extra_vocab=2 * extra_vocab)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft,
    )
    trainer.train()
    return trainer, trainer.evaluate()


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature_policy": "dts"},
        {"temperature_policy": "ctkd", "ctkd_lambda_epochs": 0.1, "ctkd_learning_rate": 50.0, "tied": False},
        {"temperature_policy": "constant", "temperature_init": 2.0, "extra_vocab": 5, "tied": False},
        {"temperature_policy": "cosine", "lora": True, "gradient_accumulation_steps": 2},
        {"temperature_policy": "dts_paper", "qwen2": True},
        {"temperature_policy": "dts_token", "log_entropy": True, "teacher_temperature_ratio": 1.5},
        {"temperature_policy": "ctkd_instance", "ctkd_lambda_epochs": 0.1, "ctkd_learning_rate": 5.0},
        {"temperature_policy": "adakd", "extra_vocab": 3},
        {"temperature_policy": "annealing", "temperature_max": 4.0, "annealing_fraction": 0.6, "tied": False},
    ],
    ids=[
        "dts-tied",
        "ctkd-untied",
        "padded-vocab-untied",
        "lora-accumulated",
        "qwen2",
        "dts-token-entropies-decoupled",
        "ctkd-instance",
        "adakd",
        "annealing-both-phases",
    ],
)
def test_a_fused_head_run_follows_the_logits_run(settings, tmp_path, tokenizer, train_dataset, eval_dataset):
    from peft import LoraConfig

    settings = dict(settings)
    if settings.pop("lora", False):
        settings["peft"] = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    runs = [
        trained(tmp_path, tokenizer, train_dataset, eval_dataset, fused=fused, **settings) for fused in (False, True)
    ]
    (plain, plain_eval), (fused, fused_eval) = runs
    assert fused.fused_heads is not None and plain.fused_heads is None
    plain_logs, fused_logs = (train_logs(trainer) for trainer in (plain, fused))
    assert len(plain_logs) == len(fused_logs) == 3
    for expected, got in zip(plain_logs, fused_logs, strict=True):
        assert set(TRAJECTORY) <= set(expected) and got.keys() == expected.keys()
        for name in expected:  # every logged value: the terms, T, and what the policy and log_entropy log
            assert got[name] == pytest.approx(expected[name], rel=2e-5, abs=1e-6), name
    moves = settings["temperature_policy"] != "constant"
    assert (len({entry["temperature"] for entry in fused_logs}) > 1) == moves
    for name in ("eval_loss", "eval_kd_loss", "eval_ce_loss", "eval_teacher_ce_loss"):
        assert fused_eval[name] == pytest.approx(plain_eval[name], rel=2e-5, abs=1e-6), name
    fused_parameters = dict(fused.model.named_parameters())
    for name, parameter in plain.model.named_parameters():
        # SGD: Adam would blow float noise in near-zero gradients up to full-size steps
        torch.testing.assert_close(fused_parameters[name], parameter, rtol=1e-4, atol=1e-6)


def train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_a_peft_adapter_on_the_head_is_refused(tmp_path, tokenizer, train_dataset):
    from peft import LoraConfig

    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"], task_type="CAUSAL_LM")
    with pytest.raises(UserError, match="plain linear layer"):
        trained(tmp_path, tokenizer, train_dataset, None, fused=True, peft=peft)


def plugins(fsdp_version=None):
    """An accelerator as ``fused_heads`` reads it: its FSDP plugin, if any."""
    fsdp = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp))


@pytest.mark.parametrize(
    "head_kind, accelerator, refusal",
    [
        ("classification", plugins(), "a classification head's logits are small already"),
        (CAUSAL_LM, plugins(fsdp_version=1), "fused_head under FSDP needs fsdp_version: 2"),
    ],
)
def test_fsdp1_and_classifiers_are_refused_before_training(head_kind, accelerator, refusal, tokenizer, tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path), fused_head=True, report_to=[])
    model = tiny_gpt2(tokenizer)
    with pytest.raises(UserError, match=refusal):
        fused_heads(args, head_kind, model, model, None, accelerator)
    assert fused_heads(args, CAUSAL_LM, model, model, None, plugins(fsdp_version=2)).student is model.lm_head
