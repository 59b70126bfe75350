"""Record formats, told apart by their fields, and the settings that turn records into examples.

- instruction records: raw Dolly (``instruction``, ``context``, ``response``); Alpaca (``instruction``,
  ``input``, ``output``; JSON lines or one JSON array); MiniLLM's processed files (Alpaca's fields plus
  ``prompt``, the finished template, used as stored; ``output`` may be a list of references, of which the
  first is learned);
- conversational (TRL): ``messages``, a list of ``{"role", "content"}`` (system, user, assistant, tool);
- prompt/completion (TRL): ``prompt`` and ``completion`` as strings (the prompt used as stored, the
  completion and an EOS learned) or as message lists (the completion's assistant turns learned).

``template`` chooses the rendering: the MiniLLM template, or the chat template (instruction records then
become a user turn and an assistant turn). Conversations need a chat template; ``auto`` takes it for them
and the MiniLLM template otherwise, so Dolly runs on GPT-2 and OPT stay as the papers ran them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat import chat_template_of, check_messages, instruction_messages
from .errors import UserError
from .template import format_prompt

TEMPLATES = ("auto", "minillm", "chat")
INSTRUCTION, MESSAGES, PROMPT_COMPLETION = "instruction", "messages", "prompt/completion"


@dataclass
class FormatArguments:
    """How records become examples: their fields, the template, the lengths. ``DataArguments`` adds where
    the records come from; the Python API (``DistillationTrainer(..., data_args=...)``) takes either."""

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
    messages_field: str | None = field(
        default=None, metadata={"help": "Field holding a conversation's messages (default: 'messages')."}
    )
    prompt_field: str | None = field(
        default=None, metadata={"help": "Prompt/completion records: the prompt's field (default: 'prompt')."}
    )
    completion_field: str | None = field(
        default=None, metadata={"help": "Prompt/completion records: the completion's field (default: 'completion')."}
    )
    template: str = field(
        default="auto",
        metadata={
            "help": "minillm: the MiniLLM/Alpaca template (the papers' base models); chat: the chat template "
            "(instructions become user turns); auto: chat for conversations, minillm otherwise.",
            "choices": list(TEMPLATES),
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "A Jinja chat template, or a file holding one (default: the tokenizer's own)."},
    )
    last_turn_only: bool = field(
        default=False,
        metadata={"help": "Learn only a conversation's last assistant turn (as TRL's GKD), not every one."},
    )
    max_length: int = field(
        default=512, metadata={"help": "Tokens of prompt + response + EOS kept per example; the rest is cut."}
    )
    max_prompt_length: int = field(
        default=256,
        metadata={
            "help": "Examples whose prompt (the tokens before the first learned one) is longer are dropped and "
            "counted, as in MiniLLM."
        },
    )

    def __post_init__(self):
        self.check_format()

    def check_format(self, prompts: bool = True) -> None:
        """Refuse impossible settings; ``prompts=False`` (GLUE) skips the prompt length rule."""
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value < 1:
                raise UserError(f"{name} must be a positive integer, got {value}")
        if self.template not in TEMPLATES:
            raise UserError(f"template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if prompts and self.max_prompt_length >= self.max_length:
            raise UserError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
                "so that every kept prompt leaves room for its response"
            )


@dataclass(frozen=True)
class Layout:
    """The format of a source's records and the fields an example is built from (unset ones unused)."""

    name: str
    conversational: bool = False  # messages, or prompt/completion as message lists
    instruction: str | None = None
    context: str | None = None
    response: str | None = None
    prompt: str | None = None  # instruction records: the finished template, used as stored
    messages: str | None = None
    completion: str | None = None

    def __str__(self) -> str:
        """How the log names it: ``instruction (instruction=instruction, context=input, ...)``."""
        fields = {role: name for role, name in vars(self).items() if isinstance(name, str) and role != "name"}
        return f"{self.name} ({', '.join(f'{role}={name}' for role, name in fields.items())})"


@dataclass(frozen=True)
class Conversation:
    """Messages to render with a chat template; assistant turns from ``first_learned`` on are learned."""

    messages: list[dict]
    first_learned: int
    where: str


def resolve_layout(args: FormatArguments, records: list[tuple[str, dict]], source: str) -> Layout:
    """The format of ``records`` from their fields: configured names first, then the usual ones."""
    names = set().union(*(record for _, record in records))
    messages = args.messages_field or ("messages" if "messages" in names else None)
    if messages:
        return Layout(MESSAGES, conversational=True, messages=messages)
    completion = args.completion_field or ("completion" if "completion" in names else None)
    if completion:
        prompt = args.prompt_field or "prompt"
        first = records[0][1]
        listed = isinstance(first.get(prompt), list) or isinstance(first.get(completion), list)
        return Layout(PROMPT_COMPLETION, conversational=listed, prompt=prompt, completion=completion)

    def pick(configured: str | None, *candidates: str) -> str | None:
        return configured or next((name for name in candidates if name in names), None)

    instruction = pick(args.instruction_field, "instruction")
    response = pick(args.response_field, "response", "output")
    if instruction is None or response is None:
        raise UserError(
            f"{source}: cannot tell the layout from the fields {sorted(names)}: expected raw Dolly "
            "(instruction, context, response), MiniLLM (instruction, input, output, prompt) or Alpaca records, "
            "conversations (messages) or prompt/completion records, or set instruction_field and response_field"
        )
    # A stored prompt was built from the MiniLLM fields: it no longer applies once those are remapped.
    remapped = args.instruction_field or args.context_field
    prompt = "prompt" if "prompt" in names and not remapped else None
    context = pick(args.context_field, "context", "input")
    return Layout(INSTRUCTION, instruction=instruction, context=context, response=response, prompt=prompt)


def chosen_template(args: FormatArguments, tokenizer, layouts: list[Layout]) -> str | None:
    """The chat template the examples are rendered with, or None for the MiniLLM template (see ``template``)."""
    conversational = [layout for layout in layouts if layout.conversational]
    if args.template == "minillm" and conversational:
        raise UserError(f"template=minillm renders instructions, but the records are {conversational[0]}: use chat")
    if args.template == "minillm" or (args.template == "auto" and not conversational):
        return None
    strings = [layout for layout in layouts if layout.name == PROMPT_COMPLETION and not layout.conversational]
    if strings:
        raise UserError(
            f"template=chat, but the records are {strings[0]} with string prompts, finished text that no template "
            "applies to: give prompt and completion as message lists, or use template minillm"
        )
    template = chat_template_of(tokenizer, args.chat_template)
    if template is None:
        raise UserError(
            "the records are rendered with a chat template (template=chat, or conversations), but the tokenizer "
            "has none: set chat_template (a Jinja template or a file holding one)"
        )
    return template


def to_example(record: dict, where: str, layout: Layout, chat: bool) -> tuple[str, str] | Conversation:
    """One record as (prompt, response) text, or as a ``Conversation`` when ``chat``; errors name the record
    (file:line or [index]) and the field."""
    if layout.name == MESSAGES:
        messages = _field(record, layout.messages, where)
        check_messages(messages, where, layout.messages)
        return Conversation(messages, 0, where)
    if layout.name == PROMPT_COMPLETION:
        return _prompt_completion(record, where, layout)
    response = _text_field(record, layout.response, where, references=True)
    if layout.prompt and not chat:
        return _text_field(record, layout.prompt, where), response
    instruction = _text_field(record, layout.instruction, where)
    # The context is optional: a record without it, or with null, has none (Dolly and Alpaca exports differ).
    has_context = layout.context is not None and record.get(layout.context) is not None
    context = _text_field(record, layout.context, where) if has_context else ""
    if chat:
        return Conversation(instruction_messages(instruction, context) + [_assistant(response)], 0, where)
    return format_prompt(instruction, context), response


def _prompt_completion(record: dict, where: str, layout: Layout) -> tuple[str, str] | Conversation:
    prompt, completion = _field(record, layout.prompt, where), _field(record, layout.completion, where)
    if not layout.conversational:
        return _text_field(record, layout.prompt, where), _text_field(record, layout.completion, where)
    if isinstance(completion, str):  # a bare completion string after a message-list prompt
        completion = [_assistant(completion)]
    check_messages(prompt, where, layout.prompt)
    check_messages(completion, where, layout.completion)
    return Conversation(prompt + completion, len(prompt), where)


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise UserError(f"{where}: missing field {name!r} (the record has {sorted(record)})")
    return record[name]


def _text_field(record: dict, name: str, where: str, references: bool = False) -> str:
    """``record[name]`` as a string; with ``references``, a list of strings gives its first (S-NI outputs)."""
    value = _field(record, name, where)
    if references and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value[0] if value else ""
    if not isinstance(value, str):
        expected = "a string or a list of strings" if references else "a string"
        raise UserError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {value!r:.80}")
    return value
