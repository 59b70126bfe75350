"""The task a run trains on, chosen once from the recipe: an instruction LM or a GLUE task.

A task supplies everything that differs between them: the data reader, the collator, the model class (and
its head), peft's task type and whether the loss shifts the labels (a causal LM predicts the next token; a
classifier's label is the example's). ``task_for(data_args)`` picks it; the commands ask it, not the
arguments. (``dts_llm.heads`` tells a model's kind from a model object, for models passed from Python.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .data import DataArguments, load_instruction_data
from .errors import UserError
from .glue import GlueTask, glue_task, load_glue_data
from .heads import CAUSAL_LM, CLASSIFICATION, REGRESSION, collator_for
from .models import load_model


@dataclass
class TrainingData:
    """Tokenised train and evaluation data (one dataset, or ``{split: dataset}`` for several), the counts
    of what was read, dropped and cut, and for instruction data how it was rendered (``template``: minillm
    or chat; ``chat_template``: the Jinja)."""

    train: datasets.Dataset
    evaluation: datasets.Dataset | dict[str, datasets.Dataset] | None
    report: dict
    template: str | None = None
    chat_template: str | None = None


class Task:
    """What a kind of task supplies; see the module's docstring."""

    kind: str  # dts_llm.heads.CAUSAL_LM, CLASSIFICATION or REGRESSION
    description: str
    model_class: type
    peft_task_type: str

    @property
    def shifts_labels(self) -> bool:
        """Whether a token's label is the next token's id (a causal LM), not its example's label."""
        return self.kind == CAUSAL_LM

    def head_config(self) -> dict:
        """``from_pretrained`` options that size a new head for the task; none for a causal LM."""
        return {}

    def collator(self, tokenizer):
        return collator_for(self.kind, tokenizer)

    def load_data(self, data_args: DataArguments, tokenizer) -> TrainingData:
        raise NotImplementedError

    def load_model(
        self, path: str, dtype, trust_remote_code: bool = False, init_kwargs: dict | None = None, new_head=True
    ):
        """The task's model from ``path``; ``new_head=False`` keeps the head a classifier was saved with (a
        teacher: the trainer checks its labels against the student's). ``init_kwargs`` override."""
        head = self.head_config() if new_head else {}
        return load_model(path, self.model_class, dtype, trust_remote_code, **head, **(init_kwargs or {}))


class InstructionTask(Task):
    """Responses to instructions, learned token by token by a causal LM (``dts_llm.data``)."""

    kind = CAUSAL_LM
    description = "causal LM"
    model_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def load_data(self, data_args: DataArguments, tokenizer) -> TrainingData:
        data = load_instruction_data(data_args, tokenizer)
        return TrainingData(data.train, data.validation, data.report, data.template, data.chat_template)


@dataclass(frozen=True)
class GlueClassificationTask(Task):
    """A GLUE task, learned by a sequence-classification head (one output for STS-B's regression)."""

    glue: GlueTask
    description = "sequence classifier"
    model_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"

    @property
    def kind(self) -> str:
        return REGRESSION if self.glue.is_regression else CLASSIFICATION

    def head_config(self) -> dict:
        return self.glue.head_config()

    def load_data(self, data_args: DataArguments, tokenizer) -> TrainingData:
        data = load_glue_data(
            self.glue,
            data_args.dataset,
            self.eval_sources(data_args),
            tokenizer,
            data_args.max_length,
            data_args.data_cache_dir,
        )
        evaluation = data.evaluation if len(data.evaluation) > 1 else next(iter(data.evaluation.values()), None)
        return TrainingData(data.train, evaluation, data.report)

    def eval_sources(self, data_args: DataArguments) -> dict[str, str] | None:
        """``load_glue_data``'s evaluation sources: ``validation_file`` for every evaluation split, or
        None (all of them from ``dataset``, a folder or hub id), or none when ``dataset`` is one file."""
        if data_args.validation_file is None:
            return {} if Path(data_args.dataset).is_file() else None
        if len(self.glue.eval_splits) > 1 and Path(data_args.validation_file).is_file():
            raise UserError(
                f"validation_file: GLUE {self.glue.name} has the evaluation splits {list(self.glue.eval_splits)}; "
                "give the folder that holds them, not one file"
            )
        return dict.fromkeys(self.glue.eval_splits, data_args.validation_file)


INSTRUCTION = InstructionTask()


def task_for(data_args: DataArguments) -> Task:
    """The recipe's task: GLUE when it names a ``glue_task``, else instruction data."""
    return INSTRUCTION if data_args.glue_task is None else GlueClassificationTask(glue_task(data_args.glue_task))
