"""`auto` temperature bounds: the teacher measured once, before training, on the first training examples.

The measurement is `dts-llm teacher-report`'s (``teacher_statistics`` over ``RANGE_GRID``) and the range is its
recommendation (``recommended_range``). Every process runs the teacher on the same examples (a partitioned
teacher needs them all in its forward) and the main process's numbers are the run's. They are saved in
output_dir as ``auto_temperature.json``, which a resumed run of the same teacher and data reads instead of
measuring again; the resolved recipe and the checkpoints hold the numbers, not `auto`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from accelerate.utils import broadcast_object_list

from .errors import UserError
from .heads import CAUSAL_LM
from .teacher_cache.store import write_atomically
from .teacher_report import FLAT_ENTROPY_SHARE, PEAKED_TOP_1_MASS, RANGE_GRID, recommended_range, teacher_statistics

logger = logging.getLogger(__name__)

AUTO_RECORD = "auto_temperature.json"
MEASURED_COLUMNS = ("input_ids", "attention_mask", "labels")


def _measurement_source(teacher, dataset, examples: int) -> dict:
    """What a measurement depends on: the teacher's name, the data's fingerprint and the examples read."""
    config = getattr(teacher, "config", None) or getattr(getattr(teacher, "module", None), "config", None)
    return {
        "teacher": getattr(config, "_name_or_path", None),
        "data": getattr(dataset, "_fingerprint", None),
        "examples": examples,
    }


def _measure(args, teacher, dataset, collator, vocab_size: int, source: dict) -> dict:
    """The teacher's statistics on the first examples, and the range recommended from them."""
    rows = (dataset[index] for index in range(source["examples"]))
    examples = [{key: row[key] for key in MEASURED_COLUMNS} for row in rows]
    batch_size = args.per_device_eval_batch_size
    batches = (collator(examples[start : start + batch_size]) for start in range(0, len(examples), batch_size))
    statistics = teacher_statistics(teacher, batches, vocab_size, RANGE_GRID, top_k=(1,), device=args.device)
    try:
        low, high = recommended_range(statistics)
    except ValueError as error:
        raise UserError(f"{', '.join(args.auto_temperature_fields)}: auto: {error}") from None
    return {**source, "temperature_min": low, "temperature_max": high, **statistics}  # statistics: tokens too


def resolve_auto_temperatures(args, head: str, teacher, dataset, collator, vocab_size: int, accelerator) -> None:
    """Replace the `auto` fields of ``args`` by the range measured on ``teacher`` (or read from an earlier
    measurement of this run), on every process alike; log it."""
    fields = args.auto_temperature_fields
    if not fields:
        return
    if head != CAUSAL_LM:
        raise UserError(f"{', '.join(fields)}: auto measures a language model's next-token distributions")
    if dataset is None or len(dataset) == 0:
        raise UserError(f"{', '.join(fields)}: auto measures the teacher on the train_dataset, and there is none")
    source = _measurement_source(teacher, dataset, min(args.auto_temperature_examples, len(dataset)))
    path = Path(args.output_dir) / AUTO_RECORD
    record = json.loads(path.read_text()) if accelerator.is_main_process and path.is_file() else None
    record = [record if record is not None and all(record.get(key) == source[key] for key in source) else None]
    broadcast_object_list(record)
    measured = record[0] is None
    if measured:
        record = [_measure(args, teacher, dataset, collator, vocab_size, source)]
        broadcast_object_list(record)
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda temporary: temporary.write_text(json.dumps(record[0], indent=1)))
    low, high = record[0]["temperature_min"], record[0]["temperature_max"]
    args.resolve_auto_temperatures(low, high)
    logger.warning(
        "%s: auto -> temperature range [%g, %g] %s %d response tokens of %d examples (top-1 mass <= %g from "
        "T_min, entropy %g x log V at T_max); %s",
        ", ".join(fields),
        low,
        high,
        "measured on the teacher's" if measured else "as measured before on the teacher's",
        record[0]["tokens"],
        source["examples"],
        PEAKED_TOP_1_MASS,
        FLAT_ENTROPY_SHARE,
        path,
    )
