"""The OpenAI-compatible server under load: continuous batching over mixed adapters.

    python -m bench.serve            # the embedded model (SmolLM2-135M-Instruct)
    python -m bench.serve --quick    # a toy model, few clients (the test suite's run)

``adaption-fx serve`` runs in a subprocess (ONNX Runtime engine, four adapters of
``adapter_len`` 10 on every layer); clients stream ``/v1/completions`` with the official
``openai`` client, greedy, ``ignore_eos`` so that every request generates ``--tokens``
tokens. Three scenarios run one after the other in each round, after a warm-up round:

- (a) ``mixed``: ``--clients`` concurrent requests spread over the four adapters;
- (b) ``one adapter``: the same requests, all on one adapter;
- (c) ``one at a time``: ``--serial`` requests over the same server, each sent when the
  previous one has finished (the engine without batching).

Throughput is generated tokens per second of wall time (first request sent to last
answer received); time to first token is when the first text chunk arrives. Ratios are
medians over rounds of per-round ratios. Targets: (a)/(b) >= 0.9, (a)/(c) >= 3. Every answer
is checked against offline ``OrtModel.generate`` of the same file with the request's
adapter, one request at a time: "correct" means the same text.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import machine

ADAPTERS = ("a", "b", "c", "d")
TARGETS = {"mixed/one adapter": 0.9, "mixed/one at a time": 3.0}
SCENARIOS = ("mixed", "one adapter", "one at a time")
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
]


@dataclass
class ServeBenchConfig:
    clients: int = 32
    tokens: int = 64
    serial: int = 8
    rounds: int = 3
    adapter_len: int = 10
    threads: int = 2


QUICK = ServeBenchConfig(clients=6, tokens=6, serial=2, rounds=1, adapter_len=4)


# ----------------------------------------------------------------------------- set-up
def _toy_files(root: Path) -> tuple[Path, Any]:
    """A tiny Llama and a byte-level BPE tokenizer, saved as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(QUESTIONS, trainer)
    directory = root / "toy"
    PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>"
    ).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory, tokenizer


def _adapters(model_dir: Path | None, root: Path, adapter_len: int) -> tuple[dict[str, Path], Any]:
    """Four random adapters (every layer) saved under ``root``; returns their directories
    and the tokenizer."""
    from adaption_fx import AdaptionConfig, rewrite
    from adaption_fx.app.pretrained import load_pretrained

    loaded = load_pretrained(model_dir)
    model = rewrite(loaded.model, None)
    layers = len(model.sites)
    paths = {}
    for seed, name in enumerate(ADAPTERS):
        model.add_adapter(name, AdaptionConfig(adapter_len=adapter_len, adapter_layers=layers))
        model.set_adapter(name)
        generator = torch.Generator().manual_seed(seed)
        state = model.adapter_state_dict()
        model.load_state_dict(
            {k: (torch.randn(v.shape, generator=g) * 0.5).to(v.dtype) for k, v in state.items()
             for g in (generator,)}
        )  # fmt: skip
        paths[name] = root / "adapters" / name
        model.save_adapter(paths[name], name)
    return paths, loaded.tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(model_dir: Path | None, adapters: dict[str, Path], cfg: ServeBenchConfig, log: Path):
    """``adaption-fx serve`` in a subprocess; yields its URL, then SIGTERMs it."""
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "adaption_fx", "serve", "--port", str(port)]
    command += ["--max-batch-size", str(cfg.clients), "--served-model-name", "base"]
    if model_dir is not None:
        command += ["--model", str(model_dir)]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 900
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start; see {log}:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()


# ----------------------------------------------------------------------------- load
def _one(client: Any, model: str, prompt: str, tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    text = []
    usage = None
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    ended = time.perf_counter()
    return {
        "model": model,
        "prompt": prompt,
        "text": "".join(text),
        "tokens": usage.completion_tokens if usage else 0,
        "ttft": (first or ended) - started,
        "latency": ended - started,
    }


def _scenario(url: str, jobs: list[tuple[str, str]], tokens: int, together: bool) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    started = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: _one(client, job[0], job[1], tokens), jobs))
    else:
        answers = [_one(client, model, prompt, tokens) for model, prompt in jobs]
    wall = time.perf_counter() - started
    generated = sum(a["tokens"] for a in answers)
    ttft = sorted(a["ttft"] for a in answers)
    latency = sorted(a["latency"] for a in answers)
    return {
        "requests": len(answers),
        "generated": generated,
        "seconds": wall,
        "tokens_per_s": generated / wall,
        "ttft_p50": _quantile(ttft, 0.5),
        "ttft_p99": _quantile(ttft, 0.99),
        "latency_p50": _quantile(latency, 0.5),
        "latency_p99": _quantile(latency, 0.99),
        "answers": answers,
    }


def _quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile of sorted ``values``."""
    index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return values[index]


def _reference(onnx_file: Path, adapters: dict[str, Path], tokenizer: Any, jobs, tokens: int):
    """Offline greedy text per (adapter, prompt): OrtModel.generate, one request at a time."""
    from adaption_fx.export import OrtModel

    model = OrtModel(onnx_file)
    for name, path in adapters.items():
        model.set_adapter_weights(path, adapter_name=name)
    texts = {}
    for name, prompt in sorted(set(jobs)):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        adapter = "__base__" if name == "base" else name
        out = model.generate(
            ids, adapter_names=[adapter], max_new_tokens=tokens, do_sample=False, eos_token_id=None
        )
        texts[(name, prompt)] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return texts


def _served_file(log: Path) -> Path:
    """The ONNX file the server exported or reused (from its log)."""
    for line in reversed(log.read_text().splitlines()):
        for marker in ("reusing the exported file ", "exporting the mixed-batch decode step to "):
            if marker in line:
                return Path(line.split(marker, 1)[1].strip())
    raise LookupError(f"the server's log {log} names no ONNX file")


def run(cfg: ServeBenchConfig, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = _toy_files(root)[0] if quick else None
        adapters, tokenizer = _adapters(model_dir, root, cfg.adapter_len)
        prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(cfg.clients)]
        spread = [(ADAPTERS[i % 4], p) for i, p in enumerate(prompts)]
        single = [(ADAPTERS[0], p) for p in prompts]
        serial = spread[: cfg.serial]
        log = root / "server.log"
        rounds: list[dict[str, Any]] = []
        with _server(model_dir, adapters, cfg, log) as url:
            _scenario(url, spread[:4], cfg.tokens, together=True)  # warm-up
            for _ in range(cfg.rounds):
                rounds.append(
                    {
                        "mixed": _scenario(url, spread, cfg.tokens, together=True),
                        "one adapter": _scenario(url, single, cfg.tokens, together=True),
                        "one at a time": _scenario(url, serial, cfg.tokens, together=False),
                    }
                )
        reference = _reference(_served_file(log), adapters, tokenizer, spread + single, cfg.tokens)
    checked = [a for r in rounds for s in r.values() for a in s["answers"]]
    wrong = [a for a in checked if a["text"] != reference[(a["model"], a["prompt"])]]
    short = [a for a in checked if a["tokens"] != cfg.tokens]
    ratios = {
        "mixed/one adapter": statistics.median(
            r["mixed"]["tokens_per_s"] / r["one adapter"]["tokens_per_s"] for r in rounds
        ),
        "mixed/one at a time": statistics.median(
            r["mixed"]["tokens_per_s"] / r["one at a time"]["tokens_per_s"] for r in rounds
        ),
    }
    scenarios = {
        name: {
            key: statistics.median(r[name][key] for r in rounds)
            for key in ("tokens_per_s", "ttft_p50", "ttft_p99", "latency_p50", "latency_p99")
        }
        | {"requests": rounds[0][name]["requests"]}
        for name in SCENARIOS
    }
    return {
        "model": "toy" if quick else "SmolLM2-135M-Instruct (embedded)",
        "config": asdict(cfg),
        "scenarios": scenarios,
        "ratios": ratios,
        "targets": TARGETS,
        "answers": len(checked),
        "wrong": len(wrong),
        "short": len(short),
        "machine": machine(),
    }


def table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"### {result['model']}: {cfg['clients']} concurrent clients, {cfg['tokens']} new tokens "
        f"each (greedy, ignore_eos), ONNX Runtime engine, {cfg['threads']} threads, median of "
        f"{cfg['rounds']} rounds",
        "",
        "| scenario | requests | tokens/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) "
        "| latency p99 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "mixed": "(a) spread over 4 adapters",
        "one adapter": "(b) all on one adapter",
        "one at a time": "(c) one request at a time",
    }
    for name in SCENARIOS:
        s = result["scenarios"][name]
        lines.append(
            f"| {labels[name]} | {s['requests']} | {s['tokens_per_s']:.1f} | {s['ttft_p50']:.3f} "
            f"| {s['ttft_p99']:.3f} | {s['latency_p50']:.2f} | {s['latency_p99']:.2f} |"
        )
    lines += ["", "| ratio | value | target |", "|---|---:|---|"]
    names = {
        "mixed/one adapter": "throughput: (a) 4 adapters / (b) one adapter",
        "mixed/one at a time": "throughput: (a) 4 adapters / (c) one at a time",
    }
    for key, label in names.items():
        value, target = result["ratios"][key], result["targets"][key]
        met = "met" if value >= target else "not met"
        lines.append(f"| {label} | {value:.2f} | >= {target} ({met}) |")
    lines += [
        "",
        f"Answers checked against offline `OrtModel.generate`: {result['answers']}; different: "
        f"{result['wrong']}; not {cfg['tokens']} tokens: {result['short']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a toy model, few clients")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = QUICK if args.quick else ServeBenchConfig()
    if args.rounds is not None:
        cfg.rounds = args.rounds
    torch.set_num_threads(cfg.threads)
    result = run(cfg, args.quick)
    text = table(result)
    stem = "serve_quick" if args.quick else "serve"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0 if result["wrong"] == 0 and result["short"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
