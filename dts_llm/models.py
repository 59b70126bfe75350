"""Loading models and tokenizers, written once for the commands, the teacher report and the evaluation.

``load_model`` reads any model class in a dtype given by name; ``load_tokenizer`` pads with EOS when the
tokenizer has no pad token (GPT-2); ``check_models`` reads only the configs, so that a missing model or a
too short context fails before any weights load. A LoRA student is merged from files
(``save_merged_model``), whatever partitioned its training-time copy.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import (
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)

from .errors import UserError


def torch_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """``dtype`` as ``from_pretrained`` takes it: a torch dtype, or "auto" (the checkpoint's)."""
    return dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def load_model(
    path: str,
    model_class=AutoModelForCausalLM,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    **options,
):
    """``model_class.from_pretrained(path)`` in ``dtype`` (None: the loading default); ``options`` (a head's
    config, `model_init_kwargs`) add or override load options."""
    settings = {} if dtype is None else {"dtype": torch_dtype(dtype)}
    return model_class.from_pretrained(path, **{**settings, "trust_remote_code": trust_remote_code, **options})


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer at ``path``, padding with EOS when it has no pad token (GPT-2's has none)."""
    return pad_with_eos(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))


def pad_with_eos(tokenizer):
    """``tokenizer``, given its EOS as pad token when it has none (batches need one)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def declare_padding(model, tokenizer) -> None:
    """Record the tokenizer's pad token in a model whose config has none (GPT-2 pads with EOS here), as
    the Trainer would, without its warning: the choice is ours, not news to the user."""
    configs = [model.config, getattr(model, "generation_config", None)]
    for config in configs:
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id


def model_config(key: str, path: str, trust_remote_code: bool = False):
    """The config of the model at ``path`` (a folder or hub id), or a UserError naming ``key``."""
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"{key}: no model found at {path!r} ({error})") from error


def check_models(model_args, max_length: int) -> None:
    """Fail on a missing model, or one whose context is shorter than ``max_length``, before any weights
    load: the field of ``model_args`` (``dts_llm.recipe.ModelArguments``) is named."""
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


@contextmanager
def whole_model_loading(hf_deepspeed_config):
    """Inside, models load whole on this process; the run's DeepSpeed config is restored after.

    Under ZeRO-3 ``from_pretrained`` partitions what it loads across processes: a collective that
    the other processes would never join when only the main process loads.
    """
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if hf_deepspeed_config is not None:
            set_hf_deepspeed_config(hf_deepspeed_config)


def save_merged_model(base, adapter_dir: str, tokenizer) -> None:
    """``base`` (the student as loaded before training) plus the adapter saved in ``adapter_dir``, merged,
    written to ``adapter_dir/merged``.

    Both are read from files, so it works whatever partitioned the training-time model (ZeRO-3, FSDP);
    under ZeRO-3 load ``base`` inside ``whole_model_loading``.
    """
    # Imported here: peft takes seconds to import, and only LoRA runs merge.
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged_dir = os.path.join(adapter_dir, "merged")
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
