"""The distillation metrics of a logging window: summed per micro-batch, summed over processes when a log
closes the window, reported as token (or example) means and the temperature's batch mean."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

_SUMMED = (
    "kd_loss",
    "ce_loss",
    "teacher_ce_loss",
    "tokens",
    "temperature",
    "temperature_std",
    "batches",
    "tempered_batches",
    "token_tempered_batches",
    "teacher_entropy",
    "student_entropy",
)


class WindowMetrics:
    """One window of sums per mode ("train", "eval"); ``flush`` reports and resets a mode's."""

    def __init__(self, log_entropy: bool):
        self.log_entropy = log_entropy
        self.sums = {"train": defaultdict(float), "eval": defaultdict(float)}

    def clear(self, mode: str) -> None:
        self.sums[mode].clear()

    def add(self, mode: str, terms, teacher_ce_sum, num_tokens, temperature) -> dict:
        """Add one micro-batch's summed terms and its temperature; the mode's sums, for more to be added."""
        sums = self.sums[mode]
        sums["kd_loss"] += terms.kd
        sums["ce_loss"] += terms.ce
        sums["teacher_ce_loss"] += teacher_ce_sum
        sums["tokens"] += num_tokens
        sums["batches"] += 1
        if torch.is_tensor(temperature):
            _add_learned_temperature(sums, temperature.detach().float())
        elif temperature is not None:
            sums["temperature"] += temperature
            sums["tempered_batches"] += 1
        return sums

    def flush(self, mode: str, prefix: str, device, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """The window's means under ``prefix``, its sums first summed over processes by ``reduce`` (a
        collective: every process calls it); then the window is reset."""
        sums = self.sums[mode]
        totals = reduce(torch.tensor([float(sums[name]) for name in _SUMMED], device=device))
        sums.clear()
        total = dict(zip(_SUMMED, totals.tolist(), strict=True))
        if total["batches"] == 0:
            return {}
        tokens = max(total["tokens"], 1.0)
        metrics = {f"{prefix}{name}": total[name] / tokens for name in ("kd_loss", "ce_loss", "teacher_ce_loss")}
        tempered = total["tempered_batches"]
        if tempered:  # a regression head uses no temperature
            metrics[f"{prefix}temperature"] = total["temperature"] / tempered
            if total["token_tempered_batches"]:  # one T per token: their spread too
                metrics[f"{prefix}temperature_std"] = total["temperature_std"] / tempered
            if self.log_entropy:
                metrics[f"{prefix}teacher_entropy"] = total["teacher_entropy"] / tokens
                metrics[f"{prefix}student_entropy"] = total["student_entropy"] / tokens
        return metrics


def _add_learned_temperature(sums: dict, temperature: Tensor) -> None:
    """A tensor T's batch mean, and for one T per token its spread (a batch without a scored token adds
    nothing)."""
    if temperature.numel() == 0:
        return
    sums["temperature"] += temperature.mean()
    sums["tempered_batches"] += 1
    if temperature.dim() == 1:
        sums["temperature_std"] += temperature.std(correction=0)
        sums["token_tempered_batches"] += 1
