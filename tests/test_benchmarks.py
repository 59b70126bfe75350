"""Smoke tests of the benchmark scripts at tiny sizes: they run, print every row, and the peers'
losses agree with ours. Timings are not checked (noise on a shared machine).

The scripts run in this interpreter, and so do their per-method workers (``run_worker`` swapped for
an in-process call that speaks the same protocol: the worker's argv in, JSON on its last stdout line
out): a fresh interpreter per worker isolates memory peaks, which only the scaling table divides by
(its workers stay fresh processes), and costs an interpreter start (torch, transformers, trl) each.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script_output(script: str, argv: list[str]) -> str:
    """What ``python benchmarks/<script> <argv>`` prints, run in this interpreter."""
    module = importlib.import_module(Path(script).stem)
    with contextlib.redirect_stdout(io.StringIO()) as output, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [script, *map(str, argv)])
        module.main()
    return output.getvalue()


def run_worker_here(script: str, argv, label: str):
    """``_common.run_worker``'s contract (the JSON on the worker's last stdout line), in process."""
    return json.loads(script_output(script, list(argv)).splitlines()[-1])


@pytest.fixture(autouse=True)
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.fixture
def workers_in_process(monkeypatch):
    for name in ("kd_loss", "train_step"):
        monkeypatch.setattr(importlib.import_module(name), "run_worker", run_worker_here)


def run_quick(script: str) -> str:
    return script_output(script, ["--quick", "--device", "cpu"])


def table_rows(output: str) -> list[list[str]]:
    """Cells of every Markdown table row in ``output``, separator rows left out."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]


@pytest.mark.timeout(300)
def test_kd_loss_peers_compute_our_loss(workers_in_process):
    output = run_quick("kd_loss.py")
    methods = {"dense", "trl", "ours"}
    rows = {row[2]: row for row in table_rows(output) if row[0] == "1000" and row[2] in methods}
    assert set(rows) == methods
    for method in ("dense", "trl"):
        assert float(rows[method][-1]) < 1e-5, f"{method}'s loss differs from ours: {rows[method]}"
    ratios = [row[1] for row in table_rows(output) if row[1].startswith("ours /")]
    assert ratios == ["ours / dense", "ours / trl"]


@pytest.mark.timeout(300)
def test_train_step_reports_all_trainers_with_matching_losses(workers_in_process):
    output = run_quick("train_step.py")
    assert [row[0] for row in table_rows(output)[1:]] == ["floor", "trl", "ours"]
    loss_diff = float(re.search(r"first-step loss rel diff ours vs trl: (\S+)", output).group(1))
    assert loss_diff < 1e-4
    assert re.search(r"ours / trl tokens/s: +\d", output) and re.search(r"ours / floor time: +\d", output)


@pytest.mark.timeout(300)
def test_generation_reports_three_modes():
    output = run_quick("generation.py")
    modes = [row[0] for row in table_rows(output)[1:]]
    assert modes == ["one at a time", "batched (8)", "pipeline (8)"]
    new_tokens = [int(row[-1]) for row in table_rows(output)[1:]]
    assert all(0 < tokens <= 8 * 16 for tokens in new_tokens)
    assert "batched / pipeline:" in output


@pytest.mark.timeout(300)
def test_scaling_reports_both_sweeps():
    output = run_quick("scaling.py")
    length_sweep, vocabulary_sweep = output.split("\nlength sweep\n")[1].split("\nvocabulary sweep\n")
    assert [row[:2] for row in table_rows(length_sweep)[1:]] == [["32", "1000"], ["64", "1000"]]
    assert [row[:2] for row in table_rows(vocabulary_sweep)[1:]] == [["64", "500"], ["64", "1000"]]
