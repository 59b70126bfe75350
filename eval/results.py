"""Evaluation results on disk (atomic JSON) and as the Markdown table the papers print."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from .suites import SUITE_NAMES


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` through a temporary file in the same folder and ``os.replace``: readers see the
    old file or the new one, never half of one, and an interrupted write leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not a `with` block: the file must outlive its handle, to be renamed (or removed) below.
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)  # a plain file's mode, not the temporary file's 0600
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON, written atomically (see ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def results_table(results: list[dict]) -> str:
    """Rows models, columns suites ("mean ± std", 2 decimals), then the average over suites.

    Suites are in the papers' order (Dolly, SelfInst, Vicuna, S-NI, UnNI), then any other in order of
    appearance. The average is over the table's suites and is left blank ("-") for a model missing one,
    since an average over fewer suites is not comparable.
    """
    seen = {suite: None for result in results for suite in result["suites"]}
    suites = [suite for suite in SUITE_NAMES if suite in seen] + [suite for suite in seen if suite not in SUITE_NAMES]
    lines = [
        "| " + " | ".join(["Model", "Params", *suites, "Avg."]) + " |",
        "|" + "---|" * 2 + "---:|" * (len(suites) + 1),
    ]
    for result in results:
        scores = result["suites"]
        cells = [f"{scores[s]['mean']:.2f} ± {scores[s]['std']:.2f}" if s in scores else "-" for s in suites]
        complete = all(s in scores for s in suites)
        average = f"{statistics.fmean(scores[s]['mean'] for s in suites):.2f}" if complete and suites else "-"
        lines.append("| " + " | ".join([result["model"], _params(result.get("params")), *cells, average]) + " |")
    return "\n".join(lines) + "\n"


def _params(count: int | None) -> str:
    """A parameter count as the papers write it (124M, 1.3B); "-" when unknown."""
    if count is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)
