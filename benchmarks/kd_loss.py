"""Forward+backward time and peak extra memory of dts_llm's distillation loss vs a dense reference.

    python benchmarks/kd_loss.py [--vocab 50257 151936] [--dtype bfloat16] [--device cuda] [--quick]

Both methods compute T^2 KL(teacher || student) at T=2 over response positions (about 25% of each
sequence is prompt, labelled -100). Every (method, vocab) pair runs in a fresh worker process (this
script with a hidden --worker flag) that materialises the inputs, warms up, runs one forward+backward
to measure memory and then --repeats timed ones, reporting the median.

Memory: peak extra memory is what a run adds on top of its inputs (student logits with
requires_grad, teacher logits, labels), the student's .grad included. On CUDA it is
max_memory_allocated() minus memory_allocated() once the inputs exist; on CPU it is the kernel's
resident-set high-water mark (VmHWM) minus the resident set at the moment that mark is reset
through /proc/self/clear_refs, after the inputs are written and a tiny warm-up has run. ru_maxrss is
not used because it cannot be reset and a worker inherits its parent's peak through fork/exec.
Workers run with MALLOC_MMAP_THRESHOLD_ fixed so that freed blocks leave the resident set at once:
the figure is then live tensor memory, like CUDA's max_memory_allocated, for both methods alike.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

IGNORE_INDEX = -100  # dts_llm.losses.IGNORE_INDEX; importing dts_llm pulls in transformers (seconds)
TEMPERATURE = 2.0
PROMPT_FRACTION = 0.25
MEMORY_TARGET = 0.25  # ours / dense, at most
TIME_TARGET = 1.2
METHODS = ("dense", "ours")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dense_kd_loss(student_logits, teacher_logits, labels, *, temperature):
    """The textbook version: fp32 log_softmax of both over every position, autograd for the rest."""
    s_logp = (student_logits[:, :-1].float() / temperature).log_softmax(-1)
    t_logp = (teacher_logits[:, :-1].float() / temperature).log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return temperature**2 * (kl * mask).sum() / mask.sum()


def loss_fn(method, chunk_size):
    if method == "ours":
        from dts_llm.losses import distillation_loss

        return functools.partial(
            distillation_loss, divergence="forward_kl", temperature=TEMPERATURE, chunk_size=chunk_size or None
        )
    return functools.partial(dense_kd_loss, temperature=TEMPERATURE)


def make_inputs(batch, length, vocab, dtype, device):
    """Random logits written in place (no temporaries) and labels whose first quarter is prompt."""
    gen = torch.Generator(device).manual_seed(0)
    student = torch.empty(batch, length, vocab, dtype=dtype, device=device).normal_(generator=gen)
    teacher = torch.empty(batch, length, vocab, dtype=dtype, device=device).normal_(generator=gen)
    labels = torch.randint(vocab, (batch, length), generator=gen, device=device)
    labels[:, : round(PROMPT_FRACTION * length)] = IGNORE_INDEX
    return student.requires_grad_(), teacher, labels


def fwd_bwd(fn, student, teacher, labels):
    student.grad = None
    loss = fn(student, teacher, labels)
    loss.backward()
    return loss.detach()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_memory(device):
    """Restart peak tracking; return the bytes in use now (the baseline)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    return status_kib("VmRSS") * 1024


def peak_memory(device):
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return status_kib("VmHWM") * 1024


def worker(args):
    """Measure one method at one vocabulary size; return time, memory and loss as a dict."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    (vocab,) = args.vocab
    fn = loss_fn(args.worker, args.chunk_size)
    fwd_bwd(fn, *make_inputs(1, 16, min(vocab, 1024), dtype, device))
    inputs = make_inputs(args.batch, args.length, vocab, dtype, device)
    baseline = reset_peak_memory(device)
    loss = fwd_bwd(fn, *inputs)
    extra_bytes = peak_memory(device) - baseline
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        fwd_bwd(fn, *inputs)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "memory_bytes": extra_bytes, "loss": loss.item()}


def run_worker(args, method, vocab):
    """Run ``worker`` for (method, vocab) in a fresh interpreter and return its result."""
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", method, "--vocab", str(vocab),
        "--batch", str(args.batch), "--length", str(args.length), "--dtype", args.dtype,
        "--repeats", str(args.repeats), "--chunk-size", str(args.chunk_size), "--device", args.device,
    ]  # fmt: skip
    print(f"measuring {method} at V={vocab} ...", file=sys.stderr, flush=True)
    # A fixed mmap threshold makes glibc return every freed large block to the OS at once, so the
    # resident set follows the live tensors (as CUDA's max_memory_allocated does) instead of
    # whatever freed chunks the heap happens to keep cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env)
    return json.loads(result.stdout.splitlines()[-1])


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mib(n_bytes):
    return f"{n_bytes / 2**20:,.1f} MiB"


def report(args, results):
    device = torch.device(args.device)
    element_bytes = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    response = args.length - round(PROMPT_FRACTION * args.length)
    print(f"KD loss benchmark: dts_llm distillation_loss (forward_kl, T={TEMPERATURE:g}) vs dense autograd")
    print(f"date      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine   {device_name(device)} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )
    print(
        f"settings  device={args.device} dtype={args.dtype} B x L = {args.batch} x {args.length} "
        f"({response} response labels per row) chunk_size={args.chunk_size or 'library default'} "
        f"time = median of {args.repeats} fwd+bwd after warm-up"
    )
    print(f"targets   ours/dense memory <= {MEMORY_TARGET}x at time <= {TIME_TARGET}x\n")
    header = (
        f"{'V':>7} | {'logits (each)':>13} | {'time dense':>10} | {'time ours':>10} | {'ratio':>6} | "
        f"{'mem dense':>12} | {'mem ours':>12} | {'ratio':>6} | {'loss rel diff':>13} | target"
    )
    print(header)
    print("-" * len(header))
    for vocab, (dense, ours) in results.items():
        time_ratio = ours["time_s"] / dense["time_s"]
        memory_ratio = ours["memory_bytes"] / dense["memory_bytes"]
        missed = [
            name
            for name, ok in (("time", time_ratio <= TIME_TARGET), ("memory", memory_ratio <= MEMORY_TARGET))
            if not ok
        ]
        loss_diff = abs(ours["loss"] - dense["loss"]) / abs(dense["loss"])
        print(
            f"{vocab:>7} | {mib(args.batch * args.length * vocab * element_bytes):>13} | "
            f"{dense['time_s'] * 1e3:>7,.1f} ms | {ours['time_s'] * 1e3:>7,.1f} ms | {time_ratio:>5.2f}x | "
            f"{mib(dense['memory_bytes']):>12} | {mib(ours['memory_bytes']):>12} | {memory_ratio:>5.2f}x | "
            f"{loss_diff:>13.1e} | {'missed: ' + ', '.join(missed) if missed else 'met'}"
        )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 151936])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=0, help="rows per chunk; 0 = the library default")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke test: B x L = 2 x 64, V = 1000, 2 repeats")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.vocab, args.repeats = 2, 64, [1000], 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {vocab: [run_worker(args, method, vocab) for method in METHODS] for vocab in args.vocab}
    report(args, results)


if __name__ == "__main__":
    main()
