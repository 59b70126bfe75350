"""`DistillationConfig`: `TrainingArguments` plus the distillation settings, each range checked here,
before any model loads.

Two fields were renamed in 0.2 and are still read, with a warning, under their old names:
``temperature`` (the policy's name, not a temperature) is ``temperature_policy``, and ``kd_loss``
(also a logged value) is ``divergence``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .errors import UserError
from .losses import DIVERGENCES, check_kd_ratio, divergence_terms
from .teacher import TEACHER_DTYPES
from .temperature import (
    DTS_POLICIES,
    POLICY_SETTINGS,
    TEMPERATURE_POLICIES,
    TemperaturePolicy,
    check_annealing_settings,
    check_constant_temperature,
    check_ctkd_settings,
    check_hidden_size,
    check_momentum,
    check_temperature_range,
    make_temperature_policy,
)

# Why generated completions and a teacher cache do not mix.
CACHE_CANNOT_SCORE = (
    "a teacher cache holds the teacher's predictions on the dataset's responses only and cannot score generated "
    "completions: distil from a teacher model, or set lmbda=0 and seq_kd=false"
)

# `auto` bounds, measured from the teacher before training (dts_llm.auto_temperature): the policies that read
# each field, and how many training examples the measurement reads.
AUTO = "auto"
AUTO_FIELDS = {
    "temperature_min": ("cosine", *DTS_POLICIES, "adakd"),
    "temperature_max": ("cosine", *DTS_POLICIES, "adakd", "annealing"),
    "temperature_init": (*DTS_POLICIES, "adakd"),
}


def float_or_auto(text: str) -> float | str:
    """A command-line value of a field that takes a number or `auto`."""
    return AUTO if text == AUTO else float(text)


# Old field name -> new one; the old names are read, with a FutureWarning, until the next release.
RENAMED_FIELDS = {"temperature": "temperature_policy", "kd_loss": "divergence"}


def renamed_field_warning(old: str, where: str = "") -> str:
    """The deprecation message for the old field name ``old``."""
    return f"{where}{old} is deprecated: it is now {RENAMED_FIELDS[old]}; {old} stops working in the next release"


def _is_number(value) -> bool:
    """Whether ``value`` reads as a number: a TRL user's ``temperature=0.9`` (or ``--temperature 0.9``)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# Fields that TrainingArguments accepts whatever their value, and torch refuses (or the run ignores) only later.
_TRAINING_RANGES = {
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, ">= 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
}


def check_training_numbers(training_args) -> None:
    """Refuse out-of-range optimisation settings before any model loads."""
    for name, (valid, requirement) in _TRAINING_RANGES.items():
        value = getattr(training_args, name)
        if not valid(value):
            raise UserError(f"{name} must be {requirement}, got {value}")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UserError(
            f"num_train_epochs is {training_args.num_train_epochs} and max_steps is unset: the run would train nothing"
        )


@dataclass
class DistillationConfig(TrainingArguments):
    """`TrainingArguments` plus the distillation knobs; invalid values fail here, before training."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "teacher_model_init_kwargs"]

    divergence: str = field(
        default="forward_kl",
        metadata={"help": "Divergence between teacher and student token distributions.", "choices": list(DIVERGENCES)},
    )
    kd_ratio: float = field(default=0.5, metadata={"help": "loss = (1 - kd_ratio) * CE + kd_ratio * KD."})
    temperature_policy: str = field(
        default="dts",
        metadata={
            "help": "How T moves: constant T, cosine annealing, DTS (and its variants), AdaKD per token, "
            "Annealing-KD, CTKD (global or per token).",
            "choices": list(TEMPERATURE_POLICIES),
        },
    )
    temperature_init: float | str = field(
        default=3.0,
        metadata={"help": "T of `constant`; T_init of `dts` (`auto`: the measured temperature_max); of `ctkd*`."},
    )
    temperature_min: float | str = field(
        default=1.0,
        metadata={"help": "Lower clamp of `dts`, end of `cosine`; `auto`: measured from the teacher."},
    )
    temperature_max: float | str = field(
        default=3.0,
        metadata={"help": "Upper clamp of `dts`, start of `cosine`, T_max of `annealing`; `auto`: measured."},
    )
    auto_temperature_examples: int = field(
        default=256,
        metadata={"help": "`auto` temperature bounds: the training examples the teacher is measured on."},
    )
    temperature_momentum: float = field(default=0.9, metadata={"help": "Momentum of the `dts` moving average."})
    temperature_progress: str = field(
        default="step",
        metadata={
            "help": "Progress p fed to the schedule: `step` = step / (max_steps - 1), 0 to 1 over the run; "
            "`epoch` = (epoch + 1) / epochs, the DTS reference (1 throughout a run of one epoch or less).",
            "choices": ["step", "epoch"],
        },
    )
    annealing_fraction: float = field(
        default=0.5,
        metadata={"help": "Share of training in Annealing-KD's first (logit-matching) phase; CE after it."},
    )
    ctkd_t_start: float = field(
        default=1.0, metadata={"help": "CTKD: T = ctkd_t_start + ctkd_t_range * sigmoid(theta)."}
    )
    ctkd_t_range: float = field(default=20.0, metadata={"help": "CTKD: the span of the learnt temperature."})
    ctkd_lambda_max: float = field(default=1.0, metadata={"help": "CTKD: final weight of the reversed gradient."})
    ctkd_lambda_epochs: float = field(
        default=10.0, metadata={"help": "CTKD: (fractional) epochs over which the weight rises from 0 (cosine)."}
    )
    ctkd_learning_rate: float = field(
        default=1e-3, metadata={"help": "CTKD: learning rate of the temperature's parameters."}
    )
    ctkd_hidden_size: int = field(default=64, metadata={"help": "CTKD instance temperature: width of its MLP."})
    jsd_beta: float = field(
        default=0.5, metadata={"help": "Mixture weight of `jsd` (0 = forward KL, 1 = reverse KL)."}
    )
    skew_lambda: float = field(default=0.1, metadata={"help": "Skew weight of `skew_forward_kl` / `skew_reverse_kl`."})
    teacher_temperature_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Decoupled temperatures: the teacher's distribution at this ratio x T, the student's at the "
            "policy's T (1: one T for both); the KD term is scaled by the student's T^2."
        },
    )
    log_entropy: bool = field(
        default=False,
        metadata={
            "help": "Also log `teacher_entropy` and `student_entropy`, each distribution's mean entropy at T on the "
            "response tokens (one extra no-grad pass over the logits; not for a compact teacher cache)."
        },
    )
    kd_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Response tokens per fp32 chunk of the loss; default: at most 16 chunks of >= 16 MiB."},
    )
    fused_head: bool = field(
        default=False,
        metadata={
            "help": "Run the models without their output heads and apply the heads inside the loss, a chunk of "
            "tokens at a time: no vocabulary-sized logits in memory (see docs/fused-head.md)."
        },
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when the student is a path or hub id."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when the teacher is a path or hub id."},
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Cast the teacher to this dtype (e.g. bfloat16) to save memory (see the README for ZeRO-3).",
            "choices": list(TEACHER_DTYPES),
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "A teacher cache folder: `dts-llm cache-teacher` writes it there, `dts-llm distill` reads the "
            "teacher from it instead of running one (see docs/teacher-cache.md)."
        },
    )
    teacher_cache_kind: str = field(
        default="exact",
        metadata={
            "help": "cache-teacher: `exact` (the teacher's final hidden states; any T) or `compact` (top-k logits "
            "and an exact normaliser over a temperature range).",
            "choices": ["exact", "compact"],
        },
    )
    teacher_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "cache-teacher, exact kind: dtype of the stored hidden states (auto: the teacher's).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    teacher_cache_top_k: int = field(default=128, metadata={"help": "cache-teacher, compact kind: tokens kept."})
    teacher_cache_temperature_min: float | None = field(
        default=None,
        metadata={"help": "cache-teacher, compact kind: lowest T served (default: the policy's lowest)."},
    )
    teacher_cache_temperature_max: float | None = field(
        default=None,
        metadata={"help": "cache-teacher, compact kind: highest T served (default: the policy's highest)."},
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy share: the probability that a training batch's responses are replaced by the "
            "student's own completions of its prompts (GKD's lmbda; 0 = off-policy, the dataset's responses)."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD: replace the responses of the batches the student does not complete by "
            "the teacher's completions of their prompts."
        },
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "On-policy and sequence-level KD: the most tokens a completion has."}
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of the completions (student's or teacher's). Not the distillation "
            "temperature T, which the temperature policy sets for the loss."
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the completions (1 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the completions (0 = off)."})
    temperature: str | None = field(default=None, metadata={"help": "Deprecated: use temperature_policy."})
    kd_loss: str | None = field(default=None, metadata={"help": "Deprecated: use divergence."})

    def __post_init__(self):
        self._adopt_renamed_fields()
        super().__post_init__()
        check_training_numbers(self)
        self._check_loss_settings()
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size must be >= 1, got {self.kd_chunk_size}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {list(TEACHER_DTYPES)}, got {self.teacher_dtype!r}")
        self._check_temperature_settings()
        self._check_generation_settings()
        self._check_teacher_temperature_ratio()

    def _check_teacher_temperature_ratio(self) -> None:
        """Decoupled temperatures apply to a divergence at T: not to Annealing-KD's MSE or a learnt T."""
        ratio = self.teacher_temperature_ratio
        if not ratio > 0:
            raise ValueError(f"teacher_temperature_ratio must be > 0, got {ratio}")
        if ratio != 1.0 and self.temperature_policy in ("annealing", "ctkd", "ctkd_instance"):
            raise ValueError(
                f"teacher_temperature_ratio ({ratio}) must be 1 with temperature_policy={self.temperature_policy}: "
                "it decouples a scheduled temperature"
            )

    def _adopt_renamed_fields(self) -> None:
        """Move a value given under an old field name to the new one, with a warning."""
        if self.temperature is not None and _is_number(self.temperature):
            raise ValueError(
                f"temperature names the temperature policy (now temperature_policy), got {self.temperature!r}: for a "
                f"fixed T set temperature_policy='constant' and temperature_init={float(self.temperature):g}"
            )
        for old, new in RENAMED_FIELDS.items():
            if getattr(self, old) is not None:
                warnings.warn(renamed_field_warning(old), FutureWarning, stacklevel=4)
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)

    def _check_loss_settings(self) -> None:
        check_kd_ratio(self.kd_ratio)
        divergence_terms(self.divergence, self.jsd_beta, self.skew_lambda)  # the name and its weight's range

    @property
    def generates(self) -> bool:
        """Whether training batches may be replaced by generated completions (on-policy or sequence-level KD)."""
        return self.lmbda > 0 or self.seq_kd

    def _check_generation_settings(self) -> None:
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.generation_temperature > 0:
            raise ValueError(f"generation_temperature must be > 0, got {self.generation_temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.generates and self.teacher_cache is not None:
            raise ValueError(f"lmbda={self.lmbda}, seq_kd={self.seq_kd}: {CACHE_CANNOT_SCORE}")
        if self.lmbda > 0 and self.kd_ratio < 1 and self.temperature_policy != "annealing":  # it sets its own mix
            warnings.warn(
                f"lmbda={self.lmbda} with kd_ratio={self.kd_ratio}: on the student's own completions the CE term "
                "trains the student on its own samples; on-policy distillation (GKD) minimises the divergence "
                "alone: kd_ratio 1",
                UserWarning,
                stacklevel=4,
            )

    @property
    def auto_temperature_fields(self) -> list[str]:
        """The temperature fields set to `auto`, to be measured from the teacher before training."""
        return [name for name in AUTO_FIELDS if getattr(self, name) == AUTO]

    def resolve_auto_temperatures(self, temperature_min: float, temperature_max: float) -> None:
        """Set the `auto` fields from the measured range (temperature_init: the run's temperature_max), then
        check the settings as for numbers given by hand."""
        fields = self.auto_temperature_fields
        for name, value in (("temperature_min", temperature_min), ("temperature_max", temperature_max)):
            if name in fields:
                setattr(self, name, value)
        if "temperature_init" in fields:
            self.temperature_init = self.temperature_max
        try:
            self._check_temperature_settings()
        except ValueError as error:
            raise ValueError(f"{', '.join(fields)} measured as auto: {error}") from None

    def _check_auto_temperatures(self) -> None:
        """`auto` only where the policy reads the field, with a teacher to measure and enough examples."""
        for name in self.auto_temperature_fields:
            if self.temperature_policy not in AUTO_FIELDS[name]:
                raise ValueError(
                    f"{name}: auto is measured for the policies {', '.join(AUTO_FIELDS[name])}, "
                    f"not temperature_policy={self.temperature_policy}"
                )
            if self.teacher_cache is not None:
                raise ValueError(
                    f"{name}: auto measures the teacher, which a teacher cache replaces: run `dts-llm teacher-report "
                    "--recipe RECIPE` with the teacher and write the recommended range in the recipe"
                )
        if self.auto_temperature_examples < 1:
            raise ValueError(f"auto_temperature_examples must be >= 1, got {self.auto_temperature_examples}")
        for name in AUTO_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value != AUTO:
                raise ValueError(f"{name} must be a number or auto, got {value!r}")

    def _check_temperature_settings(self) -> None:
        """Check the fields the chosen policy reads (each error names its field); with `auto` fields, the
        ranges are checked once they are measured."""
        policy = self.temperature_policy
        if policy not in TEMPERATURE_POLICIES:
            raise ValueError(f"temperature_policy must be one of {TEMPERATURE_POLICIES}, got {policy!r}")
        if self.temperature_progress not in ("epoch", "step"):
            raise ValueError(f"temperature_progress must be 'epoch' or 'step', got {self.temperature_progress!r}")
        if not self.ctkd_learning_rate > 0:
            raise ValueError(f"ctkd_learning_rate must be > 0, got {self.ctkd_learning_rate}")
        self._check_auto_temperatures()
        if self.auto_temperature_fields:
            return
        if policy == "constant":
            check_constant_temperature(self.temperature_init)
        elif policy == "cosine":
            check_temperature_range(self.temperature_min, self.temperature_max)
        elif policy in DTS_POLICIES:
            check_temperature_range(self.temperature_min, self.temperature_max, self.temperature_init)
            check_momentum(self.temperature_momentum)
        elif policy == "adakd":
            check_temperature_range(self.temperature_min, self.temperature_max, self.temperature_init)
        elif policy == "annealing":
            check_annealing_settings(self.temperature_max, self.annealing_fraction)
        else:
            check_ctkd_settings(
                self.temperature_init,
                self.ctkd_t_start,
                self.ctkd_t_range,
                self.ctkd_lambda_max,
                self.ctkd_lambda_epochs,
            )
            if policy == "ctkd_instance":
                check_hidden_size(self.ctkd_hidden_size)

    def make_temperature_policy(self) -> TemperaturePolicy:
        return make_temperature_policy(
            self.temperature_policy,
            temperature_init=self.temperature_init,
            temperature_min=self.temperature_min,
            temperature_max=self.temperature_max,
            temperature_momentum=self.temperature_momentum,
            annealing_fraction=self.annealing_fraction,
            ctkd_t_start=self.ctkd_t_start,
            ctkd_t_range=self.ctkd_t_range,
            ctkd_lambda_max=self.ctkd_lambda_max,
            ctkd_lambda_epochs=self.ctkd_lambda_epochs,
            ctkd_hidden_size=self.ctkd_hidden_size,
        )

    def temperature_bounds(self) -> tuple[float, float]:
        """The lowest and highest temperature the policy can produce."""
        policy = self.temperature_policy
        if policy == "constant":
            return self.temperature_init, self.temperature_init
        if policy == "annealing":
            return 1.0, self.temperature_max
        if policy.startswith("ctkd"):
            return self.ctkd_t_start, self.ctkd_t_start + self.ctkd_t_range
        return self.temperature_min, self.temperature_max

    def temperature_settings(self) -> dict[str, Any]:
        """The policy and the fields that decide its trajectory: saved with checkpoints, compared on resume."""
        policy = self.temperature_policy
        return {"temperature_policy": policy, **{name: getattr(self, name) for name in POLICY_SETTINGS[policy]}}
