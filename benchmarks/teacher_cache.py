"""Distilling from the offline teacher cache vs the live teacher vs the student's SFT: epoch time, the cost of
writing the cache, its size, memory and the teacher's forward passes, side by side in one run.

    python benchmarks/teacher_cache.py [--examples 64] [--batch 8] [--max-length 256] [--rounds 3]
                                       [--teacher 6x384] [--student 2x128] [--top-k 128] [--quick]

One epoch over the same Dolly examples (``../shared/data/dolly/raw_sample.jsonl``, tokenised by
``dts_llm.data`` with the real GPT-2 BPE, prompts over half of ``--max-length`` dropped) for four trainers
from the same initial student, with the same collator, batches and AdamW:

* ``sft``: the student alone, a plain ``transformers.Trainer`` (the model's own cross-entropy);
* ``live``: ``DistillationTrainer`` with the teacher model: forward KL, kd_ratio 0.5, DTS with T in [1, 3];
* ``exact``: the same from an exact cache (the teacher's final hidden states, fp32, and its head);
* ``compact``: the same from a compact cache (top ``--top-k`` logits and the tail's log-partition over
  T in [1, 3]).

The four run in turn, ``--rounds`` times, so that a slow spell of the shared machine hits all four; an
epoch is one ``trainer.train()``, reported as the median over the rounds. Wrapped calls inside it (the
student's forward, the teacher's or the cache's side, the KD + DTS terms) say where the time goes,
summed over every step of the epoch. Before the rounds the teacher runs once over the examples writing
nothing, then writes each cache: their ratio is the price of writing. Bytes per response token come from
the cache's files; a forward pre-hook on the teacher counts its passes. The models are GPT-2s built from
configs, randomly initialised (time and size do not depend on the weights; the compact cache's top-k then
holds little of the nearly uniform teacher's mass, which changes its loss, not its cost).

Everything is measured in one worker process started with glibc's mmap threshold fixed
(``_common.run_worker``), so that its resident-set peak follows the live tensors; on CUDA the peak is
``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from _common import (
    ROOT,
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
    synchronize,
    tiny_gpt2,
    verdict,
)

DOLLY = ROOT.parent / "shared" / "data" / "dolly" / "raw_sample.jsonl"
METHODS = ("sft", "live", "exact", "compact")
KINDS = ("exact", "compact")
CACHED_OVER_SFT_TARGET = 1.15  # a cached epoch / the SFT epoch, at most
TEMPERATURE_RANGE = (1.0, 3.0)  # DTS's clamp, which the compact cache covers
LABEL_LOGPROB_BYTES = 4  # float32 per response token, both kinds
DOLLY_TRAIN_RECORDS = 15011 - 1000  # databricks-dolly-15k less the 1000 records MiniLLM holds out
REFERENCE_TEACHERS = {"GPT-2 XL": 1600, "OPT-13B": 5120}  # hidden sizes; cached in bf16


# ---- the worker: everything measured in one process ---------------------------------------------------


class CallTimes:
    """Wall and CPU seconds inside wrapped calls and the largest tensor they returned, by name, since the
    last ``take`` (on CUDA synchronised around each call, so that its time is its own)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall, self.cpu, self.largest = defaultdict(float), defaultdict(float), defaultdict(int)

    def call(self, name: str, function, *args, **kwargs):
        """``function(*args, **kwargs)``, recorded under ``name``."""
        stopwatch = Stopwatch()
        synchronize(self.device)
        stopwatch.start()
        result = function(*args, **kwargs)
        synchronize(self.device)
        wall, cpu = stopwatch.stop()
        self.wall[name] += wall
        self.cpu[name] += cpu
        self.largest[name] = max(self.largest[name], largest_tensor_bytes(result))
        return result

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Replace ``owner.attribute`` (a method, or a module's ``forward``) on the instance by a recorded call."""
        function = getattr(owner, attribute)
        # wraps keeps the signature, from which the Trainer picks the data columns it keeps
        setattr(owner, attribute, functools.wraps(function)(functools.partial(self.call, name, function)))

    def take(self) -> dict:
        """What was recorded since the last call; recording starts again from nothing."""
        taken = {"wall": dict(self.wall), "cpu": dict(self.cpu), "largest": dict(self.largest)}
        for recorded in (self.wall, self.cpu, self.largest):
            recorded.clear()
        return taken


def largest_tensor_bytes(value) -> int:
    """The largest tensor in a call's result: a model output, a CachedBatch, a TopKTeacher, a tensor."""
    if torch.is_tensor(value):
        return value.nbytes
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, tuple):
        items = value
    elif dataclasses.is_dataclass(value):
        items = vars(value).values()
    else:
        return 0
    return max(map(largest_tensor_bytes, items), default=0)


def dolly(tokenizer, max_length: int, cache_dir: str):
    """The Dolly sample as a recipe reads it (MiniLLM template, prompts over half of ``max_length`` dropped)."""
    from dts_llm.data import DataArguments, load_instruction_data

    arguments = DataArguments(
        dataset=str(DOLLY), dev_num=0, max_length=max_length, max_prompt_length=max_length // 2,
        data_cache_dir=cache_dir,
    )  # fmt: skip
    return load_instruction_data(arguments, tokenizer)


def response_tokens(examples) -> int:
    return sum(sum(label != -100 for label in labels) for labels in examples["labels"])


def gpt2(shape: str, tokenizer, positions: int, seed: int):
    layers, width = map(int, shape.split("x"))
    heads = max(1, width // 64)
    return tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, width, layers, heads, positions, seed)


def count_teacher_passes(teacher, counts: dict) -> None:
    """A forward pre-hook adding each of the teacher's calls and the examples it ran to ``counts``."""

    def count(_module, args, kwargs):
        counts["calls"] += 1
        counts["examples"] += len(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

    teacher.register_forward_pre_hook(count, with_kwargs=True)


@torch.inference_mode()
def plain_forward(teacher, collator, examples, batch_size: int, device) -> None:
    """The teacher over the examples in the writer's batches, writing nothing: what any writer must pay."""
    for start in range(0, len(examples), batch_size):
        features = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        inputs = {k: v.to(device) for k, v in collator(features).items() if k != "labels"}
        teacher(**inputs, use_cache=False)


def write_cache(kind: str, teacher, collator, examples, tokenizer, folder: Path, args) -> None:
    from dts_llm.teacher_cache import CacheSettings, data_fingerprint, tokenizer_fingerprint, write_teacher_cache

    low, high = TEMPERATURE_RANGE
    settings = CacheSettings(kind=kind, top_k=args.top_k, temperature_min=low, temperature_max=high)
    provenance = {"tokenizer": tokenizer_fingerprint(tokenizer), "data.train": data_fingerprint(examples)}
    write_teacher_cache(
        teacher, collator, {"train": examples}, folder, settings, provenance,
        vocab_size=len(tokenizer), batch_size=args.batch,
    )  # fmt: skip


def cache_files(folder: Path) -> dict:
    """The rows' bytes (shards) and the head's, from the files the manifest lists."""
    from dts_llm.teacher_cache import TeacherCache

    cache = TeacherCache(folder, verify=False)
    shards = cache.manifest["splits"]["train"]["shards"]
    head = cache.manifest.get("head")
    return {
        "shard_bytes": sum((folder / entry["file"]).stat().st_size for entry in shards),
        "rows": sum(entry["rows"] for entry in shards),
        "head_bytes": (folder / head["file"]).stat().st_size if head else 0,
        "settings": cache.settings,
    }


def build_trainer(method: str, args, teacher, examples, tokenizer, collator, caches: dict, output_dir: str):
    from transformers import Trainer, TrainingArguments

    from dts_llm import DistillationConfig, DistillationTrainer

    student = gpt2(args.student, tokenizer, args.max_length, seed=2)
    common = {
        "output_dir": output_dir, "per_device_train_batch_size": args.batch, "num_train_epochs": 1,
        "learning_rate": 5e-5, "optim": "adamw_torch", "seed": 0, "data_seed": 0, "logging_strategy": "no",
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0,
        "use_cpu": args.device == "cpu",
    }  # fmt: skip
    shared = {"train_dataset": examples, "data_collator": collator, "processing_class": tokenizer}
    if method == "sft":
        return Trainer(model=student, args=TrainingArguments(**common), **shared)
    low, high = TEMPERATURE_RANGE
    config = DistillationConfig(
        **common, divergence="forward_kl", kd_ratio=0.5, temperature_policy="dts", temperature_init=high,
        temperature_min=low, temperature_max=high,
    )  # fmt: skip
    teacher_source = {"teacher_model": teacher} if method == "live" else {"teacher_cache": str(caches[method])}
    return DistillationTrainer(model=student, args=config, **teacher_source, **shared)


def instrument(trainer, times: CallTimes) -> None:
    """Time the student's forward, the KD + DTS terms and the cache's reads, head and whole batch."""
    times.wrap(trainer.model, "forward", "student forward")
    if hasattr(trainer, "_distillation_terms"):
        times.wrap(trainer, "_distillation_terms", "KD + DTS terms")
    cached = getattr(trainer, "cached_teacher", None)
    if cached is not None:
        times.wrap(cached, "batch", "cache batch")
        times.wrap(cached.cache.split("train"), "example_rows", "cache reads")
        if cached.head is not None:
            times.wrap(cached.head, "forward", "head matmul")


def train_epoch(method: str, args, times: CallTimes, **inputs) -> dict:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(method, args, output_dir=output_dir, **inputs)
        instrument(trainer, times)
        first_loss = first_loss_recorder(trainer)
        times.take()
        baseline = reset_peak_memory(device)
        times.call("epoch", trainer.train)
        peak = peak_memory(device) - baseline
    return {"peak_bytes": peak, "first_loss": first_loss[0], **times.take()}


def measure_in_worker(args) -> dict:
    from dts_llm.tasks import INSTRUCTION

    device = torch.device(args.device)
    tokenizer = gpt2_tokenizer()
    collator = INSTRUCTION.collator(tokenizer)
    results = {"device": str(device)}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        recipe = dolly(tokenizer, 512, str(scratch / "data"))  # the paper's recipe: 512 / 256 tokens
        results["sample"] = {"records": recipe.report["records"], "tokens": response_tokens(recipe.train)}
        examples = dolly(tokenizer, args.max_length, str(scratch / "data")).train
        examples = examples.select(range(min(args.examples, len(examples))))
        results["examples"] = {"count": len(examples), "response_tokens": response_tokens(examples)}
        results["examples"]["tokens"] = sum(map(len, examples["input_ids"]))

        times, counts = CallTimes(device), defaultdict(int)
        teacher = gpt2(args.teacher, tokenizer, args.max_length, seed=1).to(device).eval()
        times.wrap(teacher, "forward", "teacher forward")
        count_teacher_passes(teacher, counts)

        def passes(function, *function_args) -> dict:
            """``function`` timed whole and in its teacher forwards, which are counted."""
            counted = dict(counts)
            times.take()
            times.call("pass", function, *function_args)
            return {**times.take(), **{key: counts[key] - counted.get(key, 0) for key in counts}}

        results["plain"] = passes(plain_forward, teacher, collator, examples, args.batch, device)
        caches = {kind: scratch / kind for kind in KINDS}
        results["write"] = {
            kind: passes(write_cache, kind, teacher, collator, examples, tokenizer, caches[kind], args)
            for kind in KINDS
        }
        results["files"] = {kind: cache_files(caches[kind]) for kind in KINDS}

        inputs = {"teacher": teacher, "examples": examples, "tokenizer": tokenizer, "collator": collator}
        runs = {method: [] for method in METHODS}
        for _ in range(args.rounds):  # in turn, so that a slow spell of a shared machine hits all four
            for method in METHODS:
                counted = dict(counts)
                run = train_epoch(method, args, times, **inputs, caches=caches)
                run["teacher_calls"] = counts["calls"] - counted.get("calls", 0)
                run["teacher_examples"] = counts["examples"] - counted.get("examples", 0)
                runs[method].append(run)
        results["runs"] = runs
    return results


# ---- the report -----------------------------------------------------------------------------------------


def kib(n_bytes: float) -> str:
    return f"{n_bytes / 1024:,.2f} KiB"


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


def exact_bytes_per_token(hidden: int, dtype_bytes: int) -> int:
    return hidden * dtype_bytes + LABEL_LOGPROB_BYTES


def compact_bytes_per_token(top_k: int, grid_size: int) -> int:
    """The packed row: k logits, k ids, log Z_tail and its slope at each grid point, all float32."""
    return 2 * (top_k + grid_size) * 4 + LABEL_LOGPROB_BYTES


CLOCK_NAMES = {"cpu": "CPU", "wall": "wall-clock"}


def clock(results: dict) -> str:
    """The clock the breakdowns read: the process's CPU time on a CPU (what the work costs, whatever else the
    shared cores run), the wall clock on CUDA (where the CPU waits on the GPU)."""
    return "wall" if results["device"].startswith("cuda") else "cpu"


def mean_phase(runs: list[dict], clock_name: str, name: str) -> float | None:
    """Seconds per epoch inside the calls named ``name``, averaged over the rounds (None: not wrapped)."""
    values = [run[clock_name].get(name) for run in runs]
    return None if values[0] is None else statistics.mean(values)


def report_speed(results: dict) -> None:
    runs = results["runs"]
    epoch = {
        name: {method: statistics.median(run[name]["epoch"] for run in runs[method]) for method in METHODS}
        for name in ("wall", "cpu")
    }
    live_loss = runs["live"][0]["first_loss"]
    rows = []
    for method in METHODS:
        wall, cpu, loss = epoch["wall"][method], epoch["cpu"][method], runs[method][0]["first_loss"]
        difference = "(CE only)" if method == "sft" else f"{abs(loss - live_loss) / abs(live_loss):.1e}"
        rows.append([
            method, f"{wall:,.1f} s", f"{wall / epoch['wall']['sft']:.2f}x", f"{cpu:,.1f} s",
            f"{cpu / epoch['cpu']['sft']:.2f}x",
            *(" ".join(f"{run[name]['epoch']:.1f}" for run in runs[method]) for name in ("wall", "cpu")),
            f"{loss:.6f}", difference,
        ])  # fmt: skip
    print("speed: one epoch, median over the rounds (CPU time: the process's, all threads)")
    print_table(
        ["trainer", "epoch", "/ SFT", "CPU time", "CPU / SFT", "each round (s)", "each round, CPU (s)",
         "first-step loss", "vs live"],
        rows,
    )  # fmt: skip
    for method in ("exact", "compact", "live"):
        ratio, by_cpu = (epoch[name][method] / epoch[name]["sft"] for name in ("wall", "cpu"))
        if method == "live":
            print(f"live epoch / SFT epoch: {ratio:.2f}x; by CPU time {by_cpu:.2f}x")
            continue
        print(
            f"{method} epoch / SFT epoch: {ratio:.2f}x (<= {CACHED_OVER_SFT_TARGET}x: "
            f"{verdict(ratio <= CACHED_OVER_SFT_TARGET)}); by CPU time {by_cpu:.2f}x "
            f"({verdict(by_cpu <= CACHED_OVER_SFT_TARGET)})"
        )


def report_phases(results: dict) -> None:
    """Where each epoch's time goes: the wrapped calls, and the rest (backward, optimizer, data loading)."""
    runs, on = results["runs"], clock(results)
    names = ("epoch", "teacher forward", "cache reads", "head matmul", "cache batch", "student forward",
             "KD + DTS terms")  # fmt: skip
    rows, phases = [], {}
    for method in METHODS:
        phase = {name: mean_phase(runs[method], on, name) for name in names}
        if phase["cache batch"] is not None:  # what the batch does besides reading and the head
            phase["laying out"] = phase["cache batch"] - phase["cache reads"] - (phase["head matmul"] or 0.0)
        phase["teacher side"] = phase["teacher forward"] if method == "live" else phase["cache batch"]
        measured = (phase["teacher side"] or 0.0) + phase["student forward"] + (phase["KD + DTS terms"] or 0.0)
        phase["rest"] = phase["epoch"] - measured
        phases[method] = phase
        cells = ("epoch", "teacher side", "cache reads", "head matmul", "laying out", "student forward",
                 "KD + DTS terms", "rest")  # fmt: skip
        rows.append([method, *("-" if phase.get(name) is None else f"{phase[name]:,.2f}" for name in cells)])
    print(
        f"\nwhere an epoch goes ({CLOCK_NAMES[on]} seconds, mean over the rounds; wrapped calls summed over the "
        "epoch's steps; SFT's student forward includes its cross-entropy, the KD trainers' CE in the KD + DTS terms)"
    )
    print_table(
        ["trainer", "epoch", "teacher side", "cache reads", "head matmul", "laying out", "student forward",
         "KD + DTS terms", "rest: backward, optimizer, data"],
        rows,
    )  # fmt: skip
    sft = phases["sft"]
    for kind in KINDS:
        phase = phases[kind]
        parts = [
            f"cache reads {phase['cache reads']:.2f}",
            *([f"head matmul {phase['head matmul']:.2f}"] if phase["head matmul"] is not None else []),
            f"laying out {phase['laying out']:.2f}",
            f"KD + DTS terms {phase['KD + DTS terms']:.2f}",
            f"student forward {phase['student forward'] - sft['student forward']:+.2f}",
            f"rest {phase['rest'] - sft['rest']:+.2f}",
        ]
        print(f"{kind} over SFT: {phase['epoch'] - sft['epoch']:+.2f} s an epoch = {', '.join(parts)} s")


def report_writing(results: dict) -> None:
    on, plain = clock(results), results["plain"]
    rows = []
    passes = {"teacher forward only": plain, **{f"write {kind} cache": results["write"][kind] for kind in KINDS}}
    for name, run in passes.items():
        seconds, forward = run[on]["pass"], run[on]["teacher forward"]
        rows.append([
            name, f"{run['wall']['pass']:,.1f} s", f"{run['cpu']['pass']:,.1f} s",
            f"{seconds / plain[on]['pass']:.2f}x", f"{forward:,.1f} s", f"{seconds - forward:,.1f} s",
        ])  # fmt: skip
    count = results["examples"]["count"]
    print(f"\nwriting the cache: the teacher over the {count} examples once ({CLOCK_NAMES[on]} seconds)")
    print_table(
        ["pass", "time", "CPU time", "/ forward only", "of which teacher forward", "rest: rows, files, checksums"],
        rows,
    )


def report_size(args, results: dict) -> None:
    tokens = results["examples"]["response_tokens"]
    hidden = int(args.teacher.split("x")[1])
    rows = []
    for kind in KINDS:
        files = results["files"][kind]
        if kind == "exact":
            formula, how = exact_bytes_per_token(hidden, 4), f"{hidden} x 4 (fp32) + 4"
        else:
            top_k, grid = files["settings"]["top_k"], len(files["settings"]["inverse_temperatures"])
            formula, how = compact_bytes_per_token(top_k, grid), f"2 x ({top_k} + {grid}) x 4 + 4"
        rows.append([
            kind, f"{files['rows']:,}", mib(files["shard_bytes"]), f"{files['shard_bytes'] / files['rows']:,.0f} B",
            f"{formula:,} B ({how})", mib(files["head_bytes"]) if files["head_bytes"] else "-",
        ])  # fmt: skip
    assert all(results["files"][kind]["rows"] == tokens for kind in KINDS), "a cache row per response token"
    print("\nsize: measured from the files (rows: shards of rows, label log-probabilities and offsets)")
    print_table(["kind", "response tokens", "rows on disk", "bytes / token", "formula", "head file"], rows)

    sample = results["sample"]
    per_record = sample["tokens"] / sample["records"]
    train_tokens = per_record * DOLLY_TRAIN_RECORDS
    compact = compact_bytes_per_token(args.top_k, 8)
    rows = [
        [name, f"{exact_bytes_per_token(hidden, 2):,} B", gb(train_tokens * exact_bytes_per_token(hidden, 2)),
         f"{compact:,} B", gb(train_tokens * compact)]
        for name, hidden in REFERENCE_TEACHERS.items()
    ]  # fmt: skip
    print(
        f"\nthe paper's recipes: Dolly's train split, {DOLLY_TRAIN_RECORDS:,} records (15,011 less the 1,000 held "
        f"out), at the {per_record:.1f} response tokens a record of the {sample['records']} sampled records "
        f"(max length 512, prompts up to 256): about {train_tokens / 1e6:.2f} M response tokens, estimated"
    )
    print_table(
        ["teacher", "exact, bf16: bytes / token", "exact: train split", f"compact k={args.top_k}: bytes / token",
         "compact: train split"],
        rows,
    )  # fmt: skip


def report_memory(results: dict) -> None:
    runs = results["runs"]
    cuda = results["device"].startswith("cuda")
    rows = []
    for method in METHODS:
        largest = runs[method][0]["largest"]
        teacher_side = largest.get("teacher forward", 0) if method == "live" else largest.get("cache batch", 0)
        peak = statistics.median(run["peak_bytes"] for run in runs[method])
        rows.append([
            method, mib(peak), f"{peak / statistics.median(run['peak_bytes'] for run in runs['sft']):.2f}x",
            mib(largest["student forward"]), mib(teacher_side) if method != "sft" else "-",
            mib(largest["head matmul"]) if "head matmul" in largest and method == "exact" else "-",
        ])  # fmt: skip
    measure = "torch.cuda.max_memory_allocated" if cuda else "the resident-set high-water mark (VmHWM)"
    print(f"\nmemory: peak during the epoch beyond what the process held before train(), by {measure}")
    print_table(
        ["trainer", "peak extra", "/ SFT", "student logits", "teacher side (logits / packed rows)", "head output"],
        rows,
    )
    print("(largest tensors: the biggest batch's, measured on the returned tensors)")


def report_passes(args, results: dict) -> None:
    runs, rounds = results["runs"], args.rounds
    rows = [
        [method, rounds, *(sum(run[key] for run in runs[method]) for key in ("teacher_calls", "teacher_examples"))]
        for method in METHODS
    ]
    rows += [[f"write {kind}", "-", *(results["write"][kind][key] for key in ("calls", "examples"))] for kind in KINDS]
    print("\nteacher forward passes (forward pre-hook on the teacher)")
    print_table(["run", "epochs", "teacher calls", "examples through the teacher"], rows)
    live = statistics.mean(r["teacher_examples"] for r in runs["live"])
    write = results["write"]["exact"]["examples"]
    print(
        f"N epochs: live {live:.0f} N examples through the teacher; cached {write} (the write) + 0 N, "
        f"e.g. N = 7 (the DTS OPT recipe): {7 * live:.0f} vs {write}"
    )


def report(args, results: dict) -> None:
    examples = results["examples"]
    print_header(
        "Teacher cache benchmark: KD + DTS from the exact and the compact cache vs the live teacher vs student SFT",
        resolve_device(args.device),
        f"Dolly sample, first {examples['count']} examples at max length {args.max_length} ({examples['tokens']:,} "
        f"tokens, {examples['response_tokens']:,} response tokens), batch {args.batch}; GPT-2 from configs, vocab "
        f"50257: teacher {args.teacher} (layers x width), student {args.student}; fp32; AdamW lr 5e-5; forward KL, "
        f"kd_ratio 0.5, DTS T in [1, 3]; compact k={args.top_k}; {args.rounds} rounds of the four trainers in turn "
        "in one process",
        f"a cached epoch <= {CACHED_OVER_SFT_TARGET}x the SFT epoch",
    )
    report_speed(results)
    report_phases(results)
    report_writing(results)
    report_size(args, results)
    report_memory(results)
    report_passes(args, results)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="Dolly examples in the epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example; prompts up to half")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each trainer, run in turn")
    parser.add_argument("--teacher", default="6x384", help="layers x width")
    parser.add_argument("--student", default="2x128", help="layers x width")
    parser.add_argument("--top-k", type=int, default=128, help="the compact cache's k")
    add_common_options(parser)
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 examples of <= 96 tokens, tiny models")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.examples, args.batch, args.max_length, args.rounds = 8, 4, 96, 1
        args.teacher, args.student, args.top_k = "2x64", "1x32", 16
    apply_common_options(args)
    return args


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(measure_in_worker(args)))
        return
    argv = [
        "--examples", args.examples, "--batch", args.batch, "--max-length", args.max_length, "--rounds", args.rounds,
        "--teacher", args.teacher, "--student", args.student, "--top-k", args.top_k, "--device", args.device,
        "--threads", args.threads, "--worker",
    ]  # fmt: skip
    report(args, run_worker(__file__, argv, "the four trainers, the cache writes"))


if __name__ == "__main__":
    main()
