"""Tokens trained per second of an on-policy distillation step: dts_llm's DistillationTrainer vs TRL's GKDTrainer.

    python benchmarks/on_policy.py [--batch 4] [--prompt 64] [--new 64] [--lmbda 1] [--steps 6] [--warmup 2] [--quick]

The tiny GPT-2 pair of ``train_step.py`` (real 50257-token vocabulary, same initial weights, data,
optimizer and seed). Both trainers replace each batch, with probability ``--lmbda``, by the student's
sampled completions (temperature 1, at most ``--new`` tokens) of its ``--prompt``-token prompts, and
train on GKD's JSD with beta 0.5 at T = 1 (ours: ``divergence=jsd``, ``kd_ratio=1``, constant T). TRL
gets its prompts as its ChatML collator would give them (``prompts``, ``prompt_attention_mask``).
Random weights rarely sample an EOS, so a generated step learns about batch x ``--new`` tokens in both.

A step is timed from the previous step's end to its own (ours generates while the Trainer fetches the
step's batches, TRL inside the step); tokens/s is the learned (label) tokens of the timed steps over
their time; "generation" is the time spent in the trainers' generation calls. Each trainer runs in a
fresh process; peak memory as in ``train_step.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from _common import (
    add_common_options,
    apply_common_options,
    gpt2_tokenizer,
    mib,
    peak_memory,
    print_header,
    print_table,
    reset_peak_memory,
    resolve_device,
    run_worker,
    tiny_gpt2,
    verdict,
)
from train_step import IGNORE_INDEX, STUDENT, TEACHER, TRL_TOKENS_PER_S_TARGET

METHODS = ("trl", "ours")


def prompt_dataset(vocab_size: int, examples: int, prompt: int, seed: int):
    """Random prompts with a one-token response (replaced by the completions)."""
    from datasets import Dataset

    ids = torch.randint(vocab_size, (examples, prompt + 1), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * (prompt + 1)] * examples,
                              "labels": labels.tolist()})  # fmt: skip


def with_prompts(collator, prompt: int):
    """TRL's GKD reads the prompts from ``prompts`` / ``prompt_attention_mask`` (here all of one length)."""

    def collate(examples):
        batch = collator(examples)
        batch["prompts"] = batch["input_ids"][:, :prompt]
        batch["prompt_attention_mask"] = batch["attention_mask"][:, :prompt]
        return batch

    return collate


def timed(function, seconds: list):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    return wrapper


def build_trainer(method: str, args, output_dir: str, generation_seconds: list):
    from transformers import DataCollatorForSeq2Seq

    tokenizer = gpt2_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    positions = args.prompt + args.new + 1
    teacher = tiny_gpt2(vocab, eos, positions=positions, seed=1, **TEACHER)
    student = tiny_gpt2(vocab, eos, positions=positions, seed=2, **STUDENT)
    common = {
        "output_dir": output_dir, "per_device_train_batch_size": args.batch, "max_steps": args.warmup + args.steps,
        "learning_rate": 5e-5, "lr_scheduler_type": "constant", "optim": "adamw_torch", "max_grad_norm": 1.0,
        "seed": 0, "logging_strategy": "no", "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        "remove_unused_columns": False, "activation_checkpointing": False, "bf16": False,
        "use_cpu": args.device == "cpu", "max_new_tokens": args.new, "lmbda": args.lmbda,
    }  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    dataset = prompt_dataset(vocab, args.batch * (args.warmup + args.steps), args.prompt, seed=3)
    shared = {"train_dataset": dataset, "processing_class": tokenizer}
    if method == "ours":
        from dts_llm import DistillationConfig, DistillationTrainer

        config = DistillationConfig(**common, divergence="jsd", jsd_beta=0.5, kd_ratio=1.0,
                                    temperature_policy="constant", temperature_init=1.0)  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=config, data_collator=collator, **shared
        )
        trainer.on_policy.complete = timed(trainer.on_policy.complete, generation_seconds)
        return trainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    config = GKDConfig(**common, beta=0.5, temperature=1.0, seq_kd=False)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         data_collator=with_prompts(collator, args.prompt), **shared)  # fmt: skip
    trainer.generate_on_policy_outputs = timed(trainer.generate_on_policy_outputs, generation_seconds)
    return trainer


def step_clock():
    """Wall time between consecutive step ends (the first from the start of training), and labels learned."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def measure_in_worker(method: str, args) -> dict:
    device = torch.device(args.device)
    generation_seconds, tokens = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(method, args, output_dir, generation_seconds)
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *rest, **kwargs):  # the labels the loss learns (shifted)
            tokens.append(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
            return compute_loss(model, inputs, *rest, **kwargs)

        trainer.compute_loss = counted
        clock = step_clock()
        trainer.add_callback(clock)
        baseline = reset_peak_memory(device)
        trainer.train()
        peak = peak_memory(device) - baseline
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][args.warmup :]
    generation = generation_seconds[-len(durations) :] if generation_seconds else [0.0]
    timed_tokens = tokens[args.warmup :]
    return {"seconds": sum(durations), "tokens": sum(timed_tokens), "steps": len(durations),
            "generation_s": sum(generation), "peak_bytes": peak}  # fmt: skip


def report(args, results):
    print_header(
        "On-policy step benchmark: dts_llm DistillationTrainer vs TRL GKDTrainer",
        resolve_device(args.device),
        f"GPT-2 teacher {TEACHER} / student {STUDENT} from configs, vocab 50257; batch {args.batch}, random prompts "
        f"of {args.prompt} tokens, completions of at most {args.new} sampled at temperature 1; lmbda {args.lmbda}; "
        f"JSD beta 0.5 at T = 1, the divergence alone; AdamW lr 5e-5; fp32; {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, one fresh process per trainer",
        f"ours >= {TRL_TOKENS_PER_S_TARGET}x TRL's tokens trained per second",
    )
    rows = [
        [method, f"{r['seconds'] / r['steps'] * 1e3:,.0f} ms", f"{r['tokens'] / r['seconds']:,.0f}",
         f"{r['generation_s'] / r['seconds']:.0%}", f"{r['tokens'] / r['steps']:,.0f}", mib(r["peak_bytes"])]
        for method, r in results.items()
    ]  # fmt: skip
    print_table(["trainer", "step time", "tokens/s", "generation share", "tokens a step", "peak extra memory"], rows)
    ours, trl = (results[m]["tokens"] / results[m]["seconds"] for m in ("ours", "trl"))
    print(f"\nours / trl tokens/s: {ours / trl:.2f}x (>= {TRL_TOKENS_PER_S_TARGET}x: "
          f"{verdict(ours / trl >= TRL_TOKENS_PER_S_TARGET)})")  # fmt: skip


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64, help="max_new_tokens")
    parser.add_argument("--lmbda", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    add_common_options(parser)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: batch 2, prompts 8, 8 new tokens, 1 + 2 steps"
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.prompt, args.new, args.steps, args.warmup = 2, 8, 8, 2, 1
    apply_common_options(args)
    return args


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(measure_in_worker(args.worker, args)))
        return
    argv = ["--batch", args.batch, "--prompt", args.prompt, "--new", args.new, "--lmbda", args.lmbda]
    argv += ["--steps", args.steps, "--warmup", args.warmup, "--device", args.device, "--threads", args.threads]
    report(
        args, {method: run_worker(__file__, [*argv, "--worker", method], f"{method} trainer") for method in METHODS}
    )


if __name__ == "__main__":
    main()
