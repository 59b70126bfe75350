"""Pre-flight checks of a distillation run, before any training step: the teacher and the student
share one vocabulary, the datasets hold the columns the loss reads, a resumed checkpoint ran the same
temperature settings, and the schedules counted in epochs fit in the run."""

from __future__ import annotations

import json
import logging
import os

from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, TrainerCallback

from .config import AUTO, RENAMED_FIELDS, DistillationConfig
from .errors import UserError
from .heads import CAUSAL_LM
from .temperature import LEARNED_TEMPERATURE_NAME, TEMPERATURE_STATE_NAME, ctkd_lambda, reads_progress

logger = logging.getLogger(__name__)


def logits_width(model: nn.Module) -> int:
    """Rows of the output head; ``out_features`` stays right when ZeRO-3 partitions the weight."""
    head = model.get_output_embeddings()
    return getattr(head, "out_features", None) or head.weight.shape[0]


def _teacher_tokenizer(teacher: PreTrainedModel):
    """The tokenizer stored where the teacher was loaded from (folder or hub id), or None."""
    path = getattr(teacher, "name_or_path", "")
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _declared_eos(config) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def check_vocabularies(student: nn.Module, teacher: nn.Module, tokenizer) -> int:
    """The vocabulary size the losses use, after refusing pairs that do not share one tokenizer.

    Logits may be wider than the tokenizer (embeddings padded to a multiple of 8 or 64, e.g. OPT's
    50272 for 50265 tokens); both are cut to the tokenizer's size.
    """
    student_width, teacher_width = logits_width(student), logits_width(teacher)
    if tokenizer is None:
        return min(student_width, teacher_width)
    vocab_size = len(tokenizer)
    for name, width in (("student", student_width), ("teacher", teacher_width)):
        if width < vocab_size:
            raise UserError(
                f"the tokenizer has {vocab_size} tokens but the {name}'s logits have only {width}: "
                "teacher and student must share the student's tokenizer"
            )
    check_teacher_tokenizer(teacher, tokenizer)
    return vocab_size


def check_teacher_tokenizer(teacher: nn.Module, tokenizer) -> None:
    """Refuse a teacher saved with another tokenizer (or, without one, another EOS or a smaller
    embedding table): both models are fed the student's token ids."""
    if tokenizer is None:
        return
    embeddings = teacher.get_input_embeddings().num_embeddings  # intact under ZeRO-3 partitioning
    if embeddings < len(tokenizer):
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the teacher embeds only {embeddings}: "
            "teacher and student must share the student's tokenizer"
        )
    teacher_tokenizer = _teacher_tokenizer(teacher)
    if teacher_tokenizer is not None:
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"the teacher's tokenizer ({teacher.name_or_path}) differs from the student's: "
                "distillation feeds both models the same token ids, so they need one vocabulary"
            )
        return
    declared = _declared_eos(teacher.config)
    if declared and tokenizer.eos_token_id not in declared:
        raise UserError(
            f"the teacher's config declares eos_token_id {sorted(declared)} but the student's tokenizer "
            f"uses {tokenizer.eos_token_id}: the two do not share a tokenizer"
        )
    logger.warning(
        "No tokenizer was found with the teacher (%r); assuming it shares the student's vocabulary.",
        getattr(teacher, "name_or_path", ""),
    )


TOKEN_COLUMNS = {CAUSAL_LM: ("input_ids", "labels")}
LABEL_HELP = (
    "labels holds the token ids to learn, -100 on the prompt and padding; dts_llm.data.load_instruction_data "
    "builds such a dataset from instruction files, dts_llm.data.encode_example one example from a prompt "
    "and a response; untokenised records (messages, prompt/completion, instructions) are tokenised by the "
    "trainer when processing_class is given"
)


def check_training_columns(dataset, name: str, head: str) -> None:
    """Refuse, before any model loads, a dataset without the columns the loss reads (a dict of
    evaluation sets is checked set by set; a dataset without column names, e.g. a generator, is not)."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_training_columns(part, f"{name}[{key!r}]", head)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return
    needed = TOKEN_COLUMNS.get(head, ("input_ids", "label"))
    missing = [
        column for column in needed if column not in columns and not (column == "label" and "labels" in columns)
    ]
    if missing:
        raise UserError(
            f"{name} has the columns {columns} but DistillationTrainer needs {list(needed)} (missing {missing}). "
            + (LABEL_HELP if head == CAUSAL_LM else "dts_llm.glue.load_glue_data builds them for GLUE tasks")
        )


class WarnOnShortSchedules(TrainerCallback):
    """Warn when a schedule counted in epochs cannot unfold in the run's epochs: a per-epoch
    temperature over one epoch or less sits at its end value from the first step, and CTKD's
    adversarial weight ramped over more epochs than the run has never reaches its maximum."""

    def on_train_begin(self, args, state, control, **kwargs):
        epochs = state.num_train_epochs  # whole epochs begun, also for a max_steps run
        if args.temperature_progress == "epoch" and reads_progress(args.temperature_policy) and epochs <= 1:
            logger.warning(
                "temperature_progress=epoch with a run of %d epoch: the %s schedule's progress is 1 from the first "
                "step, so it starts at its end value; temperature_progress=step runs it over the optimizer steps",
                epochs,
                args.temperature_policy,
            )
        if args.temperature_policy.startswith("ctkd") and epochs < args.ctkd_lambda_epochs:
            reached = ctkd_lambda(epochs, args.ctkd_lambda_max, args.ctkd_lambda_epochs)
            logger.warning(
                "ctkd_lambda_epochs=%g but the run has at most %d epoch(s): CTKD's adversarial weight reaches only "
                "%.3g of ctkd_lambda_max=%g; lower ctkd_lambda_epochs to ramp it within the run",
                args.ctkd_lambda_epochs,
                epochs,
                reached,
                args.ctkd_lambda_max,
            )


def check_resumed_temperature(checkpoint: str, args: DistillationConfig) -> None:
    """Refuse to resume a checkpoint whose temperature policy or settings differ from ``args``',
    naming the fields: the policy's state only continues the trajectory it was saved on. Fields still `auto`
    are compared once measured (``DistillationTrainer.train``)."""
    learned, scheduled = (
        os.path.join(checkpoint, name) for name in (LEARNED_TEMPERATURE_NAME, TEMPERATURE_STATE_NAME)
    )
    if os.path.isfile(learned):
        with safe_open(learned, framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("settings", "null"))
    elif os.path.isfile(scheduled):
        with open(scheduled) as f:
            saved = json.load(f).get("settings")
    else:
        raise UserError(
            f"resume_from_checkpoint: {checkpoint} holds no temperature policy ({TEMPERATURE_STATE_NAME} or "
            f"{LEARNED_TEMPERATURE_NAME}): it was not written by DistillationTrainer (an sft checkpoint?)"
        )
    if saved is None:
        logger.warning("%s was saved without its temperature settings: resuming without comparing them", checkpoint)
        return
    saved = {RENAMED_FIELDS.get(name, name): value for name, value in saved.items()}  # dts-llm 0.1 wrote `temperature`
    requested = args.temperature_settings()
    differences = [
        f"{name} (checkpoint {saved.get(name)!r}, this run {getattr(args, name)!r})"
        for name in dict.fromkeys([*saved, *requested])
        if saved.get(name) != getattr(args, name) and getattr(args, name) != AUTO
    ]
    if differences:
        raise UserError(
            f"resume_from_checkpoint: {checkpoint} was trained with other temperature settings: "
            f"{'; '.join(differences)}. "
            "Resume with the checkpoint's settings, or start a new run in another output_dir"
        )
