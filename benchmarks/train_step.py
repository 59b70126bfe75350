"""Tokens/s of a whole distillation step: dts_llm's DistillationTrainer vs TRL's GKDTrainer vs the floor.

    python benchmarks/train_step.py [--batch 4] [--length 256] [--steps 10] [--warmup 3] [--rounds 3] [--quick]

Tiny GPT-2 teacher and student built from configs with the real 50257-token vocabulary, the same
initial weights, data, batch, optimizer and seed for every trainer; fp32 on the CPU (``--bf16``
turns on mixed precision on a GPU). Three ``transformers.Trainer`` subclasses, each in a fresh
process, train ``--warmup + --steps`` optimizer steps:

* ``floor``: what no distillation step can beat, the student's SFT step (the model's own
  cross-entropy) plus the teacher's forward pass under no_grad; no KD loss;
* ``trl``: ``trl.experimental.gkd.GKDTrainer`` configured as off-policy forward KL: lmbda=0 (never
  generates on-policy), seq_kd=False (never generates with the teacher), beta=0 (KL(teacher ||
  student)); its loss is at temperature 1 (``compute_loss`` passes no temperature; GKDConfig's
  ``temperature`` is the sampling one, set to 1 too). gradient_checkpointing and bf16, which
  SFTConfig turns on by default, are off as in the others; its own collator (which expects chat
  ``messages``) is replaced by the shared one; dropout is 0 in the models, so ``disable_dropout``
  changes nothing;
* ``ours``: ``dts_llm.DistillationTrainer`` with divergence=forward_kl, kd_ratio=1 (KD only, like
  GKD), temperature_policy=constant at 1.

Every example is ``--length`` random token ids (no padding; the first quarter is prompt, labelled
-100), so a step is batch x length tokens. A callback times each optimizer step from
``on_step_begin`` to ``on_step_end`` (forward, backward, clipping, optimizer; the batch is already
collated by then); tokens/s is batch x length over the median of the steps after the warm-up ones,
then the median over ``--rounds`` fresh processes per trainer, the three run in turn (one process
per trainer varied by 25% from one run to the next on the shared 2-core machine).
The first-step losses must agree between trl and ours (same quantity, same weights, same batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from _common import (
    Stopwatch,
    add_common_options,
    apply_common_options,
    first_loss_recorder,
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

IGNORE_INDEX = -100
PROMPT_FRACTION = 0.25
METHODS = ("floor", "trl", "ours")
TRL_TOKENS_PER_S_TARGET = 1.2  # ours / trl, at least
FLOOR_TIME_TARGET = 1.05  # ours / floor step time, at most
TEACHER = {"width": 256, "layers": 4, "heads": 4}
STUDENT = {"width": 128, "layers": 2, "heads": 2}


def token_dataset(vocab_size: int, examples: int, length: int, seed: int):
    """Random token ids of one length: no padding, so every step sees batch x length tokens."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_size, (examples, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : round(PROMPT_FRACTION * length)] = IGNORE_INDEX
    return Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": [[1] * length] * examples, "labels": labels.tolist()}
    )


def step_timer():
    """A callback that records each optimizer step's wall time (the batch is collated before it starts)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stopwatch, self.seconds = Stopwatch(), []  # (wall, CPU) per step

        def on_step_begin(self, args, state, control, **kwargs):
            self.stopwatch.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(self.stopwatch.stop())

    return StepTimer()


def build_trainer(method: str, args, output_dir: str):
    """The trainer ``method`` on the shared models, data, collator and training arguments."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = gpt2_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    teacher = tiny_gpt2(vocab, eos, positions=args.length, seed=1, **TEACHER)
    student = tiny_gpt2(vocab, eos, positions=args.length, seed=2, **STUDENT)
    common = {
        "output_dir": output_dir, "per_device_train_batch_size": args.batch, "max_steps": args.warmup + args.steps,
        "learning_rate": 5e-5, "lr_scheduler_type": "constant", "optim": "adamw_torch", "weight_decay": 0.0,
        "max_grad_norm": 1.0, "seed": 0, "data_seed": 0, "logging_strategy": "no", "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0, "remove_unused_columns": False,
        "activation_checkpointing": False, "bf16": args.bf16, "use_cpu": args.device == "cpu",
    }  # fmt: skip
    shared = {
        "train_dataset": token_dataset(vocab, args.batch * (args.warmup + args.steps), args.length, seed=3),
        "data_collator": DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
        "processing_class": tokenizer,
    }
    if method == "ours":
        from dts_llm import DistillationConfig, DistillationTrainer

        config = DistillationConfig(
            **common, divergence="forward_kl", kd_ratio=1.0, temperature_policy="constant", temperature_init=1.0
        )
        return DistillationTrainer(model=student, teacher_model=teacher, args=config, **shared)
    if method == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False)
        return GKDTrainer(model=student, teacher_model=teacher, args=config, **shared)

    class StudentSFTPlusTeacherForward(Trainer):
        """The floor: the student's own CE step, plus the teacher forward a KD step needs."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    teacher.to(args.device).eval()
    return StudentSFTPlusTeacherForward(model=student, args=TrainingArguments(**common), **shared)


def measure_in_worker(method: str, args) -> dict:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(method, args, output_dir)
        # SFTConfig (GKDConfig's base) defaults to checkpointing and bf16: make sure neither crept back.
        if trainer.args.activation_checkpointing or bool(trainer.args.bf16) != args.bf16:
            raise RuntimeError(f"{method}: checkpointing or bf16 differs from the other trainers")
        timer = step_timer()
        trainer.add_callback(timer)
        first_loss = first_loss_recorder(trainer)
        baseline = reset_peak_memory(device)
        trainer.train()
        peak = peak_memory(device) - baseline
    wall, cpu = (statistics.median(column) for column in zip(*timer.seconds[args.warmup :], strict=False))
    return {"step_s": wall, "step_cpu_s": cpu, "first_loss": first_loss[0], "peak_bytes": peak}


def report(args, results):
    tokens_per_step = args.batch * args.length
    print_header(
        "Training-step benchmark: dts_llm DistillationTrainer vs TRL GKDTrainer (off-policy forward KL) vs "
        "the floor (student SFT step + teacher forward)",
        resolve_device(args.device),
        f"GPT-2 teacher {TEACHER} / student {STUDENT} from configs, vocab 50257; B x L = {args.batch} x {args.length} "
        f"random tokens ({tokens_per_step} a step, first {PROMPT_FRACTION:.0%} prompt); AdamW lr 5e-5, clip 1.0; "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}; KD = KL(teacher || student) at T=1 (ours kd_ratio=1 constant T; "
        f"TRL lmbda=0 beta=0 seq_kd=False); step time = median of {args.steps} optimizer steps after {args.warmup} "
        f"warm-up steps (CPU time: the process's, all threads) in a fresh process per trainer, then the median over "
        f"{args.rounds} rounds of the three in turn; memory = the process's peak resident set during train() "
        "beyond what it held before (models and data built)",
        f"ours >= {TRL_TOKENS_PER_S_TARGET}x TRL's tokens/s; ours <= {FLOOR_TIME_TARGET}x the floor's step time",
    )
    rows = [
        [
            method,
            f"{r['step_s'] * 1e3:,.0f} ms",
            f"{tokens_per_step / r['step_s']:,.0f}",
            f"{r['step_cpu_s'] * 1e3:,.0f} ms",
            mib(r["peak_bytes"]),
            f"{r['first_loss']:.6f}",
        ]
        for method, r in results.items()
    ]
    print_table(["trainer", "step time", "tokens/s", "CPU time a step", "peak extra memory", "first-step loss"], rows)
    ours, trl, floor = results["ours"], results["trl"], results["floor"]
    speedup = trl["step_s"] / ours["step_s"]
    over_floor = ours["step_s"] / floor["step_s"]
    loss_diff = abs(ours["first_loss"] - trl["first_loss"]) / abs(trl["first_loss"])
    print(f"\nfirst-step loss rel diff ours vs trl: {loss_diff:.1e} (floor's loss is the student's CE, not KD)")
    cpu_speedup = trl["step_cpu_s"] / ours["step_cpu_s"]
    cpu_over_floor = ours["step_cpu_s"] / floor["step_cpu_s"]
    print(
        f"ours / trl tokens/s:   {speedup:.2f}x "
        f"(>= {TRL_TOKENS_PER_S_TARGET}x: {verdict(speedup >= TRL_TOKENS_PER_S_TARGET)}); "
        f"by CPU time {cpu_speedup:.2f}x"
    )
    print(
        f"ours / floor time:     {over_floor:.2f}x "
        f"(<= {FLOOR_TIME_TARGET}x: {verdict(over_floor <= FLOOR_TIME_TARGET)}); "
        f"by CPU time {cpu_over_floor:.2f}x"
    )
    print(f"ours / trl peak extra memory: {ours['peak_bytes'] / trl['peak_bytes']:.2f}x")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per trainer, run in turn")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    add_common_options(parser)
    parser.add_argument("--quick", action="store_true", help="smoke test: B x L = 2 x 32, 2 + 1 steps")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.steps, args.warmup, args.rounds = 2, 32, 2, 1, 1
    apply_common_options(args)
    return args


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(measure_in_worker(args.worker, args)))
        return
    argv = ["--batch", args.batch, "--length", args.length, "--steps", args.steps, "--warmup", args.warmup]
    argv += ["--device", args.device, "--threads", args.threads]
    argv += ["--bf16"] if args.bf16 else []
    runs = {method: [] for method in METHODS}
    for round_ in range(1, args.rounds + 1):  # in turn, so that a slow spell of a shared machine hits all three
        for method in METHODS:
            runs[method].append(run_worker(__file__, [*argv, "--worker", method], f"{method} trainer, round {round_}"))
    report(args, {method: median_run(method_runs) for method, method_runs in runs.items()})


def median_run(runs: list[dict]) -> dict:
    """Each measure's median over the rounds (the first-step loss is the same in every round)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


if __name__ == "__main__":
    main()
