"""Distilling classification heads: the loss against a dense reference, and `dts-llm sft` / `distill`
/ `python -m eval glue` end to end on tiny BERTs with the real SST-2 and RTE dev samples."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, STSB_HEADER, stsb_row, write_recipe, write_tsv
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from dts_llm.cli import main
from dts_llm.glue import GLUE_TASKS, read_glue_split
from dts_llm.losses import distillation_objective, regression_objective
from eval.__main__ import main as eval_main

SST2 = SHARED_DATA / "glue" / "SST-2" / "dev.tsv"
RTE = SHARED_DATA / "glue" / "RTE" / "validation.parquet"


# ---- the loss on class logits ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0, 8.0])
def test_class_logits_are_distilled_like_the_dense_reference(temperature):
    """(1 - r) CE + r T^2 KL(softmax(t/T) || softmax(s/T)), mean over labelled examples, in float64."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = 3 * torch.randn(6, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, -100, 2, 0])
    ratio = 0.7
    terms = distillation_objective(
        student.float(), teacher.float(), labels, kd_ratio=ratio, temperature=temperature, shift_labels=False
    )
    terms.loss.backward()
    ours = student.grad.clone()

    student.grad = None
    kept = labels != -100
    s, t = student[kept], teacher[kept]
    ce = torch.nn.functional.cross_entropy(s, labels[kept])
    p = (t / temperature).softmax(-1)
    kl = (p * (p.log() - (s / temperature).log_softmax(-1))).sum(-1).mean() * temperature**2
    reference = (1 - ratio) * ce + ratio * kl
    reference.backward()
    assert terms.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert terms.kd.item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    torch.testing.assert_close(ours, student.grad, rtol=1e-4, atol=1e-6)


def test_a_regression_head_is_distilled_by_mean_squared_error():
    student = torch.tensor([1.0, 2.5, 4.0], requires_grad=True)
    teacher, labels = torch.tensor([1.5, 2.0, 5.0]), torch.tensor([1.0, 3.0, 4.5])
    terms = regression_objective(student, teacher, labels, kd_ratio=0.25)
    terms.loss.backward()
    to_labels, to_teacher = (0 + 0.25 + 0.25) / 3, (0.25 + 0.25 + 1.0) / 3
    assert terms.ce.item() == pytest.approx(to_labels) and terms.kd.item() == pytest.approx(to_teacher)
    assert terms.loss.item() == pytest.approx(0.75 * to_labels + 0.25 * to_teacher)
    expected_grad = (0.75 * 2 * (student - labels) + 0.25 * 2 * (student - teacher)).detach() / 3
    torch.testing.assert_close(student.grad, expected_grad)


# ---- end to end --------------------------------------------------------------------------------


def data_tokenizer(texts: list[str]) -> BertTokenizerFast:
    """A WordPiece tokenizer whose vocabulary is every lower-cased word and mark of ``texts``: no
    BERT vocabulary exists offline, and this one covers the sample it is built from."""
    words = sorted({word for text in texts for word in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def save_bert(folder: Path, tokenizer, width: int, layers: int, task: str, seed: int) -> str:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=128,
        **GLUE_TASKS[task].head_config(),
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def glue_recipe(root: Path, task: str, output: str, **fields) -> dict:
    return {
        "glue_task": task,
        "max_length": 96,
        "output_dir": str(root / output),
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "learning_rate": 2e-3,
        "logging_steps": 5,
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 3,
        **fields,
    }


def write_splits(task: str, root: Path) -> dict:
    """The real dev sample cut into a training file and an evaluation file, in the sample's format."""
    if task == "sst2":
        lines = SST2.read_text(encoding="utf-8").splitlines(keepends=True)
        folder = root / "glue_data" / "SST-2"
        folder.mkdir(parents=True)
        (folder / "train.tsv").write_text("".join(lines[:601]), encoding="utf-8")  # header + 600
        (folder / "dev.tsv").write_text(lines[0] + "".join(lines[601:]), encoding="utf-8")
        return {"dataset": str(root / "glue_data")}
    import pandas

    frame = pandas.read_parquet(RTE)
    frame.iloc[:200].to_parquet(root / "rte_train.parquet")
    frame.iloc[200:].to_parquet(root / "rte_dev.parquet")
    return {"dataset": str(root / "rte_train.parquet"), "validation_file": str(root / "rte_dev.parquet")}


def distill(root: Path, name: str, recipe: dict) -> list[dict]:
    """`dts-llm distill` on ``recipe``, checkpointing each epoch; the last checkpoint's log history."""
    recipe = {**recipe, "save_strategy": "epoch", "save_total_limit": 1}
    assert main(["distill", write_recipe(root / f"{name}.yaml", **recipe)]) == 0
    last = max(Path(recipe["output_dir"]).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_teacher_sft_student_dts_distillation_and_scores_on_real_glue_samples(tmp_path, task):
    sample = SST2 if task == "sst2" else RTE
    if not sample.is_file():
        pytest.skip(f"{sample} is absent (the shared data samples sit beside the repository)")
    sources = write_splits(task, tmp_path)
    records = read_glue_split(task, SST2 if task == "sst2" else RTE, "validation")
    tokenizer = data_tokenizer([record[field] for record in records for field in GLUE_TASKS[task].text_fields])
    teacher_init = save_bert(tmp_path / "teacher-init", tokenizer, width=64, layers=2, task=task, seed=1)
    student_init = save_bert(tmp_path / "student-init", tokenizer, width=32, layers=1, task=task, seed=2)

    teacher_recipe = glue_recipe(
        tmp_path, task, "teacher", model_name_or_path=teacher_init, num_train_epochs=12, learning_rate=1e-3, **sources
    )
    assert main(["sft", write_recipe(tmp_path / "teacher.yaml", **teacher_recipe)]) == 0
    student_recipe = glue_recipe(
        tmp_path,
        task,
        "student",
        model_name_or_path=student_init,
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        num_train_epochs=12,
        learning_rate=1e-3,
        temperature_policy="dts",
        temperature_init=8.0,
        temperature_max=8.0,
        temperature_min=4.0,
        kd_ratio=0.5,
        **sources,
    )
    history = distill(tmp_path, "student", student_recipe)
    train = [entry for entry in history if "kd_loss" in entry]
    assert train[-1]["kd_loss"] < 0.7 * train[0]["kd_loss"], "the student does not move towards the teacher"
    temperatures = [entry["temperature"] for entry in train]
    assert min(temperatures) >= 4.0 and max(temperatures) <= 8.0 and temperatures[0] > temperatures[-1]
    assert all("eval_kd_loss" in entry for entry in history if "eval_loss" in entry)

    held_out = sources.get("validation_file", sources["dataset"])  # the records neither model trained on
    scores = {}
    for name in ("teacher", "student"):
        output = tmp_path / f"{name}-scores"
        result = eval_main(
            ["glue", "--model", str(tmp_path / name), "--task", task, "--data", held_out, "--output", str(output)]
        )
        written = json.loads((output / f"glue_{task}.json").read_text())
        assert written == json.loads(json.dumps(result))
        scores[name] = written["splits"]["validation"]["metrics"]["accuracy"]
        assert (output / f"glue_{task}.md").is_file()
    if task == "sst2":  # 600 real sentences teach tiny BERTs some sentiment (61.8 and 65.1 when written)
        assert scores["teacher"] > 55 and scores["student"] > 55


def test_stsb_regression_distils_without_a_temperature(tmp_path):
    words = "a man woman dog cat plays runs sleeps eats on the grass guitar piano food".split()
    generator = torch.Generator().manual_seed(0)

    def rows(count: int, start: int) -> list[list[str]]:
        out = [STSB_HEADER]
        for i in range(start, start + count):
            picks = torch.randint(len(words), (6,), generator=generator).tolist()
            first, second = " ".join(words[j] for j in picks[:4]), " ".join(words[j] for j in picks[2:])
            out.append(stsb_row(i, first, second, f"{5 * len(set(first.split()) & set(second.split())) / 6:.3f}"))
        return out

    folder = tmp_path / "glue_data" / "STS-B"
    write_tsv(folder / "train.tsv", rows(96, 0))
    write_tsv(folder / "dev.tsv", rows(32, 96))
    tokenizer = data_tokenizer(words)
    teacher = save_bert(tmp_path / "teacher-init", tokenizer, width=32, layers=1, task="stsb", seed=1)
    student = save_bert(tmp_path / "student-init", tokenizer, width=16, layers=1, task="stsb", seed=2)
    recipe = glue_recipe(
        tmp_path,
        "stsb",
        "student",
        model_name_or_path=student,
        teacher_model_name_or_path=teacher,
        dataset=str(tmp_path / "glue_data"),
        num_train_epochs=2,
        logging_steps=1,
    )
    history = distill(tmp_path, "stsb", recipe)
    train = [entry for entry in history if "kd_loss" in entry]
    assert train and not any("temperature" in entry for entry in history)
    assert train[-1]["ce_loss"] < train[0]["ce_loss"]
    scoring = ["--task", "stsb", "--data", str(tmp_path / "glue_data"), "--output", str(tmp_path / "scores")]
    result = eval_main(["glue", "--model", str(tmp_path / "student"), *scoring])
    assert set(result["splits"]["validation"]["metrics"]) == {"pearson", "spearmanr"}


def tiny_pair_classifiers(tokenizer, task: str, teacher_labels: dict | None = None):
    """A BERT teacher and a DistilBERT student for ``task`` (the teacher's head may be relabelled)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    head = GLUE_TASKS[task].head_config()
    teacher_head = {**head, **(teacher_labels or {})}
    bert = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    teacher = BertForSequenceClassification(BertConfig(**{**bert.to_dict(), **teacher_head}))
    student = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64, **head)
    )
    return teacher, student


def test_a_teacher_whose_labels_are_in_another_order_is_refused(tmp_path):
    from dts_llm import DistillationConfig, DistillationTrainer

    tokenizer = data_tokenizer(["a b"])
    swapped = {"id2label": {0: "not_entailment", 1: "entailment"}, "label2id": {"not_entailment": 0, "entailment": 1}}
    teacher, student = tiny_pair_classifiers(tokenizer, "rte", swapped)
    with pytest.raises(ValueError, match=r"labels .* are not the teacher's"):
        DistillationTrainer(student, teacher, args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True))
    hub_spelling = {"id2label": {0: "ENTAILMENT", 1: "Not Entailment"}}
    teacher, student = tiny_pair_classifiers(tokenizer, "rte", hub_spelling)
    DistillationTrainer(student, teacher, args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True))


@pytest.mark.parametrize("student_kind", ["bert", "distilbert"])
def test_a_lora_classifier_trains_its_adapter_and_its_head(tmp_path, student_kind):
    from dts_llm import DistillationConfig, DistillationTrainer
    from dts_llm.glue import tokenize_glue
    from dts_llm.recipe import LoraArguments

    records = [{"sentence1": f"a b {i}", "sentence2": "b a", "label": i % 2} for i in range(16)]
    tokenizer = data_tokenizer([r["sentence1"] for r in records])
    teacher, student = tiny_pair_classifiers(tokenizer, "rte")
    if student_kind == "bert":
        student = BertForSequenceClassification(teacher.config)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    peft_config = LoraArguments(lora_r=4, lora_target_modules=["all-linear"]).peft_config("SEQ_CLS")
    args = DistillationConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
    )
    dataset, _ = tokenize_glue(records, "rte", tokenizer, max_length=32)
    trainer = DistillationTrainer(
        student, teacher, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trained)
    assert any("classifier" in name and "lora_" not in name for name in trained), "the new head must train whole"
    merged = trainer.model.merge_and_unload()
    for name, p in merged.named_parameters():
        if "classifier" not in name and "embeddings" in name:
            torch.testing.assert_close(p, before[name], msg=name)  # frozen base weights stay put


def test_a_distilbert_student_keeps_the_segment_ids_its_bert_teacher_needs(tmp_path):
    """DistilBERT's forward takes no token_type_ids; the Trainer would drop the column, and the BERT
    teacher would then see both sentences of an RTE pair as one."""
    from dts_llm import DistillationConfig, DistillationTrainer
    from dts_llm.glue import tokenize_glue

    records = read_glue_split("rte", RTE, "validation")[:32] if RTE.is_file() else pytest.skip(f"{RTE} is absent")
    tokenizer = data_tokenizer([r[field] for r in records for field in ("sentence1", "sentence2")])
    teacher, student = tiny_pair_classifiers(tokenizer, "rte")
    dataset, _ = tokenize_glue(records, "rte", tokenizer, max_length=128)
    args = DistillationConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
    )
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "token_type_ids" in batch and int(batch["token_type_ids"].max()) == 1
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "kd_loss" in entry] == [1, 2]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"glue_task": "sst3"}, "glue_task: unknown GLUE task 'sst3'"),
        ({"glue_task": "mnli", "validation_file": "one.tsv"}, "validation_file: GLUE mnli has the evaluation splits"),
        ({"max_length": 512}, "max_length 512 is longer than the context of model_name_or_path"),  # BERT's 128
    ],
)
def test_a_bad_glue_recipe_fails_before_any_model_loads(tmp_path, monkeypatch, capsys, fields, message):
    import dts_llm.tasks

    monkeypatch.setattr(dts_llm.tasks, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "one.tsv").write_text("x\n")
    tokenizer = data_tokenizer(["a b"])
    model = save_bert(tmp_path / "model", tokenizer, width=16, layers=1, task="rte", seed=0)
    recipe = glue_recipe(tmp_path, "rte", "out", model_name_or_path=model, dataset=str(tmp_path))
    recipe.update({key: str(tmp_path / value) if key == "validation_file" else value for key, value in fields.items()})
    assert main(["sft", write_recipe(tmp_path / "bad.yaml", **recipe)]) == 2
    assert message in capsys.readouterr().err


def train_classifier(tmp_path, records, task: str, batch: int, accumulation: int):
    """Two steps of DTS distillation between tiny BERTs without dropout; the log and final weights."""
    from dts_llm import DistillationConfig, DistillationTrainer
    from dts_llm.glue import tokenize_glue

    tokenizer = data_tokenizer([r[field] for r in records for field in GLUE_TASKS[task].text_fields])
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    models = []
    for width, seed in ((32, 1), (16, 2)):
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * width,
            **no_dropout,
            **GLUE_TASKS[task].head_config(),
        )
        models.append(BertForSequenceClassification(config))
    teacher, student = models
    args = DistillationConfig(
        output_dir=str(tmp_path / f"{batch}x{accumulation}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=1e-2,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        temperature_policy="dts",
        temperature_progress="step",
        seed=0,
    )
    dataset, _ = tokenize_glue(records, task, tokenizer, max_length=64)
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return [e for e in trainer.state.log_history if "kd_loss" in e], dict(trainer.model.named_parameters())


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_gradient_accumulation_counts_examples_not_shifted_labels(tmp_path, task):
    """4 x 2 accumulated micro-batches train exactly like batches of 8: the normaliser counts every
    label of the accumulated batch (a causal LM's shifted count would drop one label per example)."""
    labels = [i % 2 for i in range(16)] if task == "rte" else [float(i % 6) for i in range(16)]
    records = [
        {"sentence1": f"a b {'a' * (i % 5)}", "sentence2": "b a", "label": label} for i, label in enumerate(labels)
    ]
    accumulated, accumulated_weights = train_classifier(tmp_path, records, task, batch=4, accumulation=2)
    whole, whole_weights = train_classifier(tmp_path, records, task, batch=8, accumulation=1)
    for name in ("loss", "kd_loss", "ce_loss"):  # a KL near 2e-5 carries fp32 noise of ~1e-7
        assert [e[name] for e in accumulated] == pytest.approx([e[name] for e in whole], rel=1e-5, abs=1e-6), name
    for name, parameter in whole_weights.items():
        torch.testing.assert_close(accumulated_weights[name], parameter, rtol=1e-5, atol=1e-7, msg=name)


def test_mnli_is_evaluated_on_matched_and_mismatched_under_their_own_names(tmp_path):
    from dts_llm import DistillationConfig, DistillationTrainer
    from dts_llm.glue import tokenize_glue

    records = [{"premise": "a b", "hypothesis": "b a" * (i % 3 + 1), "label": i % 3} for i in range(12)]
    tokenizer = data_tokenizer(["a b"])
    head = GLUE_TASKS["mnli"].head_config()
    bert = {
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    teacher = BertForSequenceClassification(BertConfig(**bert, **head))
    student = BertForSequenceClassification(BertConfig(**bert, **head))
    splits = {split: tokenize_glue(records, "mnli", tokenizer, 32)[0] for split in GLUE_TASKS["mnli"].eval_splits}
    args = DistillationConfig(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = DistillationTrainer(student, teacher, args=args, eval_dataset=splits, processing_class=tokenizer)
    metrics = trainer.evaluate()
    for split in ("validation_matched", "validation_mismatched"):
        assert {f"eval_{split}_{name}" for name in ("kd_loss", "ce_loss", "teacher_ce_loss", "temperature")} <= set(
            metrics
        )
