"""Which logits rows a loss scores, and the checks on what a loss is given, before any work is done."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def response_rows(labels: Tensor, logits: Tensor, shift_labels: bool = True) -> tuple[Tensor, Tensor]:
    """Flat row indices into ``logits.view(-1, V)`` that predict a response token, and those tokens.

    With ``shift_labels=False`` each row is scored against its own label (a classification head's
    logits ``[B, C]`` against ``labels[B]``) instead of the next position's.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} in batch and length")
    if not shift_labels:
        flat = labels.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        return rows, flat[rows]
    _, length = labels.shape
    targets = labels[:, 1:]
    b, i = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return b * length + i, targets[b, i]


def response_targets(labels: Tensor, logits: Tensor, vocab_size: int, shift_labels: bool) -> tuple[Tensor, Tensor]:
    """``response_rows``, after checking that every target is a token of the vocabulary."""
    rows, targets = response_rows(labels, logits, shift_labels)
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < vocab_size:
        raise ValueError(
            f"label ids span [{int(targets.min())}, {int(targets.max())}], outside the vocabulary [0, {vocab_size})"
        )
    return rows, targets


def scored_vocab(vocab_size: int | None, *logits: Tensor | None) -> int:
    """The vocabulary the loss scores: ``vocab_size``, by default the narrowest logits' width
    (padded embeddings make a model's logits wider than its tokenizer)."""
    widest_common = min(x.size(-1) for x in logits if x is not None)
    if vocab_size is None:
        return widest_common
    if vocab_size > widest_common:
        raise ValueError(f"vocab_size={vocab_size} exceeds the logits width {widest_common}")
    return vocab_size


def check_kd_ratio(kd_ratio: float) -> float:
    """The weight of the distillation term in a mix with the label loss, in [0, 1]."""
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
    return float(kd_ratio)


def check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Refuse a teacher whose logits do not line up with the student's, position for position."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in batch or sequence shape"
        )


def check_temperature(temperature: Tensor | float, num_rows: int) -> Tensor | float:
    """A positive float, 0-dim tensor, or one temperature per scored row (a learnt instance temperature)."""
    if not torch.is_tensor(temperature):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        return float(temperature)
    if temperature.dim() > 1 or (temperature.dim() == 1 and temperature.numel() != num_rows):
        raise ValueError(
            f"a temperature tensor must be a scalar or hold one value per scored token ({num_rows}), "
            f"got shape {tuple(temperature.shape)}"
        )
    if not bool((temperature.detach() > 0).all()):
        raise ValueError("every temperature must be positive")
    return temperature
