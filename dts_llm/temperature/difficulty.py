"""A per-token temperature from token difficulty, after AdaKD (arXiv 2510.11615): hard tokens get a low T
(sharp targets), easy ones a high T (soft targets)."""

from __future__ import annotations

from torch import Tensor

from .policy import ScheduledTemperature, TemperatureContext
from .scheduled import check_temperature_range


class DifficultyTemperature(ScheduledTemperature):
    """Policy ``adakd``: T_i = clamp(T_init / r_i, T_min, T_max), with r_i the token's difficulty.

    r_i is the student's CE of token i over the micro-batch's token-mean student CE (over every process):
    a token of average difficulty gets T_init, one twice as hard T_init / 2, one the student already
    predicts (r near 0) T_max. The rule has no state and no progress: a resumed run continues it as it
    is. ``temperature`` holds T_init, the T of an average token.
    """

    def __init__(self, t_init: float = 3.0, t_min: float = 1.0, t_max: float = 3.0):
        check_temperature_range(t_min, t_max, t_init)
        self.t_init, self.t_min, self.t_max = float(t_init), float(t_min), float(t_max)
        self.temperature = self.t_init

    def token_temperatures(self, context: TemperatureContext) -> float | Tensor:
        """One T per scored token of this process (T_init when no process has a scored token)."""
        cross_entropies = context.cross_entropies
        if cross_entropies is None:
            return self.t_init
        token_ces, _ = context.token_cross_entropies
        difficulty = token_ces[:, 0].double() / cross_entropies[0]
        return (self.t_init / difficulty).clamp(self.t_min, self.t_max).float()

    def step(self, context: TemperatureContext) -> float | Tensor:
        return self.token_temperatures(context)

    def current(self, context: TemperatureContext) -> float | Tensor:
        return self.token_temperatures(context)
