"""ROUGE-L scoring checked against rouge_score called directly, on the real eval sets; the evaluate module."""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
from helpers import SHARED_DATA
from rouge_score import rouge_scorer

from eval.rouge import rouge_l, seed_summary, suite_score
from eval.suites import EvalExample, load_suite

METRIC_DIR = Path(__file__).resolve().parents[1] / "eval" / "metrics" / "rouge_l"
SUITES = SHARED_DATA / "minillm"
needs_shared_data = pytest.mark.skipif(not SUITES.is_dir(), reason=f"real data samples not found at {SHARED_DATA}")


def reference_rouge_l(prediction: str, references) -> float:
    """The protocol spelled out with rouge_score itself: stemmed ROUGE-L F-measure, best reference."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)


def perturbed(text: str, rng: random.Random) -> str:
    """A prediction that shares some of the reference: its words shuffled and every third one dropped."""
    words = text.split()
    rng.shuffle(words)
    return " ".join(word for i, word in enumerate(words) if i % 3)


@needs_shared_data
@pytest.mark.parametrize("name", ["dolly", "self-inst", "sinst", "uinst-short"])
def test_suite_score_matches_rouge_score_on_real_sets(name):
    examples = load_suite(name, str(SUITES / name), limit=60).examples
    rng = random.Random(0)
    # Predictions built from the last reference, so for S-NI the best match is often not the first one.
    predictions = [perturbed(example.references[-1], rng) for example in examples]
    expected = [reference_rouge_l(p, e.references) for p, e in zip(predictions, examples, strict=False)]
    scores = [rouge_l(p, e.references) for p, e in zip(predictions, examples, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-12)
    assert suite_score(predictions, examples) == pytest.approx(100 * np.mean(expected))
    assert 0 < suite_score(predictions, examples) < 100


@needs_shared_data
def test_list_references_take_the_best_one():
    examples = [e for e in load_suite("sinst", str(SUITES / "sinst")).examples if len(e.references) > 1]
    assert examples
    for example in examples[:20]:
        prediction = example.references[-1]
        first_only = reference_rouge_l(prediction, example.references[:1])
        assert rouge_l(prediction, example.references) == pytest.approx(1.0)
        assert rouge_l(prediction, example.references) >= first_only


def test_exact_copy_scores_100_and_stemming_applies():
    examples = [EvalExample("p", ("The cats were running.",)), EvalExample("p", ("Paris", "the capital is Paris"))]
    assert suite_score(["the cat was run", "Paris"], examples) == pytest.approx(100 * (0.75 + 1.0) / 2)
    assert rouge_l("", ["anything"]) == 0.0


def test_mismatched_lengths_and_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        suite_score(["a", "b"], [EvalExample("p", ("a",))])
    with pytest.raises(ValueError, match="non-empty sequence"):
        rouge_l("a", [])
    with pytest.raises(ValueError, match="non-empty sequence"):
        rouge_l("a", "a")  # a bare string would be scored character by character
    with pytest.raises(ValueError):
        seed_summary([])


def test_seed_summary_is_mean_and_population_std():
    scores = [25.1, 26.3, 24.8, 25.9, 25.4]
    mean, std = seed_summary(scores)
    assert mean == pytest.approx(statistics.fmean(scores))
    assert std == pytest.approx(np.std(scores, ddof=0))
    assert seed_summary([30.0]) == (30.0, 0.0)


@needs_shared_data
def test_evaluate_module_loads_offline_from_its_path_and_agrees(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    examples = load_suite("sinst", str(SUITES / "sinst"), limit=40).examples
    rng = random.Random(1)
    predictions = [perturbed(example.references[0], rng) for example in examples]
    references = [list(example.references) for example in examples]
    for location in (METRIC_DIR, METRIC_DIR / "rouge_l.py"):
        metric = evaluate.load(str(location))
        result = metric.compute(predictions=predictions, references=references)
        assert result == {"rougeL": pytest.approx(suite_score(predictions, examples))}


def test_evaluate_module_loads_in_a_fresh_process_outside_the_project(tmp_path):
    """evaluate imports a cached copy of the script: ``eval.rouge`` must come from the installed project."""
    code = (
        "import evaluate; "
        f"m = evaluate.load({str(METRIC_DIR)!r}); "
        "print(m.compute(predictions=['the cat sat'], references=[['a dog ran', 'the cat sat down']]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    expected = 100 * reference_rouge_l("the cat sat", ["a dog ran", "the cat sat down"])
    assert out.stdout.strip() == repr({"rougeL": expected})
