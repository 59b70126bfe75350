"""What a model predicts, for the loss to fit it: next tokens, a class, or a score.

A causal LM is distilled token by token over its vocabulary; a sequence-classification head
(BERT on GLUE) over its class logits at the same temperature; a one-output regression head
(STS-B) by mean squared error to the labels and to the teacher, with no temperature.
"""

from __future__ import annotations

import re

from torch import nn
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from .errors import UserError
from .losses import IGNORE_INDEX

CAUSAL_LM, CLASSIFICATION, REGRESSION = "causal_lm", "classification", "regression"


def head_kind(model: nn.Module) -> str:
    """``CAUSAL_LM``, ``CLASSIFICATION`` or ``REGRESSION``, from the model's class and config."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return CAUSAL_LM
    config = model.config
    return REGRESSION if config.problem_type == "regression" or config.num_labels == 1 else CLASSIFICATION


def collator_for(kind: str, tokenizer):
    """The batch collator of a head's data: a causal LM's labels padded with the ignored index, so
    padding is never learned; a classifier's one label per example taken as it is."""
    if kind == CAUSAL_LM:
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return DataCollatorWithPadding(tokenizer)


def label_names(config) -> list[str] | None:
    """The head's label names in id order, or None when they are the generic LABEL_0, LABEL_1, ..."""
    names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    return None if all(re.fullmatch(r"LABEL_\d+", name) for name in names) else names


def label_key(name: str) -> str:
    """A label name compared loosely: "Not Entailment", "not-entailment" and "not_entailment" are one."""
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def check_label_heads(student: nn.Module, teacher: nn.Module) -> int:
    """The number of classes, after refusing a teacher whose head predicts something else."""
    kinds = head_kind(student), head_kind(teacher)
    if kinds[0] != kinds[1]:
        raise UserError(f"the student has a {kinds[0]} head but the teacher a {kinds[1]} head")
    student_labels, teacher_labels = student.config.num_labels, teacher.config.num_labels
    if student_labels != teacher_labels:
        raise UserError(f"the student's head has {student_labels} labels but the teacher's {teacher_labels}")
    names = label_names(student.config), label_names(teacher.config)
    if None not in names and [label_key(n) for n in names[0]] != [label_key(n) for n in names[1]]:
        raise UserError(f"the student's labels {names[0]} are not the teacher's {names[1]} (same ids, same order)")
    return student_labels
