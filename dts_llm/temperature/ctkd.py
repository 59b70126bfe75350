"""CTKD's learnt temperatures (Li et al., AAAI 2023): parameters trained adversarially by the trainer's optimizer."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .policy import LEARNED_TEMPERATURE_NAME, TemperatureContext, TemperaturePolicy


def check_ctkd_settings(
    t_init: float, t_start: float, t_range: float, lambda_max: float, lambda_epochs: float
) -> None:
    """Raise ``ValueError`` naming the field of an invalid CTKD setting (shared by both CTKD policies)."""
    if not t_start > 0:
        raise ValueError(f"ctkd_t_start must be > 0, got {t_start}")
    if not t_range > 0:
        raise ValueError(f"ctkd_t_range must be > 0, got {t_range}")
    if not t_start < t_init < t_start + t_range:
        raise ValueError(
            f"temperature_init ({t_init}) must lie strictly inside (ctkd_t_start, ctkd_t_start + ctkd_t_range)"
            f" = ({t_start}, {t_start + t_range}) for a CTKD temperature"
        )
    if not lambda_max >= 0:
        raise ValueError(f"ctkd_lambda_max must be >= 0, got {lambda_max}")
    if not lambda_epochs >= 0:
        raise ValueError(f"ctkd_lambda_epochs must be >= 0, got {lambda_epochs}")


def check_hidden_size(hidden_size: int) -> None:
    if not hidden_size >= 1:
        raise ValueError(f"ctkd_hidden_size must be >= 1, got {hidden_size}")


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -weight, so what follows is maximised."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.weight * grad, None


def ctkd_lambda(epoch: float, lambda_max: float, epochs: float) -> float:
    """CTKD's curriculum for the adversarial weight: a cosine from 0 to ``lambda_max`` over the first
    ``epochs`` (fractional) epochs, then held. CTKD writes it as a decay from 0 to -1 and reverses by
    multiplying with it; here the weight is positive and the reversal layer supplies the sign."""
    if epochs <= 0:
        return lambda_max
    return lambda_max * (1.0 - math.cos(math.pi * min(epoch / epochs, 1.0))) / 2.0


class LearnedTemperature(nn.Module, TemperaturePolicy):
    """CTKD (Li et al., AAAI 2023): T = t_start + t_range sigmoid(theta), theta learnt adversarially.

    ``forward(epoch, features)`` returns the temperature tensor for this batch; its gradient reaches
    the parameters reversed and scaled by ``ctkd_lambda(epoch)``, so the trainer's optimizer step,
    which lowers the student's loss, raises the KD loss through T: a curriculum from easy to hard.
    """

    def __init__(self, t_init: float, t_start: float, t_range: float, lambda_max: float, lambda_epochs: float):
        super().__init__()
        check_ctkd_settings(t_init, t_start, t_range, lambda_max, lambda_epochs)
        self.t_start, self.t_range = float(t_start), float(t_range)
        self.lambda_max, self.lambda_epochs = float(lambda_max), float(lambda_epochs)
        fraction = (t_init - t_start) / t_range
        self.initial_logit = math.log(fraction / (1.0 - fraction))

    def adversarial_weight(self, epoch: float) -> float:
        return ctkd_lambda(epoch, self.lambda_max, self.lambda_epochs)

    def logged_values(self, epoch: float) -> dict[str, float]:
        return {"ctkd_lambda": self.adversarial_weight(epoch)}

    def current(self, context: TemperatureContext) -> Tensor:
        return self.step(context)

    def _temperature(self, logits: Tensor, epoch: float) -> Tensor:
        reversed_logits = GradientReversal.apply(logits, self.adversarial_weight(epoch))
        return self.t_start + self.t_range * torch.sigmoid(reversed_logits)

    def save(self, folder: str, settings: dict[str, Any]) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(folder, LEARNED_TEMPERATURE_NAME), metadata={"settings": json.dumps(settings)})

    def load(self, folder: str, device) -> None:
        self.load_state_dict(load_file(os.path.join(folder, LEARNED_TEMPERATURE_NAME), device=str(device)))


class GlobalTemperature(LearnedTemperature):
    """CTKD's global temperature: one learnt scalar for every token."""

    def __init__(self, t_init: float, t_start: float, t_range: float, lambda_max: float, lambda_epochs: float):
        super().__init__(t_init, t_start, t_range, lambda_max, lambda_epochs)
        self.logit = nn.Parameter(torch.tensor(self.initial_logit))

    def forward(self, epoch: float, features: Tensor | None = None) -> Tensor:
        return self._temperature(self.logit, epoch)

    def step(self, context: TemperatureContext) -> Tensor:
        return self(context.epoch)


class InstanceTemperature(LearnedTemperature):
    """CTKD's instance temperature: one T per token from a small MLP over ``losses.token_features``.

    The last layer starts at zero weight and the initial logit as bias, so every token starts at
    ``t_init`` and the MLP learns where to depart from it.
    """

    def __init__(
        self,
        t_init: float,
        t_start: float,
        t_range: float,
        lambda_max: float,
        lambda_epochs: float,
        num_features: int,
        hidden_size: int,
    ):
        super().__init__(t_init, t_start, t_range, lambda_max, lambda_epochs)
        check_hidden_size(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, self.initial_logit)

    def forward(self, epoch: float, features: Tensor | None = None) -> Tensor:
        if features is None:
            raise ValueError("the instance temperature needs the tokens' features")
        return self._temperature(self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1), epoch)

    def step(self, context: TemperatureContext) -> Tensor:
        return self(context.epoch, context.features)
