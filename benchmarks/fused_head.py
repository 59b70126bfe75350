"""Peak memory and time of the fused-head loss vs the logits path vs Liger's fused linear JSD, and of a whole step.

    python benchmarks/fused_head.py [--vocab 50257 151936] [--shapes 4x512 8x1024] [--hidden 256] [--quick]

Loss alone (forward + backward from the final hidden states), (1 - r) CE + r T^2 KL(teacher || student)
at T = 2, r = 0.5, on ``--hidden``-wide hidden states of the student and the teacher (a quarter of each
sequence is prompt, labelled -100), averaged over the response tokens:

* ``fused``: ``dts_llm.losses.fused.fused_distillation_objective`` (hidden states and head weights in);
* ``logits``: the student's and the teacher's logits made by their heads (``F.linear``, the teacher's
  under no_grad), then ``dts_llm.losses.distillation_objective``: what the trainer does without
  ``fused_head``;
* ``dts-ce``: the no-grad pass the fused path adds for DTS before the loss
  (``fused_cross_entropies``: both models' CE sums from the same chunked projection);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (pure PyTorch, ``compiled=False``, its default
  chunk of 1024 rows) with beta = 0 (its forward KL), the same T, weight_hard_loss = 1 - r and
  weight_soft_loss = r T^2 (the T^2 factor applied on its side).

Whole step (``--step``): a tiny GPT-2 student (``--hidden`` wide) and teacher (1.5x wide), 2 layers each,
random token ids: the teacher's forward (no grad), the student's forward, the loss, backward:

* ``sft``: the student's plain SFT step, its own loss (``labels=``; the logits are made): the floor;
* ``distill``: the trainer's logits path (``distillation_objective`` on both models' logits);
* ``distill-fused``: the trainer's ``fused_head`` step (``dts_llm.fused_step``: the models run without
  their heads, the loss applies them).

Every (part, method) runs in a fresh worker process; time is the median of ``--repeats`` runs after a
warm-up (CPU time: the process's, all threads); memory is the peak beyond the inputs (the models and
their weights, the hidden states or token ids), gradients included, measured as ``kd_loss.py`` does.
A configuration whose logits would not fit in the memory this machine has free is skipped, and says so.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch
from _common import (
    Stopwatch,
    add_common_options,
    apply_common_options,
    installed_version,
    mib,
    peak_memory,
    print_header,
    print_table,
    reset_peak_memory,
    resolve_device,
    run_worker,
    tiny_gpt2,
)

IGNORE_INDEX = -100
TEMPERATURE = 2.0
KD_RATIO = 0.5
PROMPT_FRACTION = 0.25
LOSS_METHODS = ("fused", "logits", "dts-ce", "liger")
STEP_METHODS = ("sft", "distill", "distill-fused")
# Live N x V fp32 tensors a method holds at its peak (logits, their gradient, log-softmax copies): to skip
# what cannot fit. The fused methods hold none.
LOGITS_COPIES = {"logits": 3, "sft": 4, "distill": 4}


def labels_for(batch, length, vocab, generator):
    labels = torch.randint(vocab, (batch, length), generator=generator)
    labels[:, : round(PROMPT_FRACTION * length)] = IGNORE_INDEX
    return labels


# ---- the loss alone -----------------------------------------------------------------------------


def loss_inputs(batch, length, vocab, hidden):
    """Hidden states [B, L, H] of both models, their heads (scaled like trained ones) and labels."""
    gen = torch.Generator().manual_seed(0)

    def normal(*shape, scale=1.0):
        return torch.empty(*shape).normal_(generator=gen).mul_(scale)

    student = normal(batch, length, hidden).requires_grad_()
    teacher = normal(batch, length, hidden)
    weight = normal(vocab, hidden, scale=hidden**-0.5 * 2).requires_grad_()
    teacher_weight = normal(vocab, hidden, scale=hidden**-0.5 * 3)
    return student, weight, teacher, teacher_weight, labels_for(batch, length, vocab, gen)


def fused_loss(student, weight, teacher, teacher_weight, labels):
    from dts_llm.losses.fused import OutputHead, fused_distillation_objective

    return fused_distillation_objective(
        student, OutputHead(weight), teacher, OutputHead(teacher_weight), labels,
        kd_ratio=KD_RATIO, temperature=TEMPERATURE,
    ).loss  # fmt: skip


def logits_loss(student, weight, teacher, teacher_weight, labels):
    from dts_llm.losses import distillation_objective

    with torch.no_grad():
        teacher_logits = teacher @ teacher_weight.T
    logits = student @ weight.T
    return distillation_objective(logits, teacher_logits, labels, kd_ratio=KD_RATIO, temperature=TEMPERATURE).loss


def liger_loss(student, weight, teacher, teacher_weight, labels, *, liger):
    """Liger's loss on the rows as its callers pass them: flat, the labels shifted by one."""
    width = student.size(-1)
    rows = student[:, :-1].reshape(-1, width)
    teacher_rows = teacher[:, :-1].reshape(-1, width)
    return liger(rows, weight, teacher_rows, teacher_weight, labels[:, 1:].reshape(-1))


def dts_cross_entropies(student, weight, teacher, teacher_weight, labels):
    from dts_llm.losses.fused import OutputHead, fused_cross_entropies

    student_sum, teacher_sum = fused_cross_entropies(
        student, OutputHead(weight), teacher, OutputHead(teacher_weight), labels
    )
    return student_sum + teacher_sum


def loss_fn(method):
    if method == "fused":
        return fused_loss
    if method == "dts-ce":
        return dts_cross_entropies
    if method == "logits":
        return logits_loss
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    liger = LigerFusedLinearJSDLoss(
        weight_hard_loss=1 - KD_RATIO, weight_soft_loss=KD_RATIO * TEMPERATURE**2, beta=0.0,
        temperature=TEMPERATURE, compiled=False,
    )  # fmt: skip
    return functools.partial(liger_loss, liger=liger)


def loss_step(fn, student, weight, teacher, teacher_weight, labels):
    student.grad = weight.grad = None
    loss = fn(student, weight, teacher, teacher_weight, labels)
    if loss.requires_grad:
        loss.backward()
    return loss.detach()


# ---- a whole step -----------------------------------------------------------------------------


def step_inputs(batch, length, vocab, hidden):
    """A student and a 1.5x wider teacher (GPT-2, 2 layers each, tied embeddings) and token ids."""
    student = tiny_gpt2(vocab, 0, hidden, 2, 4, length, seed=0)
    teacher = tiny_gpt2(vocab, 0, hidden * 3 // 2, 2, 4, length, seed=1).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, : round(PROMPT_FRACTION * length)] = IGNORE_INDEX
    return student, teacher, ids, labels


def step_fn(method):
    from dts_llm.losses import distillation_objective

    if method == "sft":
        return lambda student, teacher, ids, labels: student(input_ids=ids, labels=labels).loss
    if method == "distill":

        def distill(student, teacher, ids, labels):
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            logits = student(input_ids=ids).logits
            return distillation_objective(
                logits, teacher_logits, labels, kd_ratio=KD_RATIO, temperature=TEMPERATURE
            ).loss

        return distill
    from dts_llm.fused_step import FusedHeads, output_head

    def distill_fused(student, teacher, ids, labels):
        heads = FusedHeads(output_head(student, "student"), output_head(teacher, "teacher"), student, teacher)
        with heads.hidden_states():
            with torch.no_grad():
                teacher_hidden = teacher(input_ids=ids).logits
            hidden = student(input_ids=ids).logits
        return heads.objective(hidden, teacher_hidden, labels, kd_ratio=KD_RATIO, temperature=TEMPERATURE).loss

    return distill_fused


def model_step(fn, student, teacher, ids, labels):
    student.zero_grad(set_to_none=True)
    loss = fn(student, teacher, ids, labels)
    loss.backward()
    return loss.detach()


# ---- measuring ---------------------------------------------------------------------------------


def measure_in_worker(part, method, shapes, hidden, repeats):
    """Time and peak extra memory of ``method`` at each (batch, length, vocab), in this order."""
    make, run = (loss_inputs, loss_step) if part == "loss" else (step_inputs, model_step)
    fn = loss_fn(method) if part == "loss" else step_fn(method)
    run(fn, *make(1, 16, 512, hidden))  # warm-up: first-call costs out of the measurement
    results = []
    for batch, length, vocab in shapes:
        inputs = make(batch, length, vocab, hidden)
        baseline = reset_peak_memory(torch.device("cpu"))
        loss = run(fn, *inputs)
        extra_bytes = peak_memory(torch.device("cpu")) - baseline
        times, stopwatch = [], Stopwatch()
        for _ in range(repeats):
            stopwatch.start()
            run(fn, *inputs)
            times.append(stopwatch.stop())
        wall, cpu = (statistics.median(column) for column in zip(*times, strict=True))
        results.append({"time_s": wall, "cpu_s": cpu, "memory_bytes": extra_bytes, "loss": loss.item()})
        del inputs
    return results


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fits(method, batch, length, vocab) -> bool:
    """Whether ``method``'s logits-sized tensors fit in 80% of the memory free now."""
    return LOGITS_COPIES.get(method, 0) * batch * length * vocab * 4 <= 0.8 * available_bytes()


def measure(part, method, shapes, args):
    shapes = [shape for shape in shapes if fits(method, *shape)]
    if not shapes:
        return []
    argv = [
        "--worker", part, method, "--shapes", *(",".join(map(str, shape)) for shape in shapes),
        "--hidden", args.hidden, "--repeats", args.repeats, "--threads", args.threads, "--device", "cpu",
    ]  # fmt: skip
    label = f"{part} {method} at " + ", ".join("x".join(map(str, shape)) for shape in shapes)
    return [(tuple(shape), result) for shape, result in zip(shapes, run_worker(__file__, argv, label), strict=True)]


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(part, methods, results, reference, peers):
    """One row per (shape, method), then ours / each peer's time, CPU time and memory."""
    rows, ratios = [], []
    for shape, by_method in results.items():
        batch, length, vocab = shape
        for method in methods:
            if method not in by_method:
                need = LOGITS_COPIES[method] * batch * length * vocab * 4
                rows.append([vocab, f"{batch}x{length}", method, "skipped", "", f"needs ~{mib(need)}", ""])
                continue
            r = by_method[method]
            rows.append([
                vocab, f"{batch}x{length}", method, f"{r['time_s']:,.2f} s", f"{r['cpu_s']:,.2f} s",
                mib(r["memory_bytes"]), f"{r['loss']:.6f}",
            ])  # fmt: skip
        ours = by_method[reference]
        for peer in peers:
            other = by_method.get(peer, {})
            ratios.append([
                vocab, f"{batch}x{length}", f"{reference} / {peer}", ratio(ours["time_s"], other.get("time_s")),
                ratio(ours["cpu_s"], other.get("cpu_s")), ratio(ours["memory_bytes"], other.get("memory_bytes")),
            ])  # fmt: skip
    print_table(["V", "B x L", "method", "time", "CPU time", "peak extra memory", "loss"], rows)
    print()
    if ratios:
        print_table(["V", "B x L", "ratio", "time", "CPU time", "peak extra memory"], ratios)
        print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 151936])
    parser.add_argument("--shapes", nargs="+", default=["4x512", "8x1024"], help="B x L")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=["loss", "step"], default=["loss", "step"])
    parser.add_argument(
        "--methods", nargs="+", choices=LOSS_METHODS + STEP_METHODS, help="only these (default: every method)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="V = 4096, B x L = 2 x 128, hidden 64, one repeat: a smoke run"
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    add_common_options(parser)
    args = parser.parse_args()
    apply_common_options(args)
    if args.worker:
        shapes = [tuple(map(int, s.split(","))) for s in args.shapes]
        print(json.dumps(measure_in_worker(*args.worker, shapes, args.hidden, args.repeats)))
        return
    if args.quick:
        args.vocab, args.shapes, args.hidden, args.repeats = [4096], ["2x128"], 64, 1
    shapes = [(*map(int, s.split("x")), vocab) for vocab in args.vocab for s in args.shapes]
    liger_version = installed_version("liger-kernel")
    print_header(
        "Fused LM-head distillation: the loss alone (fused / logits path / Liger) and a whole step (SFT floor / "
        "logits path / fused)",
        resolve_device("cpu"),
        f"CPU, fp32, hidden {args.hidden} (CPU-sized: the head's matmuls scale with it, the logits do not); "
        f"(1 - r) CE + r T^2 KL(teacher || student), r = {KD_RATIO}, T = {TEMPERATURE:g}; liger-kernel "
        f"{liger_version} (compiled=False); time = median of {args.repeats} fwd+bwd after warm-up; memory = peak "
        "beyond the inputs, gradients included",
        "fused loss: memory and time <= Liger's; fused step: peak memory <= the student's SFT step's",
    )
    if "loss" in args.parts:
        methods = [m for m in LOSS_METHODS if m in (args.methods or LOSS_METHODS)]
        methods = [m for m in methods if m != "liger" or liger_version != "not installed"]
        results = collect("loss", methods, shapes, args)
        print("The loss alone, from the hidden states (forward + backward)\n")
        report("loss", methods, results, "fused", [m for m in methods if m in ("logits", "liger")])
        for (batch, length, vocab), by_method in results.items():
            if not {"dts-ce", "fused"} <= set(by_method):
                continue
            ce, fused = by_method["dts-ce"], by_method["fused"]
            print(
                f"V {vocab}, {batch}x{length}: DTS's CE pass (dts-ce; its loss column holds the two CE sums) costs "
                f"{ratio(ce['time_s'], fused['time_s'])} the fused loss's time, {ratio(ce['cpu_s'], fused['cpu_s'])} "
                "its CPU time"
            )
        print()
    if "step" in args.parts:
        methods = [m for m in STEP_METHODS if m in (args.methods or STEP_METHODS)]
        results = collect("step", methods, shapes, args)
        print("A whole step: teacher forward (no grad), student forward, loss, backward\n")
        report("step", methods, results, "distill-fused", [m for m in methods if m != "distill-fused"])


def collect(part, methods, shapes, args):
    results = {shape: {} for shape in shapes}
    for method in methods:
        for shape, result in measure(part, method, shapes, args):
            results[shape][method] = result
    return results


if __name__ == "__main__":
    main()
