"""adaption_fx.training.data: reading records, prompts, response-only labels, batching,
collation."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from tokenizers_for_tests import CHATML_TEMPLATE, make_tokenizer

from adaption_fx.training.data import (
    IGNORE_INDEX,
    AlpacaFields,
    DataError,
    EncodedExample,
    Example,
    Message,
    batch_order,
    collate,
    encode_dataset,
    encode_example,
    has_chat_template,
    padding_waste,
    parse_record,
    prompt_text,
    read_records,
    resolve_pad_token_id,
    split_validation,
)

# The two Stanford Alpaca prompts, written out here rather than imported, so that the test
# pins the text itself.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd two numbers\n\n### Input:\n1 2\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def plain():
    return make_tokenizer(None, chat=False)


@pytest.fixture(scope="module")
def chat():
    return make_tokenizer(None, chat=True)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled_runs(tokenizer, encoded):
    """The decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- Prompts and labels ------------------------------------------------------------------------


def test_alpaca_prompt_text_is_the_paper_template(plain, chat):
    assert not has_chat_template(plain) and has_chat_template(chat)
    assert prompt_text(plain, "Say hi") == ALPACA_NO_INPUT
    chatml = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text(chat, "Say hi") == chatml


@pytest.mark.parametrize(
    ("record", "prompt"),
    [
        ({"instruction": "Add two numbers", "input": "1 2", "output": "the sum is 3"}, None),
        ({"instruction": "Say hi", "input": "", "output": "Hello there"}, ALPACA_NO_INPUT),
        ({"instruction": "Say hi", "output": "Hello there"}, ALPACA_NO_INPUT),
        ({"instruction": "Say hi", "input": None, "output": "Hello there"}, ALPACA_NO_INPUT),
    ],
)
def test_alpaca_labels_only_the_output_and_eos(plain, record, prompt):
    prompt = ALPACA_WITH_INPUT if prompt is None else prompt
    encoded = encode_example(parse_record(record), plain, 512)
    prompt_ids = ids(plain, prompt)
    n = len(prompt_ids)
    assert encoded.input_ids[:n] == prompt_ids
    assert encoded.labels[:n] == [IGNORE_INDEX] * n
    assert encoded.labels[n:] == encoded.input_ids[n:]
    assert encoded.input_ids[-1] == plain.eos_token_id
    assert labelled_runs(plain, encoded) == [record["output"] + "</s>"]
    assert plain.decode(encoded.input_ids) == prompt + record["output"] + "</s>"
    assert not encoded.truncated and encoded.response_tokens == len(encoded) - n


def test_alpaca_record_keeps_its_fields_and_joins_input_for_chat(chat):
    example = parse_record({"instruction": "Add two numbers", "input": "1 2", "output": "3"})
    assert example.alpaca == AlpacaFields("Add two numbers", "1 2", "3")
    assert example.messages == (
        Message("user", "Add two numbers\n\n1 2"),
        Message("assistant", "3"),
    )
    encoded = encode_example(example, chat, 512)
    prompt = "<|im_start|>user\nAdd two numbers\n\n1 2<|im_end|>\n<|im_start|>assistant\n"
    assert chat.decode(encoded.input_ids) == prompt + "3<|im_end|>\n"
    assert encoded.labels[: len(ids(chat, prompt))] == [IGNORE_INDEX] * len(ids(chat, prompt))
    assert labelled_runs(chat, encoded) == ["3<|im_end|>\n"]


def test_chat_labels_every_assistant_turn_and_nothing_else(chat):
    example = parse_record(
        {
            "messages": [
                {"role": "system", "content": "You are a helpful bot."},
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Say bye"},
                {"role": "assistant", "content": "bye"},
            ],
            "id": "extra keys are ignored",
        }
    )
    encoded = encode_example(example, chat, 512)
    text = (
        "<|im_start|>system\nYou are a helpful bot.<|im_end|>\n"
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
        "Hello there<|im_end|>\n"
        "<|im_start|>user\nSay bye<|im_end|>\n<|im_start|>assistant\n"
        "bye<|im_end|>\n"
    )
    assert chat.decode(encoded.input_ids) == text
    assert labelled_runs(chat, encoded) == ["Hello there<|im_end|>\n", "bye<|im_end|>\n"]
    unlabelled = [t for t, y in zip(encoded.input_ids, encoded.labels, strict=True) if y < 0]
    assert chat.decode(unlabelled) == (
        "<|im_start|>system\nYou are a helpful bot.<|im_end|>\n"
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nSay bye<|im_end|>\n<|im_start|>assistant\n"
    )
    # The first prompt is tokenized on its own, as generation sees it.
    first_prompt = prompt_text(chat, "Say hi").replace(
        "<|im_start|>user", "<|im_start|>system\nYou are a helpful bot.<|im_end|>\n<|im_start|>user"
    )
    assert encoded.input_ids[: len(ids(chat, first_prompt))] == ids(chat, first_prompt)


def test_saved_tokenizer_encodes_the_same(tmp_path, chat):
    reloaded = make_tokenizer(tmp_path / "tok", chat=True)
    example = parse_record({"instruction": "Say hi", "output": "Hello there"})
    assert encode_example(example, reloaded, 64) == encode_example(example, chat, 64)


def test_bos_is_written_into_the_alpaca_prompt_when_the_tokenizer_adds_one():
    tokenizer = make_tokenizer(None, chat=False, bos=True)
    assert prompt_text(tokenizer, "Say hi") == "<s>" + ALPACA_NO_INPUT
    encoded = encode_example(parse_record({"instruction": "Say hi", "output": "hi"}), tokenizer, 99)
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1
    assert labelled_runs(tokenizer, encoded) == ["hi</s>"]


def test_chat_records_without_a_template(plain):
    single = parse_record(
        {
            "messages": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi"},
            ]
        }
    )
    assert plain.decode(encode_example(single, plain, 512).input_ids) == ALPACA_NO_INPUT + "hi</s>"
    multi = parse_record(
        {
            "messages": [
                {"role": "system", "content": "You are a helpful bot."},
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi"},
            ]
        },
        source="data.jsonl:7",
    )
    with pytest.raises(DataError, match=r"data.jsonl:7: the tokenizer has no chat template.*"):
        encode_example(multi, plain, 512)


def test_template_that_is_not_prefix_stable_is_refused():
    tokenizer = make_tokenizer(None, chat=True)
    # The generation prompt says "assistant" but the rendered turn says "bot".
    tokenizer.chat_template = CHATML_TEMPLATE.replace(
        "{{ message['role'] }}",
        "{{ 'bot' if message['role'] == 'assistant' else message['role'] }}",
    )
    example = Example.from_alpaca("Say hi", "hi", source="x.jsonl:2")
    with pytest.raises(DataError, match=r"x.jsonl:2: the chat template is not prefix-stable"):
        encode_example(example, tokenizer, 512)


def test_template_errors_name_the_record():
    tokenizer = make_tokenizer(None, chat=True)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML_TEMPLATE
    )
    example = Example(
        (Message("system", "x"), Message("user", "hi"), Message("assistant", "hi")),
        source="x.jsonl:5",
    )
    with pytest.raises(DataError, match=r"x.jsonl:5: .*cannot render.*System role not supported"):
        encode_example(example, tokenizer, 512)


# --- Truncation and dropping -------------------------------------------------------------------


def test_truncation_keeps_a_response_token_or_drops(plain):
    example = parse_record({"instruction": "Say hi", "output": "hello there again"})
    full = encode_example(example, plain, 10_000)
    n_prompt = len(ids(plain, ALPACA_NO_INPUT))

    cut = encode_example(example, plain, n_prompt + 1)
    assert cut.truncated and len(cut) == n_prompt + 1
    assert cut.input_ids == full.input_ids[: n_prompt + 1]
    assert labelled_runs(plain, cut) == ["hello"]

    exact = encode_example(example, plain, len(full))
    assert exact == full and not exact.truncated
    assert encode_example(example, plain, n_prompt) is None


def test_encode_dataset_counts(plain):
    short = parse_record({"instruction": "Say hi", "output": "hi"})
    longer = parse_record({"instruction": "Say hi", "output": "hello there again and bye"})
    long_prompt = parse_record({"instruction": "Say hi " * 20, "output": "hi"})
    n_short = len(encode_example(short, plain, 10_000))
    dataset = encode_dataset([short, longer, long_prompt, short], plain, n_short)
    assert (dataset.total, dataset.truncated, dataset.dropped) == (4, 1, 1)
    assert len(dataset) == 3 and dataset.lengths == [n_short] * 3
    assert dataset.response_tokens == sum(e.response_tokens for e in dataset.examples)
    # The truncated one keeps as many tokens as the short ones: its prompt is as long.
    assert dataset.response_tokens == 3 * len(ids(plain, "hi</s>"))


def test_encode_dataset_refuses_when_everything_is_too_long(plain):
    example = parse_record({"instruction": "Say hi", "output": "hi"})
    with pytest.raises(DataError, match=r"all 2 examples are longer than max_length=5 tokens"):
        encode_dataset([example, example], plain, 5)
    with pytest.raises(DataError, match="no examples"):
        encode_dataset([], plain, 5)
    with pytest.raises(ValueError, match="max_length must be positive"):
        encode_example(example, plain, 0)


# --- Reading files -----------------------------------------------------------------------------


def test_read_json_lines_and_json_list(tmp_path):
    alpaca = {"instruction": "Say hi", "output": "hi"}
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    lines = write(tmp_path, "d.jsonl", f"{json.dumps(alpaca)}\n\n  \n{json.dumps(chat)}\n")
    # The content decides the format: this list has a .jsonl name and leading whitespace.
    listed = write(tmp_path, "list.jsonl", "\n  " + json.dumps([alpaca, chat], indent=2))
    for path in (lines, listed):
        examples = read_records(path)
        assert [e.alpaca for e in examples] == [AlpacaFields("Say hi", "", "hi"), None]
        assert examples[1].messages == (Message("user", "a"), Message("assistant", "b"))
    assert [e.source for e in read_records(lines)] == [f"{lines}:1", f"{lines}:4"]
    assert read_records(listed)[1].source == f"{listed}, record 1"


def test_read_json_lines_with_crlf_and_line_separators_in_strings(tmp_path):
    # U+2028 inside a string is valid JSON and must not split the line.
    record = {"instruction": "a\u2028b", "output": "c"}
    line = json.dumps(record, ensure_ascii=False)
    path = write(tmp_path, "crlf.jsonl", "")
    path.write_bytes(("\r\n".join([line, "", line]) + "\r\n").encode())
    examples = read_records(path)
    assert [e.alpaca for e in examples] == [AlpacaFields("a\u2028b", "", "c")] * 2
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]


def test_read_errors(tmp_path):
    good = json.dumps({"instruction": "Say hi", "output": "hi"})
    bad = write(tmp_path, "bad.jsonl", f"{good}\n\n{{'instruction': 1}}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_records(bad)
    pretty = write(tmp_path, "pretty.json", json.dumps(json.loads(good), indent=2))
    with pytest.raises(DataError, match=r"pretty\.json:1: invalid JSON.*must be a list"):
        read_records(pretty)
    broken_list = write(tmp_path, "broken.json", "[\n" + good + ",\n" + good + ",\n]\n")
    with pytest.raises(DataError, match=r"broken\.json:4: invalid JSON"):
        read_records(broken_list)
    with pytest.raises(FileNotFoundError, match=r"nothing\.jsonl"):
        read_records(tmp_path / "nothing.jsonl")
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("none.json", "[]")]:
        with pytest.raises(DataError, match=rf"{name}: the dataset is empty"):
            read_records(write(tmp_path, name, text))
    missing = write(tmp_path, "missing.jsonl", good + '\n{"instruction": "Say hi"}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:2: Alpaca record is missing 'output'"):
        read_records(missing)
    in_list = write(tmp_path, "l.json", json.dumps([json.loads(good), {"messages": []}]))
    with pytest.raises(DataError, match=r"l\.json, record 1: 'messages' must be a non-empty list"):
        read_records(in_list)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "expected a JSON object, got list"),
        (
            {"prompt": "x", "completion": "y"},
            r"expected an Alpaca record .* got keys \['completion'",
        ),
        ({"output": "y"}, "missing 'instruction'"),
        ({"instruction": "x", "output": 3}, "'output' must be a string, got int 3"),
        ({"instruction": "x", "input": ["y"], "output": "z"}, "'input' must be a string, got list"),
        ({"instruction": " ", "output": "z"}, "'instruction' is empty"),
        ({"instruction": "x", "output": "z", "messages": []}, "both 'messages' and Alpaca fields"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, r"messages\[0\] must be an object, got str"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] is missing 'content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot' is not one of system, user"),
        ({"messages": [{"role": "user", "content": 1}]}, "'content' must be a string, got int 1"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be an assistant"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "no user message before it"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
            r"messages\[1\]: assistant content is empty",
        ),
    ],
)
def test_invalid_records(record, message):
    with pytest.raises(DataError, match=r"f\.jsonl:9: .*" + message):
        parse_record(record, "f.jsonl:9")


# --- Splitting, batching, collation ------------------------------------------------------------


def test_split_validation():
    items = list(range(20))
    train, val = split_validation(items, 0.25, seed=3)
    assert len(val) == 5 and sorted(train + val) == items
    assert train == sorted(train) and val == sorted(val)  # each part keeps the input order
    assert split_validation(items, 0.25, seed=3) == (train, val)
    assert split_validation(items, 0.25, seed=4) != (train, val)
    assert len(split_validation(items, 0.01, seed=0)[1]) == 1  # never an empty validation part
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            split_validation(items, fraction, seed=0)
    with pytest.raises(DataError, match="cannot split 1 example"):
        split_validation([0], 0.5, seed=0)
    with pytest.raises(DataError, match="cannot split 2 example"):
        split_validation([0, 1], 0.9, seed=0)


def skewed_lengths(count, seed=0):
    """Mostly short examples and a long tail, as instruction data sets are."""
    rng = random.Random(seed)
    return [int(rng.lognormvariate(4.0, 0.9)) + 1 for _ in range(count)]


def test_batch_order_is_a_deterministic_length_grouped_permutation():
    lengths = skewed_lengths(1013)
    batches = batch_order(lengths, 8, seed=0, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(1013))
    assert sorted(len(b) for b in batches) == [1013 % 8] + [8] * (1013 // 8)
    assert all(
        [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches
    )
    assert batch_order(lengths, 8, seed=0, epoch=0) == batches
    assert batch_order(lengths, 8, seed=0, epoch=1) != batches
    assert batch_order(lengths, 8, seed=1, epoch=0) != batches

    rng = random.Random(0)
    shuffled = list(range(1013))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + 8] for i in range(0, 1013, 8)]
    grouped, unordered = padding_waste(lengths, batches), padding_waste(lengths, random_batches)
    assert grouped < 0.25 * unordered, (grouped, unordered)


def test_batch_order_edges():
    assert batch_order([], 4, seed=0, epoch=0) == []
    assert batch_order([5, 3, 9], 4, seed=0, epoch=0) == [[2, 0, 1]]
    with pytest.raises(ValueError, match="batch_size must be positive"):
        batch_order([1], 0, seed=0, epoch=0)
    assert padding_waste([2, 4], [[0, 1]]) == 0.25
    assert padding_waste([], []) == 0.0


def test_collate_right_pads():
    batch = collate(
        [
            EncodedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]),
            EncodedExample([8], [8], truncated=True),
        ],
        pad_token_id=0,
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 0)
    with pytest.raises(ValueError, match="differ in length"):
        EncodedExample([1, 2], [1])


def test_collate_encoded_dataset(chat):
    examples = [
        parse_record({"instruction": "Say hi", "output": "hi"}),
        parse_record({"instruction": "Say hi", "output": "hello there again"}),
    ]
    dataset = encode_dataset(examples, chat, 512)
    batch = collate(dataset.examples, resolve_pad_token_id(chat))
    assert batch["attention_mask"].sum(1).tolist() == dataset.lengths
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == dataset.response_tokens


def test_resolve_pad_token_id(plain):
    assert resolve_pad_token_id(plain) == plain.pad_token_id
    assert resolve_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert resolve_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert resolve_pad_token_id(SimpleNamespace()) == 0
