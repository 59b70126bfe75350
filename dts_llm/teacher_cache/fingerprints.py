"""Content fingerprints of what a teacher cache was made from, so a cache is used only with the same inputs.

Each is a SHA-256 of content, never of a name or a path: a retrained teacher saved to the same folder, a
tokenizer with one added token or a dataset cut at another ``max_length`` each give another fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np

from ..template import PROMPT, PROMPT_WITH_INPUT

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_READ_SIZE = 1 << 24


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(dataset: datasets.Dataset) -> str:
    """The tokenised examples in order: every example's ``input_ids`` and ``labels``, and their lengths."""
    table = dataset.with_format("arrow")[:]  # honours a shuffle's or select's index mapping
    digest = hashlib.sha256(str(len(dataset)).encode())
    for column in ("input_ids", "labels"):
        values = table.column(column).combine_chunks()
        digest.update(np.asarray(values.value_lengths(), dtype=np.int64).tobytes())
        digest.update(np.asarray(values.flatten(), dtype=np.int64).tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary, the special and added tokens and the chat template: what turns text into ids."""
    content = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.special_tokens_map,
        "added": sorted((index, str(token)) for index, token in tokenizer.added_tokens_decoder.items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def template_fingerprint() -> str:
    """The prompt template the data is rendered with."""
    return hashlib.sha256((PROMPT + "\0" + PROMPT_WITH_INPUT).encode()).hexdigest()


def weights_fingerprint(folder: str | Path) -> str | None:
    """A model folder's config and weight files, by content; None for a path that is not a local folder
    (a hub id: its files are not on this machine to be read)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(path for path in folder.iterdir() if path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def recipe_provenance(teacher_path: str | None, max_length: int, max_prompt_length: int) -> dict:
    """What a recipe decides of a cache besides its tokenizer and data: the teacher (by content when it is
    a local folder, else by name; None when the recipe names none), the template and the lengths."""
    teacher = None if teacher_path is None else (weights_fingerprint(teacher_path) or teacher_path)
    return {
        "teacher": teacher,
        "template": template_fingerprint(),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }
