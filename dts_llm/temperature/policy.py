"""The one interface of every temperature policy, the context it reads, and their checkpoint files."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from typing import Any

from torch import Tensor

TEMPERATURE_STATE_NAME = "temperature_policy.json"
LEARNED_TEMPERATURE_NAME = "temperature_policy.safetensors"


class TemperatureContext:
    """What a policy may read at one batch. The cross-entropies and the token features cost a pass
    over the logits: they are computed on first reading, so a policy that ignores them costs nothing.

    ``cross_entropies`` are the student's and the teacher's token-mean CE over every process, or None
    when no process has a scored token in this micro-batch; ``token_cross_entropies`` this process's
    ``[tokens, 2]`` per-token CEs (student, teacher) and each token's sequence.
    """

    def __init__(
        self,
        epoch: float,
        progress: Callable[[], float],
        cross_entropies: Callable[[], tuple[float, float] | None],
        features: Callable[[], Tensor],
        token_cross_entropies: Callable[[], tuple[Tensor, Tensor]] | None = None,
    ):
        self.epoch = epoch
        self._progress, self._cross_entropies, self._features = progress, cross_entropies, features
        self._token_cross_entropies = token_cross_entropies

    @cached_property
    def progress(self) -> float:
        return self._progress()

    @cached_property
    def cross_entropies(self) -> tuple[float, float] | None:
        return self._cross_entropies()

    @cached_property
    def features(self) -> Tensor:
        return self._features()

    @cached_property
    def token_cross_entropies(self) -> tuple[Tensor, Tensor]:
        return self._token_cross_entropies()


class TemperaturePolicy(ABC):
    """The one interface the trainer uses: ``step`` on a training micro-batch, ``current`` on an
    evaluation batch; the policy's own parameters (none unless learnt), extra values to log, and its
    checkpoint file."""

    @abstractmethod
    def step(self, context: TemperatureContext) -> float | Tensor:
        """Advance the policy on this training micro-batch and return its temperature."""

    @abstractmethod
    def current(self, context: TemperatureContext) -> float | Tensor:
        """The temperature of an evaluation batch, leaving the policy as it is."""

    def parameters(self):
        """Parameters the trainer's optimizer trains: none for a scheduled policy."""
        return iter(())

    def to(self, device) -> TemperaturePolicy:
        return self

    def logged_values(self, epoch: float) -> dict[str, float]:
        """Values logged beside the temperature at each logging step."""
        return {}

    @abstractmethod
    def save(self, folder: str, settings: dict[str, Any]) -> None:
        """Write the policy's state, and the ``settings`` that decide its trajectory, into a checkpoint folder."""

    @abstractmethod
    def load(self, folder: str, device) -> None:
        """Restore the state saved by ``save``."""


class ScheduledTemperature(TemperaturePolicy):
    """A policy whose temperature follows a rule (no parameters); its state is a small JSON dict."""

    temperature: float

    def current(self, context: TemperatureContext) -> float:
        return self.temperature

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])

    def save(self, folder: str, settings: dict[str, Any]) -> None:
        with open(os.path.join(folder, TEMPERATURE_STATE_NAME), "w") as f:
            json.dump({"settings": settings, "state": self.state_dict()}, f)

    def load(self, folder: str, device) -> None:
        with open(os.path.join(folder, TEMPERATURE_STATE_NAME)) as f:
            saved = json.load(f)
        # Checkpoints of dts-llm 0.1 hold the policy's state alone.
        self.load_state_dict(saved["state"] if "settings" in saved else saved)
