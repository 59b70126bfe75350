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
def test_fused_head_methods_compute_the_same_loss_and_step():
    output = run_quick("fused_head.py")
    rows = [row for row in table_rows(output) if row[0] == "4096" and " / " not in row[2] and row[3] != "skipped"]
    losses = {row[2]: float(row[-1]) for row in rows}
    assert {"fused", "logits", "sft", "distill", "distill-fused"} <= set(losses)
    for peer in ("logits", "liger"):  # Liger when installed (make installs it, without Triton)
        assert losses.get(peer, losses["fused"]) == pytest.approx(losses["fused"], rel=1e-5), peer
    assert losses["distill-fused"] == pytest.approx(losses["distill"], rel=1e-5)


@pytest.mark.timeout(300)
def test_train_step_reports_all_trainers_with_matching_losses():
    output = run_quick("train_step.py")
    assert [row[0] for row in table_rows(output)[1:]] == ["floor", "trl", "ours"]
    loss_diff = float(re.search(r"first-step loss rel diff ours vs trl: (\S+)", output).group(1))
    assert loss_diff < 1e-4
    assert re.search(r"ours / trl tokens/s: +\d", output) and re.search(r"ours / floor time: +\d", output)


@pytest.mark.timeout(300)
def test_on_policy_reports_both_trainers_learning_the_same_completion_tokens():
    output = run_quick("on_policy.py")
    rows = table_rows(output)[1:]
    assert [row[0] for row in rows] == ["trl", "ours"]
    assert [row[4] for row in rows] == ["16", "16"]  # batch 2 x 8 new tokens (random weights: no EOS)
    assert re.search(r"ours / trl tokens/s: +\d", output)


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


def block(output: str, title: str) -> str:
    """The paragraph of ``output`` (lines up to a blank one) that starts with ``title``."""
    return next(part for part in output.split("\n\n") if part.lstrip("\n").startswith(title))


@pytest.mark.timeout(300)
def test_teacher_cache_reports_every_trainer_and_the_exact_cache_gives_the_live_loss():
    output = run_quick("teacher_cache.py")
    speed = {row[0]: row for row in table_rows(block(output, "speed: one epoch"))[1:]}
    assert list(speed) == ["sft", "live", "exact", "compact"]
    assert float(speed["exact"][-1]) < 1e-5, speed["exact"]
    # The compact cache's KL over k + 1 buckets is at most the full one; CE and T are the same at step 1.
    assert float(speed["compact"][-2]) <= float(speed["live"][-2])
    for kind in ("exact", "compact"):
        assert re.search(rf"{kind} epoch / SFT epoch: \d+\.\d+x \(<= 1\.15x: (met|MISSED)\); by CPU time", output)
    phases = table_rows(block(output, "where an epoch goes"))
    assert [row[0] for row in phases[1:]] == ["sft", "live", "exact", "compact"]
    writes = table_rows(block(output, "writing the cache"))
    assert [row[0] for row in writes[1:]] == ["teacher forward only", "write exact cache", "write compact cache"]
    for kind, _, _, measured, formula, _ in table_rows(block(output, "size: measured from the files"))[1:]:
        measured, formula = float(measured.split()[0]), float(formula.split()[0])
        assert formula <= measured < 1.05 * formula, kind  # the rows, plus the file's header and offsets
    assert [row[0] for row in table_rows(block(output, "the paper's recipes"))[1:]] == ["GPT-2 XL", "OPT-13B"]
    assert len(table_rows(block(output, "memory: peak during the epoch"))) == 5
    passes = {row[0]: int(row[2]) for row in table_rows(block(output, "teacher forward passes"))[1:]}
    assert passes["sft"] == passes["exact"] == passes["compact"] == 0
    assert passes["live"] == passes["write exact"] == passes["write compact"] > 0
