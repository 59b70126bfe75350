"""Instruction data: Dolly or MiniLLM records, templated (``dts_llm.template``) and tokenised.

Records come from a hub id or from local ``.json``/``.jsonl``/``.parquet`` files (one file or a folder of
them, read by split when the file names say it: ``dts_llm.records.split_files``), in either layout users have, told
apart
by their fields:

- raw Dolly: ``instruction``, ``context``, ``response`` (``category`` and other fields are ignored);
- MiniLLM's processed files: ``instruction``, ``input``, ``output``, ``prompt``. ``prompt`` already holds the
  template and is used as stored; ``output`` may be a list of references (S-NI), of which training
  learns the first.

Other names are mapped with ``instruction_field``/``context_field``/``response_field``. Examples follow
the MiniLLM protocol: prompt tokens without special tokens (labels -100), the response and an EOS
(learned), prompts over ``max_prompt_length`` tokens dropped, sequences cut to ``max_length``, the first
``dev_num`` records held out for validation unless a validation split is given. Dropped records and cut
responses are counted in the log and in ``InstructionData.report`` (``save_data_report`` writes it out).
Files are read by ``dts_llm.records``. Examples are not padded: that is the collator's job
(``dts_llm.tasks.INSTRUCTION.collator``).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher

from .errors import UserError
from .glue import glue_task
from .losses import IGNORE_INDEX
from .records import file_names, file_records, folder_splits, is_local, located_records
from .template import format_prompt

logger = logging.getLogger(__name__)

DATA_REPORT_NAME = "data_report.json"


def encode_example(tokenizer, prompt: str, response: str, max_length: int = 512) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS, with the prompt masked out of the labels.

    The prompt is encoded without special tokens; the EOS after the response is a label even when
    the tokenizer pads with EOS (GPT-2), because labels are built here, not from the padding mask.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class DataArguments:
    """Where the instruction data comes from and how it is cut; parsed by the CLI with HfArgumentParser."""

    dataset: str = field(
        metadata={
            "help": "Required. A hub id (e.g. databricks/databricks-dolly-15k) or a local .json/.jsonl/.parquet "
            "file or folder of them, with raw Dolly or MiniLLM processed records. In a folder whose file names say "
            "their split, train* files are trained on, validation*/valid*/dev* files are the validation split "
            "and test* files are not read."
        }
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "Local file or folder for validation (of a folder of split files, its validation* files); "
            "without it the first dev_num records are held out."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to load when dataset is a hub id."})
    instruction_field: str | None = field(
        default=None, metadata={"help": "Field holding the instruction (default: 'instruction')."}
    )
    context_field: str | None = field(
        default=None,
        metadata={"help": "Field holding the optional context (default: 'context' (Dolly) or 'input' (MiniLLM))."},
    )
    response_field: str | None = field(
        default=None,
        metadata={
            "help": "Field holding the response (default: 'response' (Dolly) or 'output' (MiniLLM); "
            "of a list of references, training learns the first)."
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Tokens of prompt + response + EOS kept per example; the rest is cut."}
    )
    max_prompt_length: int = field(
        default=256, metadata={"help": "Examples whose prompt has more tokens are dropped and counted, as in MiniLLM."}
    )
    dev_num: int = field(
        default=1000,
        metadata={
            "help": "Without validation_file or a dataset folder's validation* files, the first dev_num records "
            "are the validation split (MiniLLM holds out the first 1000 Dolly records); 0 for none."
        },
    )
    num_proc: int | None = field(default=None, metadata={"help": "Processes that tokenise (default: this one)."})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache for hub downloads and tokenised data (default: the datasets cache)."}
    )
    glue_task: str | None = field(
        default=None,
        metadata={
            "help": "A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): train sequence-classification "
            "heads on it. dataset is then a GLUE source (glue_data folder, TSV, parquet/JSON export, "
            "or nyu-mll/glue); "
            "validation_file a file or folder of the evaluation split(s); max_length applies, the rest does not."
        },
    )

    def __post_init__(self):
        if not self.dataset:
            raise UserError("dataset: give a hub id, a .json/.jsonl/.parquet file or a folder of them")
        for name in ("max_length", "max_prompt_length", "num_proc"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be a positive integer, got {value}")
        if self.dev_num < 0:
            raise UserError(f"dev_num must be 0 (no validation split) or more, got {self.dev_num}")
        if self.glue_task is not None:
            try:
                self.glue_task = glue_task(self.glue_task).name
            except ValueError as error:
                raise UserError(f"glue_task: {error}") from None
            return
        if self.max_prompt_length >= self.max_length:
            raise UserError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
                "so that every kept prompt leaves room for its response"
            )


@dataclass
class InstructionData:
    """Tokenised splits plus the counts of what was read and dropped, so nothing is lost silently.

    ``report`` holds records (read, all sources), train and validation (examples kept),
    dropped_long_prompts and empty_responses; the first is the sum of these four. truncated_responses
    counts the kept examples whose response ``max_length`` cut, losing its EOS.
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    report: dict[str, int]


@dataclass(frozen=True)
class _Fields:
    """The record fields an example is built from; ``prompt``, when set, holds the finished template."""

    instruction: str
    context: str | None
    response: str
    prompt: str | None

    def __str__(self) -> str:
        """How the log names them: ``instruction=instruction, context=input, ...``, unset ones left out."""
        return ", ".join(f"{role}={name}" for role, name in vars(self).items() if name is not None)


def load_instruction_data(args: DataArguments, tokenizer) -> InstructionData:
    """Read, split, template and tokenise the records; tokenisation is cached by ``datasets``.

    Under several processes call it inside ``TrainingArguments.main_process_first()``: one process
    tokenises and the others read its cache.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token: every response must end with one")
    train_source, validation_source = _dataset_sources(args)
    examples = _read_examples(train_source, args)
    report = Counter(
        records=len(examples), train=0, validation=0, dropped_long_prompts=0, empty_responses=0, truncated_responses=0
    )
    if validation_source:
        validation_examples = _read_examples(validation_source, args)
        report["records"] += len(validation_examples)
    elif args.dev_num:
        if args.dev_num >= len(examples):
            raise UserError(
                f"dev_num={args.dev_num} leaves no training records of the {len(examples)} in {args.dataset}"
            )
        validation_examples, examples = examples[: args.dev_num], examples[args.dev_num :]
    else:
        validation_examples = None

    # Everything but the texts that the tokens depend on; hashed once, as hashing a tokenizer takes ~0.5 s.
    # The encoding functions by their source: `datasets` pickles a module's functions by name, so a
    # changed encoding would otherwise load the cache of the old one.
    code = [inspect.getsource(function) for function in (encode_example, _encode_with_prompt_length)]
    encoding = Hasher.hash((tokenizer, args.max_length, code))
    train = _tokenize(examples, args, tokenizer, encoding, report)
    if validation_examples is not None:
        validation = _tokenize(validation_examples, args, tokenizer, encoding, report)
    else:
        validation = None
    report["train"], report["validation"] = len(train), len(validation) if validation is not None else 0
    lost = report["dropped_long_prompts"] + report["empty_responses"] + report["truncated_responses"]
    logger.log(
        logging.WARNING if lost else logging.INFO,
        "Instruction data: %d records -> %d train and %d validation examples; "
        "dropped %d with a prompt over %d tokens and %d with an empty response; "
        "cut %d response%s at %d tokens (they lose their EOS)",
        report["records"],
        report["train"],
        report["validation"],
        report["dropped_long_prompts"],
        args.max_prompt_length,
        report["empty_responses"],
        report["truncated_responses"],
        "" if report["truncated_responses"] == 1 else "s",
        args.max_length,
    )
    if len(train) == 0:
        raise UserError(f"no training examples left in {args.dataset} (see the counts above)")
    return InstructionData(train=train, validation=validation, report=dict(report))


def save_data_report(report: dict, output_dir: str) -> Path:
    """Write ``report`` (what was read, dropped and cut) to ``output_dir/data_report.json``: the console
    of a long run is often gone when its results are read."""
    path = Path(output_dir) / DATA_REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def _dataset_sources(args: DataArguments) -> tuple[str | list[Path], str | list[Path] | None]:
    """Where the train and validation records come from: ``dataset`` and ``validation_file`` (None: the
    first ``dev_num`` records), or the files of a folder whose names say their split (see ``split_files``)."""
    folder = Path(args.dataset)
    splits = folder_splits(folder)
    validation = _validation_source(args.validation_file) if args.validation_file else None
    if splits is None:
        return args.dataset, validation
    if not splits["train"]:
        raise UserError(f"{folder}: the files are named as splits, but there is no train* file: {file_names(splits)}")
    if splits["validation"] and args.validation_file:
        raise UserError(
            f"{folder} holds the validation split ({file_names(splits['validation'])}) and validation_file is also "
            f"given ({args.validation_file}): remove one"
        )
    if splits["validation"]:
        held_out = file_names(splits["validation"])
    elif validation:
        held_out = f"validation_file {args.validation_file}"
    else:
        held_out = f"the first dev_num={args.dev_num} train records"
    not_read = file_names(splits["test"]) or "nothing"
    train = file_names(splits["train"])
    logger.info("%s: train from %s; validation from %s; not read: %s", folder, train, held_out, not_read)
    return splits["train"], splits["validation"] or validation


def _validation_source(source: str) -> str | list[Path]:
    """``validation_file``, or the validation files of a folder whose names say their split."""
    folder = Path(source)
    splits = folder_splits(folder)
    if splits is None:
        return source
    if not splits["validation"]:
        raise UserError(
            f"validation_file: {folder}: the files are named as splits, but there is no validation "
            f"(validation*, valid*, dev*) file: {file_names(splits)}"
        )
    logger.info("%s: validation from %s", folder, file_names(splits["validation"]))
    return splits["validation"]


def _read_examples(source: str | list[Path], args: DataArguments) -> list[tuple[str, str]]:
    """(prompt, response) of every record of a hub id, file, folder or list of files, in order."""
    if isinstance(source, list):
        records, source = file_records(source), file_names(source)
    elif is_local(source):
        records = located_records(source)
    else:  # a hub id; errors can only name the record by its index
        hub = datasets.load_dataset(source, split=args.dataset_split, cache_dir=args.data_cache_dir)
        records = [(f"{source} ({args.dataset_split})[{i}]", record) for i, record in enumerate(hub)]
    if not records:
        raise UserError(f"{source}: no records")
    fields = _resolve_fields(args, set().union(*(record for _, record in records)), source)
    logger.info("%s: %d records; fields %s", source, len(records), fields)
    return [_to_example(record, where, fields) for where, record in records]


def _resolve_fields(args: DataArguments, names: set[str], source: str) -> _Fields:
    """The configured field names, else the Dolly or MiniLLM ones that the records have."""

    def pick(configured: str | None, *candidates: str) -> str | None:
        return configured or next((name for name in candidates if name in names), None)

    instruction = pick(args.instruction_field, "instruction")
    response = pick(args.response_field, "response", "output")
    if instruction is None or response is None:
        raise UserError(
            f"{source}: cannot tell the layout from the fields {sorted(names)}: expected raw Dolly "
            "(instruction, context, response) or MiniLLM (instruction, input, output, prompt) records, "
            "or set instruction_field and response_field"
        )
    # A stored prompt was built from the MiniLLM fields: it no longer applies once those are remapped.
    remapped = args.instruction_field or args.context_field
    prompt = "prompt" if "prompt" in names and not remapped else None
    return _Fields(instruction, pick(args.context_field, "context", "input"), response, prompt)


def _to_example(record: dict, where: str, fields: _Fields) -> tuple[str, str]:
    """(prompt, response) of one record; errors name the record (file:line or [index]) and the field."""
    response = _text_field(record, fields.response, where, references=True)
    if fields.prompt:
        return _text_field(record, fields.prompt, where), response
    instruction = _text_field(record, fields.instruction, where)
    # The context is optional: a record without it, or with null, has none (Dolly and Alpaca exports differ).
    has_context = fields.context is not None and record.get(fields.context) is not None
    context = _text_field(record, fields.context, where) if has_context else ""
    return format_prompt(instruction, context), response


def _text_field(record: dict, name: str, where: str, references: bool = False) -> str:
    """``record[name]`` as a string; with ``references``, a list of strings gives its first (S-NI outputs)."""
    if name not in record:
        raise UserError(f"{where}: missing field {name!r} (the record has {sorted(record)})")
    value = record[name]
    if references and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value[0] if value else ""
    if not isinstance(value, str):
        expected = "a string or a list of strings" if references else "a string"
        raise UserError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {value!r:.80}")
    return value


def _tokenize(
    examples: list[tuple[str, str]], args: DataArguments, tokenizer, encoding: str, report: Counter
) -> datasets.Dataset:
    """input_ids/attention_mask/labels of the examples with a response and a prompt that fits.

    The cache file is named by a hash of the texts and ``encoding`` (the hash of the tokenizer, ``max_length``
    and the encoding code), so the same data and settings load it instead of tokenising again.
    ``max_prompt_length`` is applied after the cache, from the stored prompt lengths, so changing it
    re-uses the tokens.
    """
    kept = [(prompt, response) for prompt, response in examples if response.strip()]
    report["empty_responses"] += len(examples) - len(kept)
    columns = {"prompt": [prompt for prompt, _ in kept], "response": [response for _, response in kept]}
    fingerprint = Hasher.hash((columns, encoding))
    cache_dir = Path(args.data_cache_dir or datasets.config.HF_DATASETS_CACHE) / "dts_llm"
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoded = datasets.Dataset.from_dict(columns).map(
        _encode_with_prompt_length,
        fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length},
        remove_columns=["prompt", "response"],
        cache_file_name=str(cache_dir / f"tokenized-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        num_proc=args.num_proc,
        desc="Tokenising",
    )
    prompt_lengths = encoded["prompt_length"]
    fits = [i for i, length in enumerate(prompt_lengths) if length <= args.max_prompt_length]
    report["dropped_long_prompts"] += len(encoded) - len(fits)
    kept = encoded.select(fits)
    report["truncated_responses"] += sum(kept["truncated"])
    return kept.remove_columns(["prompt_length", "truncated"])


def _encode_with_prompt_length(example: dict[str, str], tokenizer, max_length: int) -> dict[str, list[int] | int]:
    """``encode_example`` plus the prompt length that decides whether the example is dropped, and
    whether ``max_length`` cut the response (its EOS then is not learned: counted, as MiniLLM cuts too)."""
    # One token more than kept tells whether the cut removed anything.
    longer = encode_example(tokenizer, example["prompt"], example["response"], max_length + 1)
    encoded = {name: ids[:max_length] for name, ids in longer.items()}
    # Response tokens are never IGNORE_INDEX, so this counts the prompt (capped at max_length, which is
    # above max_prompt_length: a prompt cut here is over the limit either way).
    prompt_length = encoded["labels"].count(IGNORE_INDEX)
    return {**encoded, "prompt_length": prompt_length, "truncated": len(longer["input_ids"]) > max_length}
