"""Forward+backward time and peak extra memory of dts_llm's KD loss vs TRL's GKD loss and a dense reference.

    python benchmarks/kd_loss.py [--vocab 50257 151936] [--dtype bfloat16] [--device cuda] [--quick]

All three compute T^2 KL(teacher || student) at T=2 over response positions (about 25% of each
sequence is prompt, labelled -100), averaged over those positions:

* ``dense``: the textbook version, fp32 log_softmax of both logits, KL, masked mean, autograd;
* ``trl``: ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` with beta=0 (TRL's forward KL,
  ``F.kl_div(student_logp, teacher_logp, log_target=True)`` = KL(teacher || student)) at the same
  temperature, on the shifted logits and labels as ``GKDTrainer.compute_loss`` passes them, times
  T^2 (TRL applies no T^2 factor; a scalar product costs nothing). It runs in the logits' dtype;
* ``ours``: ``dts_llm.losses.distillation_loss(divergence="forward_kl")``.

Every (method, vocab) pair runs in a fresh worker process (this script with a hidden --worker flag)
that materialises the inputs, warms up, runs one forward+backward to measure memory and then
--repeats timed ones, reporting the median.

Memory: peak extra memory is what a run adds on top of its inputs (student logits with
requires_grad, teacher logits, labels), the student's .grad included. On CUDA it is
max_memory_allocated() minus memory_allocated() once the inputs exist; on CPU it is the kernel's
resident-set high-water mark minus the resident set at the moment that mark is reset, after the
inputs are written and a tiny warm-up has run; workers fix glibc's mmap threshold so that freed
blocks leave the resident set at once (the figure is then live tensor memory, as on CUDA).
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
    mib,
    peak_memory,
    print_header,
    print_table,
    reset_peak_memory,
    resolve_device,
    run_worker,
    synchronize,
    verdict,
)

IGNORE_INDEX = -100  # dts_llm.losses.IGNORE_INDEX; importing dts_llm pulls in transformers (seconds)
TEMPERATURE = 2.0
PROMPT_FRACTION = 0.25
METHODS = ("dense", "trl", "ours")
# ours / peer, at most: (time, memory). Dense: the core issue's; TRL: issue 9's.
TARGETS = {"dense": (1.2, 0.25), "trl": (0.6, 0.2)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dense_kd_loss(student_logits, teacher_logits, labels, *, temperature):
    """The textbook version: fp32 log_softmax of both over every position, autograd for the rest."""
    s_logp = (student_logits[:, :-1].float() / temperature).log_softmax(-1)
    t_logp = (teacher_logits[:, :-1].float() / temperature).log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return temperature**2 * (kl * mask).sum() / mask.sum()


def trl_kd_loss(student_logits, teacher_logits, labels, *, temperature, gkd_loss):
    """TRL's GKD loss at beta=0 (forward KL), called as GKDTrainer.compute_loss calls it, times T^2."""
    loss = gkd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:], beta=0.0, temperature=temperature)
    return temperature**2 * loss


def loss_fn(method, chunk_size, temperature=TEMPERATURE):
    if method == "ours":
        from dts_llm.losses import distillation_loss

        return functools.partial(
            distillation_loss, divergence="forward_kl", temperature=temperature, chunk_size=chunk_size or None
        )
    if method == "trl":
        from trl.experimental.gkd import GKDTrainer

        return functools.partial(trl_kd_loss, temperature=temperature, gkd_loss=GKDTrainer.generalized_jsd_loss)
    return functools.partial(dense_kd_loss, temperature=temperature)


def make_inputs(batch, length, vocab, dtype, device):
    """Random logits written in place (no temporaries) and labels whose first quarter is prompt."""
    gen = torch.Generator(device).manual_seed(0)
    student = torch.empty(batch, length, vocab, dtype=dtype, device=device).normal_(generator=gen)
    teacher = torch.empty(batch, length, vocab, dtype=dtype, device=device).normal_(generator=gen)
    labels = torch.randint(vocab, (batch, length), generator=gen, device=device)
    labels[:, : round(PROMPT_FRACTION * length)] = IGNORE_INDEX
    return student.requires_grad_(), teacher, labels


def chunk_rows(labels, vocab, chunk_size):
    """Rows in dts_llm's largest chunk for these labels (the loss visits response positions only)."""
    from dts_llm.losses import default_chunk_size

    response_rows = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return min(chunk_size or default_chunk_size(response_rows, vocab), response_rows)


def fwd_bwd(fn, student, teacher, labels):
    student.grad = None
    loss = fn(student, teacher, labels)
    loss.backward()
    return loss.detach()


def measure_in_worker(method, shapes, dtype, device, repeats, chunk_size):
    """Time and peak extra memory of ``method`` at each (batch, length, vocab), smallest first.

    The peak is reset after each shape's inputs exist, and freed blocks leave the resident set at
    once (see ``run_worker``), so one process can measure several shapes in a row.
    """
    fn = loss_fn(method, chunk_size)
    fwd_bwd(fn, *make_inputs(1, 16, min(shapes[0][2], 1024), dtype, device))
    results = []
    for batch, length, vocab in shapes:
        inputs = make_inputs(batch, length, vocab, dtype, device)
        baseline = reset_peak_memory(device)
        loss = fwd_bwd(fn, *inputs)
        extra_bytes = peak_memory(device) - baseline
        times, stopwatch = [], Stopwatch()
        for _ in range(repeats):
            synchronize(device)
            stopwatch.start()
            fwd_bwd(fn, *inputs)
            synchronize(device)
            times.append(stopwatch.stop())
        wall, cpu = (statistics.median(column) for column in zip(*times, strict=False))
        result = {"time_s": wall, "cpu_s": cpu, "memory_bytes": extra_bytes, "loss": loss.item()}
        if method == "ours":
            result["chunk_rows"] = chunk_rows(inputs[2], vocab, chunk_size)
        results.append(result)
        del inputs
    return results


def measure(method, shapes, args):
    """``measure_in_worker`` in a fresh process: no allocator or peak state carried over."""
    argv = [
        "--worker", method, "--shapes", *(",".join(map(str, shape)) for shape in shapes), "--dtype", args.dtype,
        "--repeats", args.repeats, "--chunk-size", args.chunk_size, "--device", args.device, "--threads", args.threads,
    ]  # fmt: skip
    label = f"{method} at " + ", ".join("x".join(map(str, shape)) for shape in shapes)
    return run_worker(__file__, argv, label)


def relative_difference(value, reference):
    return abs(value - reference) / abs(reference)


def report(args, results):
    element_bytes = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    response = args.length - round(PROMPT_FRACTION * args.length)
    print_header(
        f"KD loss benchmark: T^2 KL(teacher || student) at T={TEMPERATURE:g}, forward + backward: "
        "dts_llm distillation_loss vs TRL GKDTrainer.generalized_jsd_loss (beta=0) vs dense autograd",
        resolve_device(args.device),
        f"device={args.device} dtype={args.dtype} B x L = {args.batch} x {args.length} ({response} response labels "
        f"per row) chunk_size={args.chunk_size or 'library default'}; time = median of {args.repeats} "
        "fwd+bwd after warm-up (CPU time: the process's, all threads); "
        "memory = peak beyond the inputs, the student's .grad included",
        "; ".join(f"ours/{peer} time <= {t}x and memory <= {m}x" for peer, (t, m) in TARGETS.items()),
    )
    rows = []
    for vocab, by_method in results.items():
        logits = mib(args.batch * args.length * vocab * element_bytes)
        ours_loss = by_method["ours"]["loss"]
        for method, result in by_method.items():
            rows.append([
                vocab, logits, method, f"{result['time_s'] * 1e3:,.1f} ms", f"{result['cpu_s'] * 1e3:,.1f} ms",
                mib(result["memory_bytes"]),
                f"{result['loss']:.6f}", f"{relative_difference(result['loss'], ours_loss):.1e}",
            ])  # fmt: skip
    print_table(
        ["V", "logits (each)", "method", "time", "CPU time", "peak extra memory", "loss", "loss rel diff to ours"],
        rows,
    )
    print()
    rows = []
    for vocab, by_method in results.items():
        ours = by_method["ours"]
        for peer, (time_target, memory_target) in TARGETS.items():
            time_ratio = ours["time_s"] / by_method[peer]["time_s"]
            memory_ratio = ours["memory_bytes"] / by_method[peer]["memory_bytes"]
            rows.append([
                vocab,
                f"ours / {peer}",
                f"{time_ratio:.2f}x (<= {time_target}x: {verdict(time_ratio <= time_target)})",
                f"{ours['cpu_s'] / by_method[peer]['cpu_s']:.2f}x",
                f"{memory_ratio:.2f}x (<= {memory_target}x: {verdict(memory_ratio <= memory_target)})",
            ])  # fmt: skip
    print_table(["V", "ratio", "time", "CPU time", "peak extra memory"], rows)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 151936])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=0, help="rows per chunk; 0 = the library default")
    add_common_options(parser)
    parser.add_argument("--quick", action="store_true", help="smoke test: B x L = 2 x 64, V = 1000, 2 repeats")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.vocab, args.repeats = 2, 64, [1000], 2
    apply_common_options(args)
    return args


def main():
    args = parse_args()
    if args.worker:
        shapes = [tuple(map(int, shape.split(","))) for shape in args.shapes]
        device = torch.device(args.device)
        print(
            json.dumps(
                measure_in_worker(args.worker, shapes, DTYPES[args.dtype], device, args.repeats, args.chunk_size)
            )
        )
        return
    results = {
        vocab: {method: measure(method, [(args.batch, args.length, vocab)], args)[0] for method in METHODS}
        for vocab in args.vocab
    }
    report(args, results)


if __name__ == "__main__":
    main()
