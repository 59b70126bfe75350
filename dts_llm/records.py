"""Where records come from: local files (``.json``/``.jsonl``/``.parquet``, one file or a folder) or a hub id.

One reader for training data, evaluation suites, GLUE exports and the teacher report, so that they are read,
and their errors named, alike: a record is located as ``file:line`` (JSON lines) or ``file[index]``; a file
is UTF-8 with or without a byte order mark (``read_text``). ``is_local`` tells a local source from a hub id,
and ``split_files`` reads a folder by split when its file names say their split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet

from .errors import UserError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
# Words that name a split in a file name; validation also takes the other spellings datasets use.
SPLIT_WORDS = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}


def is_local(source: str | Path, suffixes: tuple[str, ...] = FILE_SUFFIXES) -> bool:
    """Whether ``source`` is a local file or folder rather than a hub id: it exists, or it is named like a
    data file (a missing file is then reported as missing, not looked up on the hub)."""
    path = Path(source)
    return path.exists() or path.suffix in suffixes


def read_records(path: str) -> list[dict]:
    """The records of a .json/.jsonl/.parquet file or of a folder of them (files in name order)."""
    return [record for _, record in located_records(path)]


def located_records(path: str) -> list[tuple[str, dict]]:
    """(where, record) pairs: where is ``file:line`` for JSON lines, ``file[index]`` otherwise."""
    return file_records(data_files(Path(path)))


def data_files(path: Path) -> list[Path]:
    """``path`` itself, or the .json/.jsonl/.parquet files of the folder ``path``, in name order."""
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix in FILE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {', '.join(FILE_SUFFIXES)} files in this folder")
        return files
    if path.suffix in FILE_SUFFIXES:
        return [path]
    raise UserError(f"{path}: expected a {', '.join(FILE_SUFFIXES)} file or a folder of them")


def file_records(files: list[Path]) -> list[tuple[str, dict]]:
    """The (where, record) pairs of ``files``, one after the other; a non-object record is an error."""
    records = [item for file in files for item in _read_file(file)]
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object (a record), got {type(record).__name__}")
    return records


def _read_file(file: Path) -> list[tuple[str, object]]:
    """One file's (where, record) pairs. A .json file holds either one array or JSON lines (Alpaca / Dolly)."""
    if file.suffix == ".parquet":
        return [(f"{file}[{i}]", row) for i, row in enumerate(pyarrow.parquet.read_table(file).to_pylist())]
    text = read_text(file)
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{file}[{i}]", record) for i, record in enumerate(json.loads(text))]
        except json.JSONDecodeError as error:
            raise UserError(f"{file}:{error.lineno}: malformed JSON ({error.msg}, column {error.colno})") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if line.strip():
            try:
                records.append((f"{file}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise UserError(f"{file}:{number}: malformed JSON ({error.msg}, column {error.colno})") from None
    return records


def read_text(file: Path) -> str:
    """The text of a UTF-8 file, with or without a byte order mark (Windows editors write one).

    A byte that is not UTF-8 is a ValueError naming the file and line, not a bare offset into the file.
    """
    try:
        return file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        data, start = error.object, error.start  # the bytes after any byte order mark
        line = data.count(b"\n", 0, start) + 1
        column = start - data.rfind(b"\n", 0, start)
        raise UserError(
            f"{file}:{line}: not UTF-8 text (byte 0x{data[start]:02x} at byte {column} of the line); "
            "save the file as UTF-8"
        ) from None


def split_files(folder: Path) -> dict[str, list[Path]] | None:
    """A folder's data files by split (``train``, ``validation``, ``test``), when file names say their split;
    None when no name does (the folder is then read whole, in name order).

    A name says its split by beginning with, or holding as a word, one of ``SPLIT_WORDS``: ``train.jsonl``,
    ``valid.jsonl``, ``dev.json``, ``dolly_test.jsonl``, ``train-00000-of-00001.parquet``. Beside such
    files, a file that names no split or two is refused, naming it: a guess could train on held-out data.
    """
    files = data_files(folder)
    found = {file: _file_splits(file) for file in files}
    if not any(found.values()):
        return None
    unclear = [
        f"{file.name} names {'no split' if not splits else 'more than one split'}"
        for file, splits in found.items()
        if len(splits) != 1
    ]
    if unclear:
        raise UserError(
            f"{folder}: the files are named as splits (train*, validation*/valid*/dev*, test*), but "
            f"{'; '.join(unclear)}: rename or move them, or give dataset and validation_file as files"
        )
    return {split: [file for file, splits in found.items() if splits == {split}] for split in SPLIT_WORDS}


def folder_splits(source: str | Path) -> dict[str, list[Path]] | None:
    """``split_files`` of ``source`` when it is a folder, else None."""
    folder = Path(source)
    return split_files(folder) if folder.is_dir() else None


def _file_splits(file: Path) -> set[str]:
    """The splits ``file``'s name says it holds (see ``split_files``)."""
    words = re.findall(r"[a-z]+", file.name.lower().removesuffix(file.suffix))
    return {
        split
        for split, names in SPLIT_WORDS.items()
        if (words and words[0].startswith(names)) or any(word in names for word in words)
    }


def file_names(files: list[Path] | dict[str, list[Path]]) -> str:
    """File names for messages: a list, or every file of a ``split_files`` result."""
    if isinstance(files, dict):
        files = sorted(file for group in files.values() for file in group)
    return ", ".join(file.name for file in files)
