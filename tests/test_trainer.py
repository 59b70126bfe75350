"""DistillationTrainer end to end: real tiny GPT-2 models, the real GPT-2 tokenizer, the real Trainer."""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil

import pytest
import torch
from datasets import concatenate_datasets
from helpers import StopAt, config, tiny_gpt2, train_logs
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from dts_llm import DistillationTrainer
from dts_llm.temperature import LEARNED_TEMPERATURE_NAME, TEMPERATURE_STATE_NAME, ScheduledTemperature, ctkd_lambda

KD_METRICS = ("kd_loss", "ce_loss", "teacher_ce_loss", "temperature")


def trainer_for(tmp_path, tokenizer, teacher, train_dataset, eval_dataset=None, student=None, **overrides):
    return DistillationTrainer(
        model=student if student is not None else tiny_gpt2(tokenizer),
        teacher_model=teacher,
        args=config(tmp_path, **overrides),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def test_distillation_lowers_kd_loss_and_logs_every_term(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset, eval_dataset
):
    # KD values at different temperatures are not comparable (T^2 KL grows as T falls), so the
    # falling-loss check runs at a constant T; the DTS trajectory is tested elsewhere.
    trainer = trainer_for(
        tmp_path,
        tokenizer,
        str(trained_teacher_dir),
        train_dataset,
        eval_dataset,
        max_steps=24,
        learning_rate=1e-2,
        kd_ratio=0.9,
        temperature_policy="constant",
        temperature_init=2.0,
    )
    teacher_before = {k: v.clone() for k, v in trainer.teacher_model.state_dict().items()}
    trainer.train()

    logs = train_logs(trainer)
    assert len(logs) == 24
    for entry in logs:
        assert all(math.isfinite(entry[name]) for name in ("loss", *KD_METRICS))
    first, last = logs[0], logs[-1]
    assert last["kd_loss"] < 0.6 * first["kd_loss"]
    assert last["ce_loss"] < first["ce_loss"]
    # The total is the logged mix of the two terms (one micro-batch per logging window here).
    assert last["loss"] == pytest.approx(0.1 * last["ce_loss"] + 0.9 * last["kd_loss"], rel=1e-4)
    # The trained teacher is much better than a random student, and it never changes.
    assert first["teacher_ce_loss"] < 0.5 * first["ce_loss"]
    assert {entry["teacher_ce_loss"] for entry in logs} != {first["teacher_ce_loss"]}  # different batches
    for name, tensor in trainer.teacher_model.state_dict().items():
        assert torch.equal(tensor, teacher_before[name]), name
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())

    metrics = trainer.evaluate()
    for name in KD_METRICS:
        assert math.isfinite(metrics[f"eval_{name}"])
    assert metrics["eval_temperature"] == pytest.approx(trainer.temperature_policy.temperature)
    assert metrics["eval_loss"] == pytest.approx(
        0.1 * metrics["eval_ce_loss"] + 0.9 * metrics["eval_kd_loss"], rel=1e-3
    )


def test_dts_logs_its_rule_and_the_entropies_at_t_every_step(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset, eval_dataset
):
    trainer = trainer_for(
        tmp_path, tokenizer, str(trained_teacher_dir), train_dataset, eval_dataset, max_steps=4, log_entropy=True
    )
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 4
    for step, entry in enumerate(logs):  # one micro-batch per logging window: the rule's own values
        gap = entry["teacher_ce_loss"] - entry["ce_loss"]
        assert entry["dts_gap"] == pytest.approx(gap, rel=1e-5)
        assert entry["dts_a"] == pytest.approx(gap / (gap + 1 + 1e-4), rel=1e-4)
        assert entry["dts_fired"] == float(entry["dts_a"] > 1)
        assert entry["dts_cosine"] == pytest.approx((1 + math.cos(math.pi * step / 3)) / 2)
        # a trained teacher is surer than a random student, and no entropy exceeds log V
        assert 0 < entry["teacher_entropy"] < entry["student_entropy"] <= math.log(len(tokenizer)) + 1e-4
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_teacher_entropy"] < metrics["eval_student_entropy"]


def test_tensorboard_receives_distillation_scalars(tmp_path, tokenizer, trained_teacher_dir, train_dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = trainer_for(
        tmp_path, tokenizer, str(trained_teacher_dir), train_dataset, max_steps=3, report_to=["tensorboard"]
    )
    trainer.train()
    event_files = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert event_files
    scalars = {}
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
    for name in KD_METRICS:
        assert len(scalars[f"train/{name}"]) == 3
    logged = [entry["temperature"] for entry in train_logs(trainer)]
    assert scalars["train/temperature"] == pytest.approx(logged, rel=1e-6)


def full_and_interrupted_runs(tmp_path, tokenizer, teacher_dir, train_dataset, settings):
    """An uninterrupted run and one stopped after step 3 (saving every 3 steps), and its checkpoint."""
    full = trainer_for(tmp_path / "full", tokenizer, str(teacher_dir), train_dataset, **settings)
    full.train()
    interrupted = trainer_for(tmp_path / "resumed", tokenizer, str(teacher_dir), train_dataset, **settings)
    interrupted.add_callback(StopAt(3))
    interrupted.train()
    return full, interrupted, tmp_path / "resumed" / "run" / "checkpoint-3"


@pytest.mark.parametrize("policy, refused", [("dts", False), ("constant", True)])
def test_checkpoints_saved_with_the_old_field_names_are_compared_under_the_new_ones(tmp_path, policy, refused):
    """dts-llm 0.1 saved the policy's name as `temperature`; it is compared with `temperature_policy`."""
    from dts_llm.trainer import check_resumed_temperature

    settings = {
        "temperature": policy,
        "temperature_init": 3.0,
        "temperature_min": 1.0,
        "temperature_max": 3.0,
        "temperature_momentum": 0.9,
        "temperature_progress": "step",
    }
    (tmp_path / TEMPERATURE_STATE_NAME).write_text(json.dumps({"settings": settings, "state": {"temperature": 2.5}}))
    args = config(tmp_path, temperature_policy="dts")
    if refused:
        with pytest.raises(ValueError, match=r"temperature_policy \(checkpoint 'constant', this run 'dts'\)"):
            check_resumed_temperature(str(tmp_path), args)
    else:
        check_resumed_temperature(str(tmp_path), args)


def test_resumed_run_continues_the_same_temperature_and_loss_trajectory(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset, caplog
):
    # 32 examples / batch 8 = 4 steps an epoch; 8 steps = 2 epochs, so the per-epoch DTS progress
    # changes after the resume point.
    settings = {"max_steps": 8, "save_strategy": "steps", "save_steps": 3, "temperature_progress": "epoch"}
    full, interrupted, checkpoint = full_and_interrupted_runs(
        tmp_path, tokenizer, trained_teacher_dir, train_dataset, settings
    )
    saved = json.loads((checkpoint / TEMPERATURE_STATE_NAME).read_text())
    assert saved["state"]["temperature"] == pytest.approx(train_logs(interrupted)[-1]["temperature"])
    assert saved["settings"] == {
        "temperature_policy": "dts",
        "temperature_init": 3.0,
        "temperature_min": 1.0,
        "temperature_max": 3.0,
        "temperature_momentum": 0.9,
        "temperature_progress": "epoch",
    }
    # Another policy or other settings would continue the old trajectory under a new name: refused.
    for changed, named in (
        (
            {"temperature_policy": "constant", "temperature_init": 2.0},
            [
                "temperature_policy (checkpoint 'dts', this run 'constant')",
                "temperature_init (checkpoint 3.0, this run 2.0)",
            ],
        ),
        ({"temperature_max": 4.0}, ["temperature_max (checkpoint 3.0, this run 4.0)"]),
        ({"temperature_progress": "step"}, ["temperature_progress (checkpoint 'epoch', this run 'step')"]),
    ):
        other = trainer_for(
            tmp_path / "resumed", tokenizer, str(trained_teacher_dir), train_dataset, **{**settings, **changed}
        )
        with pytest.raises(ValueError, match="other temperature settings") as refused:
            other.train(resume_from_checkpoint=str(checkpoint))
        assert all(name in str(refused.value) for name in named), str(refused.value)
        assert other.state.global_step == 0
    # A save interrupted after the weights (no trainer_state.json, written last) is skipped by `last`.
    shutil.copytree(checkpoint, checkpoint.parent / "checkpoint-6")
    (checkpoint.parent / "checkpoint-6" / "trainer_state.json").unlink()

    resumed = trainer_for(tmp_path / "resumed", tokenizer, str(trained_teacher_dir), train_dataset, **settings)
    assert resumed.temperature_policy.temperature == 3.0  # fresh policy until the checkpoint loads
    with pytest.raises(ValueError, match=r"checkpoint-6 has no trainer_state.json"):
        resumed.train(resume_from_checkpoint=str(checkpoint.parent / "checkpoint-6"))
    with caplog.at_level(logging.WARNING, logger="dts_llm"):
        resumed.train(resume_from_checkpoint="last")
    assert "Skipping" in caplog.text and "checkpoint-6" in caplog.text

    expected = train_logs(full)
    got = train_logs(resumed)  # steps 1-3 come back from the checkpoint's trainer state
    assert got[:3] == train_logs(interrupted)
    assert [entry["step"] for entry in got] == list(range(1, 9))
    for name in ("loss", "kd_loss", "ce_loss", "temperature"):
        assert [entry[name] for entry in got] == pytest.approx([entry[name] for entry in expected], rel=1e-5), name
    assert len({round(entry["temperature"], 6) for entry in expected}) == 8  # the temperature really moved


# dts_paper saves and restores exactly as dts (the same class but for the gap's sign), tested above.
@pytest.mark.parametrize("policy", ["dts_sequence", "dts_token", "adakd"])
def test_a_new_policy_resumes_on_the_same_trajectory(policy, tmp_path, tokenizer, trained_teacher_dir, train_dataset):
    settings = {"max_steps": 5, "save_strategy": "steps", "save_steps": 3, "temperature_policy": policy}
    full, _, checkpoint = full_and_interrupted_runs(tmp_path, tokenizer, trained_teacher_dir, train_dataset, settings)
    resumed = trainer_for(tmp_path / "resumed", tokenizer, str(trained_teacher_dir), train_dataset, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    names = ["temperature", "temperature_std", "kd_loss", *(["dts_a"] if policy != "adakd" else [])]
    for name in names:
        got, expected = ([entry[name] for entry in train_logs(run)] for run in (resumed, full))
        assert got == pytest.approx(expected, rel=1e-5), name
    assert any(entry["temperature_std"] > 0 for entry in train_logs(full))  # one T per token, which differ


class RecordingPolicy(ScheduledTemperature):
    """Records what the trainer's context offers the policy; returns 2, 2 + increment, 2 + 2 increment, ..."""

    def __init__(self, increment: float = 0.0):
        self.temperature, self.increment = 2.0, increment
        self.calls = []

    def step(self, context):
        self.temperature = 2.0 + self.increment * len(self.calls)
        self.calls.append((*context.cross_entropies, context.progress))
        return self.temperature


@pytest.mark.parametrize("mode, expected", [("epoch", [0.5] * 4 + [1.0] * 4), ("step", [s / 7 for s in range(8)])])
def test_policy_sees_progress_and_token_mean_cross_entropies(
    mode, expected, tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    trainer = trainer_for(
        tmp_path, tokenizer, str(trained_teacher_dir), train_dataset, num_train_epochs=2, temperature_progress=mode
    )
    trainer.temperature_policy = RecordingPolicy(increment=0.25)
    trainer.train()
    calls = trainer.temperature_policy.calls
    assert [progress for *_, progress in calls] == pytest.approx(expected)
    # One micro-batch per logging window: the logged CE means are the values the policy saw.
    logs = train_logs(trainer)
    assert [c[0] for c in calls] == pytest.approx([entry["ce_loss"] for entry in logs], rel=1e-5)
    assert [c[1] for c in calls] == pytest.approx([entry["teacher_ce_loss"] for entry in logs], rel=1e-5)
    # The loss of each micro-batch used the temperature its own update returned.
    assert [entry["temperature"] for entry in logs] == [2.0 + 0.25 * i for i in range(8)]


def test_a_run_shorter_than_an_epoch_runs_the_whole_schedule_by_default(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset, caplog
):
    """6 steps of a 4-step epoch: cosine 3 -> 1 starts at 3 and ends at 1 (per-epoch progress logged
    T = 1 at every step of such a run); per-epoch progress is still there, with a warning."""
    trainer = trainer_for(
        tmp_path, tokenizer, str(trained_teacher_dir), train_dataset, max_steps=6, temperature_policy="cosine"
    )
    trainer.train()
    expected = [1.0 + 2.0 * 0.5 * (1.0 + math.cos(math.pi * s / 5)) for s in range(6)]
    assert [entry["temperature"] for entry in train_logs(trainer)] == pytest.approx(expected)
    assert expected[0] == 3.0 and expected[-1] == pytest.approx(1.0)

    with caplog.at_level(logging.WARNING, logger="dts_llm"):
        per_epoch = trainer_for(
            tmp_path / "epoch",
            tokenizer,
            str(trained_teacher_dir),
            train_dataset,
            max_steps=2,
            temperature_policy="cosine",
            temperature_progress="epoch",
        )
        per_epoch.train()
    assert "temperature_progress=epoch with a run of 1 epoch" in caplog.text
    assert [entry["temperature"] for entry in train_logs(per_epoch)] == [1.0, 1.0]


@pytest.mark.parametrize(
    "settings, epochs, warning",
    [
        ({"temperature_policy": "dts", "temperature_progress": "epoch"}, 1, "progress is 1 from the first step"),
        ({"temperature_policy": "dts", "temperature_progress": "epoch"}, 2, None),
        ({"temperature_policy": "dts"}, 1, None),  # per-step progress
        ({"temperature_policy": "constant", "temperature_progress": "epoch"}, 1, None),  # no schedule to degenerate
        ({"temperature_policy": "ctkd"}, 3, "reaches only 0.206 of ctkd_lambda_max=1"),  # ramped over 10 epochs
        ({"temperature_policy": "ctkd_instance", "ctkd_lambda_epochs": 2.0}, 3, None),
    ],
)
def test_schedules_counted_in_epochs_warn_when_the_run_is_too_short(tmp_path, settings, epochs, warning, caplog):
    from transformers import TrainerState

    from dts_llm.preflight import WarnOnShortSchedules

    with caplog.at_level(logging.WARNING, logger="dts_llm"):
        WarnOnShortSchedules().on_train_begin(
            config(tmp_path, **settings), TrainerState(num_train_epochs=epochs), None
        )
    if warning is None:
        assert caplog.text == ""
    else:
        assert warning in caplog.text


@pytest.mark.parametrize(
    "columns, missing",
    [
        ({"instruction": ["Add 1 and 2."], "response": ["3"]}, "['input_ids', 'labels']"),
        ({"input_ids": [[1, 2]]}, "['labels']"),
    ],
)
def test_a_dataset_without_token_labels_is_refused_before_any_model_loads(tmp_path, columns, missing):
    from datasets import Dataset

    with pytest.raises(
        ValueError, match=r"train_dataset has the columns .* \(missing " + re.escape(missing)
    ) as refused:
        DistillationTrainer(
            model=str(tmp_path / "no-student"),
            teacher_model=str(tmp_path / "no-teacher"),
            args=config(tmp_path),
            train_dataset=Dataset.from_dict(columns),
        )
    assert "load_instruction_data" in str(refused.value)


def test_an_auto_range_without_training_data_is_refused_before_training(tmp_path, tokenizer, trained_teacher_dir):
    with pytest.raises(ValueError, match="temperature_max: auto measures the teacher on the train_dataset"):
        trainer_for(tmp_path, tokenizer, str(trained_teacher_dir), None, temperature_max="auto")


def test_a_batch_without_labels_names_what_the_loss_needs(tmp_path, tokenizer, trained_teacher_dir, train_dataset):
    trainer = trainer_for(tmp_path, tokenizer, str(trained_teacher_dir), train_dataset)
    batch = {"input_ids": torch.tensor([train_dataset[0]["input_ids"]])}
    with pytest.raises(ValueError, match=r"a batch without labels .*\['input_ids'\].*encode_example"):
        trainer.compute_loss(trainer.model, batch)


def test_evaluation_reports_without_moving_the_temperature(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset, eval_dataset
):
    trainer = trainer_for(tmp_path, tokenizer, str(trained_teacher_dir), train_dataset, eval_dataset, max_steps=3)
    trainer.train()
    temperature = trainer.temperature_policy.temperature
    assert temperature != 3.0  # DTS moved during training
    first = trainer.evaluate()
    prediction = trainer.predict(train_dataset.select(range(8)))
    second = trainer.evaluate()
    assert trainer.temperature_policy.temperature == temperature
    assert first["eval_temperature"] == pytest.approx(temperature)
    for name in KD_METRICS:
        assert second[f"eval_{name}"] == pytest.approx(first[f"eval_{name}"], rel=1e-6)
        assert math.isfinite(prediction.metrics[f"test_{name}"])
    assert prediction.metrics["test_ce_loss"] != pytest.approx(first["eval_ce_loss"])


def fully_labelled(dataset):
    """Every token is a label, position 0 included (as in plain language-model data)."""
    return dataset.map(lambda row: {"labels": row["input_ids"]})


@pytest.mark.parametrize("labelling", ["prompt-masked", "fully-labelled"])
def test_gradient_accumulation_matches_one_large_batch(
    labelling, tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    """Token-normalised losses: 2 x 4 accumulated gives the update of one batch of 8, and the policy
    is updated once per micro-batch."""
    data = train_dataset if labelling == "prompt-masked" else fully_labelled(train_dataset)
    # SGD: Adam's normalisation would blow float noise in near-zero gradients up to full-size steps.
    common = {"max_steps": 2, "optim": "sgd", "learning_rate": 0.5}
    runs = {}
    for name, batch, accumulation in (("one", 8, 1), ("accumulated", 4, 2)):
        trainer = trainer_for(
            tmp_path / name,
            tokenizer,
            str(trained_teacher_dir),
            data,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **common,
        )
        trainer.temperature_policy = RecordingPolicy()
        trainer.train()
        assert len(trainer.temperature_policy.calls) == 2 * accumulation
        runs[name] = trainer
    one, accumulated = runs["one"], runs["accumulated"]
    for a, b in zip(one.model.state_dict().values(), accumulated.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for name in ("loss", "kd_loss", "ce_loss"):
        assert train_logs(one)[-1][name] == pytest.approx(train_logs(accumulated)[-1][name], rel=1e-4), name


def test_logged_loss_is_the_mix_of_its_terms_when_every_token_is_a_label(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    trainer = trainer_for(tmp_path, tokenizer, str(trained_teacher_dir), fully_labelled(train_dataset), max_steps=2)
    trainer.train()
    for entry in train_logs(trainer):
        assert entry["loss"] == pytest.approx(0.5 * entry["ce_loss"] + 0.5 * entry["kd_loss"], rel=1e-5)


def test_a_micro_batch_without_response_tokens_leaves_the_temperature(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    silent = train_dataset.select(range(2)).map(lambda row: {"labels": [-100] * len(row["labels"])})
    data = concatenate_datasets([train_dataset.select(range(2)), silent])
    trainer = trainer_for(
        tmp_path, tokenizer, str(trained_teacher_dir), data, per_device_train_batch_size=1, max_steps=4
    )
    trainer.train()
    logs = train_logs(trainer)
    silent_steps = [entry for entry in logs if entry["ce_loss"] == 0.0]
    assert len(silent_steps) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["kd_loss"])
    for previous, entry in itertools.pairwise(logs):
        if entry["ce_loss"] == 0.0:
            assert entry["loss"] == 0.0 and entry["temperature"] == previous["temperature"]


def test_padded_vocabularies_are_cut_to_the_tokenizer(tmp_path, tokenizer, train_dataset):
    student = tiny_gpt2(tokenizer, extra_vocab=7)
    teacher = tiny_gpt2(tokenizer, width=48, seed=3, extra_vocab=3)
    padding_rows = student.transformer.wte.weight[len(tokenizer) :].detach().clone()
    vocabulary_rows = student.transformer.wte.weight[: len(tokenizer)].detach().clone()
    trainer = trainer_for(
        tmp_path,
        tokenizer,
        teacher,
        train_dataset,
        student=student,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        teacher_dtype="bfloat16",
    )
    assert trainer.vocab_size == len(tokenizer)
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in train_logs(trainer))
    # The padded logits never enter the loss, so the tied rows behind them get no gradient.
    trained = trainer.model.transformer.wte.weight.detach().cpu()
    assert torch.equal(trained[len(tokenizer) :], padding_rows)
    assert not torch.equal(trained[: len(tokenizer)], vocabulary_rows)


def test_a_tokenizer_wider_than_the_teacher_is_refused(tmp_path, tokenizer, train_dataset):
    narrow = GPT2LMHeadModel(tiny_gpt2(tokenizer).config.__class__(vocab_size=1000, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="teacher's logits have only 1000"):
        trainer_for(tmp_path, tokenizer, narrow, train_dataset)


def test_a_teacher_object_with_another_eos_is_refused(tmp_path, tokenizer, train_dataset):
    teacher = tiny_gpt2(tokenizer, seed=5)
    teacher.config.eos_token_id = 0
    with pytest.raises(ValueError, match="declares eos_token_id"):
        trainer_for(tmp_path, tokenizer, teacher, train_dataset)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tokenizer, train_dataset):
    other_dir = tmp_path / "other-teacher"
    tiny_gpt2(tokenizer, seed=5).save_pretrained(other_dir)
    vocab = {**tokenizer.get_vocab()}
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    other = GPT2TokenizerFast(vocab=vocab, merges=[], eos_token="<|endoftext|>")
    other.save_pretrained(other_dir)
    with pytest.raises(ValueError, match=r"tokenizer .* differs"):
        trainer_for(tmp_path, tokenizer, str(other_dir), train_dataset)


def test_lora_student_trains_only_adapters_beside_a_bf16_loaded_teacher(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    from peft import LoraConfig

    student = tiny_gpt2(tokenizer)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=str(trained_teacher_dir),
        args=config(tmp_path, max_steps=3, teacher_model_init_kwargs={"dtype": "bfloat16"}),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"),
    )
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    frozen_before = {k: v.clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    lora_before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    assert lora_before and all("lora_" in k for k in lora_before)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in frozen_before.items())
    assert any(not torch.equal(params[k], v) for k, v in lora_before.items())
    assert all(math.isfinite(entry["kd_loss"]) for entry in train_logs(trainer))


def test_models_and_tokenizer_load_from_paths(tmp_path, trained_teacher_dir, train_dataset):
    trainer = DistillationTrainer(
        model=str(trained_teacher_dir),
        teacher_model=str(trained_teacher_dir),
        args=config(tmp_path, max_steps=1, model_init_kwargs={"dtype": "float32"}),
        train_dataset=train_dataset,
    )
    assert trainer.processing_class.get_vocab() == GPT2TokenizerFast.from_pretrained(trained_teacher_dir).get_vocab()
    trainer.train()
    (entry,) = train_logs(trainer)
    # The same weights on both sides: the divergence is zero and the two cross-entropies agree.
    assert entry["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert entry["ce_loss"] == pytest.approx(entry["teacher_ce_loss"], rel=1e-6)


def test_bf16_mixed_precision_runs_teacher_and_student_under_autocast(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    trainer = trainer_for(
        tmp_path, tokenizer, str(trained_teacher_dir), train_dataset, max_steps=2, bf16=True, use_cpu=True
    )
    dtypes = {"teacher": set(), "student": set()}
    for name, model in (("teacher", trainer.teacher_model), ("student", trainer.model)):
        model.lm_head.register_forward_hook(lambda module, inputs, output, name=name: dtypes[name].add(output.dtype))
    trainer.train()
    assert dtypes == {"teacher": {torch.bfloat16}, "student": {torch.bfloat16}}
    assert next(trainer.teacher_model.parameters()).dtype == torch.float32  # autocast, not a cast
    logs = train_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(entry[name]) for entry in logs for name in ("loss", *KD_METRICS))


# ---- CTKD and Annealing-KD through the trainer ---------------------------------------------------


def test_ctkd_learns_its_temperature_as_an_optimizer_group_and_logs_it(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    trainer = trainer_for(
        tmp_path,
        tokenizer,
        str(trained_teacher_dir),
        train_dataset,
        max_steps=6,
        temperature_policy="ctkd",
        ctkd_lambda_epochs=1.0,
        ctkd_learning_rate=0.05,
    )
    policy = trainer.temperature_policy
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups if any(p is policy.logit for p in g["params"])]
    assert len(groups) == 1 and groups[0]["params"] == [policy.logit]
    assert (groups[0]["initial_lr"], groups[0]["weight_decay"]) == (0.05, 0.0)
    assert groups[0]["lr"] < 0.05  # the linear learning-rate schedule scales it too
    logs = train_logs(trainer)
    # lambda is logged at the epoch each step ends on; the first step ran at lambda(0) = 0
    assert [e["ctkd_lambda"] for e in logs] == pytest.approx([ctkd_lambda(e["epoch"], 1.0, 1.0) for e in logs])
    temperatures = [e["temperature"] for e in logs]
    assert temperatures[:2] == pytest.approx([3.0, 3.0], abs=1e-6)  # no reversed gradient in step 1
    assert len({round(t, 5) for t in temperatures[1:]}) == 5  # then it moves every step
    with torch.no_grad():
        final = policy(trainer.state.epoch).item()
    assert abs(final - 3.0) > 1e-3 and 1.0 < final < 21.0
    assert policy.logit.grad is None  # cleared after each optimizer step, like the model's


@pytest.mark.parametrize("policy", ["ctkd", "ctkd_instance"])
def test_a_learnt_temperature_resumes_on_the_same_trajectory(
    policy, tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    settings = {
        "max_steps": 8,
        "save_strategy": "steps",
        "save_steps": 3,
        "temperature_policy": policy,
        "ctkd_lambda_epochs": 0.0,
        "ctkd_learning_rate": 0.05,
        "ctkd_hidden_size": 8,
    }
    full, _, checkpoint = full_and_interrupted_runs(tmp_path, tokenizer, trained_teacher_dir, train_dataset, settings)
    assert (checkpoint / LEARNED_TEMPERATURE_NAME).is_file() and not (checkpoint / TEMPERATURE_STATE_NAME).exists()

    resumed = trainer_for(tmp_path / "resumed", tokenizer, str(trained_teacher_dir), train_dataset, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = train_logs(full), train_logs(resumed)
    assert [entry["step"] for entry in got] == list(range(1, 9))
    names = ("loss", "kd_loss", "temperature") + (("temperature_std",) if policy == "ctkd_instance" else ())
    for name in names:
        assert [e[name] for e in got] == pytest.approx([e[name] for e in expected], rel=1e-5), name
    assert len({round(e["temperature"], 5) for e in expected}) == 8  # the temperature really moved
    for name, value in full.temperature_policy.state_dict().items():
        torch.testing.assert_close(resumed.temperature_policy.state_dict()[name], value, rtol=1e-5, atol=1e-7)


def test_the_instance_temperature_reports_its_spread_in_training_and_evaluation(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset, eval_dataset
):
    trainer = trainer_for(
        tmp_path,
        tokenizer,
        str(trained_teacher_dir),
        train_dataset,
        eval_dataset,
        max_steps=4,
        temperature_policy="ctkd_instance",
        ctkd_lambda_epochs=0.0,
        ctkd_learning_rate=0.05,
    )
    trainer.train()
    logs = train_logs(trainer)
    assert logs[0]["temperature_std"] == pytest.approx(0.0, abs=1e-6)  # every token starts at 3
    assert all(e["temperature_std"] > 0 for e in logs[1:])
    parameters = [p.detach().clone() for p in trainer.temperature_policy.parameters()]
    metrics = trainer.evaluate()
    assert metrics["eval_temperature_std"] > 0 and 1.0 < metrics["eval_temperature"] < 21.0
    assert all(torch.equal(a, b) for a, b in zip(parameters, trainer.temperature_policy.parameters(), strict=False))


def test_annealing_kd_fits_scaled_teacher_logits_then_trains_on_labels(
    tmp_path, tokenizer, trained_teacher_dir, train_dataset
):
    trainer = trainer_for(
        tmp_path,
        tokenizer,
        str(trained_teacher_dir),
        train_dataset,
        max_steps=8,
        temperature_policy="annealing",
        temperature_max=2.0,
        annealing_fraction=0.5,
    )
    trainer.train()
    logs = train_logs(trainer)
    assert [e["temperature"] for e in logs] == [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    for entry in logs[:4]:  # phase 1: the MSE to Phi(T) x teacher logits alone
        assert entry["loss"] == pytest.approx(entry["kd_loss"], rel=1e-4)
    for entry in logs[4:]:  # phase 2: cross-entropy alone
        assert entry["loss"] == pytest.approx(entry["ce_loss"], rel=1e-4)
    for entry in (logs[0], logs[-1]):  # the two terms differ, so the checks above can fail
        assert abs(entry["kd_loss"] - entry["ce_loss"]) > 0.1 * entry["ce_loss"]
