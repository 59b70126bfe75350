"""The offline teacher: a cache written once gives the online run's trajectory, and a stale one is refused.

The caches are written from the suite's trained teacher over its training and evaluation examples; runs
from them are compared step by step with the same run against the live teacher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import arithmetic_records, gpt2_tokenizer, tiny_gpt2, tokenize_records
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

import dts_llm.teacher_cache.writer as writer
from dts_llm import DistillationConfig, DistillationTrainer
from dts_llm.errors import UserError
from dts_llm.teacher_cache import (
    CacheSettings,
    TeacherCache,
    data_fingerprint,
    recipe_provenance,
    tokenizer_fingerprint,
    write_teacher_cache,
)

LOGGED = ("loss", "kd_loss", "ce_loss", "teacher_ce_loss", "temperature")
EVALUATED = ("eval_loss", "eval_kd_loss", "eval_ce_loss", "eval_teacher_ce_loss", "eval_temperature")


def write_cache(folder, teacher, tokenizer, splits, **settings) -> str:
    provenance = {"tokenizer": tokenizer_fingerprint(tokenizer)}
    provenance.update({f"data.{split}": data_fingerprint(examples) for split, examples in splits.items()})
    write_teacher_cache(
        teacher,
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        splits,
        folder,
        CacheSettings(shard_examples=8, **settings),
        provenance,
        vocab_size=len(tokenizer),
        batch_size=4,
    )
    return str(folder)


@pytest.fixture(scope="module")
def teacher(trained_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(trained_teacher_dir)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher, tokenizer, train_dataset, eval_dataset):
    """Folders of an exact cache, a compact one whose k is the whole vocabulary and a compact one of k = 16."""
    root = tmp_path_factory.mktemp("caches")
    splits = {"train": train_dataset, "validation": eval_dataset}
    compact = {"kind": "compact", "temperature_min": 1.0, "temperature_max": 3.0}
    return {
        "exact": write_cache(root / "exact", teacher, tokenizer, splits),
        "compact-full": write_cache(
            root / "compact-full", teacher, tokenizer, splits, top_k=len(tokenizer), **compact
        ),
        "compact-16": write_cache(root / "compact-16", teacher, tokenizer, splits, top_k=16, **compact),
    }


def run(tmp_path, tokenizer, train_dataset, eval_dataset, **teacher) -> tuple[DistillationTrainer, list[dict]]:
    """Six DTS steps (32 examples in batches of 8: an epoch and a half) with an evaluation every three."""
    args = DistillationConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=3,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        **teacher.pop("settings", {}),
    )
    trainer = DistillationTrainer(
        model=tiny_gpt2(tokenizer),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **teacher,
    )
    trainer.train()
    return trainer, trainer.state.log_history


def values(history: list[dict], names) -> list[list[float]]:
    return [[entry[name] for name in names] for entry in history if names[0] in entry]


@pytest.fixture(scope="module")
def online(tmp_path_factory, teacher, tokenizer, train_dataset, eval_dataset):
    return run(tmp_path_factory.mktemp("online"), tokenizer, train_dataset, eval_dataset, teacher_model=teacher)[1]


@pytest.mark.parametrize("kind", ["exact", "compact-full"])
def test_a_cache_gives_the_online_runs_temperatures_and_losses_at_every_step(
    kind, caches, online, teacher, tmp_path, tokenizer, train_dataset, eval_dataset
):
    trainer, cached = run(tmp_path, tokenizer, train_dataset, eval_dataset, teacher_cache=caches[kind])
    assert trainer.teacher_model is None  # the teacher was never loaded
    assert len(values(cached, LOGGED)) == 6 and len(values(cached, EVALUATED)) == 2
    for names in (LOGGED, EVALUATED):
        for mine, theirs in zip(values(cached, names), values(online, names), strict=True):
            assert mine == pytest.approx(theirs, rel=2e-5), names
    if kind == "exact":  # of the teacher only its head is held: GPT-2's, tied to its input embedding
        assert torch.equal(trainer.cached_teacher.head.weight, teacher.get_input_embeddings().weight)


def test_a_cache_feeds_the_fused_head_the_online_runs_trajectory(
    caches, online, tmp_path, tokenizer, train_dataset, eval_dataset
):
    """With ``fused_head`` the cached hidden states go through the teacher's saved head inside the loss; a compact
    cache's rows meet the student's projected chunks."""
    settings = {"settings": {"fused_head": True}}
    trainer, cached = run(tmp_path, tokenizer, train_dataset, eval_dataset, teacher_cache=caches["exact"], **settings)
    assert trainer.fused_heads.teacher is trainer.cached_teacher.head
    for names in (LOGGED, EVALUATED):
        for mine, theirs in zip(values(cached, names), values(online, names), strict=True):
            assert mine == pytest.approx(theirs, rel=2e-5), names
    # A compact cache: only the student is projected, the teacher's top-k rows are read as stored (k = V here:
    # the online run again).
    settings = {"settings": {"fused_head": True}}
    trainer, compact = run(
        tmp_path / "compact", tokenizer, train_dataset, eval_dataset, teacher_cache=caches["compact-full"], **settings
    )
    assert trainer.fused_heads.teacher is None
    for names in (LOGGED, EVALUATED):
        for mine, theirs in zip(values(compact, names), values(online, names), strict=True):
            assert mine == pytest.approx(theirs, rel=2e-5), names


def test_an_exact_cache_lays_the_teachers_logits_on_every_scored_position(caches, teacher, tokenizer, train_dataset):
    """What every policy and divergence reads: the teacher's logits where a label is scored (no loss reads the
    other positions), here against the teacher's own forward on a padded batch."""
    trainer = DistillationTrainer(
        model=tiny_gpt2(tokenizer),
        teacher_cache=caches["exact"],
        args=DistillationConfig(output_dir="unused", report_to=[], per_device_train_batch_size=8),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    split, examples = "train", batch.pop("teacher_cache_train")
    cached = trainer.cached_teacher.batch(split, examples, batch["labels"])
    with torch.no_grad():
        online = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(cached.logits[:, :-1][scored], online[:, :-1][scored], rtol=1e-5, atol=1e-5)
    assert not cached.logits[:, :-1][~scored].any() and not cached.logits[:, -1].any()
    logprobs = torch.log_softmax(online[:, :-1][scored], -1).gather(1, batch["labels"][:, 1:][scored][:, None])
    assert cached.cross_entropy_sum.item() == pytest.approx(-logprobs.sum().item(), rel=1e-5)


def test_a_learnt_temperature_trains_from_an_exact_cache_as_from_the_teacher(
    caches, teacher, tmp_path, tokenizer, train_dataset, eval_dataset
):
    ctkd = {"temperature_policy": "ctkd_instance", "ctkd_lambda_epochs": 0.0, "ctkd_learning_rate": 0.5}
    _, online = run(tmp_path / "online", tokenizer, train_dataset, None, teacher_model=teacher, settings=dict(ctkd))
    _, cached = run(tmp_path / "cached", tokenizer, train_dataset, None, teacher_cache=caches["exact"], settings=ctkd)
    names = (*LOGGED, "temperature_std")
    for mine, theirs in zip(values(cached, names), values(online, names), strict=True):
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-7)
    assert len({entry[-2] for entry in values(online, names)}) > 1  # the learnt T moved


def test_a_small_top_k_keeps_the_teachers_cross_entropy_exact_and_bounds_the_kd_term_below(
    caches, online, tmp_path, tokenizer, train_dataset, eval_dataset
):
    _, cached = run(tmp_path, tokenizer, train_dataset, eval_dataset, teacher_cache=caches["compact-16"])
    first, first_online = values(cached, LOGGED)[0], values(online, LOGGED)[0]
    # The same student at step 1: the teacher's CE is read exactly, the 17-bucket KL is below the full one.
    assert first[LOGGED.index("teacher_ce_loss")] == pytest.approx(first_online[LOGGED.index("teacher_ce_loss")])
    assert first[LOGGED.index("ce_loss")] == pytest.approx(first_online[LOGGED.index("ce_loss")])
    assert 0 < first[LOGGED.index("kd_loss")] <= first_online[LOGGED.index("kd_loss")]
    for mine, theirs in zip(values(cached, ("teacher_ce_loss",)), values(online, ("teacher_ce_loss",)), strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5)


def refusal(tmp_path, tokenizer, train_dataset, eval_dataset, cache, **settings) -> str:
    with pytest.raises(UserError) as refused:
        run(tmp_path, tokenizer, train_dataset, eval_dataset, teacher_cache=cache, settings=settings)
    return str(refused.value)


def test_a_cache_of_other_data_or_another_tokenizer_is_refused_naming_what_differs(
    caches, tmp_path, tokenizer, train_dataset, eval_dataset
):
    cache = caches["exact"]
    other_train = tokenize_records(tokenizer, arithmetic_records(32, start=1))
    message = refusal(tmp_path, tokenizer, other_train, eval_dataset, cache)
    assert "made from other train data (data.train: cache " in message
    message = refusal(tmp_path, tokenizer, train_dataset, train_dataset.select(range(8)), cache)
    assert "other validation data (data.validation" in message
    longer = gpt2_tokenizer()
    longer.add_tokens(["<extra>"])
    assert "other tokenizer (tokenizer: cache" in refusal(tmp_path, longer, train_dataset, eval_dataset, cache)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature_policy": "cosine", "temperature_max": 5.0}, "moves T over [1.0, 5.0] but the compact"),
        ({"temperature_policy": "constant", "temperature_init": 0.5}, "moves T over [0.5, 0.5]"),
        ({"temperature_policy": "annealing"}, "Annealing-KD fits the teacher's logits over the whole vocabulary"),
        ({"temperature_policy": "ctkd"}, "temperature_policy=ctkd cannot read a compact teacher cache"),
        ({"teacher_temperature_ratio": 2.0}, "teacher_temperature_ratio reads the teacher's whole distribution"),
        ({"log_entropy": True}, "log_entropy reads the teacher's whole distribution"),
    ],
)
def test_a_compact_cache_refuses_a_policy_it_cannot_serve(
    caches, tmp_path, tokenizer, train_dataset, eval_dataset, settings, message
):
    assert message in refusal(tmp_path, tokenizer, train_dataset, eval_dataset, caches["compact-16"], **settings)


def test_the_recipes_teacher_template_and_lengths_are_checked_against_the_cache(caches, trained_teacher_dir, tmp_path):
    cache = TeacherCache(caches["exact"], verify=False)
    recorded = dict(cache.manifest["provenance"])
    cache.manifest["provenance"] = {**recorded, **recipe_provenance(str(trained_teacher_dir), 128, 96)}
    cache.check_source(recipe_provenance(str(trained_teacher_dir), 128, 96), "recipe settings")  # the same: fine
    with pytest.raises(UserError, match=r"max_length: cache 128, now 64"):
        cache.check_source(recipe_provenance(str(trained_teacher_dir), 64, 96), "recipe settings")
    retrained = tmp_path / "teacher"
    shutil.copytree(trained_teacher_dir, retrained)
    model = AutoModelForCausalLM.from_pretrained(retrained)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(retrained)
    with pytest.raises(UserError, match=r"made from other recipe settings \(teacher: cache"):
        cache.check_source(recipe_provenance(str(retrained), 128, 96), "recipe settings")


@pytest.mark.parametrize("damage", ["missing", "truncated", "changed", "unfinished"])
def test_a_missing_truncated_or_changed_shard_is_refused(caches, tmp_path, damage):
    folder = tmp_path / "cache"
    shutil.copytree(caches["exact"], folder)
    shard = folder / "train-00001.safetensors"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "changed":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (folder / "manifest.json").unlink()
    expected = {
        "missing": "train-00001.safetensors is missing",
        "truncated": "the manifest says",
        "changed": "does not match its checksum",
        "unfinished": "no manifest.json",
    }[damage]
    with pytest.raises(UserError, match=expected):
        TeacherCache(folder)


def test_an_interrupted_write_resumes_without_redoing_finished_shards(
    caches, teacher, tokenizer, train_dataset, eval_dataset, tmp_path, monkeypatch
):
    splits = {"train": train_dataset, "validation": eval_dataset}  # 4 + 1 shards of 8 examples
    written = []
    original = writer._write_split_shard

    def write_then_stop(*args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(args[-2].name)
        original(*args)

    monkeypatch.setattr(writer, "_write_split_shard", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "cache", teacher, tokenizer, splits)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    written.clear()
    monkeypatch.setattr(writer, "_write_split_shard", lambda *args: (written.append(args[-2].name), original(*args)))
    write_cache(tmp_path / "cache", teacher, tokenizer, splits)
    assert written == ["train-00002.safetensors", "train-00003.safetensors", "validation-00000.safetensors"]
    resumed = json.loads((tmp_path / "cache" / "manifest.json").read_text())["splits"]
    whole = json.loads((Path(caches["exact"]) / "manifest.json").read_text())["splits"]
    for split, shards in whole.items():  # the same shards as an uninterrupted write, tensor for tensor
        assert [(s["file"], s["first"], s["count"], s["rows"]) for s in resumed[split]["shards"]] == [
            (s["file"], s["first"], s["count"], s["rows"]) for s in shards["shards"]
        ]
        for shard in shards["shards"]:
            mine = load_file(tmp_path / "cache" / shard["file"])
            theirs = load_file(Path(caches["exact"]) / shard["file"])
            assert all(torch.equal(mine[name], theirs[name]) for name in theirs)


def test_a_padded_teacher_head_is_cut_to_the_tokenizer_as_a_live_teacher_is(tmp_path, tokenizer, train_dataset):
    """A head with more rows than the tokenizer (OPT's 50272 for 50265 tokens) is cached whole and cut by the
    loss, as the live teacher's logits are; the padded rows' logits, whatever they are, change nothing."""
    padded = tiny_gpt2(tokenizer, width=48, seed=3, extra_vocab=7)
    with torch.no_grad():
        padded.lm_head.weight[len(tokenizer) :] = 50.0  # padded rows that would dominate any softmax
    examples = train_dataset.select(range(16))
    cache = write_cache(tmp_path / "cache", padded, tokenizer, {"train": examples})
    assert TeacherCache(cache).manifest["vocab_size"] == len(tokenizer)
    logs = {
        name: values(run(tmp_path / name, tokenizer, examples, None, **teacher)[1], LOGGED)
        for name, teacher in (("online", {"teacher_model": padded}), ("cached", {"teacher_cache": cache}))
    }
    for mine, theirs in zip(logs["cached"], logs["online"], strict=True):
        assert mine == pytest.approx(theirs, rel=2e-5)
