"""GLUE scores of a sequence-classification model on a task's evaluation splits (both MNLI dev sets).

Metrics are computed by scikit-learn and scipy (never by hand): accuracy, F1 of the positive class (1:
equivalent / duplicate), Matthews correlation, Pearson and Spearman correlation of the predicted score.
Every metric is reported x100, as the GLUE leaderboard and the papers print them (and as ``eval.rouge``
reports ROUGE-L). Classes are the argmax of the logits; STS-B's score is the head's raw output.

Output in ``output_dir``: ``glue_<task>.json`` (see ``evaluate_glue``) and ``glue_<task>.md``, a table
with a row per split. One process; the dev sets are small.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from dts_llm.glue import HUB_ID, GlueTask, glue_task, load_glue_data
from dts_llm.heads import label_key, label_names
from dts_llm.models import load_model

from .results import write_json_atomic, write_text_atomic


def glue_metrics(task: str | GlueTask, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's metrics x100, in its order (``GlueTask.metrics``), of predicted classes (scores for
    STS-B) against the gold labels."""
    task = glue_task(task)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not len(labels):
        raise ValueError("no predictions to score")
    scorers = {
        "accuracy": accuracy_score,
        "f1": lambda gold, predicted: f1_score(gold, predicted, pos_label=1),
        "matthews_correlation": matthews_corrcoef,
        "pearson": lambda gold, predicted: pearsonr(predicted, gold).statistic,
        "spearmanr": lambda gold, predicted: spearmanr(predicted, gold).statistic,
    }
    return {name: 100 * float(scorers[name](labels, predictions)) for name in task.metrics}


def check_head(config, task: GlueTask, model_path: str) -> None:
    """Refuse a model whose head cannot be scored on ``task``: another number of outputs, or label names
    in another order than the hub's ids (``roberta-large-mnli`` puts contradiction first), which would
    give a meaningless score without any error. Generic names (``LABEL_0``) are taken as the hub's order."""
    if config.num_labels != task.num_labels:
        expected = ", ".join(task.label_names) or "a similarity score"
        raise ValueError(
            f"{model_path}: the model's head has num_labels={config.num_labels}, but GLUE {task.name} needs "
            f"{task.num_labels} ({expected})"
        )
    names = label_names(config)
    if task.is_regression or names is None:
        return
    if [label_key(name) for name in names] != [label_key(name) for name in task.label_names]:
        raise ValueError(
            f"{model_path}: the model's labels by id are {names}, but GLUE {task.name}'s ids mean "
            f"{list(task.label_names)}; this script scores the hub's ids"
        )


@torch.inference_mode()
def predict(model, tokenizer, dataset, batch_size: int) -> np.ndarray:
    """Classes (argmax) or, for a one-output head, raw scores of the examples in ``dataset``, in order."""
    collate = DataCollatorWithPadding(tokenizer)
    inputs = dataset.remove_columns("labels")
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = collate([inputs[i] for i in range(start, min(start + batch_size, len(inputs)))])
        logits = model(**{name: tensor.to(model.device) for name, tensor in batch.items()}).logits.float()
        outputs.append(logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(dim=-1))
    return torch.cat(outputs).cpu().numpy()


def evaluate_glue(
    model_path: str,
    task: str | GlueTask,
    output_dir: str,
    data: str = HUB_ID,
    splits: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int = 128,
) -> dict:
    """Score the model at ``model_path`` on ``splits`` (default: all of the task's evaluation splits) read
    from ``data`` (a folder, a file for one split, or a hub id; see ``dts_llm.glue``), and write the results.

    Returns the dict written to ``glue_<task>.json``::

        {"model", "task", "scale": "x100", "max_length",
         "splits": {split: {"source", "examples", "truncated", "metrics": {name: value}}}}
    """
    task = glue_task(task)
    splits = list(splits or task.eval_splits)
    if len(splits) > 1 and Path(data).is_file():
        raise ValueError(f"{data} is one file, so it holds one split, but {len(splits)} were asked for: {splits}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        raise ValueError(f"{model_path}: the tokenizer has no pad token, needed to batch examples")
    model = load_model(model_path, AutoModelForSequenceClassification)
    check_head(model.config, task, model_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    glue = load_glue_data(task, None, dict.fromkeys(splits, data), tokenizer, max_length)

    scores = {}
    for split, dataset in glue.evaluation.items():
        predictions = predict(model, tokenizer, dataset, batch_size)
        scores[split] = {
            **glue.report[split],
            "metrics": glue_metrics(task, predictions, np.asarray(dataset["labels"])),
        }
    result = {"model": str(model_path), "task": task.name, "scale": "x100", "max_length": max_length, "splits": scores}
    write_json_atomic(Path(output_dir) / f"glue_{task.name}.json", result)
    write_text_atomic(Path(output_dir) / f"glue_{task.name}.md", glue_table(result))
    return result


def glue_table(result: dict) -> str:
    """A Markdown row per split: model, task, split, examples and the task's metrics (x100, 2 decimals)."""
    metrics = glue_task(result["task"]).metrics
    lines = [
        "| " + " | ".join(["Model", "Task", "Split", "Examples", *metrics]) + " |",
        "|" + "---|" * 3 + "---:|" * (len(metrics) + 1),
    ]
    for split, score in result["splits"].items():
        values = [f"{score['metrics'][name]:.2f}" for name in metrics]
        cells = [result["model"], result["task"], split, str(score["examples"]), *values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
