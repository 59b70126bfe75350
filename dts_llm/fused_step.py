"""The trainer's ``fused_head`` step: the models give their final hidden states, the loss applies their heads.

Each model's output head (``get_output_embeddings``, a tied input embedding included) is made to pass
its input through for the step's forward passes, so a model's ``logits`` are then its final hidden
states (after the final norm) and no B x L x V tensor is made; the objective and the no-grad passes the
policies read (DTS's cross-entropies, token features, entropies) then project them a chunk of rows at a
time (`dts_llm.losses.fused`). The forward passes still go through the wrappers (DDP, peft, FSDP), so
their hooks run as usual; the head's weight gets its gradient from the loss, once, tied or not, and none
when it is frozen (a LoRA student's). A head that ZeRO-3 partitions or FSDP2 shards is gathered whole for
the loss.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .errors import UserError
from .heads import CAUSAL_LM
from .losses.fused import (
    OutputHead,
    fused_annealing_objective,
    fused_cross_entropies,
    fused_distillation_objective,
    fused_tempered_entropies,
    fused_token_cross_entropies,
    fused_token_features,
)
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
    """The student's and the teacher's output heads (an exact teacher cache's included: its hidden states then
    pass through; None for a compact cache, whose top-k rows the loss reads as they are), switched off for the
    forward passes and applied by the loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, student_model: nn.Module, teacher_model=None):
        self.student, self.teacher = student, teacher
        self.models = {teacher: teacher_model, student: student_model}  # where FSDP2 may shard each head
        self._step: _Gathered | None = None  # what the current step has gathered, kept until its end

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One step's loss: the heads pass their input through (``hidden_states``), and a head gathered from its
        ZeRO-3 partitions or FSDP2 shards stays whole until the end, so that DTS's CE pass, the loss and the
        entropies share one all-gather of each head."""
        if self._step is not None:  # inside a step already: its gathers serve
            yield
            return
        with contextlib.ExitStack() as stack:
            self._step = _Gathered(stack)
            stack.push(self._end_step)  # exits last: after the ZeRO-3 contexts the step entered
            with self.hidden_states():
                yield

    def _end_step(self, failure: type[BaseException] | None, *_) -> bool:
        """Release what the step gathered; after a failure every unit, since no backward will follow."""
        step, self._step = self._step, None
        self._release(step.units, every_unit=failure is not None)
        return False  # a failure propagates

    @contextlib.contextmanager
    def hidden_states(self) -> Iterator[None]:
        """Inside, each head returns its input: the models' ``logits`` are their final hidden states."""
        heads = dict.fromkeys(head for head in (self.student, self.teacher) if head is not None)  # one module once
        for head in heads:
            head.forward = _pass_through  # an instance attribute shadows the class's forward
        try:
            with warnings.catch_warnings():
                # FSDP2 warns when a unit returns a view (as a head passing the final norm's view through does),
                # against in-place ops on it: the loss only reads the hidden states.
                warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
                yield
        finally:
            for head in heads:
                del head.forward

    @contextlib.contextmanager
    def _whole(self, teacher_hidden) -> Iterator[tuple[OutputHead, OutputHead | None]]:
        """The heads the loss applies, whole while it runs when ZeRO-3 partitions or FSDP2 shards them: gathered
        for this reading alone, or for the rest of the step inside ``step``."""
        projects_teacher = teacher_hidden is not None and self.teacher is not None
        modules = [self.student, self.teacher] if projects_teacher else [self.student]
        with contextlib.ExitStack() as stack:
            gathered = self._step
            if gathered is None:
                gathered = _Gathered(stack)
                stack.callback(self._release, gathered.units)
            self._gather(modules, gathered)
            heads = [OutputHead(module.weight, module.bias) for module in modules]
            yield heads[0], heads[1] if len(heads) > 1 else None

    def _gather(self, modules: list[nn.Module], gathered: _Gathered) -> None:
        """Gather the heads' ZeRO-3 partitions (the gradient computed for a whole weight then reaches its
        partitions through DeepSpeed's gradient hooks) and the FSDP2 units whose head weight is sharded now (the
        teacher's: its units reshard after every forward), what ``gathered`` holds already excepted."""
        from torch.distributed.tensor import DTensor

        partitioned = [
            p
            for module in modules
            for p in (module.weight, module.bias)
            if p is not None and hasattr(p, "ds_id") and id(p) not in gathered.zero3
        ]
        if partitioned:
            import deepspeed

            gathered.stack.enter_context(deepspeed.zero.GatheredParameters(partitioned))
            gathered.zero3.update(map(id, partitioned))
        for module in modules:
            if isinstance(module.weight, DTensor):
                unit = _fsdp_unit(self.models[module], module)
                unit.unshard()
                gathered.units[unit] = module
                if isinstance(module.weight, DTensor):
                    raise RuntimeError(
                        f"fused_head: FSDP's unit {type(unit).__name__} did not gather the head's weight"
                    )

    def _release(self, units: dict[nn.Module, nn.Module], every_unit: bool = False) -> None:
        """Free the gathered units: the teacher's, and a student's unless a backward follows (FSDP's post-backward
        reduce-scatters the gradient the loss gave the whole weight, then frees it)."""
        for unit, module in units.items():
            if every_unit or module is not self.student or not torch.is_grad_enabled():
                unit.reshard()

    def _through(self, loss, student_hidden: Tensor, teacher_hidden: Tensor | None, labels: Tensor, *args, **kwargs):
        """``loss`` (a function of `dts_llm.losses.fused`) of the hidden states through the heads."""
        with self._whole(teacher_hidden) as (student, teacher):
            return loss(student_hidden, student, teacher_hidden, teacher, labels, *args, **kwargs)

    # The logits path's functions (``distillation_objective``, `dts_llm.objectives.LOGITS_PASSES`), the same
    # arguments with hidden states in place of logits.
    def objective(self, student_hidden, teacher_hidden, labels, **settings) -> DistillationTerms:
        return self._through(fused_distillation_objective, student_hidden, teacher_hidden, labels, **settings)

    def annealing_objective(self, student_hidden, teacher_hidden, labels, **settings) -> DistillationTerms:
        return self._through(fused_annealing_objective, student_hidden, teacher_hidden, labels, **settings)

    def cross_entropy_sums(self, student_hidden, teacher_hidden, labels, **sizes) -> tuple[Tensor, Tensor | None]:
        return self._through(fused_cross_entropies, student_hidden, teacher_hidden, labels, **sizes)

    def token_features(self, student_hidden, teacher_hidden, labels, **sizes) -> Tensor:
        return self._through(fused_token_features, student_hidden, teacher_hidden, labels, **sizes)

    def token_cross_entropies(self, student_hidden, teacher_hidden, labels, **sizes) -> tuple[Tensor, Tensor]:
        return self._through(fused_token_cross_entropies, student_hidden, teacher_hidden, labels, **sizes)

    def tempered_entropies(self, student_hidden, teacher_hidden, labels, temperature, **settings) -> Tensor:
        return self._through(
            fused_tempered_entropies, student_hidden, teacher_hidden, labels, temperature=temperature, **settings
        )


class _Gathered:
    """What a step (or a single reading) has gathered of the heads: FSDP2 units (each with its head's module) and
    the ids of ZeRO-3 parameters, whose ``GatheredParameters`` contexts ``stack`` exits."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.units, self.zero3 = stack, {}, set()


def _fsdp_unit(model: nn.Module, head: nn.Module) -> nn.Module:
    """The FSDP2 module whose parameter group holds ``head``'s weight: the innermost one on the path to it."""
    from torch.distributed.fsdp import FSDPModule

    units = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    path = next(name for name, module in model.named_modules() if module is head)
    owner = max((name for name in units if not name or path == name or path.startswith(name + ".")), key=len)
    return units[owner]


def fused_heads(args, head_kind: str, student: nn.Module, teacher: nn.Module | None, cached_teacher, accelerator):
    """The trainer's ``FusedHeads`` when ``args.fused_head`` asks, after refusing what it cannot serve."""
    if not args.fused_head:
        return None
    if head_kind != CAUSAL_LM:
        raise UserError(f"fused_head applies a causal LM's output head; a {head_kind} head's logits are small already")
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None and fsdp_plugin.fsdp_version != 2:
        raise UserError(
            "fused_head under FSDP needs fsdp_version: 2 (FSDP1's flat parameters leave no head weight to apply "
            "after the forward): set it in the accelerate config, or leave fused_head off"
        )
    teacher_head = cached_teacher.head if cached_teacher is not None else output_head(teacher, "teacher")
    return FusedHeads(output_head(student, "student"), teacher_head, student, teacher)


def fused_step(heads: FusedHeads | None):
    """``heads.step()``, or nothing to do without a fused head."""
    return contextlib.nullcontext() if heads is None else heads.step()
