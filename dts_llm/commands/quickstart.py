"""`dts-llm quickstart`: the whole pipeline offline, on small models and the synthetic data set.

It runs the same code paths as the real recipes: `dts-llm sft` / `dts-llm distill` from YAML recipes
(written here), the `DistillationTrainer`, and the eval package, on a GPT-2 teacher and a smaller GPT-2
student built from configs with a BPE tokenizer trained on the data. Each model trains in a child
process, as the sweep's runs do (``train.train_in_child``), its console output in its folder's train.log;
so does `dts-llm cache-teacher`, which writes the two teacher caches (exact and compact) that two more DTS
students read instead of the teacher. Stages, in order:

    data -> tokenizer -> initial models -> teacher SFT -> teacher caches -> seven students -> evaluation -> report

Each stage is skipped when its output exists, so an interrupted run continues where it stopped
(a half-trained model is trained again from its start). ``fast`` shrinks everything for tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from eval.generate import GenerationSettings
from eval.results import write_json_atomic, write_text_atomic
from eval.run import evaluate_model

from ..plots import plot_trajectories
from ..synthetic import write_splits
from ..teacher_cache.store import MANIFEST_NAME
from ..template import format_prompt
from .demo import gpt2, train_tokenizer
from .train import run_in_child, train_in_child

DTS = {"temperature_policy": "dts", "temperature_init": 3.0, "temperature_min": 1.0, "temperature_max": 3.0}
# The teacher caches (folder -> recipe fields), each written once by `dts-llm cache-teacher` from the recipe of
# the student that reads it. The compact one keeps k = 128 tokens (the field's default; a quarter of the fast
# vocabulary, a sixth of the full one) and serves the DTS run's range, T 1 to 3 (the default for its policy).
TEACHER_CACHES = {
    "teacher-cache-exact": {"teacher_cache_kind": "exact"},
    "teacher-cache-compact": {"teacher_cache_kind": "compact", "teacher_cache_top_k": 128},
}
# The students: (name, command, recipe fields). Constant T = 1 is vanilla KD as in the real recipes; CTKD
# starts where DTS does and ramps its adversarial weight up over the first epoch; the last two are KD + DTS
# read from a teacher cache (``teacher_cache``: its folder under models/), the exact one the online run.
STUDENTS = (
    ("student-sft", "sft", {}),
    ("student-kd", "distill", {"temperature_policy": "constant", "temperature_init": 1.0}),
    ("student-kd-cosine", "distill", {"temperature_policy": "cosine", "temperature_min": 1.0, "temperature_max": 3.0}),
    ("student-kd-dts", "distill", DTS),
    (
        "student-kd-ctkd",
        "distill",
        {"temperature_policy": "ctkd", "temperature_init": 3.0, "ctkd_lambda_epochs": 1.0, "ctkd_learning_rate": 0.01},
    ),
    ("student-kd-dts-cache-exact", "distill", {**DTS, "teacher_cache": "teacher-cache-exact"}),
    ("student-kd-dts-cache-compact", "distill", {**DTS, "teacher_cache": "teacher-cache-compact"}),
)
# The runs of the figure: the online ones (a cached DTS run draws the online DTS run's line again).
KD_RUNS = tuple(name for name, command, fields in STUDENTS if command == "distill" and "teacher_cache" not in fields)


@dataclass(frozen=True)
class Settings:
    train: int
    validation: int
    test: int
    vocab_size: int
    teacher: tuple[int, int]  # (width, layers)
    student: tuple[int, int]
    teacher_epochs: int
    student_epochs: int
    seeds: tuple[int, ...] = (10, 20, 30)
    batch_size: int = 16
    learning_rate: float = 2e-3


FAST = Settings(
    train=800,
    validation=40,
    test=40,
    vocab_size=512,
    teacher=(96, 3),
    student=(48, 2),
    teacher_epochs=5,
    student_epochs=2,  # seven students: two epochs keep --fast a smoke run
)
FULL = Settings(
    train=3000,
    validation=100,
    test=200,
    vocab_size=768,
    teacher=(128, 4),
    student=(64, 2),
    teacher_epochs=6,
    student_epochs=4,
)


def _stage(number: int, text: str, start: float, skipped: bool) -> None:
    print(f"[{number}/8] {text}{' (reused)' if skipped else ''} [{time.time() - start:.0f}s]", flush=True)


def _model_done(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "log_history.json").is_file()


def _student_recipe(name: str, command: str, fields: dict, common: dict, models: Path, epochs: int) -> dict:
    """The recipe of student ``name``: the shared settings, its initialisation, and its own fields (a cached
    student's ``teacher_cache`` as the folder under ``models``, with that cache's fields)."""
    recipe = {
        **common,
        "model_name_or_path": str(models / "student-init"),
        "output_dir": str(models / name),
        "num_train_epochs": epochs,
        **fields,
    }
    if command == "distill":
        recipe.update(teacher_model_name_or_path=str(models / "teacher"), kd_ratio=0.5, divergence="forward_kl")
    if "teacher_cache" in fields:
        recipe.update(teacher_cache=str(models / fields["teacher_cache"]), **TEACHER_CACHES[fields["teacher_cache"]])
    return recipe


def _recipe_file(recipe: dict) -> Path:
    """``recipe`` written beside its output_dir, as OUTPUT_DIR.yaml."""
    folder = Path(recipe["output_dir"])
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _train(command: str, recipe: dict, folder: Path) -> None:
    """Run `dts-llm sft|distill` on ``recipe``, then keep the trainer's log history and drop the checkpoints.

    The CLI saves the model, not the log history; the last checkpoint's trainer_state.json has it.
    """
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run: start this model again
    train_in_child(command, [str(_recipe_file(recipe))], folder)
    states = sorted(folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    history = json.loads(states[-1].read_text())["log_history"]
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    (folder / "log_history.json").write_text(json.dumps(history, indent=1))


def _table(rows: list[dict], seeds: tuple[int, ...]) -> str:
    base = next(row for row in rows if row["model"] == "student-sft")
    lines = [
        f"| Model | Params | ROUGE-L sampled (mean ± std, seeds {', '.join(map(str, seeds))}) "
        "| vs SFT student | ROUGE-L greedy |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        delta = row["rouge_l_mean"] - base["rouge_l_mean"]
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.2f}M | {row['rouge_l_mean']:.2f} ± {row['rouge_l_std']:.2f} "
            f"| {delta:+.2f} | {row['rouge_l_greedy']:.2f} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Teacher:
    """The quickstart's first four stages, done: its data, models folder (the teacher, the student's
    initialisation) and the recipe fields every student shares."""

    settings: Settings
    data: Path
    models: Path
    common: dict
    recorded: dict  # what settings.json holds

    def student_recipe(self, name: str, fields: dict) -> dict:
        """A distillation recipe of the quickstart's student ``name`` with its own ``fields``."""
        return _student_recipe(name, "distill", fields, self.common, self.models, self.settings.student_epochs)


def prepare_teacher(output: str, fast: bool, start: float) -> Teacher:
    """Stages 1 to 4 in ``output`` (each skipped when done): data, tokenizer, initial models, teacher SFT."""
    settings = FAST if fast else FULL
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "settings.json"
    wanted = json.loads(json.dumps({"fast": fast, **asdict(settings)}))
    if settings_file.is_file() and json.loads(settings_file.read_text()) != wanted:
        raise ValueError(f"{out} holds a run with other settings ({settings_file}); use another --output")
    settings_file.write_text(json.dumps(wanted, indent=1))

    # 1. data
    data = out / "data"
    sizes = {"train": settings.train, "validation": settings.validation, "test": settings.test}
    done = all((data / f"{split}.jsonl").is_file() for split in sizes)
    if not done:
        write_splits(data, sizes, seed=0)
    _stage(
        1,
        f"data: {settings.train} train / {settings.validation} validation / {settings.test} test records in {data}",
        start,
        done,
    )

    # 2. tokenizer
    tokenizer_dir = out / "tokenizer"
    done = (tokenizer_dir / "tokenizer.json").is_file()
    if not done:
        records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
        texts = [format_prompt(r["instruction"], r["context"]) + r["response"] for r in records]
        train_tokenizer(texts, vocab_size=settings.vocab_size).save_pretrained(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    _stage(2, f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, in {tokenizer_dir}", start, done)

    # 3. initial models: one teacher, one student initialisation shared by the five students
    models = out / "models"
    inits = {"teacher-init": (*settings.teacher, 0), "student-init": (*settings.student, 1)}
    done = all((models / name / "model.safetensors").is_file() for name in inits)
    if not done:
        for name, (width, layers, seed) in inits.items():
            gpt2(tokenizer, width=width, layers=layers, seed=seed).save_pretrained(models / name)
            tokenizer.save_pretrained(models / name)
    _stage(
        3,
        f"initial models: teacher GPT-2 {settings.teacher[1]}x{settings.teacher[0]}, "
        f"student GPT-2 {settings.student[1]}x{settings.student[0]}",
        start,
        done,
    )

    common = {
        "dataset": str(data / "train.jsonl"),
        "validation_file": str(data / "validation.jsonl"),
        "max_length": 128,
        "max_prompt_length": 96,
        "data_cache_dir": str(out / "cache"),
        "per_device_train_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine",
        "logging_steps": 5 if fast else 10,
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": False,
        "seed": 10,
    }

    # 4. teacher SFT
    teacher = models / "teacher"
    done = _model_done(teacher)
    if not done:
        _train(
            "sft",
            {
                **common,
                "model_name_or_path": str(models / "teacher-init"),
                "output_dir": str(teacher),
                "num_train_epochs": settings.teacher_epochs,
            },
            teacher,
        )
    _stage(4, f"teacher: dts-llm sft, {settings.teacher_epochs} epochs, in {teacher}", start, done)
    return Teacher(settings, data, models, common, wanted)


def run_quickstart(output: str = "quickstart_output", fast: bool = False) -> dict:
    """Run (or continue) the quickstart in ``output``; returns what ``results.json`` holds."""
    start = time.time()
    prepared = prepare_teacher(output, fast, start)
    settings, data, models, common = prepared.settings, prepared.data, prepared.models, prepared.common
    out = Path(output)

    # 5. the teacher caches: the teacher run once over the students' data, from the recipe that reads each cache
    recipes = {name: _student_recipe(name, *rest, common, models, settings.student_epochs) for name, *rest in STUDENTS}
    readers = {fields["teacher_cache"]: name for name, _, fields in STUDENTS if "teacher_cache" in fields}
    reused = True
    for cache, reader in readers.items():
        if (models / cache / MANIFEST_NAME).is_file():
            continue
        reused = False
        recipe = str(_recipe_file(recipes[reader]))
        run_in_child("cache-teacher", [recipe], models / f"{cache}.log", models / cache / MANIFEST_NAME)
    _stage(5, f"teacher caches: dts-llm cache-teacher, {' and '.join(TEACHER_CACHES)} in {models}", start, reused)

    # 6. students, all from the same initialisation, data order and steps
    reused = True
    for name, command, _ in STUDENTS:
        folder = models / name
        if _model_done(folder):
            continue
        reused = False
        _train(command, recipes[name], folder)
        print(f"      {name}: dts-llm {command} done [{time.time() - start:.0f}s]", flush=True)
    _stage(
        6,
        "students: SFT, KD (T = 1), KD (cosine T 3 -> 1), KD + DTS, KD + CTKD, KD + DTS from the exact and the "
        f"compact teacher cache; {settings.student_epochs} epochs each",
        start,
        reused,
    )

    # 7. evaluation: ROUGE-L on the test split, sampled over seeds and greedy
    generation = {"max_length": 128, "max_prompt_tokens": 96, "batch_size": 20}
    names = ["teacher"] + [name for name, _, _ in STUDENTS]
    rows, reused = [], True
    for name in names:
        folder = out / "eval" / name
        reused &= (folder / "sampled" / "results.json").is_file() and (folder / "greedy" / "results.json").is_file()
        suites = {"test": str(data / "test.jsonl")}
        sampled = evaluate_model(
            str(models / name),
            suites,
            str(folder / "sampled"),
            seeds=settings.seeds,
            settings=GenerationSettings(**generation),
            progress=False,
        )
        greedy = evaluate_model(
            str(models / name),
            suites,
            str(folder / "greedy"),
            settings=GenerationSettings(**generation, greedy=True),
            progress=False,
        )
        rows.append(
            {
                "model": name,
                "params": sampled["params"],
                "rouge_l_mean": sampled["suites"]["test"]["mean"],
                "rouge_l_std": sampled["suites"]["test"]["std"],
                "rouge_l_per_seed": sampled["suites"]["test"]["per_seed"],
                "rouge_l_greedy": greedy["suites"]["test"]["mean"],
                "test_examples": sampled["suites"]["test"]["count"],
            }
        )
    _stage(
        7,
        f"evaluation: ROUGE-L of {len(names)} models on {settings.test} test prompts, seeds {settings.seeds} + greedy",
        start,
        reused,
    )

    # 8. report
    histories = {name: json.loads((models / name / "log_history.json").read_text()) for name in KD_RUNS}
    trajectories = {
        name.removeprefix("student-"): [e for e in history if "kd_loss" in e] for name, history in histories.items()
    }
    plot_trajectories(trajectories, out / "temperature_and_losses.png")
    table = _table(rows, settings.seeds)
    results = {"settings": prepared.recorded, "models": rows, "table": table, "figure": "temperature_and_losses.png"}
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", table)
    _stage(
        8, f"report: {out / 'results.md'}, {out / 'results.json'}, {out / 'temperature_and_losses.png'}", start, False
    )
    print("\n" + table, flush=True)
    return results


def add_parser(commands) -> None:
    quickstart = commands.add_parser(
        "quickstart",
        help="The whole pipeline offline: synthetic data, teacher SFT and caches, 7 students, eval, table, figure.",
    )
    quickstart.add_argument(
        "--output", default="quickstart_output", help="Folder for the run (default: quickstart_output)."
    )
    quickstart.add_argument(
        "--fast", action="store_true", help="Smaller everything (a few minutes; what the tests run)."
    )


def main(args: argparse.Namespace) -> None:
    run_quickstart(args.output, args.fast)
