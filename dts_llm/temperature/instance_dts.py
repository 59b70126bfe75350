"""Instance-wise DTS (the DTS paper's open question 2): the rule applied per sequence or per token."""

from __future__ import annotations

import torch
from torch import Tensor

from .policy import TemperatureContext
from .scheduled import DynamicTemperature


class InstanceDynamicTemperature(DynamicTemperature):
    """DTS with one temperature per sequence (``unit="sequence"``, policy ``dts_sequence``) or per scored
    token (``unit="token"``, ``dts_token``), from that unit's own gap.

    The shared T is updated exactly as ``dts`` does, from the micro-batch's CEs over every process (it is
    the state saved with checkpoints and the diagnostics logged). A sequence or token is seen once, so it
    has no previous temperature of its own: its momentum step starts from the shared T before this
    update, T_i = momentum * T + (1 - momentum) * clamp(target_i, T_min, T_max), with target_i the rule
    on the unit's gap (a sequence's gap from its token-mean CEs). Units with the batch's gap thus get the
    shared update; momentum 0 gives each unit its own target. The KD term of each token is scaled by
    its own T^2. Per-token CEs are this process's: no collective beyond the shared update.
    """

    def __init__(self, unit: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if unit not in ("sequence", "token"):
            raise ValueError(f"unit must be 'sequence' or 'token', got {unit!r}")
        self.unit = unit

    def unit_temperatures(self, previous: float, context: TemperatureContext) -> Tensor:
        """One T per scored token of this process, each its unit's momentum step from ``previous``."""
        token_ces, sequences = context.token_cross_entropies
        ces = token_ces.double()
        if self.unit == "sequence" and len(ces):
            _, sequences = torch.unique(sequences, return_inverse=True)
            count = torch.bincount(sequences).double()[:, None]
            ces = ces.new_zeros((len(count), 2)).index_add_(0, sequences, ces) / count
        target = self.rules(ces[:, 0], ces[:, 1], context.progress).target
        temperatures = self.momentum * previous + (1.0 - self.momentum) * target
        return (temperatures[sequences] if self.unit == "sequence" and len(ces) else temperatures).float()

    def step(self, context: TemperatureContext) -> float | Tensor:
        previous = self.temperature
        if context.cross_entropies is None:  # no scored token on any process
            return previous
        super().step(context)
        return self.unit_temperatures(previous, context)

    def current(self, context: TemperatureContext) -> Tensor:
        return self.unit_temperatures(self.temperature, context)
