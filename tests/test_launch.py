"""`dts-llm distill` launched with the shipped `accelerate_configs/` on two CPU processes (gloo):
a LoRA student in every mode (only its adapter trains; the saved adapter and the merged model give
the trained student's logits), a killed rank fails the launch instead of hanging, and launches that
accelerate would quietly turn into something else are refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import base_recipe, free_port, make_cli_workspace, write_recipe
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from dts_llm.data import DataArguments, load_instruction_data
from dts_llm.losses import IGNORE_INDEX, causal_lm_cross_entropy

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"
CPU_OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no"]
# The GPU configs as shipped, with the overrides a CPU machine needs (cpu.yaml needs none).
MODES = {
    "cpu": ["--config_file", str(CONFIGS / "cpu.yaml")],
    "ddp": ["--config_file", str(CONFIGS / "ddp.yaml"), *CPU_OVERRIDES],
    "zero2": ["--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), *CPU_OVERRIDES],
    "zero3": ["--config_file", str(CONFIGS / "deepspeed_zero3.yaml"), *CPU_OVERRIDES],
    "fsdp": ["--config_file", str(CONFIGS / "fsdp.yaml"), *CPU_OVERRIDES],
}
DTS_LLM = ["-m", "dts_llm"]
# accelerate drops FSDP without a GPU: FSDP runs go through a test-only shim that keeps it.
DTS_LLM_KEEPING_FSDP = [str(Path(__file__).parent / "distributed" / "fsdp_cli.py")]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"]}


def launch(
    mode: str, recipe: str, *flags: str, program: list[str] | None = None, **variables: str
) -> subprocess.Popen:
    if program is None:
        program = DTS_LLM_KEEPING_FSDP if mode == "fsdp" else DTS_LLM
    port = ["--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *MODES[mode], *port, *program, "distill", recipe]
    env = {name: value for name, value in os.environ.items() if name != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **variables)
    return subprocess.Popen([*command, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: int = 600) -> str:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_cli_workspace(tmp_path_factory.mktemp("launch"))


def launch_recipe(workspace, output: str, **fields) -> dict:
    return base_recipe(
        workspace,
        output,
        model_name_or_path=str(workspace / "student-init"),
        teacher_model_name_or_path=str(workspace / "teacher-init"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        **{"ddp_backend": "gloo", **fields},
    )


def validation_ce(model, workspace, tokenizer) -> float:
    """Token-mean response CE of ``model`` on the recipe's validation split, computed here."""
    data = load_instruction_data(
        DataArguments(dataset=str(workspace / "dolly.jsonl"), dev_num=8, max_length=128, max_prompt_length=96),
        tokenizer,
    )
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)(list(data.validation))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return causal_lm_cross_entropy(logits, batch["labels"], vocab_size=len(tokenizer)).item()


@pytest.mark.parametrize("mode", ["cpu", "zero2", "zero3", "fsdp"])
def test_a_lora_student_trains_only_its_adapter_in_every_mode(workspace, mode):
    recipe = launch_recipe(
        workspace,
        f"lora-{mode}",
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        merge_lora=True,
    )
    recipe["peft"] = LORA
    finish(launch(mode, write_recipe(workspace / f"lora-{mode}.yaml", **recipe)))
    out = workspace / f"lora-{mode}"

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name), "adapter untrained"

    # The merged model differs from the initial student only where LoRA adapts (c_attn).
    initial = load_file(str(workspace / "student-init" / "model.safetensors"))
    merged_weights = load_file(str(out / "merged" / "model.safetensors"))
    for name, tensor in initial.items():
        if "c_attn.weight" in name:
            assert not torch.equal(merged_weights[name], tensor), name
        else:
            torch.testing.assert_close(merged_weights[name], tensor, rtol=0, atol=0, msg=name)

    # The adapter as peft loads it, and the merged model, give the trained student's eval CE.
    tokenizer = AutoTokenizer.from_pretrained(out)
    logged = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    eval_ce = next(entry["eval_ce_loss"] for entry in logged if "eval_ce_loss" in entry)
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "student-init"), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert validation_ce(student, workspace, tokenizer) == pytest.approx(eval_ce, rel=1e-5)
    assert validation_ce(merged, workspace, tokenizer) == pytest.approx(eval_ce, rel=1e-5)


def worker_pids(launcher_pid: int) -> list[int]:
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_a_killed_rank_fails_the_launch_and_the_run_resumes_from_its_checkpoint(workspace):
    recipe = write_recipe(
        workspace / "crash.yaml",
        **launch_recipe(workspace, "crash", max_steps=30, save_strategy="steps", save_steps=2),
    )
    out = workspace / "crash"
    process = launch("ddp", recipe)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2" / "temperature_policy.json").is_file():
        assert process.poll() is None, process.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)  # the launcher notices and stops the survivor
    assert process.returncode != 0
    assert "ChildFailedError" in stderr and "Signal 9 (SIGKILL)" in stderr
    assert not (out / "model.safetensors").exists()

    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    last = checkpoints[-1]
    finish(launch("ddp", recipe, "--resume_from_checkpoint", str(last)))
    history = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "kd_loss" in entry] == list(range(1, 31))
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("mode", "recipe_fields", "variables", "message"),
    [
        ("cpu", {"use_cpu": False}, {}, "2 processes were launched but they would train separately"),
        (
            "cpu",
            {"use_cpu": False, "ddp_backend": None},
            {},
            "2 processes were launched but they would train separately",
        ),
        (
            "zero3",
            {},
            {"ACCELERATE_USE_CPU": "true"},
            "the launcher asked for DeepSpeed but accelerate set up MULTI_CPU",
        ),
        ("fsdp", {}, {}, "the launcher asked for FSDP but accelerate set up MULTI_CPU"),
    ],
    ids=["no-use_cpu", "no-use_cpu-nor-backend", "deepspeed-with-ACCELERATE_USE_CPU", "fsdp-on-cpu"],
)
def test_a_launch_that_accelerate_would_quietly_change_fails_before_training(
    workspace, mode, recipe_fields, variables, message
):
    recipe = launch_recipe(workspace, "quiet", max_steps=2, save_strategy="steps", save_steps=1, **recipe_fields)
    recipe = {key: value for key, value in recipe.items() if value is not None}
    process = launch(mode, write_recipe(workspace / "quiet.yaml", **recipe), program=DTS_LLM, **variables)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode != 0 and message in stderr
    assert not (workspace / "quiet" / "checkpoint-1").exists()
