"""Shared test fixtures: the real GPT-2 tokenizer, instruction data and a trained teacher (the plain
functions behind them live in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from datasets import Dataset
from helpers import arithmetic_records, gpt2_tokenizer, tiny_gpt2, tokenize_records
from transformers import DataCollatorForSeq2Seq, GPT2TokenizerFast, Trainer, TrainingArguments


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: intra-op threads only add overhead (10x on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer() -> GPT2TokenizerFast:
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def train_dataset(tokenizer) -> Dataset:
    return tokenize_records(tokenizer, arithmetic_records(32))


@pytest.fixture(scope="session")
def eval_dataset(tokenizer) -> Dataset:
    return tokenize_records(tokenizer, arithmetic_records(8, start=100))


@pytest.fixture(scope="session")
def trained_teacher_dir(tokenizer, train_dataset, tmp_path_factory) -> Path:
    """A small GPT-2 fine-tuned on the training set with plain cross-entropy, saved with its tokenizer."""
    out = tmp_path_factory.mktemp("teacher")
    teacher = tiny_gpt2(tokenizer, width=64, seed=1)
    args = TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=8,
        max_steps=60,
        learning_rate=3e-3,
        warmup_steps=5,
        logging_steps=60,
        save_strategy="no",
        report_to=[],
        seed=1,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    Trainer(model=teacher, args=args, train_dataset=train_dataset, data_collator=collator).train()
    teacher.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"
