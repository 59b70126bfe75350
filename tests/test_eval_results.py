"""Results on disk (atomic JSON writes) and the papers' Markdown table."""

from __future__ import annotations

import json

import pytest

from eval.results import results_table, write_json_atomic


def suite(mean: float, std: float) -> dict:
    return {"mean": mean, "std": std, "per_seed": {10: mean}, "count": 500, "skipped": {}}


def test_write_json_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    write_json_atomic(path, {"model": "gpt2", "scores": [1.5, 2.0]})
    assert json.loads(path.read_text()) == {"model": "gpt2", "scores": [1.5, 2.0]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_json_atomic_keeps_the_old_file_when_serialising_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_results_table_layout():
    results = [
        {
            "model": "gpt2-base DTS",
            "params": 124_439_808,
            "suites": {"sinst": suite(10.0, 0.5), "dolly": suite(25.456, 0.214)},  # not in the papers' order
        },
        {"model": "opt-1.3B", "params": 1_315_758_080, "suites": {"dolly": suite(26.0, 0.3)}},
        {"model": "teacher", "params": None, "suites": {"dolly": suite(27.0, 0.0), "sinst": suite(12.0, 0.0)}},
    ]
    assert results_table(results) == (
        "| Model | Params | dolly | sinst | Avg. |\n"
        "|---|---|---:|---:|---:|\n"
        "| gpt2-base DTS | 124M | 25.46 ± 0.21 | 10.00 ± 0.50 | 17.73 |\n"
        "| opt-1.3B | 1.32B | 26.00 ± 0.30 | - | - |\n"
        "| teacher | - | 27.00 ± 0.00 | 12.00 ± 0.00 | 19.50 |\n"
    )
