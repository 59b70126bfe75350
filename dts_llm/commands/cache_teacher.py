"""`dts-llm cache-teacher RECIPE [--field value ...]`: run a distill recipe's teacher once and write its cache.

The data is read and tokenised exactly as `dts-llm distill` reads it, and the cache goes to the recipe's
``teacher_cache`` folder, so the same recipe then distils from it: ``dts-llm distill RECIPE`` trains
without loading the teacher. A finished cache of the same settings and inputs is reused before the teacher
loads. Under ``accelerate launch`` every process writes its own shards; an
interrupted run, started again, resumes. The teacher is a whole replica on each process (as under DDP),
whatever the recipe's launch config says of the student: it must fit on one device.
"""

from __future__ import annotations

import logging
import time

import yaml
from accelerate import PartialState

from ..errors import UserError, user_errors
from ..models import check_models, load_tokenizer, whole_model_loading
from ..preflight import check_teacher_tokenizer, logits_width
from ..recipe import parse_recipe, recipe_parser
from ..tasks import INSTRUCTION, task_for
from ..teacher_cache import (
    CacheSettings,
    Processes,
    TeacherCache,
    data_fingerprint,
    finished_cache,
    recipe_provenance,
    tokenizer_fingerprint,
    write_teacher_cache,
)

HELP = "Run a distill recipe's teacher once and write the teacher cache its teacher_cache names."


def served_temperatures(low: float, high: float) -> tuple[float, float]:
    """A compact cache's default temperature range for a policy moving T over [low, high]: widened to include
    T = 1 and to span at least a factor of 2 (a constant T is one point, which no range can be)."""
    low, high = min(low, 1.0), max(high, 1.0)
    return low, max(high, 2 * low)


def cache_settings(training_args) -> CacheSettings:
    """The recipe's cache settings; a compact cache's temperature range defaults to the policy's (widened)."""
    low, high = served_temperatures(*training_args.temperature_bounds())
    return CacheSettings(
        kind=training_args.teacher_cache_kind,
        dtype=training_args.teacher_cache_dtype,
        top_k=training_args.teacher_cache_top_k,
        temperature_min=training_args.teacher_cache_temperature_min or low,
        temperature_max=training_args.teacher_cache_temperature_max or high,
    )


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        recipe_parser("distill").print_help()
        return
    with user_errors(ValueError, OSError, yaml.YAMLError):
        model_args, data_args, _, training_args = parse_recipe("distill", argv)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("dts_llm").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
        if training_args.teacher_cache is None:
            raise UserError("cache-teacher writes to the recipe's teacher_cache: set it (--teacher_cache FOLDER)")
        if model_args.teacher_model_name_or_path is None:
            raise UserError("cache-teacher runs the recipe's teacher: set teacher_model_name_or_path")
        check_models(model_args, data_args.max_length)
        settings = cache_settings(training_args)
        task = task_for(data_args)
        if task is not INSTRUCTION:
            raise UserError("a teacher cache holds a causal LM's predictions; GLUE teachers are distilled live")
        tokenizer = load_tokenizer(
            model_args.tokenizer_name_or_path or model_args.model_name_or_path, model_args.trust_remote_code
        )
        state = PartialState()
        with state.main_process_first():
            data = task.load_data(data_args, tokenizer)
        teacher_path = model_args.teacher_model_name_or_path
        splits = {"train": data.train, **({"validation": data.evaluation} if data.evaluation is not None else {})}
        provenance = recipe_provenance(teacher_path, data_args.max_length, data_args.max_prompt_length)
        provenance["tokenizer"] = tokenizer_fingerprint(tokenizer)
        provenance.update({f"data.{split}": data_fingerprint(examples) for split, examples in splits.items()})
        if finished_cache(training_args.teacher_cache, settings, provenance):  # reused without loading the teacher
            if state.is_main_process:
                print(cache_summary(TeacherCache(training_args.teacher_cache, verify=False), None))
            return
    teacher_dtype = training_args.teacher_dtype or model_args.dtype
    # A replica on every process, even when the recipe's launch partitions models for training (ZeRO-3).
    with whole_model_loading(getattr(training_args, "hf_deepspeed_config", None)):
        teacher = task.load_model(
            teacher_path, teacher_dtype, model_args.trust_remote_code, training_args.teacher_model_init_kwargs
        )
    check_teacher_tokenizer(teacher, tokenizer)
    if logits_width(teacher) < len(tokenizer):
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the teacher's logits only {logits_width(teacher)}"
        )
    started = time.perf_counter()
    folder = write_teacher_cache(
        teacher.to(state.device),
        task.collator(tokenizer),
        splits,
        training_args.teacher_cache,
        settings,
        provenance,
        vocab_size=len(tokenizer),
        batch_size=training_args.per_device_eval_batch_size,
        processes=Processes(state.process_index, state.num_processes, state.wait_for_everyone),
    )
    if state.is_main_process:
        print(cache_summary(TeacherCache(folder, verify=False), time.perf_counter() - started))


def cache_summary(cache: TeacherCache, seconds: float | None) -> str:
    """What a finished cache holds, its size per response token, and how long writing it took (None: reused)."""
    files = [entry for split in cache.manifest["splits"].values() for entry in split["shards"]]
    rows = sum(entry["rows"] for entry in files)
    size = sum(entry["bytes"] for entry in files)
    examples = {name: split["examples"] for name, split in cache.manifest["splits"].items()}
    return (
        f"dts-llm: teacher cache ({cache.kind}) in {cache.folder}: {examples} examples, {rows} response tokens, "
        f"{size / 2**20:.1f} MiB ({size / max(rows, 1):.0f} bytes per token), "
        + ("reused as it was (same settings and inputs)" if seconds is None else f"{seconds:.1f} s")
    )
