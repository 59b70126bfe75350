"""Batched generation: left padding, seeding, EOS cutting, prompt cutting, input order."""

import pytest
import torch
from helpers import tiny_gpt2

from eval.generate import (
    CategoricalSampler,
    GenerationSettings,
    batch_layout,
    batch_seed,
    encode_prompts,
    generate_responses,
)

PROMPTS = [
    "Below is an instruction.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
    "Hi",
    "What is the capital of France? Answer in one word, please, and explain why. " * 3,
    "Count to three.",
    "Write a long story about a dragon who learns to cook pasta in a small village by the sea. " * 2,
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt2(tokenizer, width=32, layers=2, seed=0)


def settings(**overrides) -> GenerationSettings:
    return GenerationSettings(**{"max_length": 76, "max_prompt_tokens": 64, "batch_size": 4, **overrides})


def test_defaults_are_the_minillm_protocol():
    s = GenerationSettings()
    assert (s.max_prompt_tokens, s.max_length, s.top_k, s.top_p, s.temperature, s.greedy) == (
        256,
        512,
        0,
        1.0,
        1.0,
        False,
    )
    assert s.new_tokens == 256  # MiniLLM pads prompts to 256 and generates max_length - 256
    assert GenerationSettings(max_new_tokens=1000).new_tokens == 256  # prompt + response <= max_length
    assert GenerationSettings(max_new_tokens=10).new_tokens == 10
    with pytest.raises(ValueError):
        GenerationSettings(max_prompt_tokens=512, max_length=512)


def test_left_padding_gives_the_same_greedy_output_alone_and_in_a_batch(model, tokenizer):
    greedy = settings(greedy=True)
    batched = generate_responses(model, tokenizer, PROMPTS, greedy, seed=None, progress=False)
    alone = [generate_responses(model, tokenizer, [p], greedy, seed=None, progress=False)[0] for p in PROMPTS]
    assert batched == alone
    assert all(batched)


def test_the_checkpoint_generation_config_does_not_leak_into_decoding(model, tokenizer):
    """A checkpoint's generation_config.json (repetition_penalty, n-gram bans, ...) must not change
    the protocol's decoding."""
    greedy = settings(greedy=True)
    plain = generate_responses(model, tokenizer, PROMPTS, greedy, seed=None, progress=False)
    defaults = model.generation_config
    model.generation_config = type(defaults)(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=8)
    try:
        assert generate_responses(model, tokenizer, PROMPTS, greedy, seed=None, progress=False) == plain
        assert model.generation_config.repetition_penalty == 5.0  # the model's own config is restored
    finally:
        model.generation_config = defaults


def test_same_seed_same_outputs_other_seed_other_outputs(model, tokenizer):
    first = generate_responses(model, tokenizer, PROMPTS, settings(), seed=10, progress=False)
    again = generate_responses(model, tokenizer, PROMPTS, settings(), seed=10, progress=False)
    other = generate_responses(model, tokenizer, PROMPTS, settings(), seed=20, progress=False)
    assert first == again
    assert first != other
    # the global RNG state before the call does not matter: every batch is seeded from (seed, batch index)
    torch.manual_seed(1234)
    assert generate_responses(model, tokenizer, PROMPTS, settings(), seed=10, progress=False) == first
    with pytest.raises(ValueError, match="seed"):
        generate_responses(model, tokenizer, PROMPTS, settings(), seed=None, progress=False)


def test_batch_seeds_are_distinct():
    seeds = {batch_seed(s, b) for s in (10, 20, 30, 40, 50) for b in range(200)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**63 for s in seeds)


def test_outputs_come_back_in_input_order(model, tokenizer):
    greedy = settings(greedy=True, batch_size=2)
    forward = generate_responses(model, tokenizer, PROMPTS, greedy, seed=None, progress=False)
    backward = generate_responses(model, tokenizer, PROMPTS[::-1], greedy, seed=None, progress=False)
    assert backward == forward[::-1]


def test_batch_layout_is_longest_first_with_ties_in_input_order():
    assert batch_layout([3, 5, 3, 9, 1], 2) == [[3, 1], [0, 2], [4]]


def test_prompts_are_cut_to_max_prompt_tokens(model, tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    ids = tokenizer(long_prompt, add_special_tokens=False).input_ids
    assert len(ids) > 64
    head = encode_prompts(tokenizer, [long_prompt, "short"], settings())
    assert head[0] == ids[:64]  # MiniLLM keeps the first tokens
    assert head[1] == tokenizer("short", add_special_tokens=False).input_ids
    assert encode_prompts(tokenizer, [long_prompt], settings(truncation_side="left"))[0] == ids[-64:]
    # prompt (64) + new tokens (128 - 64) fits the tiny model's 128 positions: no index error
    out = generate_responses(
        model, tokenizer, [long_prompt, "short"], settings(max_length=128), seed=10, progress=False
    )
    assert len(out) == 2 and all(out)


def test_no_special_tokens_are_added(tokenizer):
    ids = encode_prompts(tokenizer, ["Hello"], settings())[0]
    assert tokenizer.eos_token_id not in ids


class FixedGenerator:
    """A stand-in for ``model.generate`` returning the prompt followed by fixed tokens."""

    def __init__(self, model, continuations):
        self.model, self.continuations, self.calls = model, continuations, []

    def __call__(self, input_ids, attention_mask, generation_config, logits_processor):
        self.calls.append((generation_config, logits_processor))
        rows = [row.tolist() + self.continuations[i] for i, row in enumerate(input_ids)]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [generation_config.pad_token_id] * (width - len(r)) for r in rows])


def test_responses_are_cut_at_eos_and_stripped(model, tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    hello = tokenizer("  Hello world.\n", add_special_tokens=False).input_ids
    after = tokenizer(" more text", add_special_tokens=False).input_ids
    fake = FixedGenerator(model, [hello + [eos] + after, after, [eos] + hello])
    monkeypatch.setattr(model, "generate", fake)
    out = generate_responses(model, tokenizer, ["a b c", "a b", "a"], settings(), seed=10, progress=False)
    assert out == ["Hello world.", "more text", ""]
    config, processors = fake.calls[0]
    assert [type(p) for p in processors] == [CategoricalSampler]
    assert (processors[0].top_k, processors[0].top_p, processors[0].temperature) == (0, 1.0, 1.0)
    assert config.max_new_tokens == 76 - 64 and config.eos_token_id == eos and config.use_cache


def test_greedy_generation_config(model, tokenizer, monkeypatch):
    fake = FixedGenerator(model, [[1, 2]])
    monkeypatch.setattr(model, "generate", fake)
    generate_responses(model, tokenizer, ["a"], settings(greedy=True), seed=None, progress=False)
    config, processors = fake.calls[0]
    assert config.do_sample is False and config.num_beams == 1 and len(processors) == 0


def draw(settings, logits, count=20000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sampler = CategoricalSampler(generator, settings.temperature, settings.top_k, settings.top_p)
    scores = sampler(None, logits.repeat(count, 1))
    assert torch.isinf(scores).sum(-1).eq(logits.shape[-1] - 1).all()  # exactly one finite score per row
    return torch.bincount(scores.argmax(-1), minlength=logits.shape[-1]).double() / count


def test_categorical_sampler_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]])
    expected = torch.softmax(logits, -1)[0].double()
    torch.testing.assert_close(draw(settings(), logits), expected, atol=0.015, rtol=0)
    assert draw(settings(), logits)[4] == 0
    hot = torch.softmax(logits / 0.5, -1)[0].double()
    torch.testing.assert_close(draw(settings(temperature=0.5), logits), hot, atol=0.015, rtol=0)
    top2 = draw(settings(top_k=2), logits)
    torch.testing.assert_close(
        top2, torch.tensor([0.7311, 0.2689, 0, 0, 0, 0], dtype=torch.float64), atol=0.015, rtol=0
    )
    # top_p=0.6: the first token has p=0.56, so the second is needed to reach 0.6
    torch.testing.assert_close(draw(settings(top_p=0.6), logits), top2, atol=0.015, rtol=0)
