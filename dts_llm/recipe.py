"""Recipes: a YAML file of fields, plus command-line overrides, parsed into the argument dataclasses.

A recipe is one flat mapping of `ModelArguments`, `DataArguments` and `TrainingArguments` /
`DistillationConfig` fields, plus an optional `peft:` block for a LoRA student. Its entries become
command-line flags placed ahead of the user's own, so `HfArgumentParser` checks every key, type and
value, and a flag given on the command line overrides the recipe's.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .config import (
    AUTO_FIELDS,
    RENAMED_FIELDS,
    DistillationConfig,
    check_training_numbers,
    float_or_auto,
    renamed_field_warning,
)
from .data import DataArguments
from .errors import UserError, user_errors

RECIPE_NAME = "dts_llm_config.yaml"
PEFT_KEYS = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "lora_target_modules",
}


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
        metadata={
            "help": "dtype the models are loaded in (the teacher's: teacher_dtype when set).",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the checkpoint (off unless you ask)."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "With a LoRA student, also save the merged model to output_dir/merged."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train again into an output_dir that holds a finished run, deleting its checkpoints."},
    )


@dataclass
class LoraArguments:
    """A LoRA student (the recipe's `peft:` block: r, lora_alpha, lora_dropout, target_modules)."""

    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank; unset trains the full model."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt, or all-linear; default: peft's choice."}
    )

    def __post_init__(self):
        if self.lora_r is not None and self.lora_r < 1:
            raise UserError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise UserError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def peft_config(self, task_type: str = "CAUSAL_LM"):
        """peft's LoraConfig, or None for a full student; ``task_type`` SEQ_CLS trains the new head too.

        For SEQ_CLS the head's layers (``classifier``, DistilBERT's ``pre_classifier``, ``score``)
        are trained whole by peft and so kept out of the adapted modules (all-linear would match them).
        """
        if self.lora_r is None:
            return None
        # Imported here: peft takes seconds to import, and only LoRA runs need it.
        from peft import LoraConfig

        modules = self.lora_target_modules
        head = ["pre_classifier", "classifier", "score"] if task_type == "SEQ_CLS" else None
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules="all-linear" if modules == ["all-linear"] else modules,
            exclude_modules=head,
            task_type=task_type,
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping, which YAML would let the last win."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # unhashable: the base class refuses it
            key = self.construct_object(key_node)
            if key in seen:
                mark = key_node.start_mark
                raise UserError(f"{mark.name}, line {mark.line + 1}: the key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _flag_value(value) -> str:
    """A recipe value as a command-line word; booleans as true/false, which every bool or str field reads."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _adopt_renamed_keys(recipe: dict, path: str) -> dict:
    """The recipe with its deprecated keys under their new names (a warning for each; both refused).
    An old key without a value is dropped: a resolved recipe (``dts_llm_config.yaml``) lists it as null."""
    renamed = {}
    for key, value in recipe.items():
        if key in RENAMED_FIELDS and value is None:
            continue
        if key in RENAMED_FIELDS:
            if RENAMED_FIELDS[key] in recipe:
                raise UserError(
                    f"{path}: {key} is the old name of {RENAMED_FIELDS[key]}; give only {RENAMED_FIELDS[key]}"
                )
            warnings.warn(renamed_field_warning(key, f"{path}: "), FutureWarning, stacklevel=3)
        renamed[RENAMED_FIELDS.get(key, key)] = value
    return renamed


def recipe_flags(path: str, parser) -> list[str]:
    """The recipe's entries as `--key value ...` flags, each key checked against ``parser``."""
    with open(path) as f:
        recipe = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a mapping of field names to values")
    recipe = _adopt_renamed_keys(recipe, path)
    peft_block = recipe.pop("peft", None)
    if peft_block is not None:
        if not isinstance(peft_block, dict) or "r" not in peft_block:
            raise UserError(f"{path}: the peft block is a mapping that sets at least r")
        for key, value in peft_block.items():
            if key not in PEFT_KEYS:
                raise UserError(f"{path}: unknown key peft.{key}; the peft block takes {sorted(PEFT_KEYS)}")
            recipe[PEFT_KEYS[key]] = value
    actions = {action.dest: action for action in parser._actions}
    flags = []
    for key, value in recipe.items():
        if key not in actions:
            raise UserError(f"{path}: unknown key {key!r}")
        if value is None or value == []:
            continue
        if isinstance(value, dict):
            values = [json.dumps(value)]
        elif not isinstance(value, list):
            values = [_flag_value(value)]
        elif actions[key].nargs in ("+", "*") or len(value) == 1:
            values = [_flag_value(item) for item in value]
        else:
            raise UserError(f"{path}: {key} takes one value, got the list {value}")
        flags += [f"--{key}", *values]
    return flags


class _RecipeParser(HfArgumentParser):
    """Reports a bad flag in one line with where the fields are listed, not after the whole usage."""

    def error(self, message):
        raise UserError(f"{message} (`{self.prog} --help` lists the fields)")


def recipe_parser(command: str) -> HfArgumentParser:
    """The parser of `dts-llm sft|distill`: every field of its argument dataclasses is a flag."""
    config_class = DistillationConfig if command == "distill" else TrainingArguments
    parser = _RecipeParser(
        (ModelArguments, DataArguments, LoraArguments, config_class),
        prog=f"dts-llm {command}",
        usage=f"dts-llm {command} RECIPE.yaml [--field value ...]",
        description="RECIPE.yaml maps these fields to values; a --field value flag overrides the recipe's.",
        allow_abbrev=False,  # argparse would otherwise take a misspelt `learning_rat` for `learning_rate`
    )
    for action in parser._actions:
        if action.dest in AUTO_FIELDS and command == "distill":
            action.type = float_or_auto  # HfArgumentParser reads a `float | str` field as a float
    return parser


def parse_recipe(command: str, argv: list[str]):
    """(model, data, lora, training) arguments of `dts-llm sft|distill RECIPE.yaml [--flags]`."""
    parser = recipe_parser(command)
    if not argv or argv[0].startswith("-"):
        raise UserError(f"give the recipe first: usage: {parser.usage}")
    flags = recipe_flags(argv[0], parser) + argv[1:]
    with user_errors(ValueError):  # the argument dataclasses' own checks of the values given
        model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses(
            args=flags, look_for_args_file=False
        )
    if command == "distill" and not (model_args.teacher_model_name_or_path or training_args.teacher_cache):
        raise UserError("distill needs a teacher: teacher_model_name_or_path, or a teacher_cache")
    if command == "sft" and model_args.teacher_model_name_or_path:
        raise UserError("teacher_model_name_or_path is for distill; sft trains one model")
    if model_args.merge_lora and lora_args.lora_r is None:
        raise UserError("merge_lora needs a LoRA student: set peft.r (or --lora_r)")
    check_training_numbers(training_args)  # DistillationConfig checks itself; TrainingArguments does not
    return model_args, data_args, lora_args, training_args
