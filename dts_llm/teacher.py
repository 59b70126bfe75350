"""Where the frozen teacher lives under each launch mode.

- one process, DDP, DeepSpeed ZeRO-1/2: a replica on every process, never wrapped (a DDP wrapper
  would add gradient hooks and all-reduces for a model that has no gradients);
- DeepSpeed ZeRO-3: an inference-only DeepSpeed engine built from the trainer's own config, stage 3
  kept and the optimizer dropped, so the teacher is partitioned across processes like the student
  and a teacher larger than one device fits;
- FSDP (version 2): sharded with the student's FSDP settings, one unit per transformer block (see
  `shard_like_student`); FSDP version 1 (deprecated) keeps a replica, with a warning.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Stage-3 settings that DeepSpeed sizes from the model width ("auto" in a config), with the factors
# the Trainer uses for the student.
_WIDTH_SCALED_ZERO3_KEYS = {
    "reduce_bucket_size": lambda width: width * width,
    "stage3_prefetch_bucket_size": lambda width: int(0.9 * width * width),
    "stage3_param_persistence_threshold": lambda width: 10 * width,
}
# Training-only sections: an engine without an optimizer must not be given them.
_TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer")


def teacher_deepspeed_config(trainer_config: dict[str, Any], width: int | None, dtype: str | None) -> dict[str, Any]:
    """The trainer's DeepSpeed config turned into an inference-only ZeRO-3 config for the teacher.

    ``"auto"`` sizes are resolved from the teacher's ``width`` (its hidden size) and written under
    ``zero_optimization`` (DeepSpeed reads them nowhere else: dotted top-level keys are ignored,
    and tiny default-sized buckets would leave every small teacher parameter unpartitioned).
    Explicit numbers are kept. ``dtype`` ("bfloat16", "float16", "float32"), when given, replaces
    the trainer's precision for the teacher.
    """
    config = copy.deepcopy(trainer_config)
    for key in _TRAINING_ONLY_KEYS:
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    for key, size in _WIDTH_SCALED_ZERO3_KEYS.items():
        if zero.get(key, "auto") == "auto":
            if width is None:
                zero.pop(key, None)  # DeepSpeed's default
            else:
                zero[key] = size(width)
    if dtype is not None:
        config["bf16"] = {"enabled": dtype == "bfloat16"}
        config["fp16"] = {"enabled": dtype == "float16"}
    unresolved = sorted(_auto_keys(config))
    if unresolved:
        raise ValueError(f"the DeepSpeed config still has 'auto' values for the teacher: {unresolved}")
    return config


def _auto_keys(config: dict[str, Any], prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"


def _model_width(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None)
    if width is None:
        widths = getattr(config, "hidden_sizes", None)
        width = max(widths) if widths else None
    return width


def shard_like_student(teacher: nn.Module, fsdp_plugin) -> nn.Module:
    """Shard ``teacher`` with FSDP2 as the student is: same mixed precision and offload policy.

    Units are the plugin's layer classes when the teacher has them (it may be another architecture
    than the student), else the teacher's own ``_no_split_modules``. Every unit, the root included,
    frees its gathered weights after the forward: no backward follows a teacher forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if any(p.is_meta for p in teacher.parameters()):
        raise ValueError(
            "the teacher's weights were loaded on one process only (fsdp_cpu_ram_efficient_loading: true); "
            "set it to false in the accelerate config so every process holds the teacher before sharding"
        )
    options = {
        "reshard_after_forward": True,
        "mp_policy": fsdp_plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": fsdp_plugin.cpu_offload or OffloadPolicy(),
    }
    block_names = set(fsdp_plugin.transformer_cls_names_to_wrap or ())
    if not any(type(module).__name__ in block_names for module in teacher.modules()):
        block_names = set(getattr(teacher, "_no_split_modules", None) or ())
    for module in reversed(list(teacher.modules())):  # innermost first, the root last
        if module is not teacher and type(module).__name__ in block_names:
            fully_shard(module, **options)
    fully_shard(teacher, **options)
    return teacher


def prepare_teacher(teacher: nn.Module, accelerator, dtype: str | None) -> nn.Module:
    """Freeze ``teacher`` and place it as the launch mode wants (see the module docstring)."""
    teacher.requires_grad_(False)
    teacher.eval()
    torch_dtype = TEACHER_DTYPES[dtype] if dtype else None
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        import deepspeed

        config = teacher_deepspeed_config(deepspeed_plugin.deepspeed_config, _model_width(teacher), dtype)
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        if fsdp_plugin.fsdp_version == 2:
            return shard_like_student(teacher.to(dtype=torch_dtype), fsdp_plugin)
        logger.warning("FSDP version 1: the teacher is replicated on every process; fsdp_version: 2 shards it.")
    return teacher.to(device=accelerator.device, dtype=torch_dtype)
