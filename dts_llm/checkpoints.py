"""Which checkpoint a run resumes from: the folder asked for, or the latest complete one.

The Trainer writes a checkpoint's ``trainer_state.json`` last, after the weights, optimizer,
scheduler, RNG states and the temperature policy: a checkpoint folder without it (or with one that
does not parse, or that names another step) was interrupted while saving and cannot be resumed.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import UserError

logger = logging.getLogger(__name__)

LATEST = ("true", "last")
_CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def resume_checkpoint(requested: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, or None to start afresh.

    ``requested`` is a checkpoint folder, or True / "true" / "last" for the latest complete checkpoint
    in ``output_dir`` (incomplete ones are skipped with a warning); "false" or empty starts afresh.
    """
    if requested is None or requested is False or str(requested).strip().lower() in ("", "false"):
        return None
    if requested is True or str(requested).strip().lower() in LATEST:
        return latest_complete_checkpoint(output_dir)
    problem = incomplete_reason(Path(requested))
    if problem is not None:
        hint = ""
        if Path(requested).is_dir() and any(_step(folder) is not None for folder in Path(requested).iterdir()):
            hint = " (it holds checkpoint folders: pass one of them, or `last` with this folder as output_dir)"
        raise UserError(f"resume_from_checkpoint: {requested} {problem}{hint}")
    return str(requested)


def latest_complete_checkpoint(output_dir: str) -> str:
    """The highest-step complete ``checkpoint-N`` folder of ``output_dir``; raises when there is none."""
    root = Path(output_dir)
    folders = [folder for folder in root.iterdir() if _step(folder) is not None] if root.is_dir() else []
    for folder in sorted(folders, key=_step, reverse=True):
        problem = incomplete_reason(folder)
        if problem is None:
            logger.info("Resuming from %s, the latest complete checkpoint", folder)
            return str(folder)
        logger.warning("Skipping %s: it %s", folder, problem)
    raise UserError(f"resume_from_checkpoint: no complete checkpoint in {output_dir} to resume from")


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed (a phrase after "it"), or None when it is complete."""
    if not checkpoint.is_dir():
        return "is not a folder"
    state_file = checkpoint / TRAINER_STATE_NAME
    if not state_file.is_file():
        return f"has no {TRAINER_STATE_NAME} (written last: the save was interrupted, or this is no checkpoint)"
    try:
        step = json.loads(state_file.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError):
        return f"has an unreadable {TRAINER_STATE_NAME}"
    expected = _step(checkpoint)
    if expected is not None and step != expected:
        return f"has a {TRAINER_STATE_NAME} of step {step}, not {expected}"
    return None


def _step(folder: Path) -> int | None:
    match = _CHECKPOINT_FOLDER.match(folder.name)
    return int(match.group(1)) if match and folder.is_dir() else None
