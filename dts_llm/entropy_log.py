"""``log_entropy``: the teacher's and the student's entropy at T, summed into the trainer's logging window."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import DistillationConfig
from .errors import UserError
from .losses import tempered_entropies


def add_entropies(sums: dict, args: DistillationConfig, student_logits: Tensor, teacher_logits, labels: Tensor,
                  temperature, vocab_size: int, shift_labels: bool,
                  entropies_of=tempered_entropies) -> None:  # fmt: skip
    """Add this micro-batch's entropy sums at T to ``sums`` when ``log_entropy`` asks (one no-grad pass of
    ``entropies_of``: ``tempered_entropies``, or with ``fused_head`` its hidden-state twin)."""
    if not args.log_entropy or temperature is None:
        return
    if not torch.is_tensor(teacher_logits):
        raise UserError("log_entropy needs the teacher's dense logits: a compact teacher cache holds its top-k")
    entropies = entropies_of(
        student_logits, teacher_logits, labels, temperature, vocab_size=vocab_size, chunk_size=args.kd_chunk_size,
        shift_labels=shift_labels, teacher_temperature_ratio=args.teacher_temperature_ratio,
    )  # fmt: skip
    sums["teacher_entropy"] += entropies[0]
    sums["student_entropy"] += entropies[1]
