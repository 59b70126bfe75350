"""Refuse launches that accelerate would quietly turn into something else.

Three fallbacks run without an error and train wrongly or not as asked: on a machine without GPUs,
processes started from a multi-GPU config (without ``use_cpu``) each train alone, with no gradient
synchronisation; ``ACCELERATE_USE_CPU=true`` with a DeepSpeed config gives plain DDP; and
accelerate drops an FSDP config when no GPU exists. Each is caught here, before training starts.
``silence_library_notices`` drops DeepSpeed's note about the device it chose, which is no launch's business.
"""

from __future__ import annotations

import logging
import os

import torch.distributed as dist
from accelerate.utils import DistributedType, str_to_bool

from .errors import UserError

# launcher variable -> (the mode it asks for, its name, the usual reason it is lost)
_REQUESTED_MODES = {
    "ACCELERATE_USE_DEEPSPEED": (
        DistributedType.DEEPSPEED,
        "DeepSpeed",
        "ACCELERATE_USE_CPU=true replaces it with DDP: unset it, and set use_cpu: true in the recipe instead",
    ),
    "ACCELERATE_USE_FSDP": (DistributedType.FSDP, "FSDP", "accelerate drops it on a machine without a GPU"),
}


def check_launch(accelerator) -> None:
    """Raise a UserError when the processes would not train together in the mode the launcher set."""
    mode = accelerator.distributed_type
    # Not accelerator.num_processes: without a backend accelerate reports 1 whatever was launched.
    launched = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and mode == DistributedType.NO:
        raise UserError(
            f"{launched} processes were launched but they would train separately, without "
            "synchronising gradients: on a machine without GPUs set use_cpu: true in the recipe (or "
            "ACCELERATE_USE_CPU=true) and launch with accelerate_configs/cpu.yaml"
        )
    for variable, (expected, name, reason) in _REQUESTED_MODES.items():
        if str_to_bool(os.environ.get(variable, "false")) and mode != expected:
            raise UserError(f"the launcher asked for {name} but accelerate set up {mode.value} ({reason})")


def silence_library_notices() -> None:
    """Drop DeepSpeed's note, logged whenever it is imported on a machine without a GPU, that it chose the
    CPU: the run's device is the Trainer's to choose and report. Its other messages pass."""
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: not record.getMessage().startswith("Setting accelerator to CPU")
    )
