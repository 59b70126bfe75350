"""The sweep's grid: temperature families, their default settings, and the runs they make.

Every run of the grid is a name and the recipe fields it overrides (``{"temperature_policy": "constant",
"temperature_init": 4.0}``); ``dts_llm.commands.sweep`` trains, evaluates and compares them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import comma_items, comma_separated

FAMILIES = ("fixed", "dts", "cosine", "ctkd", "ctkd-instance")
DEFAULT_FAMILIES = ("fixed", "dts", "ctkd")
LEARNED_FAMILIES = {"ctkd": "ctkd", "ctkd-instance": "ctkd_instance"}  # family -> temperature policy
DEFAULT_FIXED = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFAULT_DTS = ((3.0, 1.0), (4.0, 2.0), (8.0, 4.0))  # (T_max, T_min)
DEFAULT_COSINE = ((3.0, 1.0),)


@dataclass(frozen=True)
class Run:
    """One cell of the grid: its folder name, family, a label for the table, and its recipe fields."""

    name: str
    family: str
    settings: str
    overrides: dict

    def temperature_range(self) -> tuple[float, float] | None:
        """The lowest and highest T the run's policy takes; None for a learned T (bounded by the ctkd fields)."""
        fields = self.overrides
        if self.family == "fixed":
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


def build_grid(
    families: list[str],
    fixed=DEFAULT_FIXED,
    dts=DEFAULT_DTS,
    cosine=DEFAULT_COSINE,
) -> list[Run]:
    """The runs of ``families``, in that order. DTS starts at its T_max (temperature_init = T_max)."""
    runs = []
    for family in families:
        if family == "fixed":
            for t in fixed:
                runs.append(
                    Run(
                        f"fixed-T{t:g}",
                        family,
                        f"T = {t:g}",
                        {"temperature_policy": "constant", "temperature_init": t},
                    )
                )
        elif family in ("dts", "cosine"):
            for t_max, t_min in dts if family == "dts" else cosine:
                fields = {"temperature_min": t_min, "temperature_max": t_max}
                if family == "dts":
                    fields["temperature_init"] = t_max
                name, label = f"{family}-T{t_max:g}-{t_min:g}", f"T {t_max:g} -> {t_min:g}"
                runs.append(Run(name, family, label, {"temperature_policy": family, **fields}))
        else:
            runs.append(Run(family, family, "learned T", {"temperature_policy": LEARNED_FAMILIES[family]}))
    return runs
