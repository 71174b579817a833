"""Instruction data for ``adaption-fx finetune``: read, validate, render, tokenize, batch.

A dataset file holds records in one of two forms, as JSON Lines or as one JSON list:

* Alpaca form: ``{"instruction": str, "input": str (optional), "output": str}``;
* chat form: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
  ending with an assistant message.

``read_records`` validates them into ``Example`` objects (chat form, keeping the Alpaca fields
when there were any). ``encode_example`` renders an example with the tokenizer's chat template
when it has one, else with the Alpaca prompt of Stanford Alpaca and the LLaMA-Adapter paper,
and labels only the response tokens: every prompt token is ``IGNORE_INDEX`` so the loss
trains the adapter to answer, not to reproduce prompts. ``batch_order`` groups examples of
similar length into batches so that little compute goes to padding, and ``collate`` pads one
batch into tensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE_INDEX",
    "ROLES",
    "AlpacaFields",
    "DataError",
    "EncodedDataset",
    "EncodedExample",
    "Example",
    "Message",
    "alpaca_prompt",
    "batch_order",
    "collate",
    "encode_dataset",
    "encode_example",
    "has_chat_template",
    "padding_waste",
    "parse_record",
    "prompt_text",
    "read_records",
    "resolve_pad_token_id",
    "split_validation",
]

# The label value torch.nn.functional.cross_entropy ignores by default.
IGNORE_INDEX = -100

ROLES = ("system", "user", "assistant")

# Stanford Alpaca's two prompts, which the LLaMA-Adapter paper trains with, verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# How many batches' worth of examples are sorted by length together. Sorting the whole data set
# would put all long examples in a few adjacent batches (and make the batch contents the same
# every epoch); sorting within a random window of 50 batches keeps most of the padding saving
# while batches still differ from epoch to epoch.
MEGA_BATCH_FACTOR = 50

T = TypeVar("T")


class DataError(ValueError):
    """A dataset file or record that cannot be used, with where and why in the message."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        """The ``{"role", "content"}`` mapping chat templates expect."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class AlpacaFields:
    """The raw fields of an Alpaca-form record (``input`` is ``""`` when there was none)."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Example:
    """A validated training example in chat form.

    Attributes:
        messages: the conversation; it ends with an assistant message and has a user message
            before its first assistant message.
        alpaca: the original fields when the record was in Alpaca form, so that the Alpaca
            prompt (which has its own "### Input:" section) can be rebuilt exactly.
        source: where the record came from (``file:line`` or ``file, record i``), for errors.
    """

    messages: tuple[Message, ...]
    alpaca: AlpacaFields | None = None
    source: str = "<example>"

    @classmethod
    def from_alpaca(
        cls, instruction: str, output: str, input: str = "", source: str = "<example>"
    ) -> Example:
        """An example from Alpaca fields; the user turn joins instruction and input."""
        user = f"{instruction}\n\n{input}" if input != "" else instruction
        return cls(
            messages=(Message("user", user), Message("assistant", output)),
            alpaca=AlpacaFields(instruction, input, output),
            source=source,
        )


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example and its labels (``IGNORE_INDEX`` on every non-response token).

    Attributes:
        input_ids: the tokens of the rendered example, prompt and response.
        labels: ``input_ids`` where the token is part of an assistant response, else
            ``IGNORE_INDEX``; the same length as ``input_ids``. Unshifted: the model shifts.
        truncated: whether tokens were cut from the end to fit ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids and labels differ in length: {len(self.input_ids)} and "
                f"{len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_tokens(self) -> int:
        """How many tokens carry a loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class EncodedDataset:
    """The encoded examples that fit, and what happened to the rest.

    Attributes:
        examples: the kept examples, in input order.
        total: how many examples were encoded.
        truncated: how many of the kept ones lost tokens at the end to fit ``max_length``.
        dropped: how many were left out because no response token fitted in ``max_length``.
        response_tokens: how many tokens carry a loss over all kept examples.
    """

    examples: list[EncodedExample] = field(default_factory=list)
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    response_tokens: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Token count of each kept example, for ``batch_order``."""
        return [len(example) for example in self.examples]


# --- Reading and validating records ----------------------------------------------------------


def read_records(path: str | os.PathLike[str], *, progress: bool = False) -> list[Example]:
    """Read and validate a dataset file.

    The format is decided by content, not by the extension: a file whose first
    non-whitespace character is ``[`` is one JSON list of records, anything else is JSON Lines
    (one object per line, blank lines skipped).

    Args:
        path: the dataset file.
        progress: show a progress bar while validating records.

    Returns:
        The examples in file order.

    Raises:
        FileNotFoundError: no file at ``path``.
        DataError: the file is not UTF-8, a line or the list is not valid JSON, a record is
            not a valid Alpaca or chat record, or there are no records at all.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no dataset file at {name!r}")
    if not os.path.isfile(name):
        raise DataError(f"{name}: the dataset is not a regular file")
    # The whole file is read once: what it holds is never more than its size asks for.
    with open(name, "rb") as handle:
        raw = handle.read()
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) must not hide the "[".
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # err.object: the bytes after a byte-order mark, which its offsets count in.
        line = err.object.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{name}:{line}: not UTF-8 text (byte {err.object[err.start]:#04x} cannot start or "
            "continue a character)"
        ) from None
    del raw

    if text.lstrip().startswith("["):
        located = _json_list_records(text, name)
    else:
        located = _json_lines_records(text, name)
    if not located:
        raise DataError(f"{name}: the dataset is empty (no records)")
    bar = tqdm(located, desc=f"validating {os.path.basename(name)}", disable=not progress)
    examples = [parse_record(record, source) for source, record in bar]
    logger.info("read %d records from %s", len(examples), name)
    return examples


def _json_list_records(text: str, name: str) -> list[tuple[str, Any]]:
    """(source, record) pairs of a file holding one JSON list."""
    try:
        records = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{name}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg} "
            "(a file starting with '[' is read as one JSON list of records)"
        ) from err
    except (ValueError, RecursionError) as err:
        raise DataError(f"{name}: invalid JSON: {_json_problem(err)}") from None
    if not isinstance(records, list):
        raise DataError(f"{name}: expected a JSON list of records, got {type(records).__name__}")
    return [(f"{name}, record {index}", record) for index, record in enumerate(records)]


def _json_lines_records(text: str, name: str) -> list[tuple[str, Any]]:
    """(source, record) pairs of a JSON Lines file."""
    located = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters that
    # splitlines() also breaks at, and line numbers must match what an editor shows.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as err:
            hint = ""
            if line.strip() == "{":
                # A pretty-printed object spans lines, which JSON Lines does not allow.
                hint = " (JSON Lines needs one whole object per line; a JSON file must be a list)"
            raise DataError(
                f"{name}:{number}: invalid JSON at column {err.colno}: {err.msg}; "
                f"line starts {line[:60]!r}{hint}"
            ) from err
        except (ValueError, RecursionError) as err:
            raise DataError(
                f"{name}:{number}: invalid JSON: {_json_problem(err)}; line starts {line[:60]!r}"
            ) from None
        located.append((f"{name}:{number}", record))
    return located


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (Python's json module accepts them).
    raise ValueError(f"{name} is not a JSON value")


def _json_problem(err: BaseException) -> str:
    """What went wrong beyond a syntax error: too deep, a number too long, NaN."""
    if isinstance(err, RecursionError):
        return "values nested too deeply"
    return str(err)


def _shown(value: Any) -> str:
    """A value for an error message, at most a line of it; long strings and containers are
    cut before they are rendered, not after."""
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, list):
        return f"[{len(value)} item(s)]"
    if isinstance(value, dict):
        return f"{{{len(value)} key(s)}}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_record(record: Any, source: str = "<record>") -> Example:
    """Validate one decoded JSON record and normalise it to an ``Example``.

    Args:
        record: an Alpaca-form or chat-form mapping (see the module docstring). Other keys
            are ignored; ``input`` may be ``null``, meaning no input.
        source: where it came from, for error messages.

    Raises:
        DataError: not a mapping, both forms or neither, a missing field, a wrong type, an
            empty instruction or response, an unknown role, or a conversation that does not
            end with an assistant message.
    """
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
    has_chat = "messages" in record
    has_alpaca = "instruction" in record or "output" in record
    if has_chat and has_alpaca:
        raise DataError(
            f"{source}: the record has both 'messages' and Alpaca fields "
            f"({sorted(k for k in ('instruction', 'input', 'output') if k in record)}); "
            "use one form per record"
        )
    if has_chat:
        return Example(_parse_messages(record["messages"], source), None, source)
    if has_alpaca:
        return _parse_alpaca(record, source)
    raise DataError(
        f"{source}: expected an Alpaca record ('instruction', optional 'input', 'output') or a "
        f"chat record ('messages'), got keys {sorted(record)}"
    )


def _parse_alpaca(record: dict[str, Any], source: str) -> Example:
    missing = [key for key in ("instruction", "output") if key not in record]
    if missing:
        raise DataError(f"{source}: Alpaca record is missing {' and '.join(map(repr, missing))}")
    instruction, output = record["instruction"], record["output"]
    input_ = "" if record.get("input") is None else record["input"]
    for key, value in (("instruction", instruction), ("input", input_), ("output", output)):
        if not isinstance(value, str):
            raise DataError(
                f"{source}: '{key}' must be a string, got {type(value).__name__} {_shown(value)}"
            )
    for key, value in (("instruction", instruction), ("output", output)):
        if not value.strip():
            # An empty output would train the model to stop at once; an empty instruction
            # leaves nothing to respond to. Both are data bugs, not examples.
            raise DataError(f"{source}: '{key}' is empty")
    return Example.from_alpaca(instruction, output, input_, source)


def _parse_messages(messages: Any, source: str) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{source}: 'messages' must be a non-empty list of {{role, content}} objects, got "
            f"{_shown(messages)}"
        )
    parsed = []
    for index, message in enumerate(messages):
        where = f"{source}: messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object, got {type(message).__name__}")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise DataError(f"{where} is missing {' and '.join(map(repr, missing))}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{where}: role {_shown(role)} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: 'content' must be a string, got {type(content).__name__} "
                f"{_shown(content)}"
            )
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: assistant content is empty")
        parsed.append(Message(role, content))
    if parsed[-1].role != "assistant":
        raise DataError(
            f"{source}: the last message must be an assistant message (the response to train "
            f"on), got role {parsed[-1].role!r}"
        )
    first_assistant = next(i for i, m in enumerate(parsed) if m.role == "assistant")
    if not any(m.role == "user" for m in parsed[:first_assistant]):
        raise DataError(
            f"{source}: messages[{first_assistant}] is an assistant message with no user "
            "message before it"
        )
    return tuple(parsed)


def split_validation(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split examples at random into a training and a validation part.

    The validation part holds ``round(len(examples) * fraction)`` examples, at least one.
    Each part keeps the input order; the same ``seed`` always gives the same split.

    Raises:
        ValueError: ``fraction`` is not strictly between 0 and 1.
        DataError: too few examples to leave one in each part.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    count = len(examples)
    n_val = max(1, round(count * fraction))
    if count - n_val < 1:
        raise DataError(
            f"cannot split {count} example(s) with validation fraction {fraction}: both the "
            "training and the validation part need at least one example"
        )
    indices = list(range(count))
    random.Random(seed).shuffle(indices)
    val_indices = set(indices[:n_val])
    train = [example for i, example in enumerate(examples) if i not in val_indices]
    val = [example for i, example in enumerate(examples) if i in val_indices]
    return train, val


# --- Prompts -----------------------------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (then it renders the prompts)."""
    return bool(getattr(tokenizer, "chat_template", None))


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction: the "### Input:" variant when input is not ""."""
    if input != "":
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def prompt_text(tokenizer: Any, user_text: str) -> str:
    """The generation prompt for one user message, as training renders it.

    With a chat template this is the template's rendering of the message plus the
    generation prompt; without one it is the Alpaca prompt (no input), preceded by the bos
    token when the tokenizer adds one by default (LLaMA), as in training. Tokenize the result
    with ``add_special_tokens=False``.
    """
    if has_chat_template(tokenizer):
        return _render_chat(tokenizer, (Message("user", user_text),), True, "<prompt>")
    return _bos_text(tokenizer) + alpaca_prompt(user_text)


def _render_chat(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool, source: str
) -> str:
    """The chat template's text for ``messages``; template errors become ``DataError``."""
    try:
        text = tokenizer.apply_chat_template(
            [message.as_dict() for message in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as err:
        # Templates reject conversations with raise_exception (e.g. "System role not
        # supported"); the user needs to know which record it was.
        raise DataError(
            f"{source}: the tokenizer's chat template cannot render this conversation: {err}"
        ) from err
    if not isinstance(text, str):
        raise TypeError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str"
        )
    return text


def _bos_text(tokenizer: Any) -> str:
    """The bos token's text if the tokenizer puts it first by default, else "".

    LLaMA-family tokenizers add bos when called with ``add_special_tokens=True``; the models
    were trained with it and behave worse without it. Prompts here are tokenized with
    ``add_special_tokens=False`` (chat templates write their own bos), so the Alpaca path
    writes bos into the text itself, where training and ``prompt_text`` both put it.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos = getattr(tokenizer, "bos_token", None)
    if bos_id is None or not bos:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


def _alpaca_fields(example: Example) -> AlpacaFields:
    """The Alpaca fields of an example, from a single-turn conversation if it was chat form."""
    if example.alpaca is not None:
        return example.alpaca
    roles = [message.role for message in example.messages]
    if roles != ["user", "assistant"]:
        raise DataError(
            f"{example.source}: the tokenizer has no chat template, so examples are rendered "
            "with the Alpaca prompt, which holds one instruction and one response; this "
            f"conversation has roles {roles}. Use a tokenizer with a chat template for "
            "system messages and multi-turn conversations."
        )
    return AlpacaFields(example.messages[0].content, "", example.messages[1].content)


# --- Tokenizing --------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_turn(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of the response that follows it.

    The prompt is tokenized on its own, exactly as generation will see it. The response is
    taken from the joint tokenization when that starts with the prompt's tokens: a
    SentencePiece tokenizer turns a separately tokenized "Hello" into "▁Hello", whereas after
    "### Response:\\n" the model should learn the "Hello" it would meet in running text. When
    a token merges across the boundary, the joint form cannot be split, and the response is
    tokenized on its own.
    """
    prompt_ids = _encode(tokenizer, prompt)
    joint = _encode(tokenizer, prompt + response)
    if joint[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint[len(prompt_ids) :]
    return prompt_ids, _encode(tokenizer, response)


def _divergence(expected_prefix: str, text: str) -> str:
    """Where ``text`` stops extending ``expected_prefix``, for error messages."""
    at = next(
        (i for i, (a, b) in enumerate(zip(expected_prefix, text, strict=False)) if a != b),
        min(len(expected_prefix), len(text)),
    )
    return (
        f"they differ at character {at}: {expected_prefix[at : at + 40]!r} versus "
        f"{text[at : at + 40]!r}"
    )


def _chat_segments(tokenizer: Any, example: Example) -> list[tuple[str, str]]:
    """(prompt text, response text) pairs, one per assistant turn, that concatenate to the
    rendering of the whole conversation.

    For assistant message i the prompt part is the rendering of messages[:i] with the
    generation prompt, less what earlier pairs cover; the response is what rendering
    messages[:i + 1] adds to that (the template's end-of-turn text included, so the model
    learns to stop).
    """
    messages = example.messages
    segments: list[tuple[str, str]] = []
    covered = ""  # the rendering of the conversation up to the previous assistant turn
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = _render_chat(tokenizer, messages[:i], True, example.source)
        full = _render_chat(tokenizer, messages[: i + 1], False, example.source)
        if not prompt.startswith(covered):
            raise DataError(
                f"{example.source}: the chat template is not prefix-stable: rendering "
                f"messages[:{i}] does not start with the rendering of the conversation up to "
                f"the previous assistant turn ({_divergence(covered, prompt)}), so the earlier "
                "responses cannot be located in it"
            )
        if not full.startswith(prompt):
            raise DataError(
                f"{example.source}: the chat template is not prefix-stable: rendering "
                f"messages[:{i + 1}] does not start with the rendering of messages[:{i}] plus "
                f"the generation prompt ({_divergence(prompt, full)}), so the response of "
                f"messages[{i}] cannot be separated from its prompt"
            )
        if len(full) == len(prompt):
            raise DataError(
                f"{example.source}: the chat template renders messages[{i}] (assistant) as "
                "nothing, so there is no response to train on"
            )
        segments.append((prompt[len(covered) :], full[len(prompt) :]))
        covered = full
    return segments


def example_prompt(tokenizer: Any, example: Example) -> tuple[str, str]:
    """(prompt, reference answer) for generating an example's last assistant turn.

    The prompt is rendered exactly as training renders it (chat template with the
    generation prompt, or the Alpaca template); tokenize it with
    ``add_special_tokens=False``. The reference is the last assistant message's content.
    """
    if has_chat_template(tokenizer):
        last = max(i for i, m in enumerate(example.messages) if m.role == "assistant")
        prompt = _render_chat(tokenizer, example.messages[:last], True, example.source)
        return prompt, example.messages[last].content
    fields = _alpaca_fields(example)
    return _bos_text(tokenizer) + alpaca_prompt(fields.instruction, fields.input), fields.output


def encode_example(example: Example, tokenizer: Any, max_length: int) -> EncodedExample | None:
    """Tokenize an example and label its response tokens.

    With a chat template, every assistant turn is a response (the template's end-of-turn
    token included); everything else, system and user turns and the template's own text, is
    labelled ``IGNORE_INDEX``. Without a template the Alpaca prompt is the prompt and the
    output followed by the eos token is the response.

    Args:
        example: a validated example.
        tokenizer: a Hugging Face tokenizer.
        max_length: the most tokens an example may have.

    Returns:
        The encoded example, cut from the right to ``max_length`` tokens if longer, or
        ``None`` when no response token would survive the cut.

    Raises:
        ValueError: ``max_length`` is not positive.
        DataError: a conversation the tokenizer cannot render (see ``_chat_segments``), a
            multi-turn or system conversation without a chat template, or no eos token
            for the Alpaca template.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    input_ids: list[int] = []
    labels: list[int] = []
    if has_chat_template(tokenizer):
        for prompt, response in _chat_segments(tokenizer, example):
            prompt_ids, response_ids = _encode_turn(tokenizer, prompt, response)
            input_ids += prompt_ids + response_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + response_ids
    else:
        fields = _alpaca_fields(example)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise DataError(
                "the tokenizer has neither a chat template nor an eos token: the Alpaca "
                "template ends each response with eos, without which the model cannot learn "
                "to stop"
            )
        prompt = _bos_text(tokenizer) + alpaca_prompt(fields.instruction, fields.input)
        prompt_ids, response_ids = _encode_turn(tokenizer, prompt, fields.output)
        response_ids = [*response_ids, eos_id]
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids

    if len(input_ids) <= max_length:
        return EncodedExample(input_ids, labels, truncated=False)
    labels = labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedExample(input_ids[:max_length], labels, truncated=True)


def encode_dataset(
    examples: Iterable[Example], tokenizer: Any, max_length: int, *, progress: bool = False
) -> EncodedDataset:
    """Encode examples with ``encode_example``, counting the truncated and dropped ones.

    Raises:
        DataError: there are no examples, or every one is too long to keep a response token.
    """
    examples = list(examples)
    result = EncodedDataset(total=len(examples))
    if not examples:
        raise DataError("no examples to encode")
    for example in tqdm(examples, desc="tokenizing", disable=not progress):
        encoded = encode_example(example, tokenizer, max_length)
        if encoded is None:
            result.dropped += 1
            logger.debug("%s: dropped, its prompt fills max_length=%d", example.source, max_length)
            continue
        result.examples.append(encoded)
        result.truncated += encoded.truncated
        result.response_tokens += encoded.response_tokens
    if not result.examples:
        raise DataError(
            f"all {result.total} examples are longer than max_length={max_length} tokens "
            "before their response starts, so none has a token to train on; raise max_length"
        )
    if result.dropped or result.truncated:
        logger.warning(
            "max_length=%d: %d of %d examples dropped (prompt too long), %d truncated",
            max_length,
            result.dropped,
            result.total,
            result.truncated,
        )
    logger.info(
        "encoded %d examples, %d response tokens", len(result.examples), result.response_tokens
    )
    return result


# --- Batching ----------------------------------------------------------------------------------


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices, grouped by length, in a random order.

    All indices are shuffled, cut into mega-batches of ``batch_size * 50``, each mega-batch
    is sorted by length (longest first) and chunked into batches, and the order of all
    batches is shuffled. Every index appears exactly once; only the very last chunk can be
    short, and it is kept. The result depends only on ``(lengths, batch_size, seed, epoch)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # A string seed is hashed with SHA-512 by random.Random: the same on every platform and
    # Python version, and (seed, epoch) pairs cannot collide as seed * k + epoch could.
    rng = random.Random(f"adaption-fx batch_order {seed} {epoch}")
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    mega = batch_size * MEGA_BATCH_FACTOR
    batches: list[list[int]] = []
    for start in range(0, len(indices), mega):
        # sorted() is stable, so ties keep their shuffled order.
        window = sorted(indices[start : start + mega], key=lambda i: -lengths[i])
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The fraction of token positions that are padding when each batch is padded to its
    longest example (0 for no tokens)."""
    padded = sum(max((lengths[i] for i in batch), default=0) * len(batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 0.0 if padded == 0 else 1.0 - real / padded


def collate(encoded: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` (int64).

    Padding positions get ``pad_token_id``, attention 0 and label ``IGNORE_INDEX``.
    """
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example) for example in encoded)
    shape = (len(encoded), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    for row, example in enumerate(encoded):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.int64)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token's, else eos's (many causal LMs have no pad token;
    padded positions are masked and unlabelled, so the choice does not affect training),
    else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
