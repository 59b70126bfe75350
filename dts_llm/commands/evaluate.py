"""`dts-llm eval rouge|glue ...`: the eval package's command (``python -m eval``) under the `dts-llm` name,
which an ``eval.py`` in the working directory cannot shadow."""

from __future__ import annotations

from eval.__main__ import main as evaluate

HELP = "Score a model: dts-llm eval rouge|glue ... (as python -m eval)"


def main(argv: list[str]) -> None:
    evaluate(argv, prog="dts-llm eval")
