"""Multi-process distillation on CPU (gloo), in each launch mode of `accelerate_configs/`: every rank
uses the same temperature, two ranks with batch B train like one process with batch 2B (DDP,
DeepSpeed ZeRO-2 and ZeRO-3, FSDP2), the ZeRO-3 and FSDP teachers are really partitioned, and
checkpoints resume. FSDP runs through a test-only shim (distributed/fsdp_on_cpu.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import arithmetic_records, free_port, gpt2_tokenizer, tokenize_records
from safetensors.torch import load_file

from dts_llm.on_policy import batch_source

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "distributed" / "distill_worker.py"
# launch mode -> (accelerate config, mixed precision); the GPU configs as shipped, with the overrides
# a CPU machine needs.
ACCELERATE = {
    "zero2": ("deepspeed_zero2.yaml", "no"),
    "zero3": ("deepspeed_zero3.yaml", "no"),
    "fsdp": ("fsdp.yaml", "no"),
    "fsdp-bf16": ("fsdp.yaml", "bf16"),
}
CONFIGS = ["zero2", "zero3", "fsdp"]  # fp32: these must train exactly like one process
SAVED = {"save_steps": 2}


def resumed(mode: str) -> dict:
    return {"resume": f"{mode}/checkpoint-2"}


# launch mode -> the runs its processes train in turn: run name (its output folder) -> worker options.
# A teacher object built before the arguments runs first: once a ZeRO-3 config has been seen, the
# process would load it partitioned.
LAUNCHES = {
    "single": {
        "single": {},
        "single-ctkd": {"temperature": "ctkd"},
        "single-dts-token": {"temperature": "dts_token"},
        "single-untied": {"untied": True},
    },
    "ddp": {
        "ddp": {},
        "ddp-ctkd": {"temperature": "ctkd"},
        "ddp-cached": {"teacher_cache": "cache"},
        "ddp-on-policy": {"lmbda": 0.5},
        "ddp-dts-token": {"temperature": "dts_token"},
        "ddp-auto-range": {"auto_range": True},
        "ddp-fused": {"fused_head": True},
    },
    "zero2": {"zero2": SAVED, "zero2-resumed": resumed("zero2"), "zero2-fused": {"fused_head": True}},
    "zero3": {
        "zero3-teacher-object-bf16": {"teacher_before_args": True, "teacher_dtype": "bfloat16"},
        "zero3-cached": {"teacher_cache": "cache"},
        "zero3": SAVED,
        "zero3-resumed": resumed("zero3"),
        "zero3-on-policy": {"lmbda": 0.5, "seq_kd": True},
        "zero3-fused": {"fused_head": True},
    },
    "fsdp": {
        "fsdp": SAVED,
        "fsdp-resumed": resumed("fsdp"),
        "fsdp-on-policy": {"lmbda": 0.5, "seq_kd": True, "lora": True},
        "fsdp-fused": {"fused_head": True},
        "fsdp-fused-head-resharded": {"fused_head": True, "reshard_student_head": True},
        "fsdp-fused-untied-head-resharded": {"fused_head": True, "reshard_student_head": True, "untied": True},
    },
    "fsdp-bf16": {"fsdp-bf16": {}, "fsdp-bf16-fused": {"fused_head": True}},
}
# fp32 fused_head runs, each to train like one process
FUSED = [
    "ddp-fused",
    "zero2-fused",
    "zero3-fused",
    "fsdp-fused",
    "fsdp-fused-head-resharded",
    "fsdp-fused-untied-head-resharded",
]
PARALLEL = [
    "ddp",
    "zero2",
    "zero3",
    "fsdp",
    "zero3-teacher-object-bf16",
    "fsdp-bf16",
    "ddp-cached",
    "zero3-cached",
    "ddp-on-policy",
    "zero3-on-policy",
    "fsdp-on-policy",
    *FUSED,
    "fsdp-bf16-fused",
]


def launch_command(mode: str) -> list[str]:
    if mode == "single":
        return [sys.executable, str(WORKER)]
    if mode == "ddp":
        port = ["--master_port", str(free_port())]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *port, str(WORKER)]
    config, precision = ACCELERATE[mode]
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
    ]
    overrides = ["--num_processes", "2", "--mixed_precision", precision, "--main_process_port", str(free_port())]
    return [*launcher, *overrides, str(WORKER)]


def launch(mode: str, teacher_dir, root: Path) -> dict[str, tuple[list[dict], Path]]:
    """Launch ``mode``'s processes once for all its runs; each run's per-rank results and folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if not mode.startswith("zero"):
        env["ACCELERATE_USE_CPU"] = "true"  # with a DeepSpeed config this would mean DDP
    per_device_batch = "8" if mode == "single" else "4"
    runs = LAUNCHES[mode]
    specs = [json.dumps({**options, "output": name}) for name, options in runs.items()]
    done = subprocess.run(
        [*launch_command(mode), str(teacher_dir), per_device_batch, *specs],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    processes = 1 if mode == "single" else 2
    return {
        name: ([json.loads((root / name / f"rank{rank}.json").read_text()) for rank in range(processes)], root / name)
        for name in runs
    }


@pytest.fixture(scope="module")
def runs(trained_teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    results = {}
    for mode in LAUNCHES:
        results.update(launch(mode, trained_teacher_dir, root))
    return results


@pytest.mark.parametrize("mode", PARALLEL)
def test_every_rank_computes_the_same_temperature(runs, mode):
    ranks, _ = runs[mode]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert len(ranks[0]["temperatures"]) == 4
    assert ranks[0]["temperatures"] == ranks[1]["temperatures"]
    assert [e["temperature"] for e in ranks[0]["logs"]] == [e["temperature"] for e in ranks[1]["logs"]]


@pytest.mark.parametrize(
    "mode",
    [
        "ddp",
        *CONFIGS,
        "ddp-cached",
        "zero3-cached",
        *FUSED,
    ],
)
def test_two_ranks_match_one_process_on_the_union_of_their_batches(runs, mode):
    (ranks, out), (single, single_dir) = runs[mode], runs["single-untied" if "untied" in mode else "single"]
    assert ranks[0]["temperatures"] == pytest.approx(single[0]["temperatures"], rel=1e-5)
    for name in ("loss", "kd_loss", "ce_loss", "teacher_ce_loss"):
        assert [e[name] for e in ranks[0]["logs"]] == pytest.approx([e[name] for e in single[0]["logs"]], rel=1e-4), (
            name
        )
    weights = load_file(str(out / "student.safetensors"))
    single_weights = load_file(str(single_dir / "student.safetensors"))
    assert weights.keys() == single_weights.keys()
    for name, tensor in single_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "student_sharded"),
    [
        ("fsdp-fused", [False] * 4),
        ("fsdp-fused-head-resharded", [True] * 4),
        ("fsdp-fused-untied-head-resharded", [True] * 4),
        ("zero3-fused", [True]),  # after the first step DeepSpeed's prefetching decides
    ],
)
def test_the_fused_loss_gathers_each_sharded_head_once_per_step(runs, mode, student_sharded):
    """Each DTS step reads the heads twice (the CE pass, then the loss). A head left partitioned (the teacher's
    always; under FSDP2 the student's when its unit reshards after the forward, tied or not) is gathered at the
    first reading of the step and still whole at the second; accelerate's FSDP2 layout keeps the student's head
    whole. The runs above match one process."""
    for rank in runs[mode][0]:
        sharded = rank["heads_sharded_at_loss"]
        assert sharded["teacher"] == [True, False] * 4
        assert sharded["student"][1::2] == [False] * 4
        assert sharded["student"][0::2][: len(student_sharded)] == student_sharded


def test_two_processes_write_their_own_shards_of_a_teacher_cache_and_train_without_a_teacher(runs):
    (ddp, root), (zero3, _) = runs["ddp-cached"], runs["zero3-cached"]
    assert [rank["cache_shards_written"] for rank in ddp] == [
        ["train-00000.safetensors", "train-00002.safetensors"],
        ["train-00001.safetensors", "train-00003.safetensors"],
    ]
    assert [rank["cache_shards_written"] for rank in zero3] == [[], []]  # finished: reused as it is
    assert [rank["teacher"] for rank in ddp + zero3] == [None] * 4
    manifest = json.loads((root.parent / "cache" / "manifest.json").read_text())
    examples = tokenize_records(gpt2_tokenizer(), arithmetic_records(32))
    scored = [sum(label != -100 for label in labels[1:]) for labels in examples["labels"]]
    shards = manifest["splits"]["train"]["shards"]
    assert [shard["rows"] for shard in shards] == [sum(scored[first : first + 8]) for first in range(0, 32, 8)]


@pytest.mark.parametrize("mode", ["ddp-on-policy", "zero3-on-policy", "fsdp-on-policy"])
def test_two_ranks_generate_on_the_same_steps(runs, mode):
    """lmbda=0.5 (with seq_kd under ZeRO-3, the student gathered and the partitioned teacher stepping on both
    ranks, and FSDP2 with a LoRA student, both sharded): at every step both ranks or neither generated (the
    logged share is over both), as the seed and step decide."""
    ranks, _ = runs[mode]
    seq_kd = not mode.startswith("ddp")
    expected = [float(batch_source(0, 0.5, seq_kd, step, 0) is not None) for step in range(4)]
    assert 0.0 in expected or seq_kd
    for rank in ranks:
        assert [entry["generated_share"] for entry in rank["logs"]] == expected
        assert all(0 < entry["completion_length"] <= 8 for entry in rank["logs"] if entry["generated_share"])
    if mode == "fsdp-on-policy":  # the LoRA student generated and trained with its adapter alone
        assert ranks[0]["trainable"] and all("lora_" in name for name in ranks[0]["trainable"])


def test_an_auto_range_is_measured_once_on_the_main_process_and_shared(runs):
    """Both ranks measure (a partitioned teacher needs both); the main process's range is every rank's and
    is saved once; DTS then runs inside it alike on both ranks."""
    ranks, out = runs["ddp-auto-range"]
    record = json.loads((out / "auto_temperature.json").read_text())
    low, high = record["temperature_min"], record["temperature_max"]
    assert [rank["temperature_range"] for rank in ranks] == [[low, high, high]] * 2 and 1 <= low < high
    assert record["examples"] == 32 and record["tokens"] > 0
    assert ranks[0]["temperatures"] == ranks[1]["temperatures"]
    assert all(low <= t <= high for t in ranks[0]["temperatures"])


def test_a_learnt_temperature_moves_alike_on_two_ranks_and_on_one_process(runs):
    """CTKD's temperature lives outside the DDP-wrapped model: its gradient must be averaged by
    hand, or each rank would learn its own T (and a sum instead of a mean would double its step)."""
    (ranks, _), (single, _) = runs["ddp-ctkd"], runs["single-ctkd"]
    assert ranks[0]["temperatures"] == ranks[1]["temperatures"]
    assert ranks[0]["temperatures"] == pytest.approx(single[0]["temperatures"], rel=1e-5)
    assert len({round(t, 4) for t in single[0]["temperatures"]}) == 4  # it really moved
    for name in ("loss", "kd_loss", "temperature"):
        assert [e[name] for e in ranks[0]["logs"]] == pytest.approx([e[name] for e in single[0]["logs"]], rel=1e-4), (
            name
        )


def test_per_token_dts_shares_its_temperature_across_ranks_and_trains_as_one_process(runs):
    """Each token's T is a momentum step from the shared T, which the CEs summed over ranks decide: the
    ranks agree on it, and each token gets the T one process would give it."""
    (ranks, _), (single, _) = runs["ddp-dts-token"], runs["single-dts-token"]
    assert ranks[0]["temperatures"] == ranks[1]["temperatures"]
    assert ranks[0]["temperatures"] == pytest.approx(single[0]["temperatures"], rel=1e-5)
    for name in ("loss", "kd_loss", "dts_a"):
        assert [e[name] for e in ranks[0]["logs"]] == pytest.approx([e[name] for e in single[0]["logs"]], rel=1e-4), (
            name
        )


@pytest.mark.parametrize("mode", ["single", "ddp", "zero2"])
def test_the_teacher_is_a_frozen_unwrapped_replica_outside_zero3(runs, mode):
    for rank in runs[mode][0]:
        assert rank["teacher"] == {"wrapper": "GPT2LMHeadModel", "partitions": {}, "trainable": 0}


@pytest.mark.parametrize(
    ("mode", "dtype"), [("zero3", "torch.float32"), ("zero3-teacher-object-bf16", "torch.bfloat16")]
)
def test_the_zero3_teacher_is_partitioned_across_ranks(runs, mode, dtype):
    """Each matrix holds half its elements per rank; only tensors under 10 x width (640) persist.

    Loaded under zero3_init_flag (``zero3``) or built whole before the arguments and partitioned by
    the trainer, in its ``teacher_dtype`` (``zero3-teacher-object-bf16``).
    """
    persistence_threshold = 10 * 64
    for rank in runs[mode][0]:
        assert rank["teacher"]["wrapper"] == "DeepSpeedEngine" and rank["teacher"]["trainable"] == 0
        partitions = rank["teacher"]["partitions"]
        assert len(partitions) == 28  # every parameter of the 2-layer GPT-2 (lm_head is tied to wte)
        for name, part in partitions.items():
            assert part["local"] == math.ceil(part["numel"] / 2), name
            expected = "NOT_AVAILABLE" if part["numel"] > persistence_threshold else "AVAILABLE"
            assert part["status"] == expected, name
            assert part["dtype"] == dtype, name
        assert partitions["transformer.h.0.attn.c_attn.weight"]["status"] == "NOT_AVAILABLE"


@pytest.mark.parametrize("mode", ["fsdp", "fsdp-bf16"])
def test_the_fsdp_teacher_is_sharded_across_ranks(runs, mode):
    """FSDP2: every teacher parameter is a DTensor whose rows are split between the two ranks."""
    ranks = runs[mode][0]
    assert [rank["teacher"]["wrapper"] for rank in ranks] == ["FSDPGPT2LMHeadModel"] * 2
    partitions = [rank["teacher"]["partitions"] for rank in ranks]
    assert len(partitions[0]) == 28 and all(rank["teacher"]["trainable"] == 0 for rank in ranks)
    for name, part in partitions[0].items():
        assert part["local"] + partitions[1][name]["local"] == part["numel"], name
        assert 0 < part["local"] < part["numel"], name


@pytest.mark.parametrize("mode", ["zero3-teacher-object-bf16", "fsdp-bf16", "fsdp-bf16-fused"])
def test_a_half_precision_teacher_stays_close_to_the_fp32_run(runs, mode):
    """bf16 teacher (or bf16 mixed precision): the same trajectory to within bf16 rounding."""
    ranks, single = runs[mode][0], runs["single"][0]
    for name in ("loss", "kd_loss", "ce_loss", "teacher_ce_loss", "temperature"):
        values = [e[name] for e in ranks[0]["logs"]]
        assert all(math.isfinite(v) for v in values), name
        assert values == pytest.approx([e[name] for e in single[0]["logs"]], rel=3e-2, abs=1e-2), name


@pytest.mark.parametrize("mode", CONFIGS)
def test_a_sharded_checkpoint_resumes_on_the_same_trajectory(runs, mode):
    (full, _), (resumed, out) = runs[mode], runs[f"{mode}-resumed"]
    assert resumed[0]["temperatures"] == pytest.approx(full[0]["temperatures"][2:], rel=1e-6)
    resumed_logs = [e for e in resumed[0]["logs"] if e["step"] > 2]
    assert [e["step"] for e in resumed_logs] == [3, 4]
    for name in ("loss", "kd_loss", "ce_loss", "temperature"):
        assert [e[name] for e in resumed_logs] == pytest.approx([e[name] for e in full[0]["logs"][2:]], rel=1e-5), name
    full_weights = load_file(str(runs[mode][1] / "student.safetensors"))
    for name, tensor in load_file(str(out / "student.safetensors")).items():
        torch.testing.assert_close(tensor, full_weights[name], rtol=1e-5, atol=1e-7)
