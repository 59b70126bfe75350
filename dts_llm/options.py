"""Command-line values written as comma-separated lists: ``1,2,4``, ``3:1,8:4``, ``dolly=PATH,vicuna``.

Shared by the ``dts-llm`` commands and ``python -m eval``, so that every list is split, checked and
refused alike (an ``argparse.ArgumentTypeError`` names the value).
"""

from __future__ import annotations

import argparse


def comma_items(text: str) -> list[str]:
    """The non-blank items of ``text``, stripped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def comma_separated(kind, name: str, positive: bool = True, unique: bool = False):
    """An argparse type: a non-empty comma-separated list of ``kind`` values (called ``name`` in errors),
    positive unless ``positive`` is False, duplicates dropped with ``unique``."""

    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in comma_items(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"no {name} in {text!r}")
        if positive and any(not value > 0 for value in values):
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {text!r}")
        return list(dict.fromkeys(values)) if unique else values

    return parse


def named_items(text: str) -> list[tuple[str, str | None]]:
    """``NAME=VALUE`` items as (NAME, VALUE) and bare ``NAME`` items as (NAME, None)."""
    pairs = []
    for item in comma_items(text):
        name, sep, value = item.partition("=")
        pairs.append((name.strip(), value.strip() if sep else None))
    return pairs
