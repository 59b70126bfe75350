"""One evaluation run: a model on named suites over seeds, with resumable per-(suite, seed) predictions.

Layout of ``output_dir``::

    predictions/{suite}/seed{seed}.jsonl   one {"prompt", "prediction", "references"} per example, in order
    predictions/{suite}/greedy.jsonl       the one pass of a greedy run
    results.json                           see ``evaluate_model``
    results.md                             the papers' table (eval.results.results_table)

Every file is written atomically (temporary file + rename) when its (suite, seed) completes, so an
interrupted run leaves only whole files; started again on the same ``output_dir`` it reuses every
predictions file whose prompts are the suite's prompts and generates the rest. A predictions file
holds no settings: use one ``output_dir`` per model and configuration.

Under ``accelerate launch`` / ``torchrun`` every process loads the model and the suites, generation
is split between processes by ``eval.generate.generate_responses`` (see there how seeds are applied
so the outputs do not depend on the number of processes), and only the main process writes files.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState

from dts_llm.errors import UserError
from dts_llm.models import load_model as load_pretrained
from dts_llm.models import load_tokenizer
from dts_llm.template import parse_prompt

from .generate import GenerationSettings, count_cut_prompts, generate_responses
from .results import results_table, write_json_atomic, write_text_atomic
from .rouge import seed_summary, suite_score
from .suites import EvalExample, Suite, load_suite, with_chat_template

DEFAULT_SEEDS = (10, 20, 30, 40, 50)


def predictions_path(output_dir: str | os.PathLike, suite: str, seed: int | None) -> Path:
    return Path(output_dir) / "predictions" / suite / ("greedy.jsonl" if seed is None else f"seed{seed}.jsonl")


def _check_same_run(meta_path: Path, model_path, settings: GenerationSettings, dtype, rank: int) -> None:
    """Refuse to resume into a folder whose predictions came from another model or other settings
    (the batch size included: it fixes the batch layout, hence the seeds' streams). Changed prompts
    are caught per file by ``read_predictions``."""
    meta = json.loads(json.dumps({"model": str(model_path), "settings": settings.to_dict(), "dtype": dtype}))
    if meta_path.is_file():
        stored = json.loads(meta_path.read_text(encoding="utf-8"))
        changed = sorted(key for key in meta if stored.get(key) != meta[key])
        if changed:
            raise ValueError(
                f"{meta_path.parent} holds predictions of another run (it differs in {changed}): "
                "use another output folder"
            )
    elif rank == 0:
        write_json_atomic(meta_path, meta)


def write_predictions(path: str | os.PathLike, examples: list[EvalExample], predictions: list[str]) -> None:
    lines = [
        json.dumps({"prompt": e.prompt, "prediction": p, "references": list(e.references)}, ensure_ascii=False)
        for e, p in zip(examples, predictions, strict=True)
    ]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def read_predictions(path: str | os.PathLike, examples: list[EvalExample]) -> list[str] | None:
    """The stored predictions of ``examples``, or None when the file is absent or holds other prompts."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if [r["prompt"] for r in records] != [e.prompt for e in examples]:
            print(f"note: {path} holds other prompts than the suite now has; generating again")
            return None
        return [r["prediction"] for r in records]
    except (ValueError, KeyError, TypeError) as error:
        print(f"note: {path} is unreadable ({error}); generating again")
        return None


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _from_main(obj):
    """``obj`` as the main process has it, on every process."""
    _, world = _rank_world()
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _on_main_then_everywhere(action, rank: int) -> None:
    """Run ``action`` on the main process; if it fails there, the other processes raise too instead
    of waiting forever at the next collective for a main process that is gone."""
    if rank != 0:
        error = _from_main(None)
        if error is not None:
            raise RuntimeError(f"the main process failed: {error}")
        return
    try:
        action()
    except Exception as exc:
        _from_main(f"{type(exc).__name__}: {exc}")
        raise
    _from_main(None)


def _setup_distributed() -> torch.device:
    """Join the process group when launched with several processes; the device this process uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return PartialState().device  # initialises torch.distributed (gloo on CPU, nccl on GPU)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_path: str, device: torch.device, dtype: str | torch.dtype | None = None):
    """The causal LM at ``model_path`` on ``device`` in eval mode, and its tokenizer."""
    tokenizer = load_tokenizer(model_path)
    model = load_pretrained(model_path, dtype=dtype).to(device)
    model.eval()
    return model, tokenizer


def _uses_chat_template(tokenizer, asked: bool | None, suites: dict[str, Suite], rank: int) -> bool:
    """Whether prompts are rendered with the chat template: as asked, else when the tokenizer has one."""
    has_template = tokenizer.chat_template is not None
    conversations = [name for name, suite in suites.items() if any(e.messages for e in suite.examples)]
    chat = has_template if asked is None else asked
    if chat and not has_template:
        raise UserError("--chat-template: the model's tokenizer has no chat template")
    if conversations and not chat:
        raise UserError(f"suites {conversations} hold conversations: they are evaluated with the chat template")
    if asked is None and chat and rank == 0:
        print(
            "note: the model's tokenizer has a chat template: prompts are rendered with it "
            "(--no-chat-template: the MiniLLM template)"
        )
    return chat


def evaluate_model(
    model_path: str,
    suites: dict[str, str],
    output_dir: str,
    seeds=DEFAULT_SEEDS,
    settings: GenerationSettings | None = None,
    limit: int | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    chat_template: bool | None = None,
) -> dict:
    """Score the model at ``model_path`` on each ``{suite name: source}`` and write results to ``output_dir``.

    Sampling runs once per seed; greedy decoding (``settings.greedy``) runs once, and ``seeds`` is then
    ignored. Returns (on every process) the dict written to ``results.json``::

        {"model", "params", "seeds": [...], "settings": {...}, "processes",
         "suites": {name: {"mean", "std", "per_seed": {"10": score, ...} or {"greedy": score},
                           "count", "cut_prompts", "skipped", "source"}}}

    Scores are ROUGE-L F x 100 (``eval.rouge``); mean and std are over seeds. ``cut_prompts`` counts the
    prompts over ``settings.max_prompt_tokens``, cut as ``settings.truncation_side`` says (printed too).
    ``chat_template`` renders the prompts with the model's chat template (``eval.suites.with_chat_template``);
    None: when its tokenizer has one (said in the output; ``settings.chat_template`` in the results).
    """
    settings = settings or GenerationSettings()
    runs: list[int | None] = [None] if settings.greedy else [int(s) for s in seeds]
    if not runs:
        raise ValueError("no seeds to evaluate")
    device = _setup_distributed()
    rank, world = _rank_world()
    output = Path(output_dir)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)

    _check_same_run(output / "predictions" / "meta.json", model_path, settings, dtype, rank)
    loaded: dict[str, Suite] = {name: load_suite(name, source, limit=limit) for name, source in suites.items()}
    model, tokenizer = load_model(model_path, device, dtype)
    chat = _uses_chat_template(tokenizer, chat_template, loaded, rank)
    if chat:
        loaded = {name: with_chat_template(suite, tokenizer) for name, suite in loaded.items()}

    summary: dict[str, dict] = {}
    for name, suite in loaded.items():
        if not suite.examples:
            print(f"note: suite {name} ({suite.source}) has no examples; skipped {suite.skipped}")
            continue
        prompts = [example.prompt for example in suite.examples]
        cut_prompts = count_cut_prompts(tokenizer, prompts, settings)
        if cut_prompts and rank == 0:
            kept = "first" if settings.truncation_side == "right" else "last"
            print(
                f"note: suite {name}: {cut_prompts} of {len(prompts)} prompts over {settings.max_prompt_tokens} "
                f"tokens, cut to their {kept} {settings.max_prompt_tokens}"
            )
        per_seed: dict[str, float] = {}
        for seed in runs:
            path = predictions_path(output, name, seed)
            stored = _from_main(read_predictions(path, suite.examples) if rank == 0 else None)
            if stored is None:
                predictions = generate_responses(model, tokenizer, prompts, settings, seed, progress=progress)
                _on_main_then_everywhere(partial(write_predictions, path, suite.examples, predictions), rank)
            else:
                predictions = stored
            per_seed["greedy" if seed is None else str(seed)] = suite_score(predictions, suite.examples)
        mean, std = seed_summary(list(per_seed.values()))
        summary[name] = {
            "mean": mean,
            "std": std,
            "per_seed": per_seed,
            "count": len(suite.examples),
            "cut_prompts": cut_prompts,
            "skipped": suite.skipped,
            "source": suite.source,
        }

    result = {
        "model": str(model_path),
        "params": sum(p.numel() for p in model.parameters()),
        "seeds": [] if settings.greedy else runs,
        "settings": {**settings.to_dict(), "limit": limit, "chat_template": chat},
        "processes": world,
        "suites": summary,
    }
    if rank == 0:
        write_json_atomic(output / "results.json", result)
        write_text_atomic(output / "results.md", results_table([result]))
    return result


def write_teacher_outputs(output_dir: str | os.PathLike, suite_names: list[str], seed: int | None, path: str) -> int:
    """The generations of ``seed`` (None: greedy) of the suites, as one raw-Dolly-format JSONL at ``path``.

    Each line is ``{"instruction", "context", "response", "prompt", "suite"}``. The evaluation records
    keep only the templated prompt: instruction and context are recovered by parsing the prompt against
    the training template (exactly: re-templating gives the prompt back). A prompt in another form
    (a user's own file) is written with ``"instruction": prompt, "context": ""`` and
    ``"templated": false``, so a reader can tell it apart; it would be templated again if trained on as
    Dolly. ``dts_llm``'s reader takes ``instruction``/``context``/``response``; the extra fields are
    ignored. Returns the number of records written.
    """
    lines = []
    for suite in suite_names:
        source = predictions_path(output_dir, suite, seed)
        if not source.is_file():
            continue
        for line in source.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            parsed = parse_prompt(record["prompt"])
            instruction, context = parsed if parsed else (record["prompt"], "")
            out = {
                "instruction": instruction,
                "context": context,
                "response": record["prediction"],
                "prompt": record["prompt"],
                "suite": suite,
            }
            if parsed is None:
                out["templated"] = False
            lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    write_text_atomic(path, "".join(lines))
    return len(lines)
