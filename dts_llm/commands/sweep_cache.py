"""The sweep's teacher cache: the teacher runs once for the whole grid, and every run distils from its cache.

With ``--teacher-cache FOLDER`` the sweep runs `dts-llm cache-teacher` on its recipe and overrides in a child
process (behind the sweep's launcher, as the runs train) before the first run trains, then gives every run
``--teacher_cache FOLDER``. The cache holds the recipe's data, which is every run's data: the runs differ in
their temperature only. A finished cache of the same settings and inputs is reused (cache-teacher checks it
before it loads the teacher). The exact kind serves every run; the compact kind is refused for a grid with a
run it cannot serve (a learnt T), and normalises over one range that covers every run's temperatures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..teacher_cache import COMPACT, COMPACT_REFUSED_POLICIES, EXACT
from ..teacher_cache.store import MANIFEST_NAME
from .cache_teacher import served_temperatures
from .sweep_grid import Run
from .train import TRAINED_MARK, run_in_child

KINDS = (EXACT, COMPACT)
# Recipe fields the sweep sets for every run when it writes the cache.
CACHE_FIELDS = (
    "teacher_cache",
    "teacher_cache_kind",
    "teacher_cache_temperature_min",
    "teacher_cache_temperature_max",
)
LOG_NAME = "cache-teacher.log"


@dataclass(frozen=True)
class SweepCache:
    """The cache folder, its kind, and the recipe flags that name it (to cache-teacher and to every run)."""

    folder: Path
    kind: str
    flags: tuple[str, ...]


def sweep_cache(folder: str, kind: str, runs: list[Run]) -> SweepCache:
    """The sweep's cache of ``kind`` in ``folder``; a compact one is refused, naming the runs and why, when a run
    of the grid cannot read it, and otherwise normalises over every run's temperatures."""
    flags = ["--teacher_cache", str(folder), "--teacher_cache_kind", kind]
    if kind == COMPACT:
        policies = {run.name: run.overrides["temperature_policy"] for run in runs}
        refused = [
            f"{name} ({COMPACT_REFUSED_POLICIES[p]})" for name, p in policies.items() if p in COMPACT_REFUSED_POLICIES
        ]
        if refused:
            raise UserError(
                f"--teacher-cache-kind compact: a compact cache cannot serve the runs {'; '.join(refused)}. "
                "Leave their families out of --families, or use --teacher-cache-kind exact"
            )
        ranges = [run.temperature_range() for run in runs]
        low, high = served_temperatures(min(r[0] for r in ranges), max(r[1] for r in ranges))
        flags += ["--teacher_cache_temperature_min", f"{low:g}", "--teacher_cache_temperature_max", f"{high:g}"]
    return SweepCache(Path(folder), kind, tuple(flags))


def write_cache(cache: SweepCache, recipe: str, overrides: list[str], launcher: list[str] | None, log: Path) -> bool:
    """Run `dts-llm cache-teacher` on the sweep's recipe and overrides; True when it wrote the cache, False when
    a finished one was reused (a folder holding another cache fails the child, which says why)."""
    finished = (cache.folder / MANIFEST_NAME).is_file()
    log.parent.mkdir(parents=True, exist_ok=True)
    run_in_child("cache-teacher", [recipe, *overrides, *cache.flags], log, cache.folder / MANIFEST_NAME, launcher)
    return not finished


def teacher_examples(cache: SweepCache, folders: list[Path]) -> dict:
    """How many examples the teacher ran over for the runs in ``folders``: once per example of each split, in
    the cache; and how many live teachers would have run over instead: per run, the epochs it trained times
    the training examples (exact for whole epochs, within one global batch per partial epoch) and its
    evaluations times the validation examples, summed over the runs."""
    splits = json.loads((cache.folder / MANIFEST_NAME).read_text())["splits"]
    cached = {name: split["examples"] for name, split in splits.items()}
    live = dict.fromkeys(cached, 0.0)
    for folder in folders:
        state = json.loads((folder / TRAINED_MARK).read_text())
        live["train"] += state["epoch"] * cached["train"]
        if "validation" in cached:
            evaluations = sum("eval_runtime" in entry for entry in state["log_history"])
            live["validation"] += evaluations * cached["validation"]
    live = {name: round(count) for name, count in live.items()}
    return {
        "folder": str(cache.folder),
        "kind": cache.kind,
        "teacher_examples": {**cached, "total": sum(cached.values())},
        "live_teacher_examples": {**live, "total": sum(live.values())},
    }


def cache_note(record: dict) -> str:
    """The sweep table's line about the cache (``record``: what ``teacher_examples`` returned)."""
    ran, live = record["teacher_examples"], record["live_teacher_examples"]
    return (
        f"\nEvery run read the teacher from the {record['kind']} teacher cache {record['folder']}: the teacher ran "
        f"over {ran['total']} examples ({_splits(ran)}) once, where live teachers would have run over "
        f"{live['total']} ({_splits(live)}; epochs x examples and evaluations x examples, summed over the runs).\n"
    )


def _splits(counts: dict) -> str:
    return ", ".join(f"{count} {name}" for name, count in counts.items() if name != "total")
