"""The `dts-llm` command line: sft, distill, demo, quickstart, teacher-report and sweep.

`sft` and `distill` run a YAML recipe, `demo` and `quickstart` run offline, `teacher-report`
measures a teacher's entropy across temperatures, `sweep` distils a recipe under a grid of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict

import yaml

from .recipe import RECIPE_NAME, ModelArguments, parse_recipe


def check_models_exist(model_args: ModelArguments) -> None:
    """Fail on a missing model before any weights load, naming the field."""
    from transformers import AutoConfig

    for key in ("model_name_or_path", "teacher_model_name_or_path"):
        path = getattr(model_args, key)
        if path is None:
            continue
        try:
            AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(f"{key}: no model found at {path!r} ({error})") from error


def load_model(path: str, model_args: ModelArguments, dtype: str, init_kwargs: dict | None, head: dict | None = None):
    """A causal LM in ``dtype``, or with ``head`` (a GLUE task's head config) a sequence classifier;
    ``init_kwargs`` (`model_init_kwargs`) add or override load options."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    options = {
        "dtype": dtype if dtype == "auto" else getattr(torch, dtype),
        "trust_remote_code": model_args.trust_remote_code,
        **(head or {}),
        **(init_kwargs or {}),
    }
    model_class = AutoModelForCausalLM if head is None else AutoModelForSequenceClassification
    return model_class.from_pretrained(path, **options)


def glue_eval_sources(data_args) -> dict[str, str] | None:
    """``load_glue_data``'s evaluation sources: ``validation_file`` for every evaluation split, or
    None (all of them from ``dataset``, a folder or hub id), or none when ``dataset`` is one file."""
    from pathlib import Path

    from .glue import glue_task

    task = glue_task(data_args.glue_task)
    if data_args.validation_file is None:
        return {} if Path(data_args.dataset).is_file() else None
    if len(task.eval_splits) > 1 and Path(data_args.validation_file).is_file():
        raise ValueError(
            f"validation_file: GLUE {task.name} has the evaluation splits {list(task.eval_splits)}; "
            "give the folder that holds them, not one file"
        )
    return dict.fromkeys(task.eval_splits, data_args.validation_file)


def load_training_data(data_args, tokenizer):
    """Train and evaluation datasets, their collator, the head config (None for a causal LM) and the
    data report (the counts of what was read, dropped and cut)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    from .data import load_instruction_data
    from .glue import load_glue_data
    from .losses import IGNORE_INDEX

    if data_args.glue_task is None:
        data = load_instruction_data(data_args, tokenizer)
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        return data.train, data.validation, collator, None, data.report
    data = load_glue_data(
        data_args.glue_task,
        data_args.dataset,
        glue_eval_sources(data_args),
        tokenizer,
        data_args.max_length,
        data_args.data_cache_dir,
    )
    evaluation = data.evaluation if len(data.evaluation) > 1 else next(iter(data.evaluation.values()), None)
    return data.train, evaluation, DataCollatorWithPadding(tokenizer), data.task.head_config(), data.report


def run(command: str, argv: list[str]) -> None:
    """Train as the recipe says; write the data report, model, tokenizer and resolved recipe to output_dir."""
    from transformers import AutoTokenizer, Trainer

    from .data import save_data_report
    from .launch import check_launch
    from .trainer import DistillationTrainer

    model_args, data_args, lora_args, training_args = parse_recipe(command, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dts_llm").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    check_models_exist(model_args)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first(desc="tokenising the data"):
        train, validation, collator, head, data_report = load_training_data(data_args, tokenizer)
    if training_args.should_save:
        save_data_report(data_report, training_args.output_dir)
    init_kwargs = getattr(training_args, "model_init_kwargs", None)
    model = load_model(model_args.model_name_or_path, model_args, model_args.dtype, init_kwargs, head)
    common = {
        "args": training_args,
        "train_dataset": train,
        "eval_dataset": validation,
        "processing_class": tokenizer,
        "data_collator": collator,
    }
    peft_config = lora_args.peft_config("CAUSAL_LM" if head is None else "SEQ_CLS")
    if command == "distill":
        teacher_dtype = training_args.teacher_dtype or model_args.dtype
        # A classifier teacher keeps the head it was saved with: the trainer checks its labels against the student's.
        teacher_head = None if head is None else {}
        teacher = load_model(
            model_args.teacher_model_name_or_path, model_args, teacher_dtype, training_args.teacher_model_init_kwargs, teacher_head
        )
        trainer = DistillationTrainer(model=model, teacher_model=teacher, peft_config=peft_config, **common)
    else:
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(model=model, **common)
        check_launch(trainer.accelerator)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # the tokenizer too, as processing_class
    if trainer.is_world_process_zero():
        write_outputs(trainer, model_args, data_args, lora_args, training_args, head)
    trainer.save_state()  # trainer_state.json, with the log history; written last, it marks a finished run


def write_outputs(trainer, model_args, data_args, lora_args, training_args, head: dict | None) -> None:
    """The resolved recipe beside the model, and the merged model when a LoRA student asks for it
    (``head``: the GLUE head config the student was loaded with, None for a causal LM)."""
    resolved = {
        **asdict(model_args),
        **asdict(data_args),
        **asdict(lora_args),
        **json.loads(training_args.to_json_string()),
    }
    with open(os.path.join(training_args.output_dir, RECIPE_NAME), "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)
    if model_args.merge_lora and lora_args.lora_r is not None:
        init_kwargs = getattr(training_args, "model_init_kwargs", None)
        deepspeed_plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        with _whole_model_loading(getattr(deepspeed_plugin, "hf_ds_config", None)):
            save_merged_model(training_args.output_dir, model_args, init_kwargs, trainer.processing_class, head)


@contextmanager
def _whole_model_loading(hf_deepspeed_config):
    """Inside, models load whole on this process; the run's DeepSpeed config is restored after.

    Under ZeRO-3 ``from_pretrained`` partitions what it loads across processes: a collective that
    the other processes would never join when only the main process loads.
    """
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if hf_deepspeed_config is not None:
            set_hf_deepspeed_config(hf_deepspeed_config)


def save_merged_model(
    adapter_dir: str, model_args: ModelArguments, init_kwargs: dict | None, tokenizer, head: dict | None = None
) -> None:
    """Base model plus the adapter saved in ``adapter_dir``, merged, written to ``adapter_dir/merged``.

    Both are read back from files, so it works whatever partitioned the training-time model
    (ZeRO-3, FSDP); under ZeRO-3 call it inside ``_whole_model_loading``.
    """
    from peft import PeftModel

    base = load_model(model_args.model_name_or_path, model_args, model_args.dtype, init_kwargs, head)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged_dir = os.path.join(adapter_dir, "merged")
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dts-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("sft", help="Supervised fine-tuning from a recipe: dts-llm sft RECIPE.yaml [--field value ...]")
    commands.add_parser("distill", help="Distillation from a recipe: dts-llm distill RECIPE.yaml [--field value ...]")
    demo = commands.add_parser("demo", help="Distil a tiny student offline with DTS and print the trajectory.")
    demo.add_argument("--output", default="demo_output", help="Folder for the run (default: demo_output).")
    quickstart = commands.add_parser(
        "quickstart", help="The whole pipeline offline: synthetic data, teacher SFT, five students, eval, table, figure."
    )
    quickstart.add_argument("--output", default="quickstart_output", help="Folder for the run (default: quickstart_output).")
    quickstart.add_argument("--fast", action="store_true", help="Smaller everything (a few minutes; what the tests run).")
    _add_teacher_report_parser(commands)
    sweep = _add_sweep_parser(commands)
    if argv and argv[0] in ("sft", "distill"):
        run(argv[0], argv[1:])
        _close_process_group()
        return 0
    if argv and argv[0] == "sweep":
        _run_sweep(*sweep.parse_known_args(argv[1:]))
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "teacher-report":
        from .teacher_report import report_table, run_teacher_report

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
        return 0
    if args.command == "quickstart":
        from .quickstart import run_quickstart

        run_quickstart(args.output, args.fast)
        return 0
    from .demo import run_demo

    run_demo(args.output)
    return 0


def _comma_separated(kind):
    """An argparse type: a comma-separated list of positive ``kind`` values."""

    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values or any(value <= 0 for value in values):
            raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
        return values

    return parse


def _add_teacher_report_parser(commands) -> None:
    from .teacher_report import DEFAULT_TEMPERATURES, DEFAULT_TOP_K

    report = commands.add_parser(
        "teacher-report", help="The teacher's entropy and top-k mass on response tokens at a range of T."
    )
    report.add_argument("--teacher", required=True, help="A causal LM folder (with its tokenizer) or hub id.")
    report.add_argument("--data", required=True, help="Instruction data: a hub id, or .json/.jsonl/.parquet file or folder.")
    temperatures = ",".join(f"{t:g}" for t in DEFAULT_TEMPERATURES)
    report.add_argument("--temperatures", type=_comma_separated(float), default=list(DEFAULT_TEMPERATURES), help=f"default {temperatures}")
    top_k = ",".join(str(k) for k in DEFAULT_TOP_K)
    report.add_argument("--top-k", type=_comma_separated(int), default=list(DEFAULT_TOP_K), help=f"default {top_k}")
    report.add_argument("--max-examples", type=int, help="Only the first N examples.")
    report.add_argument("--batch-size", type=int, default=8)
    report.add_argument("--max-length", type=int, default=512)
    report.add_argument("--max-prompt-length", type=int, default=256)
    report.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    report.add_argument("--output", default="teacher_report", help="Folder for the JSON, Markdown and figure.")


def _add_sweep_parser(commands) -> argparse.ArgumentParser:
    from . import sweep

    parser = commands.add_parser(
        "sweep",
        allow_abbrev=False,  # a recipe flag such as --eval_steps must not pass for a sweep option
        help="Distil a recipe under a grid of temperatures, evaluate, compare: dts-llm sweep RECIPE.yaml [options] [--field value ...]",
    )
    parser.add_argument("recipe", help="A distillation recipe; --field value flags after the options override it for every run.")
    families = ", ".join(sweep.FAMILIES)
    parser.add_argument(
        "--families", type=sweep.parse_families, default=list(sweep.DEFAULT_FAMILIES), help=f"From {families} (default: fixed,dts,ctkd)."
    )
    parser.add_argument("--fixed", type=sweep.parse_temperatures, default=list(sweep.DEFAULT_FIXED), help="default 1,2,4,8,16,32")
    parser.add_argument("--dts", type=sweep.parse_ranges, default=list(sweep.DEFAULT_DTS), help="T_max:T_min pairs, default 3:1,4:2,8:4")
    parser.add_argument("--cosine", type=sweep.parse_ranges, default=list(sweep.DEFAULT_COSINE), help="T_max:T_min pairs, default 3:1")
    parser.add_argument("--eval-data", type=sweep.parse_suites, help="NAME=PATH,... (default: the recipe's validation data)")
    parser.add_argument("--eval-seeds", type=_comma_separated(int), default=list(sweep.DEFAULT_SEEDS), help="default 10,20,30,40,50")
    parser.add_argument("--greedy", action="store_true", help="One greedy pass instead of sampling per seed.")
    parser.add_argument("--eval-limit", type=int, help="Only the first N examples of each suite.")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--launcher", help='Replaces python in "python -m dts_llm distill ...", e.g. "accelerate launch --config_file X".')
    parser.add_argument("--output", default="sweep_output", help="Folder of the runs and the report (default: sweep_output).")
    return parser


def _run_sweep(args: argparse.Namespace, overrides: list[str]) -> None:
    from .sweep import build_grid, run_sweep

    runs = build_grid(args.families, args.fixed, args.dts, args.cosine)
    run_sweep(
        args.recipe,
        overrides,
        runs,
        args.output,
        eval_data=args.eval_data,
        seeds=args.eval_seeds,
        greedy=args.greedy,
        eval_limit=args.eval_limit,
        eval_batch_size=args.eval_batch_size,
        launcher=args.launcher,
    )


def _close_process_group() -> None:
    """Tear distributed state down explicitly: avoids a rare crash at interpreter shutdown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
