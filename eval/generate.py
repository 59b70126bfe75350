"""Batched generation of responses the way MiniLLM evaluates (and DistiLLM and the DTS paper after it).

Protocol choices, each checked against MiniLLM's ``evaluate_main.py`` / ``data_utils/prompt_datasets.py``:

* Prompts are encoded without special tokens and cut to ``max_prompt_tokens`` (256) tokens. MiniLLM
  cuts evaluation prompts with ``prompt_ids[:max_prompt_length]``, i.e. it keeps the FIRST tokens
  (training, by contrast, drops long prompts). ``truncation_side="right"`` (the default, named as
  in Hugging Face tokenizers) does the same; ``"left"`` keeps the last tokens (the "### Response:"
  cue) instead, for users who prefer that over comparability. Either way the prompts cut are counted
  (``count_cut_prompts``; ``eval.run`` prints and stores them per suite).
* The new-token budget is ``max_length - max_prompt_tokens`` (256) for EVERY prompt. MiniLLM pads
  every batch to ``max_prompt_length`` and generates ``max_length - padded width`` new tokens, so
  "up to 512 - prompt length" in the papers' wording is, in their code, 256 new tokens whatever
  the prompt's length. A fixed budget also keeps a prompt's output independent of the other
  prompts in its batch, and prompt + response never exceeds ``max_length`` positions.
  ``max_new_tokens`` overrides it (still capped so that prompt + response <= ``max_length``).
* Sampling with ``top_k=0, top_p=1.0, temperature=1.0`` (plain ancestral sampling), or greedy.
  The draw is made by ``CategoricalSampler`` (same distribution as ``generate(do_sample=True)``,
  several times cheaper on CPU; see there).
  Generation stops at EOS; only the new tokens are decoded, cut at the first EOS, special tokens
  skipped, and stripped (MiniLLM cuts at ``<|endoftext|>`` and strips).
* Left padding with the attention mask (``generate`` derives position ids from it) and the KV
  cache, so a prompt gives the same greedy output alone and inside a batch.

Batch layout and seeding (what makes runs reproducible and process-count independent):

* Prompts are sorted by token length (longest first, ties by input position) and cut into
  consecutive batches of ``batch_size``; batch ``b`` of that list is the "global batch b". The
  layout is a deterministic function of the prompt list, the tokenizer and ``batch_size``;
  outputs come back in input order.
* Global batch ``b`` with seed ``s`` draws from its own ``torch.Generator`` seeded with a value
  derived from ``(s, b)`` (``numpy.random.SeedSequence``); the global torch RNG is not touched.
  Under several processes (``accelerate launch`` / ``torchrun``) global batch ``b`` runs on process
  ``b % num_processes``
  (round robin: the sorted layout would give one process all the long prompts if split in
  blocks), with the same seed it would get in one process, and the results are gathered and put
  back in input order. So N processes with per-process ``batch_size`` B give the same outputs as
  one process with ``batch_size`` B (exactly the same tensors go through the same kernels; only a
  different floating-point reduction order, e.g. another thread count or GPU type, can change a
  sample).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from dts_llm.chat import bos_prefix
from dts_llm.generation import CategoricalSampler, batch_seed, decoding_config, generate_new_tokens, left_padded


@dataclass
class GenerationSettings:
    max_prompt_tokens: int = 256
    max_length: int = 512  # prompt + new tokens
    greedy: bool = False
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: max_length - max_prompt_tokens for every prompt (MiniLLM)
    truncation_side: str = "right"  # "right" keeps the first max_prompt_tokens tokens (MiniLLM); "left" the last

    def __post_init__(self):
        if not 0 < self.max_prompt_tokens < self.max_length:
            raise ValueError(f"need 0 < max_prompt_tokens ({self.max_prompt_tokens}) < max_length ({self.max_length})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def new_tokens(self) -> int:
        """New tokens allowed for every prompt."""
        fixed = self.max_length - self.max_prompt_tokens
        return fixed if self.max_new_tokens is None else min(self.max_new_tokens, fixed)

    def to_dict(self) -> dict:
        return {**asdict(self), "new_tokens": self.new_tokens}


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, whole, without special tokens but for a BOS of the tokenizer's own, as in
    training (``dts_llm.chat.bos_prefix``; a chat template may have written it already)."""
    bos = bos_prefix(tokenizer)
    ids = tokenizer(list(prompts), add_special_tokens=False).input_ids
    return [bos + prompt if bos and prompt[:1] != bos else prompt for prompt in ids]


def encode_prompts(tokenizer, prompts: list[str], settings: GenerationSettings) -> list[list[int]]:
    """``prompt_token_ids`` cut to ``max_prompt_tokens``."""
    keep = settings.max_prompt_tokens
    ids = prompt_token_ids(tokenizer, prompts)
    return [list(p[:keep]) if settings.truncation_side == "right" else list(p[-keep:]) for p in ids]


def count_cut_prompts(tokenizer, prompts: list[str], settings: GenerationSettings) -> int:
    """How many prompts ``encode_prompts`` cuts: reported, since a prompt cut on the right loses its
    "### Response:" cue and one cut on the left its instruction."""
    return sum(len(ids) > settings.max_prompt_tokens for ids in prompt_token_ids(tokenizer, prompts))


def batch_layout(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Input positions of each global batch: longest prompts first, ties in input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _process_info() -> tuple[int, int]:
    """(process index, number of processes) of the running distributed group, (0, 1) if none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(items: list) -> list:
    """Concatenation of every process's ``items`` (in process order); ``items`` itself in one process."""
    _, world = _process_info()
    if world == 1:
        return items
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _model_device(model) -> torch.device:
    try:
        return model.device
    except AttributeError:
        return next(model.parameters()).device


def _generate_batch(
    model, tokenizer, batch: list[list[int]], settings: GenerationSettings, pad_id: int, seed: int | None
) -> list[str]:
    device = _model_device(model)
    input_ids, attention_mask = left_padded(batch, pad_id)
    sampler = None
    if not settings.greedy:
        generator = torch.Generator(device=device).manual_seed(seed)
        sampler = CategoricalSampler(generator, settings.temperature, settings.top_k, settings.top_p)
    config = decoding_config(settings.new_tokens, tokenizer.eos_token_id, pad_id)
    new = generate_new_tokens(model, input_ids.to(device), attention_mask.to(device), config, sampler).tolist()
    responses = []
    for tokens in new:
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        responses.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return responses


def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    settings: GenerationSettings,
    seed: int | None,
    progress: bool = True,
) -> list[str]:
    """One response per prompt, in input order (see the module docstring for the protocol).

    ``seed`` is required for sampling and ignored by greedy decoding. In a distributed group every
    process must call this with the same prompts; each generates its share of the batches and every
    process returns the full list.
    """
    if not settings.greedy and seed is None:
        raise ValueError("sampling needs a seed (or use greedy decoding)")
    if not prompts:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rank, world = _process_info()
    encoded = encode_prompts(tokenizer, prompts, settings)
    layout = batch_layout([len(ids) for ids in encoded], settings.batch_size)
    mine = [(index, batch) for index, batch in enumerate(layout) if index % world == rank]

    was_training = model.training
    model.eval()
    results: list[tuple[int, str]] = []
    bar = tqdm(
        total=sum(len(batch) for _, batch in mine),
        unit="prompt",
        desc="greedy" if settings.greedy else f"seed {seed}",
        disable=not progress or rank != 0,
    )
    try:
        for index, batch in mine:
            generator_seed = None if settings.greedy else batch_seed(seed, index)
            responses = _generate_batch(
                model, tokenizer, [encoded[i] for i in batch], settings, pad_id, generator_seed
            )
            results.extend(zip(batch, responses, strict=False))
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)

    ordered: list[str | None] = [None] * len(prompts)
    for position, response in _gather(results):
        ordered[position] = response
    assert all(r is not None for r in ordered), "a prompt got no response"
    return ordered  # type: ignore[return-value]
