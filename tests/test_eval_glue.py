"""GLUE scoring: metrics against scikit-learn / scipy and by hand, the head checks, and ``python -m eval glue``
end to end on tiny BERTs built from configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tsv
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizerFast

from dts_llm.glue import GLUE_TASKS, load_glue_data
from eval.__main__ import main
from eval.glue import check_head, glue_metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = 'a the film is good bad man dog runs sleeps not very and it was ? . , "'.split()


def test_metrics_are_the_libraries_times_100():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert glue_metrics("mrpc", predicted, labels) == pytest.approx(
        {"f1": 100 * f1_score(labels, predicted), "accuracy": 100 * accuracy_score(labels, predicted)}
    )
    assert glue_metrics("cola", predicted, labels) == pytest.approx(
        {"matthews_correlation": 100 * matthews_corrcoef(labels, predicted)}
    )
    three = rng.integers(0, 3, 200)
    assert glue_metrics("mnli", three, labels) == pytest.approx({"accuracy": 100 * accuracy_score(labels, three)})
    gold, scores = rng.uniform(0, 5, 100), rng.uniform(0, 5, 100)
    assert glue_metrics("stsb", scores, gold) == pytest.approx(
        {"pearson": 100 * pearsonr(scores, gold)[0], "spearmanr": 100 * spearmanr(scores, gold)[0]}
    )


def test_metrics_on_a_hand_computed_case():
    # TP = 2 (ids 0, 4), FP = 1 (id 3), FN = 1 (id 1), TN = 1 (id 2)
    labels, predicted = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert glue_metrics("qqp", predicted, labels) == pytest.approx({"f1": 200 / 3, "accuracy": 60.0})
    # MCC = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)) = (2 - 1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert glue_metrics("cola", predicted, labels) == pytest.approx({"matthews_correlation": 100 / 6})
    # deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9); the ranks agree exactly
    assert glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(
        {"pearson": 100 * 3 / (2 * 42 / 9) ** 0.5, "spearmanr": 100.0}
    )
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        glue_metrics("sst2", [1, 0, 1], [1, 0])


def test_a_head_that_does_not_fit_the_task_is_refused():
    with pytest.raises(
        ValueError, match="num_labels=2, but GLUE mnli needs 3 \\(entailment, neutral, contradiction\\)"
    ):
        check_head(BertConfig(num_labels=2), GLUE_TASKS["mnli"], "student")
    swapped = BertConfig(num_labels=3, id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})
    with pytest.raises(ValueError, match="the model's labels by id are \\['CONTRADICTION'"):
        check_head(swapped, GLUE_TASKS["mnli"], "roberta-large-mnli")
    check_head(BertConfig(num_labels=3), GLUE_TASKS["mnli"], "generic LABEL_i names")
    check_head(BertConfig(num_labels=2, id2label={0: "Entailment", 1: "not entailment"}), GLUE_TASKS["rte"], "ok")
    check_head(BertConfig(**GLUE_TASKS["stsb"].head_config()), GLUE_TASKS["stsb"], "regression")


def bert_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer over ``WORDS``. (``BertTokenizerFast(vocab_file=...)`` gives an empty vocabulary
    in transformers 5, so the vocabulary goes in as a dict.)"""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def save_tiny_bert(folder: Path, task: str, seed: int = 0) -> Path:
    """An untrained 2-layer BERT with the task's head, saved with its tokenizer."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,  # wide weights: an untrained model's predictions then differ between examples
        **GLUE_TASKS[task].head_config(),
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentences(count: int, seed: int) -> list[str]:
    """Sentences of 2 to 12 words, so that batches need padding."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(2, 13))) for _ in range(count)]


def one_by_one(model_dir: Path, task: str, source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of the model on each example alone (no padding) and the labels, to check the batched run."""
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    dataset = load_glue_data(task, None, {split: source}, AutoTokenizer.from_pretrained(model_dir)).evaluation[split]
    with torch.inference_mode():
        logits = [
            model(**{k: torch.tensor([v]) for k, v in row.items() if k != "labels"}).logits[0] for row in dataset
        ]
    outputs = torch.stack(logits)
    predicted = outputs[:, 0] if outputs.shape[-1] == 1 else outputs.argmax(-1)
    return predicted.numpy(), np.asarray(dataset["labels"])


def score(model_dir: Path, task: str, data: Path, output: Path, *extra: str) -> dict:
    """``python -m eval glue`` in this process."""
    return main(
        ["glue", "--model", str(model_dir), "--task", task, "--data", str(data), "--output", str(output), *extra]
    )


def test_python_m_eval_glue_scores_sst2_and_writes_json_and_markdown(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "student", "sst2")
    rng = np.random.default_rng(1)
    rows = [[text, str(rng.integers(0, 2))] for text in sentences(40, 1)]
    dev = write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], *rows])
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "eval", "glue", "--model", str(model_dir), "--task", "sst2"]
    command += ["--data", str(tmp_path), "--batch-size", "16", "--output", str(out)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr

    result = json.loads((out / "glue_sst2.json").read_text())
    predicted, labels = one_by_one(model_dir, "sst2", dev, "validation")
    assert set(predicted) == {0, 1}  # both classes predicted, so a batched run out of order would show
    assert result["task"] == "sst2" and result["scale"] == "x100" and list(result["splits"]) == ["validation"]
    validation = result["splits"]["validation"]
    assert validation["examples"] == 40 and validation["source"] == str(tmp_path)
    assert validation["metrics"] == {"accuracy": pytest.approx(100 * accuracy_score(labels, predicted))}
    table = (out / "glue_sst2.md").read_text()
    assert table.splitlines()[0] == "| Model | Task | Split | Examples | accuracy |"
    assert f"| {model_dir} | sst2 | validation | 40 | {validation['metrics']['accuracy']:.2f} |" in table
    assert table in run.stdout


def test_mnli_is_scored_on_matched_and_mismatched(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"]
    names = GLUE_TASKS["mnli"].label_names
    for file, seed in (("dev_matched.tsv", 2), ("dev_mismatched.tsv", 3)):
        pairs = zip(sentences(12, seed), sentences(12, seed + 10), strict=True)
        rows = [
            [str(i), "0", f"{i}n", "fiction", first, second, names[i % 3]] for i, (first, second) in enumerate(pairs)
        ]
        write_tsv(tmp_path / "glue_data" / "MNLI" / file, [header, *rows])
    result = score(save_tiny_bert(tmp_path / "mnli", "mnli"), "mnli", tmp_path / "glue_data", tmp_path / "out")
    assert list(result["splits"]) == ["validation_matched", "validation_mismatched"]
    assert [split["examples"] for split in result["splits"].values()] == [12, 12]
    assert json.loads((tmp_path / "out" / "glue_mnli.json").read_text()) == result


def test_stsb_is_scored_on_the_heads_raw_output(tmp_path):
    header = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
    pairs = zip(sentences(20, 4), sentences(20, 5), strict=True)
    rows = [[str(i), "main", "f", "2012", "0", "none", "none", a, b, f"{i % 6}.0"] for i, (a, b) in enumerate(pairs)]
    dev = write_tsv(tmp_path / "dev.tsv", [header, *rows])
    model_dir = save_tiny_bert(tmp_path / "stsb", "stsb")
    result = score(model_dir, "stsb", dev, tmp_path / "out", "--batch-size", "8")
    predicted, gold = one_by_one(model_dir, "stsb", dev, "validation")
    expected = {"pearson": 100 * pearsonr(predicted, gold)[0], "spearmanr": 100 * spearmanr(predicted, gold)[0]}
    assert result["splits"]["validation"]["metrics"] == pytest.approx(expected, rel=1e-4)


def test_a_model_with_another_number_of_labels_is_refused(tmp_path):
    dev = write_tsv(
        tmp_path / "dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"]]
    )
    mnli_model = save_tiny_bert(tmp_path / "m", "mnli")
    with pytest.raises(ValueError, match="num_labels=3, but GLUE rte needs 2"):
        score(mnli_model, "rte", dev, tmp_path)
    with pytest.raises(ValueError, match="holds one split, but 2 were asked for"):
        score(mnli_model, "mnli", dev, tmp_path)


def test_a_bert_tokenizer_gives_token_types_to_sentence_pairs(tmp_path):
    rows = [["index", "sentence1", "sentence2", "label"], ["0", "the dog runs", "a man sleeps", "entailment"]]
    dev = write_tsv(tmp_path / "dev.tsv", rows)
    row = load_glue_data("rte", None, {"validation": dev}, bert_tokenizer()).evaluation["validation"][0]
    assert row["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert row["input_ids"][0] == 2 and row["labels"] == 0  # [CLS] first; entailment is id 0
