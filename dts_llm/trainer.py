"""`DistillationTrainer`: token-level KD of a causal LM from a frozen teacher.

One training step (``compute_loss``):

1. the frozen teacher runs without building a graph, in eval mode (first, so that its activations
   are gone before the student's graph is built);
2. the student runs;
3. for a policy that reads them, the student's and the teacher's cross-entropy on the response
   tokens are computed (no graph);
4. the temperature policy steps (``step(context)``) and returns T; a policy that reads the two CEs
   (DTS) gets them summed over all processes first, so every rank uses the same T, and only such a
   policy costs their pass over the logits (step 3); a learnt policy (CTKD) returns a temperature
   tensor that the loss differentiates (its parameters are in the optimizer);
5. the objective, (1 - kd_ratio) CE + kd_ratio KD at T (x T^2), is computed in one chunked fp32 pass,
   normalised by the response-token count of the whole (accumulated, all-process) batch
   (Annealing-KD's objective: an MSE to the scaled teacher logits, then CE alone).

``kd_loss``, ``ce_loss``, ``teacher_ce_loss`` (token means over the logging window, all processes)
and ``temperature`` (mean over its micro-batches; with one T per token also ``temperature_std``,
their spread) are logged next to ``loss``, and reported by evaluation with its prefix
(``eval_kd_loss``, ...). CTKD runs log ``ctkd_lambda`` too, DTS runs its rule's quantities, and with
``log_entropy`` the two distributions' mean entropy at T (one more no-grad pass over the logits).

With ``fused_head`` both models return their final hidden states and steps 3 and 5 apply their heads a chunk
of tokens at a time (`dts_llm.fused_step`): no vocabulary-sized logits.

With ``lmbda`` > 0 or ``seq_kd`` the batches of a step are first replaced by the student's or the teacher's
completions of their prompts (`dts_llm.on_policy`), which then go through the same step.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
)

from .auto_temperature import resolve_auto_temperatures
from .checkpoints import resume_checkpoint
from .config import DistillationConfig, check_training_numbers
from .data import trainer_dataset
from .entropy_log import add_entropies
from .errors import UserError
from .formats import FormatArguments
from .fused_step import fused_heads, fused_step
from .heads import CAUSAL_LM, REGRESSION, check_label_heads, collator_for, head_kind
from .launch import check_launch
from .losses import IGNORE_INDEX, regression_objective
from .metrics import WindowMetrics
from .models import pad_with_eos
from .objectives import LOGITS_PASSES, make_objective
from .on_policy import on_policy_batches
from .preflight import (
    LABEL_HELP,
    WarnOnShortSchedules,
    check_resumed_temperature,
    check_teacher_tokenizer,
    check_training_columns,
    check_vocabularies,
)
from .teacher import prepare_teacher
from .teacher_cache import CACHE_COLUMNS, TeacherCache, cache_column, open_cached_teacher
from .temperature import TemperatureContext

# DistillationConfig and check_training_numbers live in dts_llm.config; still importable from here.
__all__ = ["DistillationConfig", "DistillationTrainer", "check_resumed_temperature", "check_training_numbers"]

logger = logging.getLogger(__name__)


def _load_causal_lm(model: str | PreTrainedModel, init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **(init_kwargs or {}))
    return model


def _check_teacher(head: str, student: nn.Module, teacher: nn.Module, tokenizer) -> int:
    """The vocabulary (or label) count the loss scores, after refusing a teacher that predicts something else."""
    if head == CAUSAL_LM:
        return check_vocabularies(student, teacher, tokenizer)
    check_teacher_tokenizer(teacher, tokenizer)
    return check_label_heads(student, teacher)


class _ClearTemperatureGradients(TrainerCallback):
    """The Trainer clears the model's gradients after each optimizer step; this clears a learnt
    temperature's, which live outside the model."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.policy.zero_grad(set_to_none=True)


class DistillationTrainer(Trainer):
    """A `Trainer` whose loss distils a frozen teacher into the student at a scheduled temperature.

    ``model`` and ``teacher_model`` may be models or paths / hub ids of causal LMs (loaded with
    ``model_init_kwargs`` / ``teacher_model_init_kwargs``), or sequence-classification models
    (`dts_llm.heads`: class logits distilled at the temperature, a regression score by MSE). With
    ``peft_config`` the student is wrapped by peft and only its adapters train. With ``teacher_cache`` (a
    folder written by `dts-llm cache-teacher`, or ``args.teacher_cache``) instead of ``teacher_model``, the
    teacher is read from the cache (`dts_llm.teacher_cache`) and never loaded.

    With ``processing_class``, a causal LM's datasets may be untokenised records in any format `dts_llm.formats`
    reads, as TRL's trainers take them, rendered and cut as ``data_args`` (a `FormatArguments`) says.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        callbacks=None,
        peft_config=None,
        teacher_cache: str | TeacherCache | None = None,
        data_args: FormatArguments | None = None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig()
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
        # A model given by path is loaded as a causal LM; a model object says its own kind, once.
        self.head = CAUSAL_LM if isinstance(model, str) else head_kind(model)
        if self.head == CAUSAL_LM and processing_class is not None:
            train_dataset = trainer_dataset(train_dataset, "train_dataset", processing_class, data_args)
            eval_dataset = trainer_dataset(eval_dataset, "eval_dataset", processing_class, data_args)
        check_training_columns(train_dataset, "train_dataset", self.head)
        check_training_columns(eval_dataset, "eval_dataset", self.head)
        if processing_class is None and isinstance(model, str):
            processing_class = AutoTokenizer.from_pretrained(model)
        model = _load_causal_lm(model, args.model_init_kwargs)
        teacher_cache = teacher_cache if teacher_cache is not None else args.teacher_cache
        if (teacher_model is None) == (teacher_cache is None):
            raise UserError("DistillationTrainer needs one teacher: a teacher_model or a teacher_cache")
        self.cached_teacher = None
        if teacher_cache is not None:
            if self.head != CAUSAL_LM:
                raise UserError("a teacher cache holds a causal LM's predictions: distil a classifier from its model")
            self.cached_teacher = open_cached_teacher(teacher_cache, model, processing_class, args)
            self.vocab_size = self.cached_teacher.vocab_size
            train_dataset = self.cached_teacher.index(train_dataset, "train")
            eval_dataset = self.cached_teacher.index(eval_dataset, "validation")
        else:
            teacher_model = _load_causal_lm(teacher_model, args.teacher_model_init_kwargs)
            self.vocab_size = _check_teacher(self.head, model, teacher_model, processing_class)
        if self.head == REGRESSION and args.temperature_policy != "constant":
            logger.warning(
                "A regression head is distilled without a temperature: temperature_policy=%s has no effect.",
                args.temperature_policy,
            )
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if data_collator is None and processing_class is not None:
            data_collator = collator_for(self.head, pad_with_eos(processing_class))

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
        # Our loss consumes `num_items_in_batch` whatever the model's forward accepts, and counts
        # tokens on the shifted labels (a causal LM's) or the labels themselves (one per example):
        # tell the Trainer, so it counts (and scales) the same way.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = self.head == CAUSAL_LM
        check_launch(self.accelerator)
        self.teacher_model = teacher_model and prepare_teacher(teacher_model, self.accelerator, args.teacher_dtype)
        resolve_auto_temperatures(
            args, self.head, self.teacher_model, train_dataset, self.data_collator, self.vocab_size, self.accelerator
        )
        self.temperature_policy = args.make_temperature_policy().to(args.device)
        self.fused_heads = fused_heads(args, self.head, model, teacher_model, self.cached_teacher, self.accelerator)
        self.objective = make_objective(args, self.temperature_policy, self.fused_heads)
        self.passes = self.fused_heads or LOGITS_PASSES  # the no-grad passes over the logits or hidden states
        self.learns_temperature = any(True for _ in self.temperature_policy.parameters())
        if self.learns_temperature:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise UserError(
                    f"temperature_policy={args.temperature_policy} learns its temperature in the trainer's optimizer, "
                    "which DeepSpeed and FSDP build from the student's parameters alone: use DDP or one process"
                )
            self.add_callback(_ClearTemperatureGradients(self.temperature_policy))
        self.add_callback(WarnOnShortSchedules())
        self.on_policy = on_policy_batches(args, self.head, self.cached_teacher, processing_class, self.accelerator)
        self.metrics = WindowMetrics(args.log_entropy)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the data columns the teacher's forward takes too: a DistilBERT student has no
        ``token_type_ids``, but its BERT teacher needs them to tell the two sentences of a pair apart."""
        super()._set_signature_columns_if_needed()
        if self.cached_teacher is not None:
            self._signature_columns.extend(CACHE_COLUMNS.values())
            return
        teacher = getattr(self.teacher_model, "module", self.teacher_model)  # a DeepSpeed engine's model
        for name in inspect.signature(teacher.forward).parameters:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """A step's batches, generated ones in place (on-policy or sequence-level KD), before their tokens are
        counted."""
        if self.on_policy is not None:
            step = self.state.global_step
            epoch_iterator = self.on_policy.replaced(epoch_iterator, step, self.model, self.teacher_model)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    # ---- a learnt temperature's optimisation ----------------------------------------------------

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, plus a CTKD temperature's parameters as their own group (own
        learning rate, no weight decay; the learning-rate schedule scales it like the others)."""
        optimizer = super().create_optimizer(model)
        if self.learns_temperature:
            parameters = list(self.temperature_policy.parameters())
            present = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not present.intersection(map(id, parameters)):
                optimizer.add_param_group(
                    {"params": parameters, "lr": self.args.ctkd_learning_rate, "weight_decay": 0.0}
                )
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Average a learnt temperature's gradients over processes, as DDP does the model's.

        Done after every micro-batch: averaging is linear, so the accumulated sum is still right.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.learns_temperature and self.accelerator.num_processes > 1:
            for parameter in self.temperature_policy.parameters():
                if parameter.grad is None:  # no response token here: still take part in the collective
                    parameter.grad = torch.zeros_like(parameter)
                parameter.grad.copy_(self.accelerator.reduce(parameter.grad, reduction="mean"))
        return loss

    # ---- the loss -------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise UserError(
                f"a batch without labels reached the distillation loss (it has {sorted(inputs)}): {LABEL_HELP}"
            )
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        cached_rows = cache_column(model_inputs)
        if self.head == CAUSAL_LM:
            model_inputs["use_cache"] = False
        # With fused_head the models' `logits` are hidden states, and a head ZeRO-3 or FSDP2 partitions is
        # gathered once for the step.
        with fused_step(self.fused_heads):
            teacher_ce_sum = None
            with torch.no_grad(), self.accelerator.autocast():
                if self.cached_teacher is None:
                    teacher_logits = self.teacher_model(**model_inputs).logits
                elif cached_rows is None:
                    raise UserError(
                        f"a batch without its teacher cache index reached the loss (it has {sorted(inputs)})"
                    )
                else:
                    teacher_logits, teacher_ce_sum = self.cached_teacher.batch(*cached_rows, labels)
            outputs = model(**model_inputs)

            if self.head == REGRESSION:
                terms, teacher_ce_sum, num_tokens = self._regression_terms(outputs.logits, teacher_logits, labels)
                temperature = None
            else:
                terms, teacher_ce_sum, num_tokens, temperature = self._distillation_terms(
                    outputs.logits, teacher_logits, labels, model.training, teacher_ce_sum
                )
            normaliser = num_tokens if num_items_in_batch is None else num_items_in_batch
            loss = terms.loss / torch.clamp(torch.as_tensor(normaliser, device=terms.loss.device), min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # The normaliser counts every process's tokens and DDP averages gradients over processes.
                loss = loss * self.accelerator.num_processes

            mode = "train" if model.training else "eval"
            sums = self.metrics.add(mode, terms, teacher_ce_sum, num_tokens, temperature)
            shift = self._loss_shifts_labels
            add_entropies(
                sums, self.args, outputs.logits, teacher_logits, labels, temperature, self.vocab_size, shift,
                self.passes.tempered_entropies,
            )  # fmt: skip
        if return_outputs and self.fused_heads:
            outputs = {}  # no logits to return: evaluation predicts nothing
        return (loss, outputs) if return_outputs else loss

    def _distillation_terms(self, student_logits, teacher_logits, labels, training: bool, teacher_ce_sum=None):
        """Summed objective over the scored labels, the teacher's CE sum (given by a cached teacher), their
        count and T.

        Scored labels are a causal LM's response tokens (next position) or a classifier's labels.
        The policy reads what it needs from the context: only one that reads the two CEs (DTS) costs
        a pass over the logits before the loss; otherwise the loss's own pass reports both.
        """
        shift = self.head == CAUSAL_LM
        sizes = {"vocab_size": self.vocab_size, "chunk_size": self.args.kd_chunk_size, "shift_labels": shift}
        num_tokens = ((labels[:, 1:] if shift else labels) != IGNORE_INDEX).sum()
        sums = {}

        def cross_entropies():
            with torch.no_grad():
                teacher = teacher_logits if teacher_ce_sum is None else None
                sums["student"], teacher_sum = self.passes.cross_entropy_sums(student_logits, teacher, labels, **sizes)
                sums["teacher"] = teacher_ce_sum if teacher_sum is None else teacher_sum
            return self._mean_cross_entropies(sums["student"], sums["teacher"], num_tokens)

        context = TemperatureContext(
            epoch=float(self.state.epoch or 0.0),
            progress=self._progress,
            cross_entropies=cross_entropies,
            features=lambda: self.passes.token_features(student_logits, teacher_logits, labels, **sizes),
            token_cross_entropies=lambda: self.passes.token_cross_entropies(
                student_logits, teacher_logits, labels, **sizes
            ),
        )
        policy = self.temperature_policy
        temperature = policy.step(context) if training else policy.current(context)
        teacher_ce_sum = sums.get("teacher", teacher_ce_sum)
        common = {"labels": labels, "reduction": "sum", "teacher_cross_entropy": teacher_ce_sum is None, **sizes}
        terms = self.objective(student_logits, teacher_logits, temperature, **common)
        return terms, terms.teacher_ce if teacher_ce_sum is None else teacher_ce_sum, num_tokens, temperature

    def _regression_terms(self, student_scores, teacher_scores, labels):
        """Summed (1 - r) MSE to the labels + r MSE to the teacher, the teacher's own MSE sum, and the
        example count; ``ce_loss`` / ``teacher_ce_loss`` then log mean squared errors."""
        student_scores, teacher_scores = student_scores.squeeze(-1), teacher_scores.squeeze(-1)
        terms = regression_objective(
            student_scores, teacher_scores, labels, kd_ratio=self.args.kd_ratio, reduction="sum"
        )
        teacher_error = (teacher_scores.float() - labels.float()).square().sum()
        return terms, teacher_error, torch.tensor(labels.numel(), device=labels.device)

    def _mean_cross_entropies(self, ce_sum, teacher_ce_sum, num_tokens) -> tuple[float, float] | None:
        """This micro-batch's student and teacher CE, token-averaged over all processes (collective);
        None when no process has a response token."""
        totals = self._sum_over_processes(torch.stack([ce_sum.float(), teacher_ce_sum.float(), num_tokens.float()]))
        student_total, teacher_total, tokens = totals.tolist()
        if tokens == 0:
            return None
        return student_total / tokens, teacher_total / tokens

    def _progress(self) -> float:
        """p in [0, 1] for the schedule: per optimizer step, 0 at the first and 1 at the last, or per
        epoch as in the DTS reference, (epoch + 1) / epochs for the 0-based epoch."""
        if self.args.temperature_progress == "step":
            return min(self.state.global_step / max(self.state.max_steps - 1, 1), 1.0)
        return min((int(self.state.epoch or 0) + 1) / max(self.state.num_train_epochs, 1), 1.0)

    # ---- metrics -----------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Train, or resume from a checkpoint folder or (True, "true", "last") the latest complete one
        in ``output_dir``, after checking that it ran the temperature policy this run asks for."""
        checkpoint = resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_resumed_temperature(checkpoint, self.args)
        self.metrics.clear("train")
        return super().train(checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the distillation metrics of the training window that ``logs`` closes."""
        if "loss" in logs:
            logs.update(self.metrics.flush("train", "", self.args.device, self._sum_over_processes))
            logs.update(self.temperature_policy.logged_values(float(self.state.epoch or 0.0)))
            if self.on_policy is not None:
                logs.update(self.on_policy.flush_metrics(self._sum_over_processes))
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Evaluate or predict, and report the distillation metrics under the loop's key prefix."""
        self.metrics.clear("eval")
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix=metric_key_prefix
        )
        prefix = f"{metric_key_prefix}_"
        output.metrics.update(self.metrics.flush("eval", prefix, self.args.device, self._sum_over_processes))
        return output

    def _sum_over_processes(self, totals: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(totals, reduction="sum") if self.accelerator.num_processes > 1 else totals

    # ---- checkpoints -------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Save the temperature policy with the optimizer: both are training state (a learnt
        temperature's optimizer moments are in the optimizer), with the settings that decide its trajectory."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            self.temperature_policy.save(output_dir, self.args.temperature_settings())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.temperature_policy.load(checkpoint, self.args.device)
