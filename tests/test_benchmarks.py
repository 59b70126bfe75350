"""Smoke tests of the benchmark scripts at tiny sizes: they run, print every row, and the peers'
losses agree with ours. Timings are not checked (noise on a shared machine). Each script runs in one
fresh interpreter with its workers (benchmark_in_one_process.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parent / "benchmark_in_one_process.py"


def run_quick(script: str) -> str:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # as _common.run_worker starts a worker
    result = subprocess.run(
        [sys.executable, str(DRIVER), script, "--quick", "--device", "cpu"],
        check=True, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    return result.stdout


def table_rows(output: str) -> list[list[str]]:
    """Cells of every Markdown table row in ``output``, separator rows left out."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]


@pytest.mark.timeout(300)
def test_kd_loss_peers_compute_our_loss():
    output = run_quick("kd_loss.py")
    methods = {"dense", "trl", "ours"}
    rows = {row[2]: row for row in table_rows(output) if row[0] == "1000" and row[2] in methods}
    assert set(rows) == methods
    for method in ("dense", "trl"):
        assert float(rows[method][-1]) < 1e-5, f"{method}'s loss differs from ours: {rows[method]}"
    ratios = [row[1] for row in table_rows(output) if row[1].startswith("ours /")]
    assert ratios == ["ours / dense", "ours / trl"]


@pytest.mark.timeout(300)
def test_train_step_reports_all_trainers_with_matching_losses():
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
