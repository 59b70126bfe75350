"""ROUGE-L the papers' way (best reference, mean x 100) as an ``evaluate`` metric that loads offline.

``evaluate.load("rouge")`` fetches its script from the hub; this one loads from its folder:
``evaluate.load("<project>/eval/metrics/rouge_l")``. evaluate copies this file into its module cache
before importing it, so the scoring comes from the installed ``eval.rouge`` rather than a relative import,
and the numbers are the ones ``python -m eval`` reports.
"""

import datasets
import evaluate

from eval.rouge import mean_rouge_l


class RougeL(evaluate.Metric):
    """{"rougeL": mean over examples of the best ROUGE-L F-measure over the references, x 100}."""

    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries (2004); Gu et al., MiniLLM (2024)",
            inputs_description="predictions: list of str; references: list of lists of str, one or more each",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        return {"rougeL": mean_rouge_l(predictions, references)}
