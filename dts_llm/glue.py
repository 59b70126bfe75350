"""The GLUE tasks and their data: one table of tasks, readers for every layout users have, tokenisation.

A split comes from one of three sources, told apart by the path:

- the TSV files the GLUE download script (``download_glue_data.py``) writes: ``glue_data/RTE/dev.tsv`` or
  the folder holding them (or its parent ``glue_data``);
- the Hugging Face export with the hub's field names: ``<split>.parquet``/``.jsonl``/``.json``, the hub's
  ``<split>-00000-of-00001.parquet`` shards, one such file or the folder holding them;
- otherwise a hub id (``nyu-mll/glue``), read with ``datasets.load_dataset(hub_id, task, split=split)``.

Every reader returns the same records, ``{text fields (the hub's names)..., "label": int | float}`` with the
hub's label ids. Nothing is skipped: a malformed row, an unknown label or a missing field is a ``ValueError``
naming the file and line (TSV, JSON lines), index (parquet, JSON arrays) and field. Test splits carry no
labels (the benchmark keeps them private) and are refused with that reason, since distillation and scoring
both need labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets

from .errors import UserError
from .records import is_local, located_records, read_text

logger = logging.getLogger(__name__)

HUB_ID = "nyu-mll/glue"
EXPORT_SUFFIXES = (".parquet", ".jsonl", ".json")
TEST_FILES = ("test.tsv", "test_matched.tsv", "test_mismatched.tsv")  # the script's unlabelled files


@dataclass(frozen=True)
class TsvColumns:
    """Where a task's texts and label stand in the download script's TSVs.

    Columns are found by name in the header row, because a task's files differ in width (MNLI's train.tsv
    has 12 columns, its dev files 16). CoLA's files have no header row: ``names`` gives theirs.
    """

    texts: tuple[str, ...]  # in the order of GlueTask.text_fields
    label: str
    label_format: Literal["id", "name", "score"]  # "0"/"1", a label name ("entailment"), a float
    names: tuple[str, ...] | None = None  # the columns of a file without a header row


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as the hub (``nyu-mll/glue``) names it, and as the download script writes it."""

    name: str
    text_fields: tuple[str, ...]  # one sentence or a pair, the hub's field names
    label_names: tuple[str, ...]  # in the hub's id order; empty for regression (STS-B)
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...]  # the hub's labelled evaluation splits
    folder: str  # the download script's folder, e.g. "SST-2"
    files: Mapping[str, str]  # split -> the download script's file name
    tsv: TsvColumns

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: 1 (a score) for regression."""
        return len(self.label_names) or 1

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.eval_splits)

    def head_config(self) -> dict:
        """Keyword arguments for ``AutoModelForSequenceClassification.from_pretrained`` that give the head
        this task's size and label names, so a saved model says which id is which label."""
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {
            "num_labels": self.num_labels,
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {name: i for i, name in enumerate(self.label_names)},
        }


def _task(name, text_fields, label_names, metrics, folder, tsv, eval_splits=("validation",), files=None) -> GlueTask:
    files = files or {"train": "train.tsv", "validation": "dev.tsv"}
    return GlueTask(name, text_fields, label_names, metrics, eval_splits, folder, files, tsv)


_PAIR = ("sentence1", "sentence2")
_NLI = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        _task(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("matthews_correlation",),
            "CoLA",
            TsvColumns(("sentence",), "label", "id", names=("source", "label", "original_mark", "sentence")),
        ),
        _task(
            "sst2",
            ("sentence",),
            ("negative", "positive"),
            ("accuracy",),
            "SST-2",
            TsvColumns(("sentence",), "label", "id"),
        ),
        _task(
            "mrpc",
            _PAIR,
            ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
            "MRPC",
            TsvColumns(("#1 String", "#2 String"), "Quality", "id"),
        ),
        _task(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("f1", "accuracy"),
            "QQP",
            TsvColumns(("question1", "question2"), "is_duplicate", "id"),
        ),
        _task("stsb", _PAIR, (), ("pearson", "spearmanr"), "STS-B", TsvColumns(_PAIR, "score", "score")),
        _task(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "MNLI",
            TsvColumns(_PAIR, "gold_label", "name"),
            eval_splits=("validation_matched", "validation_mismatched"),
            files={
                "train": "train.tsv",
                "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
            },
        ),
        _task(
            "qnli",
            ("question", "sentence"),
            _NLI,
            ("accuracy",),
            "QNLI",
            TsvColumns(("question", "sentence"), "label", "name"),
        ),
        _task("rte", _PAIR, _NLI, ("accuracy",), "RTE", TsvColumns(_PAIR, "label", "name")),
        # WNLI's ids are the other way round from RTE's: 1 is entailment, in the TSVs and on the hub.
        _task(
            "wnli", _PAIR, ("not_entailment", "entailment"), ("accuracy",), "WNLI", TsvColumns(_PAIR, "label", "id")
        ),
    )
}


def glue_task(name: str | GlueTask) -> GlueTask:
    """The task called ``name``; the download script's spelling (``SST-2``, ``STS-B``) is accepted too."""
    if isinstance(name, GlueTask):
        return name
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {name!r}: expected one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# ---- readers ------------------------------------------------------------------------------------


def read_glue_tsv(path: str | Path, task: str | GlueTask) -> list[dict]:
    """The records of a TSV written by the GLUE download script.

    Lines are split on tabs with no quote processing (texts hold unbalanced quotes; a quoting CSV reader
    would merge lines) and only at ``\\n``, so line numbers in errors are the editor's. The text is read
    by ``dts_llm.records.read_text``: a byte order mark is accepted, a byte that is not UTF-8 names its line.
    """
    task, path = glue_task(task), Path(path)
    if path.name in TEST_FILES:
        raise UserError(f"{path}: GLUE test files have no labels (the benchmark keeps them private); use dev")
    layout = task.tsv
    text = read_text(path)
    lines = enumerate((line.removesuffix("\r") for line in text.split("\n")), start=1)
    if layout.names is None:
        if not text:
            raise UserError(f"{path}: empty file, expected a header row")
        header = tuple(next(lines)[1].split("\t"))
    else:
        header = layout.names
    missing = [name for name in (*layout.texts, layout.label) if name not in header]
    if missing:
        raise UserError(f"{path}:1: the header {list(header)} lacks the column(s) {missing} of GLUE {task.name}")
    text_columns = [header.index(name) for name in layout.texts]
    label_column = header.index(layout.label)
    records = []
    for number, line in lines:
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise UserError(
                f"{path}:{number}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                f"found {len(fields)}"
            )
        record = {field: fields[column] for field, column in zip(task.text_fields, text_columns, strict=True)}
        record["label"] = _tsv_label(fields[label_column], task, f"{path}:{number}")
        records.append(record)
    return records


def _tsv_label(text: str, task: GlueTask, where: str) -> int | float:
    """A TSV label cell as the hub's label: a float score, or the id of a label id or name."""
    if task.tsv.label_format == "score":
        try:
            score = float(text)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise UserError(f"{where}: the score {text!r} is not a number")
        return score
    if task.tsv.label_format == "name":
        ids = {name: i for i, name in enumerate(task.label_names)}
    else:
        ids = {str(i): i for i in range(task.num_labels)}
    if text not in ids:
        raise UserError(f"{where}: unknown label {text!r} for GLUE {task.name}: expected one of {list(ids)}")
    return ids[text]


def read_glue_export(path: str | Path, task: str | GlueTask) -> list[dict]:
    """The records of a parquet / JSON / JSON lines file with the hub's field names (``idx`` and others are
    ignored)."""
    task = glue_task(task)
    return [normalise_record(record, task, where) for where, record in located_records(str(path))]


def read_glue_hub(hub_id: str, task: str | GlueTask, split: str, cache_dir: str | None = None) -> list[dict]:
    """The records of ``split`` of ``task`` from a hub dataset laid out like ``nyu-mll/glue``."""
    task = glue_task(task)
    hub = datasets.load_dataset(hub_id, task.name, split=split, cache_dir=cache_dir)
    return [normalise_record(record, task, f"{hub_id} {task.name} ({split})[{i}]") for i, record in enumerate(hub)]


def normalise_record(record: dict, task: GlueTask, where: str) -> dict:
    """``{text fields..., "label"}`` of a record with the hub's field names, checked."""
    for field in (*task.text_fields, "label"):
        if field not in record:
            raise UserError(f"{where}: missing field {field!r} of GLUE {task.name} (the record has {sorted(record)})")
    normalised = {}
    for field in task.text_fields:
        if not isinstance(record[field], str):
            raise UserError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
        normalised[field] = record[field]
    label = record["label"]
    if task.is_regression:
        valid = isinstance(label, (int, float)) and not isinstance(label, bool)
        expected = "a number (the similarity score)"
    else:
        valid = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < task.num_labels
        expected = f"a label id 0..{task.num_labels - 1} ({', '.join(task.label_names)})"
    if not valid:
        hint = " (-1 marks the unlabelled test split)" if label == -1 else ""
        raise UserError(f"{where}: field 'label' must be {expected}, got {label!r}{hint}")
    normalised["label"] = float(label) if task.is_regression else label
    return normalised


def read_glue_split(task: str | GlueTask, source: str | Path, split: str, cache_dir: str | None = None) -> list[dict]:
    """The records of ``split`` from a file, a folder (see ``split_files``) or a hub id."""
    task, path = glue_task(task), Path(source)
    if split not in task.splits:
        raise UserError(f"GLUE {task.name} has no labelled split {split!r}: expected one of {list(task.splits)}")
    if path.is_dir():
        files = split_files(path, task, split)
    elif is_local(path, (".tsv", *EXPORT_SUFFIXES)):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        files = [path]
    else:
        return read_glue_hub(str(source), task, split, cache_dir)
    records = []
    for file in files:
        if file.suffix == ".tsv":
            records += read_glue_tsv(file, task)
        elif file.suffix in EXPORT_SUFFIXES:
            records += read_glue_export(file, task)
        else:
            raise UserError(f"{file}: expected a .tsv, {', '.join(EXPORT_SUFFIXES)} file or a folder of them")
    if not records:
        raise UserError(f"{source}: no {split} records of GLUE {task.name}")
    return records


def split_files(folder: Path, task: GlueTask, split: str) -> list[Path]:
    """The file(s) of ``split`` in ``folder``, in ``folder/<script folder>`` (``glue_data/RTE``) or in
    ``folder/<task>`` (the hub's ``rte/``): the script's TSV, ``<split>.parquet|.jsonl|.json`` or the hub's
    ``<split>-*.parquet`` shards. Two of these side by side is an error, not a guess."""
    names = (task.files[split], *(split + suffix for suffix in EXPORT_SUFFIXES))
    for directory in (folder, folder / task.folder, folder / task.name):
        found = [[directory / name] for name in names if (directory / name).is_file()]
        shards = sorted(directory.glob(f"{split}-*.parquet"))
        found += [shards] if shards else []
        if len(found) > 1:
            raise UserError(f"{directory}: several files hold GLUE {task.name} {split}: {found}; give one file")
        if found:
            return found[0]
    raise FileNotFoundError(
        f"{folder}: no GLUE {task.name} {split} file: looked for {', '.join(names)} or {split}-*.parquet "
        f"in it and in {task.folder}/ and {task.name}/ below it"
    )


# ---- tokenisation ---------------------------------------------------------------------------------


def tokenize_glue(
    records: list[dict], task: str | GlueTask, tokenizer, max_length: int
) -> tuple[datasets.Dataset, int]:
    """``input_ids``, ``attention_mask`` (``token_type_ids`` when the tokenizer makes them) and ``labels``
    (int64, or float32 for regression, the dtype the MSE loss needs), cut to ``max_length`` tokens (a pair
    loses tokens from its longer text first), unpadded. Also returns how many examples were cut."""
    task = glue_task(task)
    if max_length < 1:
        raise UserError(f"max_length must be a positive integer, got {max_length}")
    texts = [[record[field] for record in records] for field in task.text_fields]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    if encoded.encodings is not None:  # a fast tokenizer keeps what truncation removed
        truncated = sum(bool(encoding.overflowing) for encoding in encoded.encodings)
    else:  # otherwise count those that fill max_length, an upper bound
        truncated = sum(len(ids) >= max_length for ids in encoded["input_ids"])
    labels = [record["label"] for record in records]
    label_type = datasets.Value("float32" if task.is_regression else "int64")
    return datasets.Dataset.from_dict(dict(encoded)).add_column("labels", labels, feature=label_type), truncated


@dataclass
class GlueData:
    """Tokenised splits of one task; ``report[split]`` holds its ``source``, ``examples`` and ``truncated``
    (examples cut to ``max_length``), so nothing is shortened unseen."""

    task: GlueTask
    train: datasets.Dataset | None
    evaluation: dict[str, datasets.Dataset]
    report: dict[str, dict[str, str | int]]


def load_glue_data(
    task: str | GlueTask,
    train_source: str | Path | None,
    eval_sources: Mapping[str, str | Path] | None,
    tokenizer,
    max_length: int = 128,
    cache_dir: str | None = None,
) -> GlueData:
    """Read and tokenise a task's training split and evaluation splits.

    ``train_source``: a file, a folder or a hub id (``HUB_ID``); None for no training split.
    ``eval_sources``: ``{split: source}`` with the hub's split names (``validation``, or
    ``validation_matched``/``validation_mismatched`` for MNLI); ``{}`` for none; None for all of the task's
    evaluation splits from ``train_source``, which must then be a folder or a hub id.
    ``max_length`` 128 is the usual GLUE fine-tuning length. ``cache_dir`` is for hub downloads.
    """
    task = glue_task(task)
    if eval_sources is None:
        if train_source is None or Path(train_source).is_file():
            raise UserError(
                f"eval_sources: give {{split: source}} for GLUE {task.name} (splits {list(task.eval_splits)}), "
                "or {} for none; they are found by themselves only in a folder or on the hub"
            )
        eval_sources = dict.fromkeys(task.eval_splits, train_source)
    unknown = [split for split in eval_sources if split not in task.eval_splits]
    if unknown:
        raise UserError(
            f"eval_sources: GLUE {task.name} has no evaluation split {unknown}: expected {list(task.eval_splits)}"
        )
    if train_source is None and not eval_sources:
        raise UserError(f"GLUE {task.name}: no train_source and no eval_sources, nothing to load")
    sources = {"train": train_source} if train_source is not None else {}
    sources.update(eval_sources)
    tokenised, report = {}, {}
    for split, source in sources.items():
        dataset, truncated = tokenize_glue(
            read_glue_split(task, source, split, cache_dir), task, tokenizer, max_length
        )
        tokenised[split] = dataset
        report[split] = {"source": str(source), "examples": len(dataset), "truncated": truncated}
        logger.log(
            logging.WARNING if truncated else logging.INFO,
            "GLUE %s %s: %d examples from %s, %d cut to %d tokens",
            task.name,
            split,
            len(dataset),
            source,
            truncated,
            max_length,
        )
    return GlueData(task=task, train=tokenised.pop("train", None), evaluation=tokenised, report=report)
