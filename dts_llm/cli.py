"""The `dts-llm` command line: sft, distill, demo, quickstart, teacher-report and sweep.

`sft` and `distill` run a YAML recipe, `demo` and `quickstart` run offline, `teacher-report`
measures a teacher's entropy across temperatures, `sweep` distils a recipe under a grid of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import yaml

from .errors import UserError, exit_status, user_errors
from .recipe import RECIPE_NAME, ModelArguments, parse_recipe, recipe_parser


def check_models(model_args: ModelArguments, max_length: int) -> None:
    """Fail on a missing model, or one whose context is shorter than ``max_length``, before any weights
    load: the field is named."""
    for key in ("model_name_or_path", "teacher_model_name_or_path"):
        path = getattr(model_args, key)
        if path is None:
            continue
        context = getattr(model_config(key, path, model_args.trust_remote_code), "max_position_embeddings", None)
        if context is not None and max_length > context:
            raise UserError(
                f"max_length {max_length} is longer than the context of {key} ({path}: "
                f"{context} positions): lower max_length"
            )


def model_config(key: str, path: str, trust_remote_code: bool = False):
    """The config of the model at ``path`` (a folder or hub id), or a UserError naming ``key``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"{key}: no model found at {path!r} ({error})") from error


# What a training run leaves in its output_dir (besides checkpoint-* folders).
_TRAINED_OUTPUTS = (
    "trainer_state.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
)


def trained_outputs(output_dir: str) -> list[Path]:
    """The models, checkpoints and trainer state that a run has written to ``output_dir``."""
    folder = Path(output_dir)
    return [folder / name for name in _TRAINED_OUTPUTS if (folder / name).exists()] + sorted(folder.glob("checkpoint-*"))


def check_output_dir(training_args, overwrite: bool, resuming: bool) -> None:
    """Refuse to train over a trained run unless resuming it or asked to overwrite it (then its
    checkpoints and state go, so that none is resumed later by mistake); fail now, not at the first
    checkpoint, when output_dir cannot be written."""
    output_dir = training_args.output_dir
    found = [] if resuming else trained_outputs(output_dir)
    if found and not overwrite:
        raise UserError(
            f"{output_dir} holds a trained run ({', '.join(path.name for path in found[:3])}): continue it with "
            "--resume_from_checkpoint last, or train again with another output_dir or --overwrite_output_dir true"
        )
    if found and training_args.process_index == 0:
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    check_writable(output_dir)


def check_writable(output_dir: str) -> None:
    """Create and remove a folder where output_dir is or will be: nothing is left behind, and under
    several processes each probe has its own name."""
    folder = Path(output_dir).absolute()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"output_dir {output_dir}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        raise UserError(f"output_dir {output_dir}: cannot write in {existing} ({error.strerror})") from error


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


def declare_padding(model, tokenizer) -> None:
    """Record the tokenizer's pad token in a model whose config has none (GPT-2 pads with EOS here), as
    the Trainer would, without its warning: the choice is ours, not news to the user."""
    configs = [model.config, getattr(model, "generation_config", None)]
    for config in configs:
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id


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
    """Train as the recipe says; write the model, tokenizer, resolved recipe, data report and model card to output_dir.

    Until weights load, a ValueError, OSError or YAML error comes from the recipe, the model folders
    or the data the user gave: it is reported as a UserError, in one line.
    """
    from transformers import AutoTokenizer, Trainer

    from .checkpoints import resume_checkpoint
    from .data import save_data_report
    from .launch import check_launch
    from .trainer import DistillationTrainer, check_resumed_temperature

    with user_errors(ValueError, OSError, yaml.YAMLError):
        model_args, data_args, lora_args, training_args = parse_recipe(command, argv)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("dts_llm").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
        check_models(model_args, data_args.max_length)
        checkpoint = resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
        if checkpoint is not None and command == "distill":
            check_resumed_temperature(checkpoint, training_args)
        check_output_dir(training_args, model_args.overwrite_output_dir, resuming=checkpoint is not None)
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
    declare_padding(model, tokenizer)
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

    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)  # the tokenizer too, as processing_class
    if trainer.is_world_process_zero():
        write_outputs(trainer, model_args, data_args, lora_args, training_args, head)
        if lora_args.lora_r is None:
            write_model_card(command, model_args, data_args, training_args, trainer.state.log_history)
    trainer.save_state()  # trainer_state.json, with the log history; written last, it marks a finished run
    if trainer.is_world_process_zero():
        print(run_summary(training_args.output_dir, model_args.merge_lora, trainer.state.log_history))


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of each training loss term, the run's mean loss, and each evaluation metric."""
    metrics = {}
    for entry in log_history:
        for key, value in entry.items():
            timing = key.endswith(("_runtime", "_per_second"))
            wanted = key in ("loss", "kd_loss", "ce_loss", "temperature", "train_loss") or (key.startswith("eval_") and not timing)
            if wanted and isinstance(value, (int, float)):
                metrics[key] = value
    return metrics


def run_summary(output_dir: str, merged: bool, log_history: list[dict]) -> str:
    """What a finished run prints last: where its model is and its final metrics."""
    where = f"the model is in {output_dir}" + (f", the merged model in {Path(output_dir) / 'merged'}" if merged else "")
    metrics = ", ".join(f"{key} {value:.4g}" for key, value in final_metrics(log_history).items())
    return f"dts-llm: done: {where}\nfinal metrics: {metrics or 'none logged'}"


def write_model_card(command: str, model_args, data_args, training_args, log_history: list[dict]) -> None:
    """README.md beside a full model: where it came from, how it was trained, its final metrics."""
    origin = (
        f"distilled from `{model_args.teacher_model_name_or_path}` into `{model_args.model_name_or_path}`"
        if command == "distill"
        else f"fine-tuned from `{model_args.model_name_or_path}`"
    )
    data = data_args.dataset + (f" (GLUE {data_args.glue_task})" if data_args.glue_task else "")
    kind = "causal LM" if data_args.glue_task is None else "sequence classifier"
    settings = {"learning_rate": training_args.learning_rate, "max_length": data_args.max_length}
    if command == "distill":
        settings.update(temperature_policy=training_args.temperature_policy, kd_ratio=training_args.kd_ratio)
    settings.update({"max_steps": training_args.max_steps} if training_args.max_steps > 0 else {"epochs": training_args.num_train_epochs})
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [dts-llm, {'distillation' if command == 'distill' else 'fine-tuning'}]",
        "---",
        "",
        f"# {Path(training_args.output_dir).name}",
        "",
        f"A {kind} {origin} with `dts-llm {command}` on `{data}`; the full recipe is in `{RECIPE_NAME}`.",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in settings.items()),
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {key} | {value:.4g} |" for key, value in final_metrics(log_history).items()),
    ]
    (Path(training_args.output_dir) / "README.md").write_text("\n".join(lines) + "\n")


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
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

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
    """Run one `dts-llm` command; a mistake the user can fix is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    silence_library_notices()
    return exit_status("dts-llm", lambda: _run_command(argv))


def silence_library_notices() -> None:
    """Drop DeepSpeed's note, logged whenever it is imported on a machine without a GPU, that it chose the
    CPU: the run's device is the Trainer's to choose and report. Its other messages pass."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: not record.getMessage().startswith("Setting accelerator to CPU"))


def _run_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dts-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("sft", help="Supervised fine-tuning from a recipe: dts-llm sft RECIPE.yaml [--field value ...]")
    commands.add_parser("distill", help="Distillation from a recipe: dts-llm distill RECIPE.yaml [--field value ...]")
    commands.add_parser("eval", help="Score a model: dts-llm eval rouge|glue ... (as python -m eval)")
    demo = commands.add_parser("demo", help="Distil a tiny student offline with DTS and print the trajectory.")
    demo.add_argument("--output", default="demo_output", help="Folder for the run (default: demo_output).")
    quickstart = commands.add_parser(
        "quickstart", help="The whole pipeline offline: synthetic data, teacher SFT, five students, eval, table, figure."
    )
    quickstart.add_argument("--output", default="quickstart_output", help="Folder for the run (default: quickstart_output).")
    quickstart.add_argument("--fast", action="store_true", help="Smaller everything (a few minutes; what the tests run).")
    _add_teacher_report_parser(commands)
    sweep = _add_sweep_parser(commands)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command in ("sft", "distill"):
        if rest[:1] in (["-h"], ["--help"]):
            recipe_parser(command).print_help()
            return
        run(command, rest)
        _close_process_group()
        return
    if command == "eval":
        from eval.__main__ import main as evaluate

        evaluate(rest, prog="dts-llm eval")
        return
    if command == "sweep":
        _run_sweep(*sweep.parse_known_args(rest))
        return
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    elif args.command == "teacher-report":
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
    elif args.command == "quickstart":
        from .quickstart import run_quickstart

        run_quickstart(args.output, args.fast)
    else:
        from .demo import run_demo

        run_demo(args.output)


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
