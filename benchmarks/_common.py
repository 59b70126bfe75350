"""Helpers the benchmark scripts share: the report header, memory probes, worker processes, tables.

Kept free of dts_llm and transformers imports (seconds each) so that a script pays for those only in
the process that measures with them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # dts_llm, eval and the tests' offline GPT-2 tokenizer


def installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
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


def print_header(title: str, device: torch.device, settings: str, targets: str) -> None:
    """The lines every report starts with: what was measured, when, where, with which versions."""
    versions = ", ".join(f"{name} {installed_version(name)}" for name in ("transformers", "trl"))
    print(title)
    print(f"date      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine   {device_name(device)} ({os.cpu_count()} logical CPUs); {torch.get_num_threads()} threads; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start"
    )
    print(f"versions  torch {torch.__version__}, {versions}, Python {platform.python_version()}")
    print(f"settings  {settings}")
    print(f"targets   {targets}\n")


def add_common_options(parser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch intra-op threads (0: torch's default); 1 makes CPU time a contention-proof measure of work",
    )  # fmt: skip


def apply_common_options(args) -> None:
    """Resolve ``--device`` and set ``--threads`` in this process (workers get both passed on)."""
    args.device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)


class Stopwatch:
    """Wall and process CPU seconds (all threads) since ``start``: on a shared machine the CPU time
    of a single-threaded run measures the work done, whatever else the cores are running."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_memory(device: torch.device) -> int:
    """Restart peak tracking; return the bytes in use now (the baseline).

    On CPU the kernel's resident-set high-water mark (VmHWM) is reset to the current resident set
    through /proc/self/clear_refs; ru_maxrss cannot be reset and is inherited through fork/exec.
    """
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS") * 1024


def peak_memory(device: torch.device) -> int:
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def run_worker(script: str, argv: Sequence[str], label: str):
    """Run ``script`` with ``argv`` in a fresh interpreter and return the JSON on its last stdout line.

    A fixed mmap threshold makes glibc return every freed large block to the OS at once, so the
    resident set follows the live tensors (as CUDA's max_memory_allocated does) instead of whatever
    freed chunks the heap happens to keep cached.
    """
    print(f"measuring {label} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    command = [sys.executable, os.path.abspath(script), *map(str, argv)]
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env)
    return json.loads(result.stdout.splitlines()[-1])


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown-compatible table, columns right-aligned to their widest cell."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=False)) + " |" for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|")
    print("\n".join(lines))


def first_loss_recorder(trainer):
    """Wrap ``trainer.compute_loss`` to keep the first micro-batch's loss (no extra work after that)."""
    compute_loss, seen = trainer.compute_loss, []

    def recorded(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        if not seen:
            seen.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recorded
    return seen


def tiny_gpt2(vocab_size: int, eos_id: int, width: int, layers: int, heads: int, positions: int, seed: int):
    """A randomly initialised GPT-2 without dropout, so that every trainer runs the same computation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=heads, n_positions=positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def gpt2_tokenizer():
    """The real GPT-2 BPE (50257 tokens), offline, as the tests build it."""
    from helpers import gpt2_tokenizer as build

    return build()
