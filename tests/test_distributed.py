"""Multi-process distillation on CPU (gloo): every rank uses the same temperature, and two ranks with
batch B train exactly like one process with batch 2B."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "distributed" / "distill_worker.py"


def run_worker(teacher_dir, output: Path, processes: int, per_device_batch: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    if processes == 1:
        command = [sys.executable, str(WORKER)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(WORKER)]
    done = subprocess.run(
        [*command, str(teacher_dir), str(output), str(per_device_batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(processes)]


@pytest.fixture(scope="module")
def runs(trained_teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {
        "ddp": (run_worker(trained_teacher_dir, root / "ddp", processes=2, per_device_batch=4), root / "ddp"),
        "single": (run_worker(trained_teacher_dir, root / "single", processes=1, per_device_batch=8), root / "single"),
    }


def test_every_rank_computes_the_same_temperature(runs):
    ranks, _ = runs["ddp"]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert len(ranks[0]["temperatures"]) == 4
    assert ranks[0]["temperatures"] == ranks[1]["temperatures"]
    assert [e["temperature"] for e in ranks[0]["logs"]] == [e["temperature"] for e in ranks[1]["logs"]]


def test_two_ranks_match_one_process_on_the_union_of_their_batches(runs):
    (ddp, ddp_dir), (single, single_dir) = runs["ddp"], runs["single"]
    assert ddp[0]["temperatures"] == pytest.approx(single[0]["temperatures"], rel=1e-5)
    for name in ("loss", "kd_loss", "ce_loss", "teacher_ce_loss"):
        assert [e[name] for e in ddp[0]["logs"]] == pytest.approx([e[name] for e in single[0]["logs"]], rel=1e-4), name
    ddp_weights = load_file(str(ddp_dir / "student.safetensors"))
    single_weights = load_file(str(single_dir / "student.safetensors"))
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-4, atol=1e-6)
