"""`dts-llm demo`: a small offline distillation run that shows DTS at work in seconds.

Everything is built here from a seed: arithmetic instructions, a byte-level BPE tokenizer, a GPT-2
teacher fine-tuned with plain cross-entropy, then a smaller GPT-2 student distilled from it with
the DTS temperature. It prints the temperature and the loss terms as training goes and writes the
trainer's log history; the teacher and the student are saved. No network, no GPU.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from ..data import encode_example
from ..tasks import INSTRUCTION
from ..template import format_prompt
from ..trainer import DistillationConfig, DistillationTrainer

EOS = "<|endoftext|>"


def arithmetic_examples(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        examples.append((format_prompt(f"What is {a} plus {b}?"), f"{a} plus {b} is {a + b}."))
    return examples


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def gpt2(tokenizer, width: int, layers: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers falls back to for GPT-2, after a warning on every run
    return model


def run_demo(output: str) -> list[dict]:
    out = Path(output)
    train, valid = arithmetic_examples(512, seed=0), arithmetic_examples(64, seed=1)
    tokenizer = train_tokenizer([p + r for p, r in train])

    def encode(pairs):
        return Dataset.from_list([encode_example(tokenizer, p, r) for p, r in pairs])

    train_set, valid_set = encode(train), encode(valid)
    common = {
        "per_device_train_batch_size": 16,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_pin_memory": torch.cuda.is_available(),  # else torch warns that it cannot pin
    }
    collator = INSTRUCTION.collator(tokenizer)

    print("1/2 fine-tuning the teacher (GPT-2, 4 layers x 128) with cross-entropy ...")
    teacher = gpt2(tokenizer, width=128, layers=4, seed=0)
    teacher_args = TrainingArguments(output_dir=str(out / "teacher"), num_train_epochs=3, learning_rate=2e-3, **common)
    Trainer(model=teacher, args=teacher_args, train_dataset=train_set, data_collator=collator).train()
    # Saved with its tokenizer, as a teacher a user would distil from: the trainer checks the two match.
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")

    print("2/2 distilling the student (GPT-2, 2 layers x 64) with DTS ...")
    args = DistillationConfig(
        output_dir=str(out / "student"),
        num_train_epochs=3,
        learning_rate=2e-3,
        logging_steps=8,
        kd_ratio=0.5,
        temperature_policy="dts",
        **common,
    )
    trainer = DistillationTrainer(
        model=gpt2(tokenizer, width=64, layers=2, seed=1),
        teacher_model=str(out / "teacher"),
        args=args,
        train_dataset=train_set,
        eval_dataset=valid_set,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.evaluate()
    trainer.save_model()  # the student and its tokenizer, in out/student

    history = trainer.state.log_history
    print(f"\n{'step':>5} {'epoch':>6} {'T':>6} {'kd_loss':>8} {'ce_loss':>8} {'teacher_ce':>10}")
    for entry in history:
        if "kd_loss" in entry:
            print(
                f"{entry['step']:>5} {entry['epoch']:>6.2f} {entry['temperature']:>6.3f} "
                f"{entry['kd_loss']:>8.4f} {entry['ce_loss']:>8.4f} {entry['teacher_ce_loss']:>10.4f}"
            )
    final = history[-1]
    print(
        f"\nvalidation: student CE {final['eval_ce_loss']:.3f}, teacher CE {final['eval_teacher_ce_loss']:.3f}, "
        f"KD {final['eval_kd_loss']:.4f} at T = {final['eval_temperature']:.3f}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    print(
        f"teacher and student saved in {out / 'teacher'} and {out / 'student'}; "
        f"log history in {out / 'log_history.json'}"
    )
    return history


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="Distil a tiny student offline with DTS and print the trajectory.")
    demo.add_argument("--output", default="demo_output", help="Folder for the run (default: demo_output).")


def main(args: argparse.Namespace) -> None:
    run_demo(args.output)
