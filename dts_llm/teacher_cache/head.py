"""The teacher's output head, which turns a cached final hidden state into the teacher's logits.

A causal LM's logits are its output head applied to the last hidden state (after the final norm), so the
head's input is what the exact cache stores: a forward hook on the head records it whatever the
architecture. Models that change the logits after the head (a soft cap, a logit scale) would be cached
wrongly; ``check_head_reproduces`` refuses them on the first batch.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import UserError


class TeacherHead(nn.Module):
    """The output projection alone: ``logits = hidden @ weight.T + bias``."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @classmethod
    def of(cls, model: nn.Module) -> TeacherHead:
        """``model``'s output head (its input embeddings when they are tied), detached, sharing its storage:
        writing a cache reads it, never changes it."""
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return cls(head.weight.detach(), None if bias is None else bias.detach())

    @classmethod
    def load(cls, path: Path, device=None) -> TeacherHead:
        tensors = load_file(str(path))
        return cls(tensors["weight"], tensors.get("bias")).to(device)

    def save(self, path: Path) -> None:
        tensors = {"weight": self.weight.contiguous().cpu()}
        if self.bias is not None:
            tensors["bias"] = self.bias.contiguous().cpu()
        save_file(tensors, str(path))

    @property
    def vocab_width(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


class HeadInputs:
    """Records the input of ``model``'s output head on each forward, while the ``with`` block lasts."""

    def __init__(self, model: nn.Module):
        self.module = model.get_output_embeddings()
        self.hidden: Tensor | None = None

    def __enter__(self) -> HeadInputs:
        def record(_module, inputs):
            self.hidden = inputs[0]

        self._handle = self.module.register_forward_pre_hook(record)
        return self

    def __exit__(self, *_exc) -> None:
        self._handle.remove()


def check_head_reproduces(head: TeacherHead, hidden: Tensor, logits: Tensor, model_name: str) -> None:
    """Refuse a teacher whose logits are not its head applied to the hidden state (the cache would lie)."""
    recomputed = head(hidden).float()
    error = (recomputed - logits.float()).abs().max().item()
    scale = 1.0 + logits.float().abs().max().item()
    if error > 1e-3 * scale:
        raise UserError(
            f"{model_name}: its logits are not its output head applied to the final hidden state "
            f"(max difference {error:.3g}; a logit soft cap or scale?), so an exact cache cannot reproduce them: "
            "use teacher_cache_kind: compact"
        )
