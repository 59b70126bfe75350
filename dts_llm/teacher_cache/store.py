"""The cache folder: safetensors shards of per-token rows, the teacher's head, and a manifest.

A shard holds a run of consecutive examples of one split: ``rows`` (one row per response position, in
the order the loss scores them), ``label_logprob`` (the teacher's log-probability of each position's
label, at T = 1) and ``offsets`` (example i's rows are ``offsets[i]:offsets[i + 1]``). Shards are
written under a temporary name and renamed, so a shard file is whole or absent; ``manifest.json`` is
written last, with every shard's size and SHA-256, and marks a finished cache. Reading maps the
shards into memory and copies only the rows a batch asks for.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import UserError
from .fingerprints import file_sha256

MANIFEST_NAME = "manifest.json"
HEAD_NAME = "head.safetensors"
FORMAT_VERSION = 1
EXACT, COMPACT = "exact", "compact"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def write_atomically(path: Path, write) -> None:
    """``write(temporary_path)``, then rename it to ``path``: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_shard(path: Path, rows: torch.Tensor, label_logprob: torch.Tensor, offsets: torch.Tensor, metadata: dict):
    tensors = {"rows": rows.contiguous(), "label_logprob": label_logprob.float(), "offsets": offsets.long()}
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def finished_shard(path: Path, metadata: dict) -> bool:
    """Whether ``path`` is a whole shard written with ``metadata`` (the settings and examples asked for now)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as shard:
            return shard.metadata() == metadata
    except (SafetensorError, OSError):  # a truncated or foreign file: write it again
        return False


def write_manifest(folder: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True)
    write_atomically(folder / MANIFEST_NAME, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not a teacher cache manifest ({error})") from error
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: cache format {manifest.get('format')!r}, this dts-llm reads {FORMAT_VERSION}")
    return manifest


def verify_file(path: Path, entry: dict) -> None:
    """Refuse a missing, truncated or changed file, naming it."""
    if not path.is_file():
        raise UserError(f"teacher cache: {path} is missing; write the cache again with dts-llm cache-teacher")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UserError(f"teacher cache: {path} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
    if file_sha256(path) != entry["sha256"]:
        raise UserError(f"teacher cache: {path} does not match its checksum in the manifest (changed or corrupt)")


@dataclass
class CachedSplit:
    """One split's shards, read lazily: the first example of each, and their row offsets once opened."""

    folder: Path
    shards: list[dict]
    firsts: list[int] = field(init=False)
    _open: dict[int, tuple] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.firsts = [entry["first"] for entry in self.shards]

    @property
    def num_examples(self) -> int:
        return sum(entry["count"] for entry in self.shards)

    def _shard(self, index: int):
        if index not in self._open:
            handle = safe_open(str(self.folder / self.shards[index]["file"]), framework="pt")
            self._open[index] = (handle, handle.get_tensor("offsets").tolist())
        return self._open[index]

    def example_rows(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``example``'s rows and label log-probabilities."""
        index = bisect.bisect_right(self.firsts, example) - 1
        if not 0 <= example < self.num_examples or index < 0:
            raise IndexError(f"example {example} is not in the cache's {self.num_examples} examples")
        handle, offsets = self._shard(index)
        local = example - self.firsts[index]
        start, stop = offsets[local], offsets[local + 1]
        return handle.get_slice("rows")[start:stop], handle.get_slice("label_logprob")[start:stop]


class TeacherCache:
    """A finished cache folder, its shards checked against the manifest (sizes and checksums) when opened."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise UserError(
                f"teacher cache {self.folder}: no {MANIFEST_NAME} (not a cache, or its writing did not finish: "
                "run dts-llm cache-teacher again, it resumes)"
            )
        self.manifest = manifest
        if verify:
            for entry in self._files():
                verify_file(self.folder / entry["file"], entry)
        self.splits = {name: CachedSplit(self.folder, split["shards"]) for name, split in manifest["splits"].items()}

    def _files(self) -> list[dict]:
        head = [self.manifest["head"]] if self.manifest.get("head") else []
        return head + [entry for split in self.manifest["splits"].values() for entry in split["shards"]]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def split(self, name: str) -> CachedSplit:
        if name not in self.splits:
            raise UserError(f"teacher cache {self.folder} holds the splits {sorted(self.splits)}, not {name!r}")
        return self.splits[name]

    def check_source(self, expected: dict[str, object], what: str) -> None:
        """Refuse a cache made from other inputs: each entry of ``expected`` (a provenance key and its value
        now) must equal the manifest's; every difference is named."""
        recorded = self.manifest["provenance"]
        differing = [key for key, value in expected.items() if value is not None and recorded.get(key) != value]
        if differing:
            details = "; ".join(f"{key}: cache {recorded.get(key)!r}, now {expected[key]!r}" for key in differing)
            raise UserError(
                f"teacher cache {self.folder} was made from other {what} ({details}): "
                "write it again with dts-llm cache-teacher for this recipe"
            )
