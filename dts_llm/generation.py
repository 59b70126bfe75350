"""Batched sampling from a causal LM: left-padded prompts, the KV cache, an exact categorical draw.

Shared by evaluation (`eval.generate`) and on-policy distillation (`dts_llm.on_policy`), so that a
student samples in training as it is scored afterwards.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


def batch_seed(seed: int, *keys: int) -> int:
    """A torch seed derived from ``seed`` and ``keys`` (a batch index, a step, ...); distinct keys, unrelated seeds."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token lists padded on the left, so that every prompt ends
    where generation starts (``generate`` derives the position ids from the mask)."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


class CategoricalSampler(LogitsProcessor):
    """Draws each row's next token from softmax(logits / temperature) (after top-k / top-p when set).

    An exact categorical draw by inverse CDF (one uniform per row from ``generator``, a float64
    cumulative sum and a binary search), returned as scores that are -inf except at the drawn token.
    Why not ``generate(do_sample=True)``: ``torch.multinomial`` on CPU draws one exponential per
    vocabulary entry (50k per row per step), which costs more than a tiny model's forward and so
    hides what batching saves (it was 75% of the batched run's time in benchmarks/generation.py). The
    distribution is the same; the random stream differs from ``multinomial``'s, which no evaluation
    can reproduce bit for bit anyway. It also takes an explicit ``torch.Generator``, so the caller's
    global RNG is left alone.
    """

    def __init__(self, generator: torch.Generator, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            drop = (probs.cumsum(-1) - probs) >= self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        cdf = torch.softmax(logits, dim=-1).double().cumsum(-1)
        draws = torch.rand((cdf.shape[0], 1), generator=self.generator, device=cdf.device, dtype=cdf.dtype)
        tokens = torch.searchsorted(cdf, draws * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def decoding_config(max_new_tokens: int, eos_id: int, pad_id: int) -> GenerationConfig:
    """``generate``'s greedy loop with the KV cache, stopping at EOS; for sampling, a `CategoricalSampler`
    leaves the drawn token the only finite score, so the argmax picks it."""
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )


@torch.no_grad()  # not inference_mode: FSDP2 would keep inference tensors as its unsharded parameters
def generate_new_tokens(
    model, input_ids, attention_mask, config: GenerationConfig, sampler: CategoricalSampler | None, **kwargs
) -> torch.Tensor:
    """The new tokens ``model.generate`` appends to left-padded prompts (pad after a row's EOS).

    ``generate`` fills every field left unset from the checkpoint's generation_config.json (a
    repetition_penalty, say, would change the scores): the library defaults stand in meanwhile (on the
    model under a peft wrapper, whose ``generate`` reads them).
    """
    processors = LogitsProcessorList([sampler] if sampler is not None else [])
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpoint_defaults, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
            **kwargs,
        )
    finally:
        inner.generation_config = checkpoint_defaults
    return output[:, input_ids.shape[1] :]
