"""`DistillationConfig` and `DistillationTrainer`: token-level KD of a causal LM from a frozen teacher.

One training step (``compute_loss``):

1. the frozen teacher runs without building a graph, in eval mode;
2. the student runs;
3. the student's and the teacher's cross-entropy on the response tokens are computed;
4. the temperature policy updates from those two values (summed over all processes first, so every
   rank uses the same T) and the training progress, and returns T;
5. the divergence at T (x T^2) is computed in fp32 chunks, masked to response tokens;
6. loss = (1 - kd_ratio) CE + kd_ratio KD, both normalised by the response-token count of the
   whole (accumulated, all-process) batch when the Trainer provides it.

``kd_loss``, ``ce_loss``, ``teacher_ce_loss`` and ``temperature`` are logged next to ``loss``
(token means over the logging window, all processes), in evaluation too (``eval_`` prefix).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .losses import DIVERGENCES, IGNORE_INDEX, causal_lm_cross_entropy, distillation_loss
from .losses import divergence_terms
from .temperature import TEMPERATURE_POLICIES, make_temperature_policy

logger = logging.getLogger(__name__)

TEMPERATURE_STATE_NAME = "temperature_policy.json"
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DistillationConfig(TrainingArguments):
    """`TrainingArguments` plus the distillation knobs; invalid values fail here, before training."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "teacher_model_init_kwargs"]

    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": "Divergence between teacher and student token distributions.", "choices": list(DIVERGENCES)},
    )
    kd_ratio: float = field(default=0.5, metadata={"help": "loss = (1 - kd_ratio) * CE + kd_ratio * KD."})
    temperature: str = field(
        default="dts",
        metadata={"help": "Temperature policy: constant T, cosine annealing or DTS.", "choices": list(TEMPERATURE_POLICIES)},
    )
    temperature_init: float = field(default=3.0, metadata={"help": "T of `constant`; T_init of `dts`."})
    temperature_min: float = field(default=1.0, metadata={"help": "Lower clamp of `dts`, end of `cosine`."})
    temperature_max: float = field(default=3.0, metadata={"help": "Upper clamp of `dts`, start of `cosine`."})
    temperature_momentum: float = field(default=0.9, metadata={"help": "Momentum of the `dts` moving average."})
    temperature_progress: str = field(
        default="epoch",
        metadata={
            "help": "Progress p fed to the schedule: `epoch` = (epoch + 1) / epochs (DTS reference), "
            "`step` = (step + 1) / max_steps.",
            "choices": ["epoch", "step"],
        },
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Mixture weight of `jsd` (0 = forward KL, 1 = reverse KL)."})
    skew_lambda: float = field(default=0.1, metadata={"help": "Skew weight of `skew_forward_kl` / `skew_reverse_kl`."})
    kd_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Response tokens per fp32 chunk of the loss; default: at most 16 chunks of >= 16 MiB."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `from_pretrained` when the student is a path or hub id."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `from_pretrained` when the teacher is a path or hub id."}
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "Cast the teacher to this dtype (e.g. bfloat16) to save memory.", "choices": list(TEACHER_DTYPES)},
    )

    def __post_init__(self):
        super().__post_init__()
        divergence_terms(self.kd_loss, self.jsd_beta, self.skew_lambda)
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}")
        if self.temperature_progress not in ("epoch", "step"):
            raise ValueError(f"temperature_progress must be 'epoch' or 'step', got {self.temperature_progress!r}")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size must be >= 1, got {self.kd_chunk_size}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {list(TEACHER_DTYPES)}, got {self.teacher_dtype!r}")
        self.make_temperature_policy()

    def make_temperature_policy(self):
        return make_temperature_policy(
            self.temperature,
            self.temperature_init,
            self.temperature_min,
            self.temperature_max,
            self.temperature_momentum,
        )


def _load_causal_lm(model: str | PreTrainedModel, init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **(init_kwargs or {}))
    return model


def _logits_width(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _teacher_tokenizer(teacher: PreTrainedModel):
    """The tokenizer saved with the teacher, when one sits in a local folder; else None."""
    path = getattr(teacher, "name_or_path", "")
    if not path or not os.path.isdir(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def check_vocabularies(student: nn.Module, teacher: nn.Module, tokenizer) -> int:
    """The vocabulary size the losses use, after refusing pairs that do not share one tokenizer.

    Logits may be wider than the tokenizer (embeddings padded to a multiple of 8 or 64, e.g. OPT's
    50272 for 50265 tokens); both are cut to the tokenizer's size.
    """
    student_width, teacher_width = _logits_width(student), _logits_width(teacher)
    if tokenizer is None:
        return min(student_width, teacher_width)
    vocab_size = len(tokenizer)
    for name, width in (("student", student_width), ("teacher", teacher_width)):
        if width < vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the {name}'s logits have only {width}: "
                "teacher and student must share the student's tokenizer"
            )
    teacher_tokenizer = _teacher_tokenizer(teacher)
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the teacher's tokenizer ({teacher.name_or_path}) differs from the student's: token-level "
            "distillation needs one shared vocabulary"
        )
    return vocab_size


class DistillationTrainer(Trainer):
    """A `Trainer` whose loss distils a frozen teacher into the student at a scheduled temperature.

    ``model`` and ``teacher_model`` may be models or paths / hub ids (loaded with
    ``model_init_kwargs`` / ``teacher_model_init_kwargs``). With ``peft_config`` the student is
    wrapped by peft and only its adapters train.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        teacher_model: PreTrainedModel | str,
        args: DistillationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        callbacks=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig()
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
        if processing_class is None and isinstance(model, str):
            processing_class = AutoTokenizer.from_pretrained(model)
        model = _load_causal_lm(model, args.model_init_kwargs)
        teacher_model = _load_causal_lm(teacher_model, args.teacher_model_init_kwargs)
        self.vocab_size = check_vocabularies(model, teacher_model, processing_class)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if data_collator is None and processing_class is not None:
            if processing_class.pad_token is None:
                processing_class.pad_token = processing_class.eos_token
            data_collator = DataCollatorForSeq2Seq(processing_class, label_pad_token_id=IGNORE_INDEX)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        self.teacher_model = self._prepare_teacher(teacher_model)
        self.temperature_policy = args.make_temperature_policy()
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}

    def _prepare_teacher(self, teacher: PreTrainedModel) -> PreTrainedModel:
        """Frozen, in eval mode, on the student's device, in ``teacher_dtype`` if one is set."""
        teacher.requires_grad_(False)
        teacher.eval()
        dtype = TEACHER_DTYPES[self.args.teacher_dtype] if self.args.teacher_dtype else None
        return teacher.to(device=self.accelerator.device, dtype=dtype)

    # ---- the loss -------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**model_inputs, use_cache=False).logits

        common = {"vocab_size": self.vocab_size, "chunk_size": self.args.kd_chunk_size, "reduction": "sum"}
        num_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        ce_sum = causal_lm_cross_entropy(outputs.logits, labels, **common)
        with torch.no_grad():
            teacher_ce_sum = causal_lm_cross_entropy(teacher_logits, labels, **common)
        if model.training:
            temperature = self._update_temperature(ce_sum.detach(), teacher_ce_sum, num_tokens)
        else:
            temperature = self.temperature_policy.temperature
        kd_sum = distillation_loss(
            outputs.logits,
            teacher_logits,
            labels,
            divergence=self.args.kd_loss,
            temperature=temperature,
            jsd_beta=self.args.jsd_beta,
            skew_lambda=self.args.skew_lambda,
            **common,
        )

        ratio = self.args.kd_ratio
        normaliser = num_tokens if num_items_in_batch is None else num_items_in_batch
        loss = ((1.0 - ratio) * ce_sum + ratio * kd_sum) / torch.clamp(torch.as_tensor(normaliser), min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # The normaliser counts every process's tokens and DDP averages gradients over processes.
            loss = loss * self.accelerator.num_processes

        sums = self._metric_sums["train" if model.training else "eval"]
        sums["kd_loss"] += kd_sum.detach()
        sums["ce_loss"] += ce_sum.detach()
        sums["teacher_ce_loss"] += teacher_ce_sum
        sums["tokens"] += num_tokens
        sums["temperature"] += temperature
        sums["batches"] += 1
        return (loss, outputs) if return_outputs else loss

    def _update_temperature(self, ce_sum: torch.Tensor, teacher_ce_sum: torch.Tensor, num_tokens: torch.Tensor) -> float:
        """Advance the policy with this micro-batch's CE, token-averaged over all processes."""
        totals = torch.stack([ce_sum.float(), teacher_ce_sum.float(), num_tokens.float()])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        student_total, teacher_total, tokens = totals.tolist()
        tokens = max(tokens, 1.0)
        return self.temperature_policy.update(student_total / tokens, teacher_total / tokens, self._progress())

    def _progress(self) -> float:
        """p in (0, 1] for the schedule: per epoch as in the DTS reference, or per optimizer step."""
        if self.args.temperature_progress == "step":
            done, total = self.state.global_step, self.state.max_steps
        else:
            done, total = int(self.state.epoch or 0), self.state.num_train_epochs
        return min((done + 1) / max(total, 1), 1.0)

    # ---- logging ---------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the distillation metrics of the window that ``logs`` closes, then log as usual.

        Evaluation metrics are added in place, so ``trainer.evaluate()`` returns them too.
        """
        if "loss" in logs:
            logs.update(self._flush_metrics("train", prefix=""))
        elif self._metric_sums["eval"]["batches"]:
            prefix = next((k[: -len("loss")] for k in logs if k.endswith("_loss")), "eval_")
            logs.update(self._flush_metrics("eval", prefix=prefix))
        super().log(logs, start_time)

    def _flush_metrics(self, mode: str, prefix: str) -> dict[str, float]:
        sums = self._metric_sums[mode]
        if not sums["batches"]:
            return {}
        names = ["kd_loss", "ce_loss", "teacher_ce_loss", "tokens", "temperature", "batches"]
        totals = torch.tensor([float(sums[name]) for name in names], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        kd, ce, teacher_ce, tokens, temperature, batches = totals.tolist()
        sums.clear()
        tokens = max(tokens, 1.0)
        return {
            f"{prefix}kd_loss": kd / tokens,
            f"{prefix}ce_loss": ce / tokens,
            f"{prefix}teacher_ce_loss": teacher_ce / tokens,
            f"{prefix}temperature": temperature / batches,
        }

    # ---- checkpoints -------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, TEMPERATURE_STATE_NAME), "w") as f:
                json.dump(self.temperature_policy.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resume the temperature policy with the optimizer: both are training state."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, TEMPERATURE_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by DistillationTrainer")
        with open(path) as f:
            self.temperature_policy.load_state_dict(json.load(f))
