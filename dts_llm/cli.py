"""The `dts-llm` command line: `sft` and `distill` run a YAML recipe, `demo` the offline demo.

A recipe is one flat YAML mapping of `ModelArguments`, `DataArguments` and `TrainingArguments` /
`DistillationConfig` fields, plus an optional `peft:` block for a LoRA student. The recipe becomes
command-line flags ahead of the user's own, so `HfArgumentParser` checks every key and type, and
a flag given on the command line overrides the recipe's value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import yaml

RECIPE_NAME = "dts_llm_config.yaml"
PEFT_KEYS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "target_modules": "lora_target_modules"}


@dataclass
class ModelArguments:
    """Which models to load, and how."""

    model_name_or_path: str = field(metadata={"help": "The student (distill) or the model to fine-tune (sft)."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The teacher (distill only)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; default: the one saved with the model."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype the models are loaded in.", "choices": ["float32", "bfloat16", "float16", "auto"]},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the checkpoint (off unless you ask)."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "With a LoRA student, also save the merged model to output_dir/merged."}
    )


@dataclass
class LoraArguments:
    """A LoRA student (the recipe's `peft:` block: r, lora_alpha, lora_dropout, target_modules)."""

    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank; unset trains the full model."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: peft's choice for the architecture."}
    )

    def peft_config(self):
        if self.lora_r is None:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            task_type="CAUSAL_LM",
        )


def recipe_flags(path: str) -> list[str]:
    """The recipe's keys as `--key value` flags; the `peft:` block becomes the `--lora_*` flags."""
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping of field names to values")
    peft_block = recipe.pop("peft", None) or {}
    for key, value in peft_block.items():
        if key not in PEFT_KEYS:
            raise ValueError(f"{path}: unknown key peft.{key}; the peft block takes {sorted(PEFT_KEYS)}")
        recipe[PEFT_KEYS[key]] = value
    flags = []
    for key, value in recipe.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, list):
            flags.extend(str(item) for item in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def parse_recipe(command: str, argv: list[str]):
    """(model, data, lora, training) arguments from a recipe file and command-line overrides."""
    from transformers import HfArgumentParser, TrainingArguments

    from .data import DataArguments
    from .trainer import DistillationConfig

    config_class = DistillationConfig if command == "distill" else TrainingArguments
    # No abbreviations: argparse would otherwise take a misspelt `learning_rat` for `learning_rate`.
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, config_class), allow_abbrev=False)
    if not argv or argv[0].startswith("-"):
        parser.print_help()
        raise SystemExit(f"usage: dts-llm {command} RECIPE.yaml [--field value ...]")
    model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses(
        args=recipe_flags(argv[0]) + argv[1:]
    )
    if command == "distill" and not model_args.teacher_model_name_or_path:
        raise ValueError("teacher_model_name_or_path is required for distill")
    if command == "sft" and model_args.teacher_model_name_or_path:
        raise ValueError("teacher_model_name_or_path is for distill; sft trains one model")
    return model_args, data_args, lora_args, training_args


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


def load_model(path: str, model_args: ModelArguments):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=model_args.trust_remote_code)


def run(command: str, argv: list[str]) -> str:
    """Train as the recipe says; write the model, tokenizer and resolved recipe to output_dir."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    from .data import load_instruction_data
    from .losses import IGNORE_INDEX
    from .trainer import DistillationTrainer

    model_args, data_args, lora_args, training_args = parse_recipe(command, argv)
    check_models_exist(model_args)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first(desc="tokenising the data"):
        data = load_instruction_data(data_args, tokenizer)
    model = load_model(model_args.model_name_or_path, model_args)
    common = {
        "args": training_args,
        "train_dataset": data.train,
        "eval_dataset": data.validation,
        "processing_class": tokenizer,
        "data_collator": DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
    }
    if command == "distill":
        teacher = load_model(model_args.teacher_model_name_or_path, model_args)
        trainer = DistillationTrainer(model=model, teacher_model=teacher, peft_config=lora_args.peft_config(), **common)
    else:
        peft_config = lora_args.peft_config()
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(model=model, **common)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        write_outputs(trainer, model_args, data_args, lora_args, training_args)
    return training_args.output_dir


def write_outputs(trainer, model_args, data_args, lora_args, training_args) -> None:
    """The resolved recipe beside the model, and the merged model when a LoRA student asks for it."""
    resolved = {
        **asdict(model_args),
        **asdict(data_args),
        **asdict(lora_args),
        **json.loads(training_args.to_json_string()),
    }
    with open(os.path.join(training_args.output_dir, RECIPE_NAME), "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)
    trainer.processing_class.save_pretrained(training_args.output_dir)
    if model_args.merge_lora and lora_args.lora_r is not None:
        merged_dir = os.path.join(training_args.output_dir, "merged")
        trainer.model.merge_and_unload().save_pretrained(merged_dir)
        trainer.processing_class.save_pretrained(merged_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dts-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("sft", help="Supervised fine-tuning from a recipe: dts-llm sft RECIPE.yaml [--field value ...]")
    commands.add_parser("distill", help="Distillation from a recipe: dts-llm distill RECIPE.yaml [--field value ...]")
    demo = commands.add_parser("demo", help="Distil a tiny student offline with DTS and print the trajectory.")
    demo.add_argument("--output", default="demo_output", help="Folder for the run (default: demo_output).")
    if argv and argv[0] in ("sft", "distill"):
        run(argv[0], argv[1:])
        _close_process_group()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .demo import run_demo

    run_demo(args.output)
    return 0


def _close_process_group() -> None:
    """Tear distributed state down explicitly: avoids a rare crash at interpreter shutdown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
