"""One process of a multi-process distillation run, started by torchrun or `accelerate launch`.

Writes, per rank, the temperature the policy returned at every optimizer step, the logged metrics
and where the teacher's parameters live (for DeepSpeed ZeRO-3: each one's full and local size),
and on rank 0 the final student weights, so tests can compare launch modes with each other and
with a single-process run on the union of their batches. One launch trains several runs in turn
(one JSON object each), so that they share the processes' start-up.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from peft import LoraConfig
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import arithmetic_records, gpt2_tokenizer, tiny_gpt2, tokenize_records

import dts_llm.teacher_cache.writer as writer
from dts_llm import DistillationConfig, DistillationTrainer
from dts_llm.models import whole_model_loading
from dts_llm.teacher_cache import (
    CacheSettings,
    Processes,
    data_fingerprint,
    tokenizer_fingerprint,
    write_teacher_cache,
)

if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    from fsdp_on_cpu import keep_fsdp_on_cpu

    keep_fsdp_on_cpu()


RUN_DEFAULTS = {
    "save_steps": 0,
    "resume": None,
    "teacher_dtype": None,
    "teacher_before_args": False,
    "temperature": "dts",
    "teacher_cache": None,
    "lmbda": 0.0,
    "seq_kd": False,
    "lora": False,
    "auto_range": False,
    "fused_head": False,
    "reshard_student_head": False,
    "untied": False,
}


class TemperatureRecorder(TrainerCallback):
    def __init__(self):
        self.temperatures = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        policy = self.trainer.temperature_policy
        if isinstance(policy, torch.nn.Module):  # a learnt (CTKD) temperature: its value after the step
            with torch.no_grad():
                self.temperatures.append(policy(state.epoch).item())
        else:
            self.temperatures.append(policy.temperature)


def partition(parameter) -> dict | None:
    """Full and local element counts of a ZeRO-3 or FSDP2 parameter; None for a whole tensor."""
    if hasattr(parameter, "ds_numel"):
        local = parameter.ds_tensor
        return {
            "numel": parameter.ds_numel,
            "local": local.numel(),
            "status": parameter.ds_status.name,
            "dtype": str(local.dtype),
        }
    if isinstance(parameter, DTensor):
        return {"numel": parameter.numel(), "local": parameter.to_local().numel()}
    return None


def teacher_placement(teacher) -> dict:
    """The teacher's wrapper, its trainable tensors, and each partitioned parameter's sizes."""
    module = getattr(teacher, "module", teacher)
    partitions = {name: partition(p) for name, p in module.named_parameters() if partition(p) is not None}
    trainable = sum(p.requires_grad for p in module.parameters())
    return {"wrapper": type(teacher).__name__, "partitions": partitions, "trainable": trainable}


def write_cache(folder: str, teacher_dir: str, tokenizer, train_dataset, args) -> list[str]:
    """Every process writes its shards of the teacher cache (4 shards of 8 examples); the names of this
    process's. A cache already finished is left as it is."""
    written = []
    write_shard = writer._write_split_shard
    writer._write_split_shard = lambda *args: (written.append(args[-2].name), write_shard(*args))
    state = PartialState()
    with whole_model_loading(getattr(args, "hf_deepspeed_config", None)):
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    write_teacher_cache(
        teacher,
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        {"train": train_dataset},
        folder,
        CacheSettings(shard_examples=8),
        {"tokenizer": tokenizer_fingerprint(tokenizer), "data.train": data_fingerprint(train_dataset)},
        vocab_size=len(tokenizer),
        batch_size=4,
        processes=Processes(state.process_index, state.num_processes, state.wait_for_everyone),
    )
    writer._write_split_shard = write_shard
    return written


class ReshardStudentHead(TrainerCallback):
    """FSDP2: the unit holding the student's head frees its gathered weights after every forward (accelerate
    keeps them gathered), so that a fused loss finds the head sharded and has to gather it itself."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_output_embeddings().set_reshard_after_forward(True)


def is_sharded(weight) -> bool:
    """An FSDP2 DTensor, or a ZeRO-3 parameter whose partitions are not gathered."""
    return isinstance(weight, DTensor) or getattr(getattr(weight, "ds_status", None), "name", None) == "NOT_AVAILABLE"


def record_sharded_heads(heads) -> dict[str, list[bool]]:
    """Whether each model's head weight was sharded each time the fused loss read the heads."""
    sharded = {"student": [], "teacher": []}
    if heads is None:
        return sharded
    gather = heads._gather

    def recording(modules, gathered):
        for role in sharded:
            sharded[role].append(is_sharded(getattr(heads, role).weight))
        return gather(modules, gathered)

    heads._gather = recording
    return sharded


def train(options: argparse.Namespace) -> None:
    """One training run into ``options.output``; the processes may run several in turn."""
    tokenizer = gpt2_tokenizer()
    # A teacher object built before the arguments is not loaded partitioned, even under ZeRO-3.
    teacher = AutoModelForCausalLM.from_pretrained(options.teacher_dir) if options.teacher_before_args else None
    per_device_batch, save_steps = options.per_device_batch, options.save_steps
    args = DistillationConfig(
        output_dir=options.output,
        per_device_train_batch_size=per_device_batch,
        max_steps=4,
        optim="sgd",
        optim_args="momentum=0.9",  # optimizer state, so that resuming has some to restore
        learning_rate=0.2,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        temperature=options.temperature,
        temperature_progress="step",
        temperature_momentum=0.5,
        ctkd_lambda_epochs=0.0,  # the full reversed gradient from the first step
        ctkd_learning_rate=1.0,  # with the trained test teacher T moves ~0.2 a step (3 -> 2.1 in 4 steps), unsaturated
        teacher_dtype=options.teacher_dtype,
        lmbda=options.lmbda,
        seq_kd=options.seq_kd,
        max_new_tokens=8,
        **(
            {"temperature_min": "auto", "temperature_max": "auto", "temperature_init": "auto"}
            if options.auto_range
            else {}
        ),
        fused_head=options.fused_head,
    )
    recorder = TemperatureRecorder()
    train_dataset = tokenize_records(tokenizer, arithmetic_records(32))
    written = None
    if options.teacher_cache:
        written = write_cache(options.teacher_cache, options.teacher_dir, tokenizer, train_dataset, args)
        teacher = {"teacher_cache": options.teacher_cache}
    else:
        teacher = {"teacher_model": teacher if teacher is not None else options.teacher_dir}
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"]) if options.lora else None
    trainer = DistillationTrainer(
        model=tiny_gpt2(tokenizer, tied=not options.untied),
        **teacher,
        peft_config=lora,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[recorder, *([ReshardStudentHead()] if options.reshard_student_head else [])],
    )
    recorder.trainer = trainer
    sharded_at_loss = record_sharded_heads(trainer.fused_heads)
    trainer.train(resume_from_checkpoint=options.resume)
    rank = trainer.args.process_index
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "world_size": trainer.args.world_size,
        "temperatures": recorder.temperatures,
        "logs": logs,
        "teacher": None if trainer.teacher_model is None else teacher_placement(trainer.teacher_model),
        "cache_shards_written": written,
        "temperature_range": [args.temperature_min, args.temperature_max, args.temperature_init],
        "trainable": sorted(name for name, p in trainer.model.named_parameters() if p.requires_grad),
        "heads_sharded_at_loss": sharded_at_loss,
    }
    Path(options.output, f"rank{rank}.json").write_text(json.dumps(result))
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective under ZeRO-3
    if rank == 0:
        tied = trainer.model.config.tie_word_embeddings  # safetensors refuses a tensor saved twice
        state = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight" or not tied}
        save_file(state, str(Path(options.output, "student.safetensors")))


def run_options(teacher_dir: str, per_device_batch: int, run: str) -> argparse.Namespace:
    """A run given as JSON, its output folder and any of ``RUN_DEFAULTS`` it changes; a misspelt key fails
    rather than leaving a default in place."""
    options = json.loads(run)
    unknown = set(options) - {"output", *RUN_DEFAULTS}
    if unknown:
        raise ValueError(f"unknown run options {sorted(unknown)} in {run}")
    return argparse.Namespace(
        teacher_dir=teacher_dir, per_device_batch=per_device_batch, **{**RUN_DEFAULTS, **options}
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher_dir")
    parser.add_argument("per_device_batch", type=int)
    parser.add_argument("runs", nargs="+", help='JSON objects, e.g. {"output": "out", "save_steps": 2}; run in turn')
    arguments = parser.parse_args()
    # One launch, several runs: each interpreter start (torch, transformers, DeepSpeed) and process
    # group costs seconds; a run's trainer builds its own engine and state, so runs stay independent.
    for run in arguments.runs:
        train(run_options(arguments.teacher_dir, arguments.per_device_batch, run))
    if dist.is_initialized():
        dist.destroy_process_group()
    # Everything is written and the process group is gone. Under load, ZeRO-3 ranks sometimes abort
    # in C++ static destructors at interpreter exit ("terminate called without an active exception",
    # a joinable thread destroyed); skipping interpreter teardown keeps that out of the results.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
