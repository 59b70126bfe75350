"""The sweep's grid: temperature families, their default settings, and the runs they make.

Every run of the grid is a name and the recipe fields it overrides (``{"temperature_policy": "constant",
"temperature_init": 4.0}``); ``dts_llm.commands.sweep`` trains, evaluates and compares them. With training
seeds every cell of the grid is trained once per seed (``seed`` overridden too), and the report aggregates
a cell's runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import comma_items, comma_separated

# Family -> temperature policy: one run per --dts range (--cosine for cosine) or one learned run. AdaKD starts
# a token of average difficulty at the range's geometric middle; on-policy (GKD's lmbda 0.5) and
# sequence-level KD are DTS on generated responses (docs/on-policy.md). On-policy learns the divergence
# alone, as GKD does (kd_ratio 1): the student's own completions are no labels for its CE term.
RANGED_FAMILIES = {
    "dts": "dts",
    "cosine": "cosine",
    "dts-paper": "dts_paper",
    "dts-sequence": "dts_sequence",
    "dts-token": "dts_token",
    "adakd": "adakd",
    "on-policy": "dts",
    "seq-kd": "dts",
}
GENERATING_FAMILIES = {"on-policy": {"lmbda": 0.5, "kd_ratio": 1.0}, "seq-kd": {"seq_kd": True}}
LEARNED_FAMILIES = {"ctkd": "ctkd", "ctkd-instance": "ctkd_instance"}
# Reverse KL at T = 1 beside the fixed forward-KL runs: the comparison of arXiv 2606.00306.
REVERSE_KL = {"temperature_policy": "constant", "temperature_init": 1.0, "divergence": "reverse_kl"}
FAMILIES = ("fixed", *RANGED_FAMILIES, *LEARNED_FAMILIES, "reverse-kl")
DEFAULT_FAMILIES = ("fixed", "dts", "ctkd")
DEFAULT_FIXED = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFAULT_DTS = ((3.0, 1.0), (4.0, 2.0), (8.0, 4.0))  # (T_max, T_min)
DEFAULT_COSINE = ((3.0, 1.0),)


@dataclass(frozen=True)
class Run:
    """One run of the grid: its folder name, family, a label for the table, its recipe fields, and the
    cell of the grid it trains (its name without the training seed)."""

    name: str
    family: str
    settings: str
    overrides: dict
    cell: str = ""

    def temperature_range(self) -> tuple[float, float] | None:
        """The lowest and highest T the run's policy takes; None for a learned T (bounded by the ctkd fields)."""
        fields = self.overrides
        if fields["temperature_policy"] == "constant":
            return fields["temperature_init"], fields["temperature_init"]
        if "temperature_min" in fields:
            return fields["temperature_min"], fields["temperature_max"]
        return None


def parse_families(text: str) -> list[str]:
    """An argparse type: comma-separated family names, each known."""
    families = list(dict.fromkeys(comma_items(text)))
    unknown = [family for family in families if family not in FAMILIES]
    if unknown or not families:
        raise argparse.ArgumentTypeError(f"unknown family {unknown or text!r}; choose from {', '.join(FAMILIES)}")
    return families


parse_temperatures = comma_separated(float, "temperatures", unique=True)


def parse_ranges(text: str) -> list[tuple[float, float]]:
    """An argparse type: comma-separated T_max:T_min pairs, e.g. 3:1,8:4."""
    pairs = []
    for part in comma_items(text):
        try:
            t_max, t_min = (float(value) for value in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected T_max:T_min pairs such as 3:1, got {part!r}") from None
        if not t_min > 0:
            raise argparse.ArgumentTypeError(f"T_min must be positive, got {part!r}")
        if t_min > t_max:
            raise argparse.ArgumentTypeError(f"T_min exceeds T_max in {part!r}; write T_max:T_min")
        pairs.append((t_max, t_min))
    if not pairs:
        raise argparse.ArgumentTypeError(f"no T_max:T_min pair in {text!r}")
    return list(dict.fromkeys(pairs))


def _family_runs(family: str, fixed, dts, cosine) -> list[Run]:
    if family == "fixed":
        return [
            Run(f"fixed-T{t:g}", family, f"T = {t:g}", {"temperature_policy": "constant", "temperature_init": t})
            for t in fixed
        ]
    if family == "reverse-kl":
        return [Run(family, family, "reverse KL, T = 1", dict(REVERSE_KL))]
    if family in LEARNED_FAMILIES:
        return [Run(family, family, "learned T", {"temperature_policy": LEARNED_FAMILIES[family]})]
    runs = []
    for t_max, t_min in cosine if family == "cosine" else dts:
        fields = {"temperature_policy": RANGED_FAMILIES[family], "temperature_min": t_min, "temperature_max": t_max}
        if family == "adakd":
            fields["temperature_init"] = round((t_min * t_max) ** 0.5, 2)
        elif family != "cosine":
            fields["temperature_init"] = t_max
        label = f"T {t_max:g} -> {t_min:g}" if family != "adakd" else f"T in [{t_min:g}, {t_max:g}]"
        runs.append(
            Run(f"{family}-T{t_max:g}-{t_min:g}", family, label, {**fields, **GENERATING_FAMILIES.get(family, {})})
        )
    return runs


def build_grid(
    families: list[str],
    fixed=DEFAULT_FIXED,
    dts=DEFAULT_DTS,
    cosine=DEFAULT_COSINE,
    train_seeds: list[int] | None = None,
) -> list[Run]:
    """The runs of ``families``, in that order; each cell once per training seed when ``train_seeds`` are given.
    DTS starts at its T_max (temperature_init = T_max)."""
    cells = [run for family in families for run in _family_runs(family, fixed, dts, cosine)]
    if not train_seeds:
        return [Run(run.name, run.family, run.settings, run.overrides, run.name) for run in cells]
    return [
        Run(f"{run.name}-seed{seed}", run.family, run.settings, {**run.overrides, "seed": seed}, run.name)
        for run in cells
        for seed in train_seeds
    ]
