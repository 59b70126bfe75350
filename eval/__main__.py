"""``python -m eval rouge|glue ...``: score a causal LM on the instruction suites, or a classifier on GLUE.

    python -m eval rouge --model PATH [--suites dolly=PATH,self-inst=PATH,...] [--data-dir DIR]
        [--seeds 10,20,30,40,50] [--greedy] [--batch-size N] [--max-new-tokens N] [--limit N]
        [--output DIR] [--teacher-outputs FILE] [--chat-template | --no-chat-template]

(``dts-llm eval rouge|glue ...`` is the same command, and is not shadowed by an ``eval.py`` in the
working directory.)

``--data-dir DIR`` takes the suites from MiniLLM's processed-data layout: DIR/dolly, DIR/self-inst,
DIR/vicuna, DIR/sinst, DIR/uinst (absent ones are skipped with a note). ``--suites`` names suites
with their sources (a file, a MiniLLM folder or a hub id); a bare name there picks that suite from
``--data-dir``. Run it under ``accelerate launch`` or ``torchrun`` to split generation across
processes.

``--chat-template`` renders each prompt with the model's chat template, an instruction (and input) as a
user turn, as chat training does; it is the default for a model whose tokenizer has a chat template (said in
the output), and a suite of conversations (``messages``) needs it.

``--teacher-outputs FILE`` also writes the generations (greedy with ``--greedy``, otherwise the
first seed's) as a raw-Dolly-format JSONL (instruction/context/response, see
``eval.run.write_teacher_outputs``) for sequence-level KD.

    python -m eval glue --model PATH --task sst2 [--data SOURCE] [--split NAME ...] [--batch-size N]
        [--max-length N] [--output DIR]

scores a sequence-classification model on the task's evaluation splits (MNLI: matched and mismatched),
metrics x100 (``eval.glue``). ``--data`` is the download script's ``glue_data`` folder or a task folder in
it, a folder or file of the Hugging Face export, or a hub id (default nyu-mll/glue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from dts_llm.errors import UserError, exit_status, user_errors
from dts_llm.glue import GLUE_TASKS, HUB_ID
from dts_llm.launch import silence_library_notices
from dts_llm.models import model_config
from dts_llm.options import comma_separated, named_items

from .generate import GenerationSettings
from .glue import evaluate_glue, glue_table
from .run import DEFAULT_SEEDS, evaluate_model, write_teacher_outputs
from .suites import SUITE_NAMES


def resolve_suites(spec: str | None, data_dir: str | None) -> dict[str, str]:
    """``{name: source}`` from ``--suites`` and ``--data-dir``."""
    suites: dict[str, str] = {}
    if spec:
        for name, source in named_items(spec):
            if source is not None:
                suites[name] = source
            elif data_dir is None:
                raise UserError(f"--suites {name}: give a source ({name}=PATH) or --data-dir")
            elif (Path(data_dir) / name).exists():
                suites[name] = str(Path(data_dir) / name)
            else:
                raise UserError(f"--suites {name}: {Path(data_dir) / name} does not exist")
    elif data_dir is not None:
        for name in SUITE_NAMES:
            folder = Path(data_dir) / name
            if folder.exists():
                suites[name] = str(folder)
            else:
                print(f"note: {folder} is absent; suite {name} skipped", file=sys.stderr)
    if not suites:
        raise UserError("no suites to evaluate: give --suites NAME=PATH,... or --data-dir DIR")
    return suites


def build_parser(prog: str = "python -m eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rouge = commands.add_parser("rouge", help="ROUGE-L on the instruction suites (MiniLLM protocol)")
    rouge.add_argument("--model", required=True, help="a saved model folder (with its tokenizer) or hub id")
    rouge.add_argument("--suites", help="comma-separated NAME=SOURCE (or NAME, taken from --data-dir)")
    rouge.add_argument("--data-dir", help="MiniLLM processed-data folder holding dolly/, self-inst/, ...")
    rouge.add_argument(
        "--seeds",
        type=comma_separated(int, "seeds", positive=False),
        default=list(DEFAULT_SEEDS),
        help="default 10,20,30,40,50",
    )
    rouge.add_argument("--greedy", action="store_true", help="one greedy pass instead of sampling per seed")
    rouge.add_argument(
        "--batch-size", type=int, default=GenerationSettings.batch_size, help="prompts per batch per process"
    )
    rouge.add_argument("--max-prompt-tokens", type=int, default=GenerationSettings.max_prompt_tokens)
    rouge.add_argument("--max-length", type=int, default=GenerationSettings.max_length, help="prompt + new tokens")
    rouge.add_argument(
        "--max-new-tokens", type=int, help="new tokens per response (default and most: max-length - max-prompt-tokens)"
    )
    rouge.add_argument("--limit", type=int, help="only the first N examples of each suite")
    rouge.add_argument("--dtype", help="model dtype, e.g. bfloat16 (default: the checkpoint's loading default)")
    rouge.add_argument("--output", default="eval_results", help="output folder (default eval_results)")
    rouge.add_argument("--teacher-outputs", metavar="FILE", help="also write the generations as Dolly-format JSONL")
    rouge.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        help="render prompts with the model's chat template, instructions as user turns (default: when it has one)",
    )
    rouge.add_argument("--no-progress", action="store_true")
    glue = commands.add_parser("glue", help="GLUE metrics of a sequence-classification model on one task")
    glue.add_argument("--model", required=True, help="a saved model folder (with its tokenizer) or hub id")
    glue.add_argument("--task", required=True, choices=list(GLUE_TASKS))
    glue.add_argument("--data", default=HUB_ID, help=f"glue_data/task folder, file or hub id (default {HUB_ID})")
    glue.add_argument("--split", nargs="+", help="evaluation splits (default: all of the task's)")
    glue.add_argument("--batch-size", type=int, default=32)
    glue.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    glue.add_argument("--output", default="eval_results", help="output folder (default eval_results)")
    return parser


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The rouge command's settings; a --max-new-tokens that prompt + response would not fit is refused,
    not cut."""
    budget = args.max_length - args.max_prompt_tokens
    if args.max_new_tokens is not None and args.max_new_tokens > budget:
        raise UserError(
            f"--max-new-tokens {args.max_new_tokens} does not fit: --max-length {args.max_length} minus "
            f"--max-prompt-tokens {args.max_prompt_tokens} leaves {budget}; raise --max-length"
        )
    return GenerationSettings(
        max_prompt_tokens=args.max_prompt_tokens,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        batch_size=args.batch_size,
    )


def main(argv: list[str] | None = None, prog: str = "python -m eval") -> dict:
    """Run the command; a missing model, bad suite or bad setting raises a UserError before any model loads."""
    args = build_parser(prog).parse_args(argv)
    with user_errors(ValueError):
        model_config("--model", args.model)
        if args.command == "rouge":
            suites = resolve_suites(args.suites, args.data_dir)
            settings = generation_settings(args)
    if args.command == "glue":
        result = evaluate_glue(
            args.model,
            args.task,
            args.output,
            data=args.data,
            splits=args.split,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
        print(glue_table(result), end="")
        return result
    result = evaluate_model(
        args.model,
        suites,
        args.output,
        seeds=args.seeds,
        settings=settings,
        limit=args.limit,
        dtype=args.dtype,
        progress=not args.no_progress,
        chat_template=args.chat_template,
    )
    main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if main_process:
        print((Path(args.output) / "results.md").read_text(encoding="utf-8"), end="")
        if args.teacher_outputs:
            seed = None if args.greedy else args.seeds[0]
            count = write_teacher_outputs(args.output, list(result["suites"]), seed, args.teacher_outputs)
            print(f"wrote {count} teacher outputs to {args.teacher_outputs}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    silence_library_notices()
    sys.exit(exit_status("python -m eval", main))
