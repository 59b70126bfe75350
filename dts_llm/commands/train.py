"""`dts-llm sft` and `dts-llm distill`: train as a YAML recipe says.

Everything the user gave is checked before any weights load (recipe, models' configs, checkpoint to resume,
output_dir, data); then the task the recipe names (``dts_llm.tasks``) loads the model(s), and the run writes
the model, tokenizer, resolved recipe, data report and model card to output_dir. ``train_in_child`` runs
one of these commands in a child process (``run_in_child`` any command): the quickstart and the sweep train
their stages that way.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
import yaml
from transformers import Trainer

from ..checkpoints import resume_checkpoint
from ..data import save_data_report
from ..errors import UserError, user_errors
from ..launch import check_launch
from ..models import (
    check_models,
    declare_padding,
    load_tokenizer,
    save_merged_model,
    whole_model_loading,
)
from ..recipe import RECIPE_NAME, parse_recipe, recipe_parser
from ..tasks import Task, task_for
from ..teacher_cache import TeacherCache, recipe_provenance
from ..trainer import DistillationTrainer, check_resumed_temperature

COMMANDS = {
    "sft": "Supervised fine-tuning from a recipe: dts-llm sft RECIPE.yaml [--field value ...]",
    "distill": "Distillation from a recipe: dts-llm distill RECIPE.yaml [--field value ...]",
}
# What a training run leaves in its output_dir (besides checkpoint-* folders).
_TRAINED_OUTPUTS = (
    "trainer_state.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
)
TRAINED_MARK = "trainer_state.json"  # written last by a run: it marks a finished one


def main(command: str, argv: list[str]) -> None:
    """`dts-llm sft|distill ARGV`: the recipe's help, or the run."""
    if argv[:1] in (["-h"], ["--help"]):
        recipe_parser(command).print_help()
        return
    run(command, argv)
    _close_process_group()


def trained_outputs(output_dir: str) -> list[Path]:
    """The models, checkpoints and trainer state that a run has written to ``output_dir``."""
    folder = Path(output_dir)
    return [folder / name for name in _TRAINED_OUTPUTS if (folder / name).exists()] + sorted(
        folder.glob("checkpoint-*")
    )


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


def run(command: str, argv: list[str]) -> None:
    """Train as the recipe says; write the model, tokenizer, resolved recipe, data report and model card to output_dir.

    Until weights load, a ValueError, OSError or YAML error comes from the recipe, the model folders
    or the data the user gave: it is reported as a UserError, in one line.
    """
    with user_errors(ValueError, OSError, yaml.YAMLError):
        model_args, data_args, lora_args, training_args = parse_recipe(command, argv)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("dts_llm").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
        check_models(model_args, data_args.max_length)
        cache = open_recipe_cache(model_args, data_args, training_args) if command == "distill" else None
        checkpoint = resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
        if checkpoint is not None and command == "distill":
            check_resumed_temperature(checkpoint, training_args)
        check_output_dir(training_args, model_args.overwrite_output_dir, resuming=checkpoint is not None)
        tokenizer = load_tokenizer(
            model_args.tokenizer_name_or_path or model_args.model_name_or_path, model_args.trust_remote_code
        )
        task = task_for(data_args)
        with training_args.main_process_first(desc="tokenising the data"):
            data = task.load_data(data_args, tokenizer)
        if training_args.should_save:
            save_data_report(data.report, training_args.output_dir)
    trust = model_args.trust_remote_code
    init_kwargs = getattr(training_args, "model_init_kwargs", None)
    model = task.load_model(model_args.model_name_or_path, model_args.dtype, trust, init_kwargs)
    declare_padding(model, tokenizer)
    common = {
        "args": training_args,
        "train_dataset": data.train,
        "eval_dataset": data.evaluation,
        "processing_class": tokenizer,
        "data_collator": task.collator(tokenizer),
    }
    peft_config = lora_args.peft_config(task.peft_task_type)
    if command == "distill" and cache is not None:
        trainer = DistillationTrainer(model=model, teacher_cache=cache, peft_config=peft_config, **common)
    elif command == "distill":
        teacher_dtype = training_args.teacher_dtype or model_args.dtype
        teacher_kwargs = training_args.teacher_model_init_kwargs
        teacher = task.load_model(
            model_args.teacher_model_name_or_path, teacher_dtype, trust, teacher_kwargs, new_head=False
        )
        trainer = DistillationTrainer(model=model, teacher_model=teacher, peft_config=peft_config, **common)
    else:
        if peft_config is not None:
            # Imported here: peft takes seconds to import, and only LoRA runs need it.
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(model=model, **common)
        check_launch(trainer.accelerator)

    # The chat template that rendered the data is saved with the model: evaluation renders prompts with it.
    # Set after the trainer's checks, which compare the tokenizer as loaded (with a teacher cache's, say).
    if data.chat_template is not None:
        tokenizer.chat_template = data.chat_template
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)  # the tokenizer too, as processing_class
    if trainer.is_world_process_zero():
        write_outputs(trainer, task, model_args, data_args, lora_args, training_args, data.template)
        if lora_args.lora_r is None:
            write_model_card(command, task, model_args, data_args, training_args, trainer.state.log_history)
    trainer.save_state()  # trainer_state.json, with the log history; written last, it marks a finished run
    if trainer.is_world_process_zero():
        print(run_summary(training_args.output_dir, model_args.merge_lora, trainer.state.log_history))


def open_recipe_cache(model_args, data_args, training_args) -> TeacherCache | None:
    """The recipe's teacher cache, verified and checked against the recipe's teacher, template and lengths
    (the trainer checks the tokenizer and the data); None when the recipe has none."""
    if training_args.teacher_cache is None:
        return None
    if model_args.teacher_model_name_or_path is not None:
        logging.getLogger(__name__).info(
            "teacher_cache is set: the teacher %s is read from it, not loaded", model_args.teacher_model_name_or_path
        )
    cache = TeacherCache(training_args.teacher_cache)
    provenance = recipe_provenance(
        model_args.teacher_model_name_or_path, data_args.max_length, data_args.max_prompt_length
    )
    cache.check_source(provenance, "recipe settings")
    return cache


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of each training loss term, the run's mean loss, and each evaluation metric."""
    metrics = {}
    for entry in log_history:
        for key, value in entry.items():
            timing = key.endswith(("_runtime", "_per_second"))
            wanted = key in ("loss", "kd_loss", "ce_loss", "temperature", "train_loss") or (
                key.startswith("eval_") and not timing
            )
            if wanted and isinstance(value, (int, float)):
                metrics[key] = value
    return metrics


def run_summary(output_dir: str, merged: bool, log_history: list[dict]) -> str:
    """What a finished run prints last: where its model is and its final metrics."""
    where = f"the model is in {output_dir}" + (
        f", the merged model in {Path(output_dir) / 'merged'}" if merged else ""
    )
    metrics = ", ".join(f"{key} {value:.4g}" for key, value in final_metrics(log_history).items())
    return f"dts-llm: done: {where}\nfinal metrics: {metrics or 'none logged'}"


def write_model_card(command: str, task: Task, model_args, data_args, training_args, log_history: list[dict]) -> None:
    """README.md beside a full model: where it came from, how it was trained, its final metrics."""
    origin = (
        f"distilled from `{model_args.teacher_model_name_or_path}` into `{model_args.model_name_or_path}`"
        if command == "distill"
        else f"fine-tuned from `{model_args.model_name_or_path}`"
    )
    data = data_args.dataset + (f" (GLUE {data_args.glue_task})" if data_args.glue_task else "")
    settings = {"learning_rate": training_args.learning_rate, "max_length": data_args.max_length}
    if command == "distill":
        settings.update(temperature_policy=training_args.temperature_policy, kd_ratio=training_args.kd_ratio)
    settings.update(
        {"max_steps": training_args.max_steps}
        if training_args.max_steps > 0
        else {"epochs": training_args.num_train_epochs}
    )
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [dts-llm, {'distillation' if command == 'distill' else 'fine-tuning'}]",
        "---",
        "",
        f"# {Path(training_args.output_dir).name}",
        "",
        f"A {task.description} {origin} with `dts-llm {command}` on `{data}`; the full recipe is in `{RECIPE_NAME}`.",
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


def write_outputs(trainer, task: Task, model_args, data_args, lora_args, training_args, template=None) -> None:
    """The resolved recipe beside the model, opening with how instruction data was rendered (``template``:
    minillm or chat; a comment, so the file stays the recipe it was, and runs again as one), and the merged
    model when a LoRA student asks for it (its base loaded again as ``task`` loads students, whole on this
    process)."""
    resolved = {
        **asdict(model_args),
        **asdict(data_args),
        **asdict(lora_args),
        **json.loads(training_args.to_json_string()),
    }
    with open(os.path.join(training_args.output_dir, RECIPE_NAME), "w") as f:
        if template is not None:
            f.write(f"# rendered with: template {template} (template: {data_args.template})\n")
        yaml.safe_dump(resolved, f, sort_keys=False)
    if model_args.merge_lora and lora_args.lora_r is not None:
        init_kwargs = getattr(training_args, "model_init_kwargs", None)
        deepspeed_plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        with whole_model_loading(getattr(deepspeed_plugin, "hf_ds_config", None)):
            base = task.load_model(
                model_args.model_name_or_path, model_args.dtype, model_args.trust_remote_code, init_kwargs
            )
            save_merged_model(base, training_args.output_dir, trainer.processing_class)


def train_in_child(command: str, argv: list[str], output_dir: Path, launcher: list[str] | None = None) -> None:
    """`dts-llm COMMAND ARGV --output_dir OUTPUT_DIR` in a child process (behind ``launcher``, e.g.
    ``accelerate launch ...``; default: this Python), its output in OUTPUT_DIR/train.log.

    The quickstart and the sweep train every stage so: a fresh process per stage (GPU memory, seeds,
    process groups), multi-GPU training without a second code path, and the user's own command."""
    output_dir.mkdir(parents=True, exist_ok=True)
    argv = [*argv, "--output_dir", str(output_dir)]
    run_in_child(command, argv, output_dir / "train.log", output_dir / TRAINED_MARK, launcher)


def run_in_child(command: str, argv: list[str], log: Path, mark: Path, launcher: list[str] | None = None) -> None:
    """`dts-llm COMMAND ARGV` in a child process behind ``launcher``, its output in ``log``; it must exit with
    status 0 and leave ``mark`` (what a finished run writes last). A failure raises with the end of the log."""
    child = [*(launcher or [sys.executable]), "-m", "dts_llm", command, *argv]
    with open(log, "w") as stream:
        done = subprocess.run(child, stdout=stream, stderr=subprocess.STDOUT, check=False)  # the log says why
    if done.returncode != 0 or not mark.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"`{shlex.join(child)}` failed (exit {done.returncode}); {log} ends with:\n{tail}")


def _close_process_group() -> None:
    """Tear distributed state down explicitly: avoids a rare crash at interpreter shutdown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
