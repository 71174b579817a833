"""The OpenAI-compatible server (adaption-fx serve), driven with the official openai client.

A tiny chat Llama with four adapters is served from one mixed-batch ONNX file, in this
process (uvicorn in a thread) so that a fault can be injected; SIGTERM runs against the
real command in a subprocess. Every greedy answer is compared with offline
``OrtModel.generate`` of the same file with that adapter, one request at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import randomize_adapter, tiny_llama
from tokenizers_for_tests import CHATML_TEMPLATE

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import Running, free_port  # noqa: E402

from adaption_fx.config import AdaptionConfig  # noqa: E402
from adaption_fx.export import OrtModel  # noqa: E402
from adaption_fx.rewrite import rewrite  # noqa: E402
from adaption_fx.serving import ServeConfig  # noqa: E402

KEY = "test-key"
ADAPTERS = ("alpha", "beta", "gamma", "delta")
SIZES = {"alpha": (4, 2), "beta": (3, 2), "gamma": (4, 1), "delta": (2, 2)}
BASE = "tiny"
WORDS = ["hello there friend", "Say hi again", "what is the answer"]


def bpe_chat_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (every string has tokens, as stop strings need) with the
    ChatML template, saved to ``directory`` and loaded back as the server loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    special = ["<pad>", "</s>", "<s>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    raw.train_from_iterator([*WORDS, "user assistant system", "the cat sat on the mat"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model directory, an adapter root with five adapters (four served at start-up,
    one for hot loading) and the exported file."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = bpe_chat_tokenizer(root / "model")
    hf = tiny_llama(
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    hf.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Random weights pick byte tokens that decode to no text; keep the answers readable
    # (zero logits for every token but printable ASCII ones and the end of turn).
    with torch.no_grad():
        for token in range(len(tokenizer)):
            piece = tokenizer.decode([token])
            readable = piece.isascii() and piece.isprintable() and piece.strip()
            if not readable and token != hf.generation_config.eos_token_id:
                hf.lm_head.weight[token] = 0.0
    hf.save_pretrained(root / "model")
    model = rewrite(hf, None)
    adapter_root = root / "adapters"
    for seed, name in enumerate((*ADAPTERS, "late"), start=1):
        length, layers = SIZES.get(name, (3, 2))
        model.add_adapter(name, AdaptionConfig(adapter_len=length, adapter_layers=layers))
        model.set_adapter(name)
        randomize_adapter(model, seed=seed, gate_scale=2.0)
        model.save_adapter(adapter_root / name, name)
    return root, adapter_root


def serve_config(root: Path, adapter_root: Path, **overrides) -> ServeConfig:
    settings = dict(
        model=str(root / "model"),
        adapters={name: str(adapter_root / name) for name in ADAPTERS},
        allow_adapter_loading=True,
        adapter_root=str(adapter_root),
        api_key=KEY,
        served_model_name=BASE,
        max_model_len=64,
        max_adapter_len=4,
        adapter_layers=2,
    )
    settings.update(overrides)
    return ServeConfig(**settings)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ADAPTION_FX_CACHE_DIR")
    os.environ["ADAPTION_FX_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["ADAPTION_FX_CACHE_DIR"]
    else:
        os.environ["ADAPTION_FX_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def server(files, cache_dir):
    root, adapter_root = files
    running = Running(serve_config(root, adapter_root))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def onnx_file(server, cache_dir):
    (path,) = (p for p in (cache_dir / "serve").glob("*.onnx") if ".adapter." not in p.name)
    return path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(files, onnx_file):
    """Greedy answers of the exported file, one request at a time with OrtModel.generate."""
    root, adapter_root = files
    ort_model = OrtModel(onnx_file)
    for name in (*ADAPTERS, "late"):
        ort_model.set_adapter_weights(adapter_root / name, adapter_name=name)
    tokenizer = bpe_chat_tokenizer(root / "offline-tokenizer")

    def answer(prompt_ids: list[int], adapter: str, max_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = ort_model.generate(
            ids, adapter_names=[adapter], max_new_tokens=max_tokens, do_sample=False
        )
        return out[0, ids.shape[1] :].tolist()

    answer.tokenizer = tokenizer
    return answer


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- the API
def test_models_lists_the_base_model_and_every_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [BASE, *ADAPTERS]


def test_chat_completion_equals_offline_generate(client, offline):
    prompt = "hello there friend"
    reply = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
    )
    ids = chat_ids(offline.tokenizer, prompt)
    expected = offline(ids, "beta", 12)
    assert reply.choices[0].message.content == text_of(offline.tokenizer, expected)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == len(ids) + len(expected)
    assert reply.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    assert reply.object == "chat.completion" and reply.model == "beta"


def test_completion_and_streaming_give_the_same_text(client, offline):
    prompt = "Say hi again"
    whole = client.completions.create(model="gamma", prompt=prompt, max_tokens=10, temperature=0)
    ids = offline.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert whole.choices[0].text == text_of(offline.tokenizer, offline(ids, "gamma", 10))
    assert whole.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(
            model="gamma", prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        whole.choices[0].finish_reason
    )
    chat = list(
        client.chat.completions.create(
            model=BASE,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=10,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    expected = offline(chat_ids(offline.tokenizer, prompt), "__base__", 10)
    assert text == text_of(offline.tokenizer, expected)
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage.completion_tokens == len(expected)


def test_echo_puts_the_prompt_first(client):
    plain = client.completions.create(model="alpha", prompt="hello", max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model="alpha", prompt="hello", max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "hello" + plain.choices[0].text
    chunks = client.completions.create(
        model="alpha", prompt="hello", max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_raw_stream_is_openai_server_sent_events(server):
    body = {"model": "alpha", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_stop_strings_end_the_text_before_them(client, offline):
    prompt = "what is the answer"
    tok = offline.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    tokens = offline(ids, "delta", 16)
    text = text_of(tok, tokens)
    # A stop string: a later generated token's (ASCII) text that does not occur before it.
    stop = start = None
    for k in range(1, len(tokens)):
        piece = tok.decode(tokens[k : k + 1]).strip()
        before = text_of(tok, tokens[:k])
        if piece.isascii() and piece.isalnum() and piece not in before:
            stop, start = piece, before.__len__() + text_of(tok, tokens[k:]).index(piece)
            break
    assert stop is not None, [tok.decode([t]) for t in tokens]
    for stream in (False, True):
        reply = client.completions.create(
            model="delta",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stop=[stop, "never appears"],
            stream=stream,
        )
        if stream:
            chunks = list(reply)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            got, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert got == text[:start]
        assert reason == "stop"


def test_sampling_with_a_seed_repeats_and_n_gives_choices(client):
    def ask(seed):
        return client.completions.create(
            model="alpha", prompt="hello", max_tokens=8, temperature=1.0, top_p=0.9,
            seed=seed, n=3,
        )  # fmt: skip

    first, again = ask(7), ask(7)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert (
        first.usage.completion_tokens
        == sum(len(c.text) > 0 or c.finish_reason == "stop" for c in first.choices)
        or first.usage.completion_tokens >= 3
    )


def test_concurrent_requests_over_four_adapters_and_the_base(client, offline):
    """Rows of five models share decode steps; each answer equals offline generate."""
    jobs = []
    for i in range(15):
        model = [BASE, *ADAPTERS][i % 5]
        prompt = WORDS[i % 3]
        jobs.append((model, prompt, 6 + (i % 4) * 3))

    def run(job):
        model, prompt, tokens = job
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=tokens,
            temperature=0,
        )

    with concurrent.futures.ThreadPoolExecutor(15) as pool:
        replies = list(pool.map(run, jobs))
    for (model, prompt, tokens), reply in zip(jobs, replies, strict=True):
        adapter = "__base__" if model == BASE else model
        expected = offline(chat_ids(offline.tokenizer, prompt), adapter, tokens)
        assert reply.choices[0].message.content == text_of(offline.tokenizer, expected), model
        assert reply.usage.completion_tokens == len(expected)


def test_steps_are_shared(server, client):
    """Continuous batching: concurrent requests take fewer steps than one at a time."""
    before = server.state.scheduler.steps

    def run(i):
        return client.completions.create(
            model=ADAPTERS[i % 4], prompt="hello", max_tokens=12, temperature=0
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(run, range(8)))
    steps = server.state.scheduler.steps - before
    generated = sum(r.usage.completion_tokens for r in replies)
    assert steps < generated - 8  # one at a time: a step per token after each prefill


def test_hot_load_and_unload_during_traffic(server, client, offline):
    stop = threading.Event()
    failures: list[Exception] = []

    def traffic():
        while not stop.is_set():
            try:
                client.completions.create(model="alpha", prompt="hello", max_tokens=6)
            except Exception as exc:
                failures.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        loaded = httpx.post(
            f"{server.url}/v1/adapters", json={"name": "late", "path": "late"}, headers=auth
        )
        assert loaded.status_code == 200, loaded.text
        assert "late" in [m.id for m in client.models.list().data]
        reply = client.completions.create(
            model="late", prompt="hello there", max_tokens=8, temperature=0
        )
        ids = offline.tokenizer("hello there", add_special_tokens=False)["input_ids"]
        assert reply.choices[0].text == text_of(offline.tokenizer, offline(ids, "late", 8))
        # Unload while a request of it streams: the request finishes, then it is gone.
        stream = client.completions.create(
            model="late", prompt="hello there", max_tokens=20, temperature=0, stream=True
        )
        first = next(iter(stream))
        deleted = httpx.delete(f"{server.url}/v1/adapters/late", headers=auth)
        assert deleted.status_code == 200, deleted.text
        rest = list(stream)
        assert rest[-1].usage is not None and first is not None
        assert "late" not in [m.id for m in client.models.list().data]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="late", prompt="hello", max_tokens=2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []


# ----------------------------------------------------------------------------- errors
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": BASE, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": BASE, "prompt": "hi", "temperature": 3}, "temperature"),
        ({"model": BASE, "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": BASE, "prompt": "hi", "n": 0}, "n"),
        ({"model": BASE, "prompt": ""}, "prompt"),
        ({"model": BASE}, "prompt"),
        ({"prompt": "hi"}, "model"),
        ({"model": BASE, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": BASE, "prompt": "hello " * 40, "max_tokens": 4}, "context length"),
        ({"model": BASE, "prompt": "hi", "max_tokens": 200}, "context length"),
        ({"model": BASE, "prompt": "hi", "n": 40}, "n"),
        ({"model": BASE, "prompt": "hi", "logprobs": 2}, "logprobs"),
        ({"model": BASE, "prompt": "hi", "tools": [{"type": "function"}]}, "tools"),
        ({"model": BASE, "prompt": ["a", "b"]}, "one prompt"),
    ],
)
def test_bad_requests_get_400(server, body, needle):
    response = httpx.post(
        f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert needle in error["message"] + str(error.get("param"))
    assert error["type"] == "invalid_request_error"


def test_malformed_json_unknown_model_and_auth(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={**auth, "Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and error_of(bad)["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert "nope" in str(missing.value)
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_adapter_loading_refuses_paths_outside_the_root(server, files, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/adapters"
    outside = httpx.post(url, json={"name": "x", "path": str(tmp_path)}, headers=auth)
    assert outside.status_code == 403 and "outside" in error_of(outside)["message"]
    climbing = httpx.post(url, json={"name": "x", "path": "../model"}, headers=auth)
    assert climbing.status_code == 403
    link = files[1] / "link"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        linked = httpx.post(url, json={"name": "x", "path": "link"}, headers=auth)
        assert linked.status_code == 403
    finally:
        link.unlink()
    taken = httpx.post(url, json={"name": "alpha", "path": "alpha"}, headers=auth)
    assert taken.status_code == 409
    bad_name = httpx.post(url, json={"name": "../x", "path": "alpha"}, headers=auth)
    assert bad_name.status_code == 400
    not_adapter = httpx.post(url, json={"name": "x", "path": "."}, headers=auth)
    assert not_adapter.status_code == 400
    assert httpx.delete(f"{url}/nope", headers=auth).status_code == 404


def test_a_failing_request_fails_alone(server, client, monkeypatch):
    """An exception while one request's tokens are chosen fails that request only."""
    from adaption_fx.generation import loop

    original = loop.TokenChooser.choose

    def choose(self, logits, sequence, record=None):
        if self.args.config.max_new_tokens == 13:  # the doomed request's marker
            raise RuntimeError("injected fault")
        return original(self, logits, sequence, record)

    monkeypatch.setattr(loop.TokenChooser, "choose", choose)

    def run(tokens):
        return client.completions.create(
            model="alpha", prompt="hello", max_tokens=tokens, temperature=0
        )

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, t) for t in (12, 13, 11)]
    assert futures[0].result().usage.completion_tokens >= 1
    assert futures[2].result().usage.completion_tokens >= 1
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        futures[1].result()
    assert client.completions.create(model="alpha", prompt="hi", max_tokens=2).choices


def test_disconnect_mid_stream_frees_the_row(server, monkeypatch):
    scheduler = server.state.scheduler
    engine = scheduler.engine
    decode = engine.decode

    def slow_decode(*args):  # slow enough that the client leaves mid-answer
        time.sleep(0.05)
        return decode(*args)

    monkeypatch.setattr(engine, "decode", slow_decode)
    body = {
        "model": "alpha", "prompt": "hello", "max_tokens": 60, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:  # fmt: skip
        assert response.status_code == 200  # the headers: the request is queued
        deadline = time.time() + 20
        while scheduler.running == 0 and time.time() < deadline:  # the row joins the batch
            time.sleep(0.01)
        assert scheduler.running == 1
    # The client is gone: the server cancels the request and its row leaves the batch.
    deadline = time.time() + 20
    cancelled = 'adaption_fx_requests_total{adapter="alpha",status="cancelled"} 1.0'
    while time.time() < deadline:
        if scheduler.running == 0 and cancelled in httpx.get(f"{server.url}/metrics").text:
            break
        time.sleep(0.05)
    assert scheduler.running == 0
    assert cancelled in httpx.get(f"{server.url}/metrics").text


def test_metrics(server, client):
    client.completions.create(model="gamma", prompt="hi", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'adaption_fx_requests_total{adapter="gamma",status="200"}',
        'adaption_fx_generation_tokens_total{adapter="gamma"}',
        'adaption_fx_prompt_tokens_total{adapter="gamma"}',
        "adaption_fx_queue_depth",
        "adaption_fx_running_batch_size",
        "adaption_fx_time_to_first_token_seconds_bucket",
        "adaption_fx_inter_token_latency_seconds_bucket",
        'adaption_fx_requests_total{adapter="nope",status="404"}',
    ):
        assert name in text, name


def test_full_queue_gets_429_with_retry_after(files, onnx_file):
    root, adapter_root = files
    config = serve_config(root, adapter_root, onnx=str(onnx_file), max_queue=1, max_batch_size=1)
    running = Running(config)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)

        def run(_):
            try:
                return client.completions.create(model="alpha", prompt="hello", max_tokens=40)
            except openai.RateLimitError as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(run, range(6)))
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        answered = [r for r in results if not isinstance(r, Exception)]
        assert refused and answered
        assert refused[0].response.headers["retry-after"] == "1"
        assert refused[0].body["code"] == "queue_full"
    finally:
        running.stop()


def test_eager_engine_equals_adapted_model_generate(files, cache_dir):
    root, adapter_root = files
    config = serve_config(root, adapter_root, engine="eager")
    running = Running(config)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        jobs = [("alpha", "hello there", 8), (BASE, "Say hi", 6), ("delta", "what is", 9)]

        def run(job):
            model, prompt, tokens = job
            return client.completions.create(
                model=model, prompt=prompt, max_tokens=tokens, temperature=0
            )

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(run, jobs))
        model = running.state.scheduler.engine.model
        tokenizer = running.state.tokenizer
        for (name, prompt, tokens), reply in zip(jobs, replies, strict=True):
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            if name == BASE:
                with model.disable_adapter():
                    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
            expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            assert reply.choices[0].text == expected, name
    finally:
        running.stop()


def test_json_logs_carry_the_request_fields():
    import logging

    from adaption_fx.serving.logs import JsonFormatter

    record = logging.LogRecord(
        "adaption_fx.serving", logging.INFO, "x", 1, "request %s", ("7",), None
    )
    record.request_id, record.completion_tokens = "7", 12
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "request 7" and entry["level"] == "INFO"
    assert entry["request_id"] == "7" and entry["completion_tokens"] == 12
    assert entry["time"].endswith("Z")


# ----------------------------------------------------------------------------- the command
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--allow-adapter-loading"], "--adapter-root"),
        (["--adapter", "noequals"], "NAME=DIR"),
        (["--adapter", "a=/nonexistent"], "not a directory"),
        (["--engine", "eager", "--onnx", "x.onnx"], "onnxruntime engine"),
        (["--adapter-root", "/nonexistent"], "not a directory"),
    ],
)
def test_serve_command_refuses_bad_settings_before_loading(args, needle, capsys):
    from adaption_fx.app.cli import main

    with contextlib.suppress(SystemExit):
        assert main(["serve", *args]) != 0
    assert needle in capsys.readouterr().err


def test_sigterm_drains_and_exits_zero(files, onnx_file, cache_dir):
    root, adapter_root = files
    port = free_port()
    env = {**os.environ, "ADAPTION_FX_CACHE_DIR": str(cache_dir)}
    command = [
        sys.executable, "-m", "adaption_fx", "serve", "--model", str(root / "model"),
        "--onnx", str(onnx_file), "--adapter", f"alpha={adapter_root / 'alpha'}",
        "--port", str(port), "--max-adapter-len", "4",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert process.poll() is None, process.stdout.read().decode()
            assert time.time() < deadline
            time.sleep(0.2)
        body = {
            "model": "alpha", "prompt": "hello", "max_tokens": 40, "stream": True,
            "ignore_eos": True,
        }  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200  # taken: SIGTERM must let it finish
            process.send_signal(signal.SIGTERM)
            rest = [line for line in response.iter_lines() if line]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2][6:])["usage"]
        assert usage["completion_tokens"] == 40  # the stream in flight finished
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
