"""`dts-llm teacher-report`: the teacher's entropy and top-k mass on response tokens at a range of T
(``dts_llm.teacher_report`` measures; this command reads the teacher and the data and writes the report)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import DataArguments, load_instruction_data
from ..errors import UserError
from ..models import load_model, load_tokenizer
from ..options import comma_separated
from ..recipe import parse_recipe
from ..tasks import INSTRUCTION
from ..teacher_report import (
    DEFAULT_TEMPERATURES,
    DEFAULT_TOP_K,
    RANGE_GRID,
    plot_report,
    recommended_range,
    report_table,
    teacher_statistics,
)


def _shown(measured: dict, temperatures: Sequence[float], top_k: Sequence[int]) -> list[dict]:
    """The rows of ``measured`` at the asked temperatures, with the asked top-k masses."""
    rows = [row for row in measured["temperatures"] if row["temperature"] in set(temperatures)]
    return [{**row, "top_k_mass": {str(k): row["top_k_mass"][str(k)] for k in top_k}} for row in rows]


def run_teacher_report(
    teacher_path: str,
    data_args: DataArguments,
    output: str,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    max_examples: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
) -> dict:
    """Measure ``teacher_path`` on the response tokens of the training split of ``data_args``'s instruction
    data (any form `dts_llm.data` reads) at ``temperatures`` and, for the recommended range, on ``RANGE_GRID``;
    write teacher_report.json (with the data's counts of records dropped and cut), .md and .png to ``output``;
    return the report."""
    tokenizer = load_tokenizer(teacher_path)
    data = data_args.dataset
    instruction_data = load_instruction_data(data_args, tokenizer)
    examples = instruction_data.train
    if max_examples is not None:
        examples = examples.select(range(min(max_examples, len(examples))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(teacher_path, dtype=dtype).to(device).eval()
    batches = DataLoader(list(examples), batch_size=batch_size, collate_fn=INSTRUCTION.collator(tokenizer))
    report = {"teacher": teacher_path, "data": data, "data_report": instruction_data.report, "examples": len(examples)}
    vocab_size = min(len(tokenizer), teacher.get_output_embeddings().out_features)  # padded rows cut, as in training
    grid, ks = sorted({*temperatures, *RANGE_GRID}), sorted({*top_k, 1})
    measured = teacher_statistics(teacher, batches, vocab_size, grid, ks)
    try:
        report["recommended_range"] = recommended_range(measured)
    except ValueError as error:
        report["recommended_range"], report["no_range"] = None, str(error)
    report.update({**measured, "temperatures": _shown(measured, temperatures, top_k)})

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "teacher_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "teacher_report.md").write_text(report_table(report))
    plot_report(report, folder / "teacher_report.png")
    return report


def add_parser(commands) -> None:
    report = commands.add_parser(
        "teacher-report", help="The teacher's entropy and top-k mass on response tokens at a range of T."
    )
    report.add_argument(
        "--recipe", help="A distillation recipe: its teacher, data and lengths (the options below override them)."
    )
    report.add_argument("--teacher", help="A causal LM folder (with its tokenizer) or hub id.")
    report.add_argument("--data", help="Instruction data: a hub id, or .json/.jsonl/.parquet file or folder.")
    temperatures = ",".join(f"{t:g}" for t in DEFAULT_TEMPERATURES)
    report.add_argument(
        "--temperatures",
        type=comma_separated(float, "temperatures"),
        default=list(DEFAULT_TEMPERATURES),
        help=f"default {temperatures}",
    )
    top_k = ",".join(str(k) for k in DEFAULT_TOP_K)
    report.add_argument(
        "--top-k", type=comma_separated(int, "top-k values"), default=list(DEFAULT_TOP_K), help=f"default {top_k}"
    )
    report.add_argument("--max-examples", type=int, help="Only the first N examples.")
    report.add_argument("--batch-size", type=int, default=8)
    report.add_argument("--max-length", type=int, help="default: the recipe's, or 512")
    report.add_argument("--max-prompt-length", type=int, help="default: the recipe's, or 256")
    report.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    report.add_argument("--output", default="teacher_report", help="Folder for the JSON, Markdown and figure.")


def _teacher_and_data(args: argparse.Namespace) -> tuple[str, DataArguments]:
    """The teacher and the data: as the recipe's training split has them (its template, lengths and
    validation share; the options given override it), or all of ``--data``."""
    if args.recipe is None:
        if args.teacher is None or args.data is None:
            raise UserError("teacher-report needs --teacher and --data, or a --recipe that names them")
        lengths = {"max_length": args.max_length or 512, "max_prompt_length": args.max_prompt_length or 256}
        return args.teacher, DataArguments(dataset=args.data, dev_num=0, **lengths)
    model_args, data_args, _, _ = parse_recipe("distill", [args.recipe])
    teacher = args.teacher or model_args.teacher_model_name_or_path
    if teacher is None:
        raise UserError(f"{args.recipe} names no teacher_model_name_or_path: give --teacher")
    given = {"dataset": args.data, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length}
    return teacher, replace(data_args, **{key: value for key, value in given.items() if value is not None})


def main(args: argparse.Namespace) -> None:
    teacher, data_args = _teacher_and_data(args)
    report = run_teacher_report(
        teacher, data_args, args.output, args.temperatures, args.top_k, args.max_examples, args.batch_size, args.dtype
    )
    print(report_table(report), end="")
