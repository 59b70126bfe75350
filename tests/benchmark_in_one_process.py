"""TEST-ONLY: run a benchmark script with its per-method workers in this one interpreter.

    python tests/benchmark_in_one_process.py kd_loss.py --quick --device cpu

A worker speaks the same protocol here (its argv in, JSON on its last stdout line out); started with
``MALLOC_MMAP_THRESHOLD_`` set, as ``_common.run_worker`` starts workers, the memory peaks stay
sound from one measurement to the next (see ``_common.reset_peak_memory``). One interpreter instead
of one per worker saves the smoke tests ~10 starts of torch, transformers and trl.
"""

import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# The scripts whose ``measure`` starts workers.
WORKER_SCRIPTS = ("kd_loss", "train_step", "teacher_cache", "on_policy", "fused_head")


def run_script(script: str, argv) -> None:
    """``python benchmarks/<script> <argv>``, here."""
    sys.argv = [script, *map(str, argv)]
    importlib.import_module(Path(script).stem).main()


def run_worker_here(script: str, argv, label: str):
    """``_common.run_worker``'s contract: the JSON on the worker's last stdout line."""
    with contextlib.redirect_stdout(io.StringIO()) as output:
        run_script(script, argv)
    return json.loads(output.getvalue().splitlines()[-1])


if __name__ == "__main__":
    for name in WORKER_SCRIPTS:
        importlib.import_module(name).run_worker = run_worker_here
    run_script(sys.argv[1], sys.argv[2:])
