"""ROUGE-L as MiniLLM, DistiLLM and the DTS paper report it, computed by ``rouge-score`` (never by hand).

Per example: the ROUGE-L F-measure (Porter stemming, rouge-score's default tokenizer) of the prediction
against each reference, the best one kept (S-NI has several references). Per suite: the mean over
examples x 100. Over sampling seeds: mean and population standard deviation.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rouge_score import rouge_scorer

from .suites import EvalExample

# One scorer for the process: it holds the stemmer, and scoring is stateless.
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1] of ``prediction`` against its best-matching reference."""
    if isinstance(references, str) or not references:
        raise ValueError(f"references must be a non-empty sequence of strings, got {references!r:.80}")
    return max(_SCORER.score(reference, prediction)["rougeL"].fmeasure for reference in references)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L over examples x 100, the number the papers' tables show for one suite and seed."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not predictions:
        raise ValueError("no predictions to score")
    return 100 * statistics.fmean(rouge_l(p, refs) for p, refs in zip(predictions, references, strict=False))


def suite_score(predictions: Sequence[str], examples: Sequence[EvalExample]) -> float:
    """The suite's score x 100 for predictions given in the order of its examples."""
    return mean_rouge_l(predictions, [example.references for example in examples])


def seed_summary(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation of a suite's scores over seeds.

    The population deviation (ddof=0, ``numpy.std``'s default): MiniLLM's code averages the seeds
    outside its scripts and states no estimator, so this is our choice; one seed gives 0.
    """
    if not scores:
        raise ValueError("no seed scores to summarise")
    return statistics.fmean(scores), statistics.pstdev(scores)
