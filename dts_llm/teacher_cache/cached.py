"""The cached teacher in a training step: a batch's rows read from the cache, in place of a teacher forward.

``open_cached_teacher`` checks, before training, that the cache was made from the student's tokenizer and the
trainer's data, and that the run's temperature policy can read it. The trainer's datasets then carry each
example's place in its cached split (a ``CACHE_COLUMNS`` column); the rows of a
batch are laid back on the positions the loss scores, so everything downstream reads them as it reads a
live teacher's logits. The exact kind gives the teacher's logits over the whole vocabulary (its head
applied to the cached hidden states, the rest zeros that no loss reads); the compact kind a
``TopKTeacher``. The teacher's cross-entropy comes from the stored label log-probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import datasets
import torch
from torch import Tensor

from ..errors import UserError
from ..losses import IGNORE_INDEX, TopKTeacher
from ..preflight import logits_width
from .fingerprints import data_fingerprint, tokenizer_fingerprint
from .head import TeacherHead
from .store import COMPACT, HEAD_NAME, TeacherCache

# The dataset column holding an example's index in its cached split; one name per split, so that a batch
# says which split it was drawn from.
CACHE_COLUMNS = {"train": "teacher_cache_train", "validation": "teacher_cache_validation"}
# Policies a compact cache cannot serve, and why (the sweep refuses its runs of them before writing one).
COMPACT_REFUSED_POLICIES = {
    "dts_sequence": "instance-wise DTS reads the teacher's CE of every token, which a compact cache does not keep",
    "dts_token": "instance-wise DTS reads the teacher's CE of every token, which a compact cache does not keep",
    "adakd": "adakd reads the per-token cross-entropies, which a compact cache does not keep",
    "annealing": "Annealing-KD fits the teacher's logits over the whole vocabulary",
    "ctkd": "CTKD differentiates the teacher's distribution with respect to T over the whole vocabulary",
    "ctkd_instance": "CTKD's instance temperature reads features of the teacher's whole distribution",
}


class CachedBatch(NamedTuple):
    """The teacher's side of a batch: logits (or their compact form) and the summed CE of the labels."""

    logits: Tensor | TopKTeacher
    cross_entropy_sum: Tensor


def cache_column(batch: dict) -> tuple[str, Tensor] | None:
    """The cached split a batch was drawn from and its examples' indices there, removed from ``batch``."""
    for split, column in CACHE_COLUMNS.items():
        if column in batch:
            return split, batch.pop(column)
    return None


class CachedTeacher:
    """Reads a batch's teacher rows from ``cache`` and lays them out like the student's logits."""

    def __init__(self, cache: TeacherCache, device):
        self.cache, self.device = cache, device
        self.vocab_size = cache.manifest["vocab_size"]
        self.head = None if cache.kind == COMPACT else TeacherHead.load(cache.folder / HEAD_NAME, device)
        if cache.kind == COMPACT:
            settings = cache.settings
            self.inverse_temperatures = torch.tensor(settings["inverse_temperatures"], dtype=torch.float64)
            self.top_k = settings["top_k"]

    def batch(self, split: str, examples: Tensor, labels: Tensor) -> CachedBatch:
        """The teacher's outputs for the batch whose dataset indices are ``examples`` and labels ``labels``."""
        scored = labels[:, 1:] != IGNORE_INDEX
        wanted = scored.sum(1).tolist()
        cached = self.cache.split(split)
        rows, logprobs = [], []
        for example, count in zip(examples.tolist(), wanted, strict=True):
            example_rows, example_logprobs = cached.example_rows(example)
            if len(example_rows) != count:
                raise UserError(
                    f"teacher cache {self.cache.folder}: {split} example {example} has {count} response tokens in "
                    f"this batch but {len(example_rows)} in the cache: the data or its collator changed"
                )
            rows.append(example_rows)
            logprobs.append(example_logprobs)
        rows = torch.cat(rows).to(self.device)
        cross_entropy_sum = -torch.cat(logprobs).to(self.device).double().sum().float()
        batch_size, length = labels.shape
        positions = scored.nonzero(as_tuple=True)
        if self.head is not None:
            rows = self.head(rows)
        laid_out = rows.new_zeros(batch_size, length, rows.size(-1))
        laid_out[positions] = rows
        if self.head is not None:
            return CachedBatch(laid_out, cross_entropy_sum)
        return CachedBatch(TopKTeacher(laid_out, self.inverse_temperatures, self.top_k), cross_entropy_sum)

    def index(self, dataset, split: str):
        """``dataset`` (checked to be the cached split's data, example for example) with each example's
        index in the split as that split's ``CACHE_COLUMNS`` column, which the collator carries to the loss."""
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            raise UserError("a teacher cache serves one evaluation set (its validation split), not a dict of them")
        if not isinstance(dataset, datasets.Dataset):
            raise UserError(
                f"a teacher cache needs the {split} data as a datasets.Dataset, got {type(dataset).__name__}"
            )
        self.cache.split(split)
        self.cache.check_source({f"data.{split}": data_fingerprint(dataset)}, f"{split} data")
        column = CACHE_COLUMNS[split]
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        return dataset.add_column(column, list(range(len(dataset))))


def open_cached_teacher(cache: str | TeacherCache, student, tokenizer, args) -> CachedTeacher:
    """The cache at ``cache``, after refusing one the run cannot use: made with another tokenizer, narrower
    than the student's vocabulary, or (compact) unable to give what ``args`` (a `DistillationConfig`) asks of
    the teacher: the policy's temperatures, a teacher at another temperature than the student's, or the
    teacher's entropy."""
    cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
    if tokenizer is not None:
        cache.check_source({"tokenizer": tokenizer_fingerprint(tokenizer)}, "tokenizer")
    cached = CachedTeacher(cache, args.device)
    width = logits_width(student)
    if width < cached.vocab_size:
        raise UserError(
            f"teacher cache {cache.folder} scores {cached.vocab_size} tokens but the student's logits have {width}"
        )
    if cache.kind == COMPACT:
        _check_compact_serves(cache, args)
    return cached


def _check_compact_serves(cache: TeacherCache, args) -> None:
    """Refuse settings that read the teacher's whole distribution, and temperatures off the cache's grid."""
    policy, temperature_bounds = args.temperature_policy, args.temperature_bounds()
    needs_dense = {
        "teacher_temperature_ratio": args.teacher_temperature_ratio != 1.0,
        "log_entropy": args.log_entropy,
    }
    for field, asked in needs_dense.items():
        if asked:
            raise UserError(
                f"{field} reads the teacher's whole distribution, which the compact teacher cache {cache.folder} "
                "does not hold: write an exact cache (teacher_cache_kind: exact)"
            )
    if policy in COMPACT_REFUSED_POLICIES:
        raise UserError(
            f"temperature_policy={policy} cannot read a compact teacher cache: "
            f"{COMPACT_REFUSED_POLICIES[policy]}; write an exact cache (teacher_cache_kind: exact)"
        )
    low, high = cache.settings["temperature_min"], cache.settings["temperature_max"]
    if not low <= temperature_bounds[0] <= temperature_bounds[1] <= high:
        raise UserError(
            f"temperature_policy={policy} moves T over [{temperature_bounds[0]}, {temperature_bounds[1]}] but the "
            f"compact teacher cache {cache.folder} normalises over [{low}, {high}] only: write it again with "
            "teacher_cache_temperature_min / _max covering the policy's range"
        )
