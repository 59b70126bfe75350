"""Instruction data: records in any format ``dts_llm.formats`` reads, rendered and tokenised.

Records come from a hub id or from local ``.json``/``.jsonl``/``.parquet`` files (one file or a folder of
them, read by split when the file names say it: ``dts_llm.records.split_files``). ``template`` renders them
with the MiniLLM template (``dts_llm.template``) or a chat template (``dts_llm.chat``); the choice is logged
and kept in ``InstructionData``. The MiniLLM protocol: prompt tokens without special tokens (labels -100;
a tokenizer with a BOS of its own gets it, see ``dts_llm.chat.bos_prefix``), the response and an EOS
learned. Conversations learn every assistant turn with its end-of-turn token. For both: prompts (the tokens
before the first learned one) over ``max_prompt_length`` dropped, sequences cut to ``max_length``, the first
``dev_num`` records held out for validation unless a validation split is given. Skipped records and cut
responses are counted in the log and in ``InstructionData.report`` (``save_data_report`` writes it out).
``encode_records`` does the same for an untokenised dataset given to the trainer. Examples are not padded:
that is the collator's job (``dts_llm.tasks.INSTRUCTION.collator``).
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

from .chat import bos_prefix, encode_conversation, learned_turns
from .errors import UserError
from .formats import Conversation, FormatArguments, Layout, chosen_template, resolve_layout, to_example
from .glue import glue_task
from .losses import IGNORE_INDEX
from .records import file_names, file_records, folder_splits, is_local, located_records
from .template import format_prompt as format_prompt  # importable from here, as before

logger = logging.getLogger(__name__)

DATA_REPORT_NAME = "data_report.json"
Example = tuple[str, str] | Conversation


def encode_example(tokenizer, prompt: str, response: str, max_length: int = 512) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS, with the prompt masked out of the labels.

    The prompt is encoded without special tokens (but for a BOS of the tokenizer's own: ``bos_prefix``); the
    EOS after the response is a label even when the tokenizer pads with EOS (GPT-2), because labels are
    built here, not from the padding mask.
    """
    prompt_ids = bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class DataArguments(FormatArguments):
    """Where the instruction data comes from and how it is cut; parsed by the CLI with HfArgumentParser."""

    dataset: str = field(
        kw_only=True,
        metadata={
            "help": "Required. A hub id (e.g. databricks/databricks-dolly-15k) or a local .json/.jsonl/.parquet "
            "file or folder of them, with raw Dolly, MiniLLM, Alpaca, conversational (messages) or "
            "prompt/completion records. In a folder whose file names say "
            "their split, train* files are trained on, validation*/valid*/dev* files are the validation split "
            "and test* files are not read."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "Local file or folder for validation (of a folder of split files, its validation* files); "
            "without it the first dev_num records are held out."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to load when dataset is a hub id."})
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
        if self.num_proc is not None and self.num_proc < 1:
            raise UserError(f"num_proc must be a positive integer, got {self.num_proc}")
        if self.dev_num < 0:
            raise UserError(f"dev_num must be 0 (no validation split) or more, got {self.dev_num}")
        self.check_format(prompts=self.glue_task is None)
        if self.glue_task is not None:
            try:
                self.glue_task = glue_task(self.glue_task).name
            except ValueError as error:
                raise UserError(f"glue_task: {error}") from None


@dataclass
class InstructionData:
    """Tokenised splits plus the counts of what was read and dropped, so nothing is lost silently.

    ``report`` holds records (read, all sources), train and validation (examples kept),
    dropped_long_prompts and empty_responses, and with a chat template no_assistant_turns; records is the
    sum of the others. truncated_responses counts the kept examples that ``max_length`` cut inside a
    learned span. ``template`` is how they were rendered (minillm or chat); ``chat_template`` the Jinja used.
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    report: dict[str, int]
    template: str = "minillm"
    chat_template: str | None = None


def load_instruction_data(args: DataArguments, tokenizer) -> InstructionData:
    """Read, split, render and tokenise the records; tokenisation is cached by ``datasets``.

    Under several processes call it inside ``TrainingArguments.main_process_first()``: one process
    tokenises and the others read its cache.
    """
    train_source, validation_source = _dataset_sources(args)
    sources = [_read_records(train_source, args)]
    if validation_source:
        sources.append(_read_records(validation_source, args))
    template = _chosen_template(args, tokenizer, [layout for _, layout in sources])
    examples, validation_examples = ([_examples(*source, template) for source in sources] + [None])[:2]
    report = _new_report(sum(len(records) for records, _ in sources), template)
    if validation_examples is None and args.dev_num:
        if args.dev_num >= len(examples):
            raise UserError(
                f"dev_num={args.dev_num} leaves no training records of the {len(examples)} in {args.dataset}"
            )
        validation_examples, examples = examples[: args.dev_num], examples[args.dev_num :]

    encoding = _Encoding(tokenizer, args, template, args.data_cache_dir, args.num_proc)
    train = _tokenize(examples, encoding, report)
    validation = _tokenize(validation_examples, encoding, report) if validation_examples is not None else None
    report["train"], report["validation"] = len(train), len(validation) if validation is not None else 0
    _log_report(report, args)
    if len(train) == 0:
        raise UserError(f"no training examples left in {args.dataset} (see the counts above)")
    name = "minillm" if template is None else "chat"
    return InstructionData(train, validation, dict(report), template=name, chat_template=template)


def encode_records(dataset, tokenizer, args: FormatArguments | None = None, name: str = "train_dataset"):
    """An untokenised dataset (any format of ``dts_llm.formats``) as input_ids/attention_mask/labels, rendered
    and cut as ``args`` (default: ``FormatArguments()``) says; what was skipped is logged. The trainer calls
    it on the datasets it is given without ``input_ids``."""
    args = args or FormatArguments()
    records = [(f"{name}[{index}]", record) for index, record in enumerate(dataset)]
    if not records:
        raise UserError(f"{name}: no records")
    layout = resolve_layout(args, records, name)
    template = _chosen_template(args, tokenizer, [layout])
    report = _new_report(len(records), template)
    encoded = _tokenize(_examples(records, layout, template), _Encoding(tokenizer, args, template), report)
    report["train"] = len(encoded)
    _log_report(report, args, name)
    return encoded


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


def trainer_dataset(dataset, name: str, tokenizer, args: FormatArguments | None):
    """``dataset``, or its records rendered and tokenised (``encode_records``) when it has neither ``input_ids``
    nor ``labels``; a dict of evaluation sets entry by entry."""
    if isinstance(dataset, dict):
        return {key: trainer_dataset(part, f"{name}[{key!r}]", tokenizer, args) for key, part in dataset.items()}
    columns = getattr(dataset, "column_names", None)
    if columns is None or "input_ids" in columns or "labels" in columns:
        return dataset
    return encode_records(dataset, tokenizer, args, name)


def _read_records(source: str | list[Path], args: DataArguments) -> tuple[list[tuple[str, dict]], Layout]:
    """(where, record) of every record of a hub id, file, folder or list of files, in order, and their format."""
    if isinstance(source, list):
        records, source = file_records(source), file_names(source)
    elif is_local(source):
        records = located_records(source)
    else:  # a hub id; errors can only name the record by its index
        hub = datasets.load_dataset(source, split=args.dataset_split, cache_dir=args.data_cache_dir)
        records = [(f"{source} ({args.dataset_split})[{i}]", record) for i, record in enumerate(hub)]
    if not records:
        raise UserError(f"{source}: no records")
    layout = resolve_layout(args, records, source)
    logger.info("%s: %d records; %s", source, len(records), layout)
    return records, layout


def _chosen_template(args: FormatArguments, tokenizer, layouts: list[Layout]) -> str | None:
    """``chosen_template``, logged: the run's log says how its examples were rendered."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token: every response must end with one")
    template = chosen_template(args, tokenizer, layouts)
    origin = "the MiniLLM template" if template is None else "the tokenizer's chat template"
    if template is not None and args.chat_template is not None:
        origin = "the chat_template given"
    logger.info("Rendering with %s (template=%s)", origin, args.template)
    return template


def _examples(records: list[tuple[str, dict]], layout: Layout, template: str | None) -> list[Example]:
    return [to_example(record, where, layout, chat=template is not None) for where, record in records]


def _new_report(records: int, template: str | None) -> Counter:
    report = Counter(
        records=records, train=0, validation=0, dropped_long_prompts=0, empty_responses=0, truncated_responses=0
    )
    if template is not None:
        report["no_assistant_turns"] = 0
    return report


def _log_report(report: Counter, args: FormatArguments, name: str = "Instruction data") -> None:
    lost = report["dropped_long_prompts"] + report["empty_responses"] + report["truncated_responses"]
    skipped = report.get("no_assistant_turns", 0)
    logger.log(
        logging.WARNING if lost or skipped else logging.INFO,
        "%s: %d records -> %d train and %d validation examples; "
        "dropped %d with a prompt over %d tokens and %d with an empty response%s; "
        "cut %d response%s at %d tokens (they lose their EOS)",
        name,
        report["records"],
        report["train"],
        report["validation"],
        report["dropped_long_prompts"],
        args.max_prompt_length,
        report["empty_responses"],
        f" and {skipped} without an assistant turn" if "no_assistant_turns" in report else "",
        report["truncated_responses"],
        "" if report["truncated_responses"] == 1 else "s",
        args.max_length,
    )


class _Encoding:
    """What the tokens depend on besides the texts, hashed once (hashing a tokenizer takes ~0.5 s); the
    encoding functions by their source, as `datasets` pickles a module's functions by name, so a changed
    encoding would otherwise load the cache of the old one."""

    def __init__(self, tokenizer, args: FormatArguments, template: str | None, cache_dir=None, num_proc=None):
        self.tokenizer, self.args, self.template, self.num_proc = tokenizer, args, template, num_proc
        self.cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "dts_llm"
        chat = inspect.getmodule(encode_conversation)  # its whole module: the rendering and the masks
        functions = (encode_example, _encode_with_prompt_length, _encode_conversation_with_prompt_length, _cut, chat)
        code = [inspect.getsource(item) for item in functions]
        self.hash = Hasher.hash((tokenizer, args.max_length, template, code))


def _tokenize(examples: list[Example], encoding: _Encoding, report: Counter) -> datasets.Dataset:
    """input_ids/attention_mask/labels of the examples with something to learn and a prompt that fits.

    The cache file is named by a hash of the texts and the ``encoding``, so the same data and settings load
    it instead of tokenising again. ``max_prompt_length`` is applied after the cache, from the stored prompt
    lengths, so changing it re-uses the tokens.
    """
    args, template = encoding.args, encoding.template
    if template is None:
        kept = [(prompt, response) for prompt, response in examples if response.strip()]
        report["empty_responses"] += len(examples) - len(kept)
        columns = {"prompt": [prompt for prompt, _ in kept], "response": [response for _, response in kept]}
        function, options = _encode_with_prompt_length, {}
    else:
        columns = _conversation_columns(examples, args.last_turn_only, report)
        function, options = _encode_conversation_with_prompt_length, {"template": template}
    fingerprint = Hasher.hash((columns, encoding.hash))
    encoding.cache.mkdir(parents=True, exist_ok=True)
    encoded = datasets.Dataset.from_dict(columns).map(
        function,
        fn_kwargs={"tokenizer": encoding.tokenizer, "max_length": args.max_length, **options},
        remove_columns=list(columns),
        cache_file_name=str(encoding.cache / f"tokenized-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        num_proc=encoding.num_proc,
        desc="Tokenising",
    )
    prompt_lengths = encoded["prompt_length"]
    fits = [i for i, length in enumerate(prompt_lengths) if length <= args.max_prompt_length]
    report["dropped_long_prompts"] += len(encoded) - len(fits)
    kept = encoded.select(fits)
    report["truncated_responses"] += sum(kept["truncated"])
    return kept.remove_columns(["prompt_length", "truncated"])


def _conversation_columns(conversations: list[Conversation], last_turn_only: bool, report: Counter) -> dict:
    """The conversations with a learned assistant turn that has content, as columns (messages as JSON, so that
    any message keys survive arrow); the others counted as no_assistant_turns or empty_responses."""
    columns = {"messages": [], "turns": [], "where": []}
    for conversation in conversations:
        turns = learned_turns(conversation.messages, conversation.first_learned, last_turn_only)
        if not turns:
            report["no_assistant_turns"] += 1
        elif not any(conversation.messages[turn]["content"].strip() for turn in turns):
            report["empty_responses"] += 1
        else:
            columns["messages"].append(json.dumps(conversation.messages))
            columns["turns"].append(turns)
            columns["where"].append(conversation.where)
    return columns


def _encode_with_prompt_length(example: dict[str, str], tokenizer, max_length: int) -> dict[str, list[int] | int]:
    """``encode_example`` plus the prompt length that decides whether the example is dropped, and whether
    ``max_length`` cut the response (its EOS then is not learned: counted, as MiniLLM cuts too)."""
    # One token more than kept tells whether the cut removed anything.
    return _cut(encode_example(tokenizer, example["prompt"], example["response"], max_length + 1), max_length)


def _encode_conversation_with_prompt_length(example: dict, tokenizer, max_length: int, template: str) -> dict:
    """``encode_conversation`` cut as ``_cut`` says."""
    messages = json.loads(example["messages"])
    return _cut(encode_conversation(tokenizer, messages, template, example["turns"], example["where"]), max_length)


def _cut(encoded: dict[str, list[int]], max_length: int) -> dict[str, list[int] | int | bool]:
    """``encoded`` cut to ``max_length``, with its prompt length (the tokens before the first learned one,
    at most ``max_length``) and whether the cut took a learned token (a cut turn keeps its learned prefix)."""
    kept = {name: ids[:max_length] for name, ids in encoded.items()}
    prompt_length = next((i for i, label in enumerate(kept["labels"]) if label != IGNORE_INDEX), len(kept["labels"]))
    truncated = any(label != IGNORE_INDEX for label in encoded["labels"][max_length:])
    return {**kept, "prompt_length": prompt_length, "truncated": truncated}
