"""On-policy and sequence-level distillation: a training batch's responses replaced by generated completions.

Before each optimizer step the batches it accumulates are drawn; for each, a draw seeded from the run's
seed, the step and the batch's place in the step (the same on every process) decides: with probability
``lmbda`` the student completes the batch's prompts (GKD's on-policy mixing), otherwise with ``seq_kd``
the teacher does (sequence-level KD), otherwise the dataset's responses stay. A completion is sampled
(``generation_temperature``, ``top_p``, ``top_k``) with a generator seeded from the seed, the step, the
batch and the process, so a resumed run generates what the uninterrupted one did. The completion and its
EOS become the labels (the prompt masked, padding after the EOS not learned), and the teacher scores them
in the same step, at the distillation temperature the policy sets.

Replacing the batches before the step's tokens are counted keeps the loss normalised by the tokens
actually learned. Generation runs in eval mode without a graph, the training mode restored after it.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from .config import CACHE_CANNOT_SCORE, DistillationConfig
from .errors import UserError
from .generation import CategoricalSampler, batch_seed, decoding_config, generate_new_tokens, left_padded
from .heads import CAUSAL_LM
from .losses import IGNORE_INDEX

STUDENT, TEACHER = "student", "teacher"


def batch_prompts(batch: dict) -> list[list[int]]:
    """Each row's prompt: its attended tokens before the first learned label."""
    attended = batch["attention_mask"].bool()
    before_labels = (batch["labels"] != IGNORE_INDEX).long().cumsum(1) == 0
    return [row[keep].tolist() for row, keep in zip(batch["input_ids"], attended & before_labels, strict=True)]


def completed_batch(prompts: list[list[int]], new_tokens: torch.Tensor, eos_id: int, pad_id: int):
    """The right-padded batch of prompts + completions, only the completions (each up to its EOS) learned;
    and each completion's length and whether it was cut (no EOS)."""
    completions, cut = [], []
    for tokens in new_tokens.tolist():
        ended = eos_id in tokens
        completions.append(tokens[: tokens.index(eos_id) + 1] if ended else tokens)
        cut.append(not ended)
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.as_tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = torch.as_tensor(completion, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch, [len(c) for c in completions], cut


def batch_source(seed: int, lmbda: float, seq_kd: bool, step: int, index: int) -> str | None:
    """Who completes batch ``index`` of optimizer step ``step`` (`STUDENT`, `TEACHER` or None: the dataset's
    responses stay): a function of the seed, step and batch only, so the same on every process."""
    generator = torch.Generator().manual_seed(batch_seed(seed, step, index))
    if torch.rand((), generator=generator).item() < lmbda:
        return STUDENT
    return TEACHER if seq_kd else None


def _bare(model):
    """The teacher under its DeepSpeed engine, if any."""
    return getattr(model, "module", model)


def position_limit(*models) -> int | None:
    """The fewest positions any of ``models`` has (None when none says): a completion must fit in the
    student that writes it and in the teacher that scores it."""
    limits = [getattr(model.config, "max_position_embeddings", None) for model in models if model is not None]
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


@contextmanager
def _gathered(model, zero3: bool):
    """A ZeRO-3 student's parameters gathered whole on every process for the generation, so that each can
    stop at its own EOS."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield


class OnPolicyBatches:
    """Decides which batches are generated, generates them and keeps the counts that are logged."""

    def __init__(self, args: DistillationConfig, tokenizer, accelerator):
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise UserError("lmbda > 0 or seq_kd needs a tokenizer with an EOS token (processing_class)")
        self.args, self.accelerator = args, accelerator
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        self.zero3 = plugin is not None and plugin.zero_stage == 3
        # Sharded models run collectives in every forward: all processes keep stepping until all are done.
        self.synced = self.zero3 or getattr(accelerator.state, "fsdp_plugin", None) is not None
        self.sums = defaultdict(float)

    def replaced(self, batches, step: int, student, teacher):
        """``batches`` (an iterator) with the chosen ones replaced by completions."""
        limit = position_limit(student, _bare(teacher))
        for index, batch in enumerate(batches):
            source = batch_source(self.args.seed, self.args.lmbda, self.args.seq_kd, step, index)
            self.sums["batches"] += 1
            if source is not None:
                model = student if source == STUDENT else _bare(teacher)
                batch = self.complete(batch, model, step, index, gather=source == STUDENT, limit=limit)
            yield batch

    def complete(self, batch: dict, model, step: int, index: int, gather: bool, limit: int | None = None) -> dict:
        """``batch`` with its responses replaced by ``model``'s completions of its prompts, each at most
        ``max_new_tokens`` long and the batch at most ``limit`` positions wide (a completion cut by either is
        learned without an EOS and counted as cut)."""
        prompts = batch_prompts(batch)
        device = batch["input_ids"].device
        input_ids, attention_mask = left_padded(prompts, self.pad_id)
        room = self.args.max_new_tokens if limit is None else min(self.args.max_new_tokens, limit - input_ids.size(1))
        if room < 1:
            raise UserError(
                f"a prompt of {input_ids.size(1)} tokens leaves no room for a completion in the models' {limit} "
                "positions: keep prompts shorter (max_prompt_length)"
            )
        seed = batch_seed(self.args.seed, step, index, self.accelerator.process_index)
        sampler = CategoricalSampler(
            torch.Generator(device=device).manual_seed(seed),
            self.args.generation_temperature,
            self.args.top_k,
            self.args.top_p,
        )
        config = decoding_config(room, self.eos_id, self.pad_id)
        was_training = model.training
        model.eval()
        try:
            with _gathered(model, self.zero3 and gather), self.accelerator.autocast():
                synced = {"synced_gpus": True} if self.synced and not (self.zero3 and gather) else {}
                new_tokens = generate_new_tokens(
                    model, input_ids.to(device), attention_mask.to(device), config, sampler, **synced
                )
        finally:
            model.train(was_training)
        completed, lengths, cut = completed_batch(prompts, new_tokens, self.eos_id, self.pad_id)
        self.sums["generated_batches"] += 1
        self.sums["completions"] += len(lengths)
        self.sums["completion_tokens"] += sum(lengths)
        self.sums["cut_completions"] += sum(cut)
        return {name: tensor.to(device) for name, tensor in completed.items()}

    def flush_metrics(self, reduce) -> dict[str, float]:
        """The logging window's share of generated batches, mean completion length and share of completions cut
        by ``max_new_tokens``, its sums first summed over processes by ``reduce`` (a collective); then reset."""
        names = ["batches", "generated_batches", "completions", "completion_tokens", "cut_completions"]
        totals = reduce(torch.tensor([self.sums[name] for name in names], device=self.args.device))
        self.sums.clear()
        batches, generated, completions, tokens, cut = totals.tolist()
        if batches == 0:
            return {}
        metrics = {"generated_share": generated / batches}
        if completions:
            metrics.update(completion_length=tokens / completions, cut_share=cut / completions)
        return metrics


def on_policy_batches(args: DistillationConfig, head: str, cached_teacher, tokenizer, accelerator):
    """An `OnPolicyBatches` when ``args`` asks for generated completions, else None (after refusing a
    set-up that cannot generate or score them)."""
    if not args.generates:
        return None
    if cached_teacher is not None:
        raise UserError(f"lmbda={args.lmbda}, seq_kd={args.seq_kd}: {CACHE_CANNOT_SCORE}")
    if head != CAUSAL_LM:
        raise UserError(f"lmbda={args.lmbda}, seq_kd={args.seq_kd}: only a causal LM student generates completions")
    return OnPolicyBatches(args, tokenizer, accelerator)
