"""`dts-llm teacher-report`: the teacher's entropy and top-k mass on response tokens at a range of T
(``dts_llm.teacher_report`` measures; this command reads the teacher and the data and writes the report)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import DataArguments, load_instruction_data
from ..models import load_model, load_tokenizer
from ..options import comma_separated
from ..tasks import INSTRUCTION
from ..teacher_report import (
    DEFAULT_TEMPERATURES,
    DEFAULT_TOP_K,
    plot_report,
    report_table,
    teacher_statistics,
)


def run_teacher_report(
    teacher_path: str,
    data: str,
    output: str,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    max_examples: int | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    max_prompt_length: int = 256,
    dtype: str = "float32",
) -> dict:
    """Measure ``teacher_path`` on the response tokens of ``data`` (instruction data, any form
    `dts_llm.data` reads); write teacher_report.json (with the data's counts of records dropped and cut),
    .md and .png to ``output``; return the report."""
    tokenizer = load_tokenizer(teacher_path)
    data_args = DataArguments(dataset=data, dev_num=0, max_length=max_length, max_prompt_length=max_prompt_length)
    instruction_data = load_instruction_data(data_args, tokenizer)
    examples = instruction_data.train
    if max_examples is not None:
        examples = examples.select(range(min(max_examples, len(examples))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(teacher_path, dtype=dtype).to(device).eval()
    batches = DataLoader(list(examples), batch_size=batch_size, collate_fn=INSTRUCTION.collator(tokenizer))
    report = {"teacher": teacher_path, "data": data, "data_report": instruction_data.report, "examples": len(examples)}
    vocab_size = min(len(tokenizer), teacher.get_output_embeddings().out_features)  # padded rows cut, as in training
    report.update(teacher_statistics(teacher, batches, vocab_size, temperatures, top_k))

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
    report.add_argument("--teacher", required=True, help="A causal LM folder (with its tokenizer) or hub id.")
    report.add_argument(
        "--data", required=True, help="Instruction data: a hub id, or .json/.jsonl/.parquet file or folder."
    )
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
    report.add_argument("--max-length", type=int, default=512)
    report.add_argument("--max-prompt-length", type=int, default=256)
    report.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    report.add_argument("--output", default="teacher_report", help="Folder for the JSON, Markdown and figure.")


def main(args: argparse.Namespace) -> None:
    report = run_teacher_report(
        args.teacher,
        args.data,
        args.output,
        args.temperatures,
        args.top_k,
        args.max_examples,
        args.batch_size,
        args.max_length,
        args.max_prompt_length,
        args.dtype,
    )
    print(report_table(report), end="")
