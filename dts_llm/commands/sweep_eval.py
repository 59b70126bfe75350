"""How the sweep scores its runs: ROUGE-L of each run's model on the evaluation suites, after all training.

The suites default to the recipe's validation data; every run is evaluated with the same settings, kept in
its run.json, so a re-run evaluates again only a run scored with other settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from eval.generate import GenerationSettings
from eval.run import evaluate_model
from eval.suites import load_suite

from ..errors import UserError
from ..options import named_items
from ..records import folder_splits


@dataclass(frozen=True)
class Evaluation:
    """How every run is scored: ROUGE-L on ``suites`` ({name: source}), sampled per seed or greedy."""

    suites: dict
    seeds: tuple[int, ...]
    greedy: bool
    limit: int | None
    batch_size: int
    max_length: int
    max_prompt_tokens: int

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_length=self.max_length,
            max_prompt_tokens=self.max_prompt_tokens,
            greedy=self.greedy,
            batch_size=self.batch_size,
        )


def parse_suites(text: str) -> dict[str, str]:
    """An argparse type: comma-separated NAME=PATH (or PATH, named by its file name)."""
    suites = {Path(name).stem if source is None else name: source or name for name, source in named_items(text)}
    if not suites:
        raise argparse.ArgumentTypeError(f"no evaluation data in {text!r}")
    return suites


def default_suites(data_args, limit: int | None) -> tuple[dict[str, str], int | None]:
    """The recipe's validation data as the suite "validation": its validation_file, or the first dev_num
    records of a local dataset (the records training held out); and the example limit that implies. Of a
    folder of split files (``data.split_files``), its one validation file is that data."""
    if data_args.validation_file:
        return {"validation": _validation_file(data_args.validation_file)}, limit
    splits = folder_splits(data_args.dataset)
    if splits and splits["validation"]:
        return {"validation": _validation_file(data_args.dataset)}, limit
    if data_args.dev_num and Path(data_args.dataset).is_file():
        return {"validation": data_args.dataset}, min(limit or data_args.dev_num, data_args.dev_num)
    raise UserError(
        "--eval-data: the recipe has no validation data the sweep can read (no validation_file, and dataset "
        "is not a local file with dev_num held out); give --eval-data NAME=PATH"
    )


def _validation_file(source: str) -> str:
    """``source``, or the validation file of ``source`` when it is a folder of split files."""
    splits = folder_splits(source)
    if not splits:
        return source
    if len(splits["validation"]) != 1:
        names = ", ".join(file.name for file in splits["validation"]) or "none"
        raise UserError(f"--eval-data: {source} has {names} as validation files, not one; give --eval-data NAME=PATH")
    return str(splits["validation"][0])


def check_suites(evaluation: Evaluation) -> None:
    """Read every suite once, so a missing or empty one fails before training."""
    for name, source in evaluation.suites.items():
        if not load_suite(name, source, limit=evaluation.limit).examples:
            raise ValueError(f"--eval-data: suite {name} ({source}) has no example with a reference")


def evaluate_run(folder: Path, evaluation: Evaluation) -> bool:
    """ROUGE-L of the run's model unless evaluated with these settings already; True when it evaluated."""
    record_path = folder / "run.json"
    record = json.loads(record_path.read_text())
    wanted = json_normal(asdict(evaluation))
    results = folder / "eval" / "results.json"
    if record.get("evaluation") == wanted and results.is_file():
        return False
    if record.get("evaluation") != wanted and (folder / "eval").exists():
        shutil.rmtree(folder / "eval")  # other settings: eval refuses to resume into their folder
    record_path.write_text(json.dumps({**record, "evaluation": wanted}, indent=1))
    model = folder / "merged" if (folder / "merged").is_dir() else folder  # a LoRA student merged by the CLI
    evaluate_model(
        str(model),
        evaluation.suites,
        str(folder / "eval"),
        seeds=evaluation.seeds,
        settings=evaluation.generation_settings(),
        limit=evaluation.limit,
        progress=False,
    )
    return True


def json_normal(obj):
    """``obj`` as it reads back from JSON (tuples as lists), so stored and wanted settings compare equal."""
    return json.loads(json.dumps(obj))
