"""Writing a teacher cache: the teacher run once over the tokenised examples, shard by shard.

Each process writes the shards ``index % world_size == rank`` (under ``accelerate launch`` the teacher is
a replica per process, as in DDP); a shard already written with the same settings is kept, so an
interrupted run resumes where it stopped. The first process writes the head and, when every shard is
there, the manifest with their checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import UserError
from ..losses import IGNORE_INDEX, compact_teacher_rows, inverse_temperature_grid
from .fingerprints import file_sha256
from .head import HeadInputs, TeacherHead, check_head_reproduces
from .store import (
    COMPACT,
    EXACT,
    FORMAT_VERSION,
    HEAD_NAME,
    finished_shard,
    read_manifest,
    shard_name,
    write_atomically,
    write_manifest,
    write_shard,
)

logger = logging.getLogger(__name__)

CACHE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CacheSettings:
    """What a cache holds per response token. Exact: the teacher's final hidden state (``dtype``: as the
    teacher computes it, or another). Compact: the top ``top_k`` logits and ids and the tail's
    log-partition on ``grid_size`` inverse temperatures spanning [temperature_min, temperature_max]."""

    kind: str = EXACT
    dtype: str = "auto"
    top_k: int = 128
    temperature_min: float = 1.0
    temperature_max: float = 10.0
    grid_size: int = 8
    shard_examples: int = 1024

    def __post_init__(self):
        if self.kind not in (EXACT, COMPACT):
            raise UserError(f"teacher_cache_kind must be {EXACT!r} or {COMPACT!r}, got {self.kind!r}")
        if self.dtype not in CACHE_DTYPES:
            raise UserError(f"teacher_cache_dtype must be one of {list(CACHE_DTYPES)}, got {self.dtype!r}")
        if self.kind == COMPACT:
            if self.top_k < 1:
                raise UserError(f"teacher_cache_top_k must be >= 1, got {self.top_k}")
            if not 0 < self.temperature_min < self.temperature_max:
                raise UserError(
                    "teacher_cache_temperature_min / _max must satisfy 0 < min < max, got "
                    f"{self.temperature_min} / {self.temperature_max}"
                )
            if self.grid_size < 2:
                raise UserError(f"teacher_cache_grid_size must be >= 2, got {self.grid_size}")
        if self.shard_examples < 1:
            raise UserError(f"shard_examples must be >= 1, got {self.shard_examples}")

    def inverse_temperatures(self) -> torch.Tensor:
        """The compact kind's grid of 1 / T at which the tail's log-partition is stored."""
        return inverse_temperature_grid(self.temperature_min, self.temperature_max, self.grid_size)

    def recorded(self) -> dict:
        """The settings that decide the rows (not how they are split into files), as the manifest keeps them."""
        settings = {"kind": self.kind, "shard_examples": self.shard_examples}
        if self.kind == EXACT:
            return {**settings, "dtype": self.dtype}
        return {
            **settings,
            "top_k": self.top_k,
            "temperature_min": self.temperature_min,
            "temperature_max": self.temperature_max,
            "inverse_temperatures": self.inverse_temperatures().tolist(),
        }


@dataclass(frozen=True)
class Processes:
    """This process's place among those writing the cache, and a barrier across them."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None


def _digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _batch_rows(teacher, batch: dict, settings: CacheSettings, vocab_size: int, head: TeacherHead | None, name: str):
    """One padded batch through the teacher: its rows, label log-probabilities and rows per example."""
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    with HeadInputs(teacher) as recorded:
        logits = teacher(**batch, use_cache=False).logits[:, :-1]
    logits_rows = logits[scored][:, :vocab_size].float()
    label_logprob = torch.log_softmax(logits_rows, -1).gather(1, targets[scored][:, None]).squeeze(1)
    if settings.kind == EXACT:
        hidden = recorded.hidden[:, :-1][scored]
        if head is not None:  # the first batch: the head must give the teacher's logits back
            check_head_reproduces(head, hidden, logits[scored], name)
        dtype = CACHE_DTYPES[settings.dtype] or hidden.dtype
        rows = hidden.to(dtype)
    else:
        rows = compact_teacher_rows(logits_rows, settings.top_k, settings.inverse_temperatures())
    return rows.cpu(), label_logprob.cpu(), scored.sum(1).cpu()


@torch.inference_mode()
def _write_split_shard(teacher, collator, examples: datasets.Dataset, settings, vocab_size, batch_size, path, meta):
    rows, logprobs, counts = [], [], []
    head = TeacherHead.of(teacher) if settings.kind == EXACT else None
    device = next(teacher.parameters()).device
    keys = ("input_ids", "attention_mask", "labels")
    for start in range(0, len(examples), batch_size):
        columns = examples[start : start + batch_size]
        features = [dict(zip(keys, values, strict=True)) for values in zip(*map(columns.get, keys), strict=True)]
        batch = {key: value.to(device) for key, value in collator(features).items()}
        batch_rows, batch_logprobs, batch_counts = _batch_rows(
            teacher, batch, settings, vocab_size, head if start == 0 else None, teacher.name_or_path
        )
        rows.append(batch_rows)
        logprobs.append(batch_logprobs)
        counts.append(batch_counts)
    counts = torch.cat(counts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    write_shard(path, torch.cat(rows), torch.cat(logprobs), offsets, meta)


def finished_cache(folder: str | Path, settings: CacheSettings, provenance: dict) -> bool:
    """Whether ``folder`` holds a finished cache of these settings and inputs (so writing it has nothing to do);
    a folder holding a cache of others is refused."""
    existing = read_manifest(Path(folder))
    if existing is None:
        return False
    if existing["settings"] == settings.recorded() and existing["provenance"] == provenance:
        return True
    raise UserError(
        f"{folder} holds a teacher cache made with other settings or inputs: give another folder, or delete it"
    )


def write_teacher_cache(
    teacher,
    collator,
    splits: dict[str, datasets.Dataset],
    folder: str | Path,
    settings: CacheSettings,
    provenance: dict,
    *,
    vocab_size: int,
    batch_size: int = 8,
    processes: Processes = Processes(),
) -> Path:
    """Run ``teacher`` (eval mode, no gradients) over ``splits`` and write the cache to ``folder``.

    ``provenance`` (fingerprints of the teacher, tokenizer, template, data and lengths) is recorded in
    the manifest for the training run to check. A finished cache with the same settings and provenance
    is left as it is; one with others is refused.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = settings.recorded()
    if finished_cache(folder, settings, provenance):
        logger.info("The teacher cache in %s is complete: nothing to do.", folder)
        return folder
    teacher.eval()
    key = _digest({"settings": recorded, "provenance": provenance})
    plan = [
        (split, index, range(first, min(first + settings.shard_examples, len(examples))))
        for split, examples in splits.items()
        for index, first in enumerate(range(0, len(examples), settings.shard_examples))
    ]
    mine = plan[processes.rank :: processes.world_size]
    progress = tqdm(mine, desc="caching the teacher", unit="shard", disable=processes.rank != 0)
    for split, index, examples in progress:
        meta = {"split": split, "first": str(examples.start), "count": str(len(examples)), "key": key}
        path = folder / shard_name(split, index)
        if finished_shard(path, meta):
            continue
        _write_split_shard(
            teacher, collator, splits[split].select(examples), settings, vocab_size, batch_size, path, meta
        )
    processes.barrier()
    if processes.rank == 0:
        manifest = _manifest(folder, teacher, splits, plan, settings, recorded, provenance, vocab_size)
        write_manifest(folder, manifest)
    processes.barrier()
    return folder


def _manifest(folder, teacher, splits, plan, settings, recorded, provenance, vocab_size) -> dict:
    manifest = {
        "format": FORMAT_VERSION,
        "kind": settings.kind,
        "settings": recorded,
        "provenance": provenance,
        "vocab_size": vocab_size,
        "splits": {split: {"examples": len(examples), "shards": []} for split, examples in splits.items()},
    }
    if settings.kind == EXACT:
        head_path = folder / HEAD_NAME
        write_atomically(head_path, TeacherHead.of(teacher).save)
        manifest["head"] = _entry(head_path)
    for split, index, examples in plan:
        path = folder / shard_name(split, index)
        with safe_open(str(path), framework="pt") as shard:
            rows = int(shard.get_slice("offsets")[-1:][0])
        entry = {**_entry(path), "first": examples.start, "count": len(examples), "rows": rows}
        manifest["splits"][split]["shards"].append(entry)
    for stale in (
        set(folder.glob("*.safetensors"))
        - {folder / HEAD_NAME}
        - {folder / shard_name(split, index) for split, index, _ in plan}
    ):
        stale.unlink()
    return manifest


def _entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
