"""The trainer's ``fused_head`` step: the models give their final hidden states, the loss applies their heads.

Each model's output head (``get_output_embeddings``, a tied input embedding included) is made to pass
its input through for the step's forward passes, so a model's ``logits`` are then its final hidden
states (after the final norm) and no B x L x V tensor is made; the objective and DTS's cross-entropies
then project them a chunk of rows at a time (`dts_llm.losses.fused`). The forward passes still go
through the wrappers (DDP, peft), so their hooks run as usual; the head's weight gets its gradient
from the loss, once, tied or not, and none when it is frozen (a LoRA student's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from .errors import UserError
from .losses.fused import OutputHead, fused_cross_entropies, fused_distillation_objective
from .losses.objectives import DistillationTerms

# Config fields of models whose logits are not their head's output (a soft cap, a scale after the head).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: nn.Module, role: str) -> nn.Linear:
    """``model``'s output head, after refusing one the fused loss cannot apply in its place."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise UserError(
            f"fused_head needs the {role}'s output head to be a plain linear layer (the loss applies it), got "
            f"{type(head).__name__}: leave fused_head off (a peft adapter on lm_head, or no causal-LM head)"
        )
    config = getattr(model, "config", None)
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        raise UserError(f"fused_head: the {role} changes its logits after its head ({', '.join(transforms)})")
    return head


def _pass_through(hidden: Tensor) -> Tensor:
    return hidden


class FusedHeads:
    """The student's and the teacher's heads (no teacher head: a cached teacher applies its own), switched
    off for the forward passes and applied by the loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        self.student = output_head(student, "student")
        self.teacher = None if teacher is None else output_head(teacher, "teacher")

    @contextlib.contextmanager
    def hidden_states(self) -> Iterator[None]:
        """Inside, each head returns its input: the models' ``logits`` are their final hidden states."""
        heads = [head for head in (self.student, self.teacher) if head is not None]
        for head in heads:
            head.forward = _pass_through  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            for head in heads:
                del head.forward

    def _heads(self, teacher_hidden) -> tuple[OutputHead, OutputHead | None]:
        teacher = None if teacher_hidden is None else OutputHead(self.teacher.weight, self.teacher.bias)
        return OutputHead(self.student.weight, self.student.bias), teacher

    def objective(
        self, student_hidden: Tensor, teacher_hidden: Tensor, labels: Tensor, **settings
    ) -> DistillationTerms:
        """``distillation_objective``'s terms from the hidden states (its keyword arguments)."""
        student, teacher = self._heads(teacher_hidden)
        return fused_distillation_objective(student_hidden, student, teacher_hidden, teacher, labels, **settings)

    def cross_entropy_sums(
        self, student_hidden: Tensor, teacher_hidden: Tensor | None, labels: Tensor, **sizes
    ) -> tuple[Tensor, Tensor | None]:
        """The student's and (given its hidden states) the teacher's CE summed over the scored tokens."""
        student, teacher = self._heads(teacher_hidden)
        return fused_cross_entropies(student_hidden, student, teacher_hidden, teacher, labels, **sizes)
