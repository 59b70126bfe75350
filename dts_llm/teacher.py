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

from .errors import UserError

logger = logging.getLogger(__name__)

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Stage-3 settings that DeepSpeed sizes from the model width ("auto" in a config), with the factors
# the Trainer uses for the student.
_WIDTH_SCALED_ZERO3_KEYS = {
    "reduce_bucket_size": lambda width: width * width,
    "stage3_prefetch_bucket_size": lambda width: int(0.9 * width * width),
    "stage3_param_persistence_threshold": lambda width: 10 * width,
}
# Training-only sections, which an engine without an optimizer must not be given, and monitors,
# which would write over the student engine's outputs.
_STUDENT_ONLY_KEYS = (
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "zero_allow_untested_optimizer",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "flops_profiler",
    "comms_logger",
)


def teacher_deepspeed_config(trainer_config: dict[str, Any], width: int | None, dtype: str | None) -> dict[str, Any]:
    """The trainer's DeepSpeed config turned into an inference-only ZeRO-3 config for the teacher.

    ``"auto"`` sizes are resolved from the teacher's ``width`` (its hidden size) and written under
    ``zero_optimization`` (DeepSpeed reads them nowhere else: dotted top-level keys are ignored,
    and tiny default-sized buckets would leave every small teacher parameter unpartitioned).
    Explicit numbers are kept. ``dtype`` ("bfloat16", "float16", "float32"), when given, replaces
    the trainer's precision for the teacher.
    """
    config = copy.deepcopy(trainer_config)
    for key in _STUDENT_ONLY_KEYS:
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
        raise UserError(f"the DeepSpeed config still has 'auto' values for the teacher: {unresolved}")
    return config


def _auto_keys(config: dict[str, Any], prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"


def _model_width(model: nn.Module) -> int | None:
    """The hidden size DeepSpeed's sizes scale with (the largest one, or the text model's)."""
    config = getattr(model, "config", None)
    for candidate in (config, getattr(config, "text_config", None)):
        width = getattr(candidate, "hidden_size", None)
        widths = getattr(candidate, "hidden_sizes", None)
        if width is not None or widths:
            return width if width is not None else max(widths)
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in TEACHER_DTYPES.items() if value == dtype)


def deepspeed_zero3_engine(teacher: nn.Module, trainer_config: dict[str, Any], dtype: str | None):
    """The teacher as an inference-only ZeRO-3 engine (see `teacher_deepspeed_config`).

    A teacher loaded under ``zero3_init_flag`` is already partitioned, in the trainer's precision;
    ``teacher_dtype`` cannot change that any more and is reported as ignored. A whole teacher is
    partitioned here, one parameter at a time and in ``teacher_dtype``, before the engine starts
    (the engine would first move it to the device whole).
    """
    import deepspeed

    partitioned = [p for p in teacher.parameters() if hasattr(p, "ds_id")]
    if partitioned:
        loaded = _dtype_name(partitioned[0].ds_tensor.dtype)
        if dtype is not None and dtype != loaded:
            logger.warning(
                "teacher_dtype=%s is ignored: zero3_init_flag loaded the teacher partitioned in %s", dtype, loaded
            )
        dtype = loaded
    config = teacher_deepspeed_config(trainer_config, _model_width(teacher), dtype)
    if not partitioned:
        teacher.to(dtype=TEACHER_DTYPES[dtype] if dtype else None)  # in host memory: Init keeps dtypes
        deepspeed.zero.Init(module=teacher, config_dict_or_path=config)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def shard_like_student(teacher: nn.Module, fsdp_plugin) -> nn.Module:
    """Shard ``teacher`` with FSDP2 as the student is: same mixed precision and offload policy.

    Units are the plugin's layer classes when the teacher has them (it may be another architecture
    than the student), else the teacher's own ``_no_split_modules``. Every unit, the root included,
    frees its gathered weights after the forward: no backward follows a teacher forward. The
    teacher is sharded over all processes (a hybrid-sharding mesh of the student's is not copied),
    and computes in the plugin's ``param_dtype`` when mixed precision is on.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if any(p.is_meta for p in teacher.parameters()):
        raise UserError(
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
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        return deepspeed_zero3_engine(teacher, deepspeed_plugin.deepspeed_config, dtype)
    torch_dtype = TEACHER_DTYPES[dtype] if dtype else None
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None:
        if fsdp_plugin.fsdp_version == 2:
            return shard_like_student(teacher.to(dtype=torch_dtype), fsdp_plugin)
        logger.warning("FSDP version 1: the teacher is replicated on every process; fsdp_version: 2 shards it.")
    return teacher.to(device=accelerator.device, dtype=torch_dtype)
