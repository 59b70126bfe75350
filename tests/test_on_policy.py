"""On-policy and sequence-level distillation: which batches are generated, what their labels are, resuming."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import StopAt, config, tiny_gpt2
from helpers import train_logs as logs
from transformers import GPT2LMHeadModel

from dts_llm import DistillationConfig, DistillationTrainer
from dts_llm.losses import IGNORE_INDEX
from dts_llm.on_policy import STUDENT, TEACHER, batch_source

pytestmark = pytest.mark.usefixtures("single_thread")


class RecordingTrainer(DistillationTrainer):
    """Records every training micro-batch the loss sees, with its step and the student's mode."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen = getattr(self, "seen", [])
            self.seen.append((self.state.global_step, {k: v.clone() for k, v in inputs.items()}, model.training))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def run(tmp_path, tokenizer, teacher_dir, train_dataset, student=None, callbacks=(), **overrides):
    trainer = RecordingTrainer(
        model=student if student is not None else tiny_gpt2(tokenizer),
        teacher_model=str(teacher_dir),
        args=config(tmp_path, **{"max_steps": 3, "max_new_tokens": 8, **overrides}),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def check_completions(batch, eos_id, max_new_tokens):
    """Prompts masked, each completion learned up to and with its EOS (or cut at max_new_tokens), nothing after."""
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        learned = (labels != IGNORE_INDEX).nonzero().flatten()
        assert len(learned) and learned.tolist() == list(range(learned[0], learned[-1] + 1))  # one span
        assert torch.equal(labels[learned], ids[learned])
        ends_with_eos = labels[learned[-1]] == eos_id
        assert ends_with_eos or len(learned) == max_new_tokens
        assert eos_id not in labels[learned[:-1]].tolist()
        assert mask[: learned[-1] + 1].all() and not mask[learned[-1] + 1 :].any()  # padding after it
    return batch


def test_lmbda_zero_is_off_policy_and_an_undrawn_lmbda_leaves_the_trajectory(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    off = run(tmp_path / "off", tokenizer, trained_teacher_dir, train_dataset)
    assert off.on_policy is None  # lmbda=0, seq_kd=False: the off-policy step, untouched
    off.train()
    # Never drawn: the batches pass through the on-policy machinery unchanged, the global RNG untouched.
    undrawn = run(tmp_path / "undrawn", tokenizer, trained_teacher_dir, train_dataset, lmbda=1e-12)
    undrawn.train()
    names = ("loss", "kd_loss", "ce_loss", "temperature")
    assert [[entry[n] for n in names] for entry in logs(undrawn)] == [[entry[n] for n in names] for entry in logs(off)]
    assert [entry["generated_share"] for entry in logs(undrawn)] == [0.0] * 3
    for (_, a, _), (_, b, _) in zip(off.seen, undrawn.seen, strict=True):
        assert torch.equal(a["labels"], b["labels"])


def test_lmbda_one_trains_every_batch_on_the_students_completions(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    # The student starts as the trained teacher, so that its completions end with an EOS.
    student = GPT2LMHeadModel.from_pretrained(trained_teacher_dir)
    trainer = run(tmp_path, tokenizer, trained_teacher_dir, train_dataset, student=student, lmbda=1.0)
    generated = []
    complete = trainer.on_policy.complete

    def recording(batch, model, *args, **kwargs):
        assert model is trainer.model
        mode = model.training
        out = complete(batch, model, *args, **kwargs)
        assert model.training == mode  # generated in eval mode, then back
        generated.append((batch, out))
        return out

    trainer.on_policy.complete = recording
    trainer.train()
    assert len(generated) == len(trainer.seen) == 3
    for (original, replaced), (_, seen, training) in zip(generated, trainer.seen, strict=True):
        assert training and torch.equal(seen["labels"], replaced["labels"])
        check_completions(replaced, tokenizer.eos_token_id, 8)
        # the same prompts, from the batch's prompt mask
        for row in range(len(original["labels"])):
            prompt = original["input_ids"][row][
                (original["labels"][row] == IGNORE_INDEX) & original["attention_mask"][row].bool()
            ]
            first = (replaced["labels"][row] != IGNORE_INDEX).nonzero()[0].item()
            assert replaced["input_ids"][row][:first].tolist() == prompt[:first].tolist()
    assert any(batch["labels"].eq(tokenizer.eos_token_id).any() for _, batch in generated)  # the EOS is learned
    entries = logs(trainer)
    assert [entry["generated_share"] for entry in entries] == [1.0] * 3
    assert all(0 < entry["completion_length"] <= 8 and 0 <= entry["cut_share"] <= 1 for entry in entries)
    assert any(entry["cut_share"] < 1 for entry in entries)


def test_completions_stop_where_the_batch_would_outgrow_the_students_positions(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    longest_prompt = max(
        next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX) for row in train_dataset
    )
    positions = longest_prompt + 3  # at least three positions left after any batch's longest prompt
    student = tiny_gpt2(tokenizer, positions=positions)
    trainer = run(tmp_path, tokenizer, trained_teacher_dir, train_dataset, student=student, lmbda=1.0, max_steps=1)
    trainer.train()
    [(_, batch, _)] = trainer.seen
    # None of the untrained student's completions reaches an EOS: each runs until the batch fills the positions.
    assert batch["input_ids"].size(1) == positions and [entry["cut_share"] for entry in logs(trainer)] == [1.0]
    first_learned = (batch["labels"] != IGNORE_INDEX).int().argmax(1)
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [positions - first_learned.max().item()] * len(
        batch["labels"]
    )
    with pytest.raises(ValueError, match=r"a prompt of \d+ tokens leaves no room for a completion in the models' 8"):
        trainer.on_policy.complete(batch, student, 0, 0, gather=True, limit=8)


def test_seq_kd_trains_on_the_teachers_completions(tmp_path, tokenizer, trained_teacher_dir, train_dataset):
    # top_k=1: the teacher's greedy completions, which its own `generate` on each prompt alone must match.
    trainer = run(tmp_path, tokenizer, trained_teacher_dir, train_dataset, seq_kd=True, max_new_tokens=12, top_k=1)
    sources = []
    complete = trainer.on_policy.complete

    def recording(batch, model, *args, **kwargs):
        sources.append(model)
        return complete(batch, model, *args, **kwargs)

    trainer.on_policy.complete = recording
    trainer.train()
    teacher = trainer.teacher_model
    assert len(sources) == 3 and all(model is teacher for model in sources)
    eos = tokenizer.eos_token_id
    for _, batch, _ in trainer.seen:
        check_completions(batch, eos, 12)
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            learned = (labels != IGNORE_INDEX).nonzero().flatten()
            prompt = ids[: learned[0]].unsqueeze(0)
            alone = teacher.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            assert labels[learned].tolist() == alone[0, prompt.shape[1] :][: len(learned)].tolist()


def test_a_resumed_run_generates_what_the_uninterrupted_run_did(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    settings = {"lmbda": 0.5, "max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    full = run(tmp_path / "full", tokenizer, trained_teacher_dir, train_dataset, **settings)
    full.train()
    interrupted = run(
        tmp_path / "resumed", tokenizer, trained_teacher_dir, train_dataset, callbacks=(StopAt(3),), **settings
    )
    interrupted.train()
    resumed = run(tmp_path / "resumed", tokenizer, trained_teacher_dir, train_dataset, **settings)
    resumed.train(resume_from_checkpoint="last")

    sources = [batch_source(0, 0.5, False, step, 0) for step in range(6)]
    assert STUDENT in sources and None in sources  # lmbda=0.5: both kinds of step
    assert [step for step, _, _ in resumed.seen] == [3, 4, 5]
    for (_, expected, _), (_, got, _) in zip(full.seen[3:], resumed.seen, strict=True):
        assert torch.equal(expected["input_ids"], got["input_ids"]) and torch.equal(expected["labels"], got["labels"])
    expected, got = logs(full)[3:], logs(resumed)[3:]
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in expected], rel=1e-5)


def test_the_choice_of_batches_depends_on_the_seed_step_and_batch_only():
    sources = [batch_source(0, 0.3, True, step, index) for step in range(200) for index in range(2)]
    assert sources == [batch_source(0, 0.3, True, step, index) for step in range(200) for index in range(2)]
    assert sources != [batch_source(1, 0.3, True, step, index) for step in range(200) for index in range(2)]
    assert set(sources) == {STUDENT, TEACHER}
    assert sources.count(STUDENT) / len(sources) == pytest.approx(0.3, abs=0.06)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lmbda", 1.5, r"lmbda must be in \[0, 1\]"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("generation_temperature", 0.0, "generation_temperature must be > 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_k", -1, "top_k must be >= 0"),
        ("teacher_cache", "some/cache", "a teacher cache .* cannot score generated completions"),
    ],
)
def test_generation_settings_are_checked_before_training(field, value, message):
    extra = {"lmbda": 0.5} if field == "teacher_cache" else {}
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="unused", report_to=[], **{field: value, **extra})


def test_on_policy_batches_with_a_cross_entropy_term_are_warned_about():
    """CE on the student's own completions is self-training: warned, naming both fields; the settings GKD uses
    (kd_ratio 1), sequence-level KD (CE on the teacher's completions) and Annealing-KD (whose phases set the mix,
    not kd_ratio) are not."""
    with pytest.warns(UserWarning, match=r"lmbda=0.5 with kd_ratio=0.5: .* kd_ratio 1"):
        DistillationConfig(output_dir="unused", report_to=[], lmbda=0.5, kd_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistillationConfig(output_dir="unused", report_to=[], lmbda=0.5, kd_ratio=1.0)
        DistillationConfig(output_dir="unused", report_to=[], seq_kd=True, kd_ratio=0.5)
        DistillationConfig(output_dir="unused", report_to=[], lmbda=0.5, temperature_policy="annealing")  # own mix


def test_a_lora_student_generates_with_its_adapter_active(tmp_path, tokenizer, trained_teacher_dir, train_dataset):
    from peft import LoraConfig

    # A random (not zero) adapter, large enough to change the greedy completions.
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["c_attn"], init_lora_weights=False, task_type="CAUSAL_LM")
    trainer = DistillationTrainer(
        model=GPT2LMHeadModel.from_pretrained(trained_teacher_dir),
        teacher_model=str(trained_teacher_dir),
        args=config(tmp_path, max_steps=1, lmbda=1.0, max_new_tokens=6, top_k=1),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    pairs = []
    complete = trainer.on_policy.complete

    def recording(batch, model, *args, **kwargs):
        used = complete(batch, model, *args, **kwargs)
        with model.disable_adapter():
            pairs.append((used, complete(batch, model, *args, **kwargs)))
        return used

    trainer.on_policy.complete = recording
    trainer.train()
    (used, without_adapter), *_ = pairs
    assert not torch.equal(used["labels"], without_adapter["labels"])
