"""The instruction-following test suites (Dolly, SelfInst, Vicuna, S-NI, UnNI) as prompts with references.

A suite is read from a file, a folder or a hub id, in any of the layouts users have; the layout is told
apart per record by its fields:

- MiniLLM's processed files (``prompt``, ``output``): ``prompt`` already holds the template and is used as
  stored; ``output`` is one reference or a list of them (S-NI);
- raw Dolly (``instruction``, ``context``, ``response``);
- the original Self-Instruct user-oriented file (``instruction``, ``instances`` of ``input``/``output``):
  one example per instance;
- Vicuna questions (``question_id`` and ``text``, or ``turns`` of which the first is asked). The question
  file has no answers: a record is scored against its ``reference``, ``output`` or ``answer`` field when it
  has one and is otherwise skipped as "no reference" (MiniLLM's processed Vicuna folder has them);
- other ``instruction``/``input``/``output`` records (Alpaca style);
- conversations (``messages``): the last assistant turn is the reference, the turns before it the prompt
  (such a suite needs the chat template).

Records without a stored prompt get the training template, ``dts_llm.template.format_prompt``, so a model is
evaluated with the prompts it learned; ``with_chat_template`` renders a suite for a chat model instead, each
instruction (and input) as the user turn that training gives it (``dts_llm.chat.instruction_messages``). A
record that cannot be read (malformed JSON, no prompt or instruction) raises a ValueError naming the file, line
and field; a record without a usable reference is counted in ``Suite.skipped`` and left out, so one bad record
does not stop an evaluation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import datasets

from dts_llm.chat import check_messages, instruction_messages

# dts_llm's file reader, so that suites and training data are read, and their errors named, alike.
from dts_llm.records import is_local, located_records
from dts_llm.template import format_prompt, parse_prompt

SUITE_NAMES = ("dolly", "self-inst", "vicuna", "sinst", "uinst")
HUB_SPLITS = ("test", "validation")  # held-out splits only: scoring training records is not comparable
REFERENCE_FIELDS = ("reference", "output", "answer")  # Vicuna records, in the order they are looked for


@dataclass(frozen=True)
class EvalExample:
    """One prompt, templated as the model saw prompts in training, and the answers it is scored against; a
    conversation's example has its turns before the reference instead, and no prompt until it is rendered."""

    prompt: str
    references: tuple[str, ...]
    messages: tuple[dict, ...] | None = None


@dataclass
class Suite:
    """The examples of one suite, with the records left out counted by reason so results can report them."""

    name: str
    source: str
    examples: list[EvalExample]
    skipped: dict[str, int]


def load_suite(name: str, source: str, limit: int | None = None) -> Suite:
    """The first ``limit`` (default all) examples of ``source``: a file, a MiniLLM folder or a hub id.

    A folder is read through its ``valid.jsonl``, the file MiniLLM's processed data folders evaluate on.
    A source that does not exist and does not end in .json/.jsonl/.parquet is taken as a hub id, of which
    the ``train`` split is read.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    examples: list[EvalExample] = []
    skipped: Counter[str] = Counter()
    for where, record in _records(source):
        for example in _examples(record, where):
            if isinstance(example, str):
                skipped[example] += 1
            else:
                examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    return Suite(name=name, source=source, examples=examples[:limit], skipped=dict(skipped))


def with_chat_template(suite: Suite, tokenizer) -> Suite:
    """``suite`` with every prompt rendered by ``tokenizer``'s chat template, ready for the assistant's turn: a
    conversation as it is, a templated instruction (and input) as the user turn training gives it, another
    prompt as the user turn's text."""

    def messages(example: EvalExample) -> list[dict]:
        if example.messages is not None:
            return list(example.messages)
        return instruction_messages(*(parse_prompt(example.prompt) or (example.prompt,)))

    examples = [
        replace(
            example,
            prompt=tokenizer.apply_chat_template(messages(example), tokenize=False, add_generation_prompt=True),
        )
        for example in suite.examples
    ]
    return replace(suite, examples=examples)


def _records(source: str) -> list[tuple[str, dict]]:
    """(where, record) pairs; ``where`` names the file and line (or the hub record) for error messages."""
    path = Path(source)
    if path.is_dir():
        path = path / "valid.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{source}: a suite folder must hold valid.jsonl (MiniLLM's layout)")
    if is_local(path):
        return located_records(str(path))
    splits = datasets.load_dataset(source)
    split = next((name for name in HUB_SPLITS if name in splits), None)
    if split is None:
        raise ValueError(
            f"{source} has no test or validation split (it has {list(splits)}): evaluating on training "
            "records is not comparable with published numbers; give MiniLLM's processed valid.jsonl instead"
        )
    return [(f"{source} ({split})[{i}]", record) for i, record in enumerate(splits[split])]


def _examples(record: dict, where: str) -> Iterator[EvalExample | str]:
    """The examples of one record; a string instead of an example is the reason it was skipped."""
    if "messages" in record:  # a conversation: its last assistant turn is the reference
        yield _conversation(record["messages"], where)
    elif "prompt" in record:  # MiniLLM processed
        yield _example(_text(record, "prompt", where), record.get("output"), where, "output")
    elif "instances" in record:  # Self-Instruct user-oriented
        instruction = _text(record, "instruction", where)
        instances = record["instances"]
        if not isinstance(instances, list):
            raise ValueError(f"{where}: field 'instances' must be a list, got {type(instances).__name__}")
        for i, instance in enumerate(instances):
            at = f"{where}, instance {i}"
            if not isinstance(instance, dict):
                raise ValueError(f"{at}: expected an object with 'input' and 'output', got {type(instance).__name__}")
            prompt = format_prompt(instruction, _text(instance, "input", at, required=False))
            yield _example(prompt, instance.get("output"), at, "output")
    elif "question_id" in record:  # Vicuna questions
        field = next((name for name in REFERENCE_FIELDS if name in record), REFERENCE_FIELDS[0])
        yield _example(format_prompt(_question(record, where)), record.get(field), where, field)
    elif "response" in record:  # raw Dolly
        prompt = format_prompt(_text(record, "instruction", where), _text(record, "context", where, required=False))
        yield _example(prompt, record["response"], where, "response")
    elif "instruction" in record:  # Alpaca style, or MiniLLM fields without the stored prompt
        prompt = format_prompt(_text(record, "instruction", where), _text(record, "input", where, required=False))
        yield _example(prompt, record.get("output"), where, "output")
    else:
        raise ValueError(
            f"{where}: missing field 'prompt' or 'instruction' (or 'question_id' with 'text'/'turns' for Vicuna); "
            f"the record has {sorted(record)}"
        )


def _conversation(messages, where: str) -> EvalExample | str:
    check_messages(messages, where, "messages")
    last = next((i for i in reversed(range(len(messages))) if messages[i]["role"] == "assistant"), None)
    if last is None:
        return "no assistant turn"
    if last == 0:
        raise ValueError(f"{where}: the conversation opens with its assistant turn: there is nothing to prompt it")
    example = _example("", messages[last]["content"], where, f"messages[{last}].content")
    return example if isinstance(example, str) else replace(example, messages=tuple(messages[:last]))


def _question(record: dict, where: str) -> str:
    """A Vicuna question: ``text`` (Vicuna 80), else the first of ``turns`` (MT-Bench style files)."""
    if "text" in record:
        return _text(record, "text", where)
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
        raise ValueError(f"{where}: missing field 'text' or 'turns' (a non-empty list of questions)")
    return turns[0]


def _text(record: dict, name: str, where: str, required: bool = True) -> str:
    """``record[name]`` as a string: a required field must be there and not blank, an optional one may be absent."""
    value = record.get(name)
    if value is None:
        if required:
            raise ValueError(f"{where}: missing field {name!r}; the record has {sorted(record)}")
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.80}")
    return value


def _example(prompt: str, references: object, where: str, field: str) -> EvalExample | str:
    """The example, or the reason it is skipped when it has nothing to be scored against."""
    if references is None:
        return "no reference"
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list) or not all(isinstance(item, str) for item in references):
        raise ValueError(f"{where}: field {field!r} must be a string or a list of strings, got {references!r:.80}")
    if not references:
        return "empty reference list"
    kept = tuple(reference for reference in references if reference.strip())
    if not kept:
        return "empty reference"
    return EvalExample(prompt=prompt, references=kept)
