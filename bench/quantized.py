"""Quantized serving: int4/int8 ONNX files against fp32 ONNX Runtime and llama.cpp.

On the embedded model (``python -m bench.quantized``, about 10 minutes on 2 cores):

1. the demo's adapter is trained (``adaption_fx.app.demo.run_demo``: the demo task, 400
   examples, one epoch);
2. the adapted model is exported as decode-step files in fp32, int4 from the GGUF file's own
   blocks (``gguf_file=``: Q4_1 linear weights, the Q8_0 tied embedding), int4 and int8
   quantized by ONNX Runtime's block quantizer from the fp32 weights (what a model without
   a GGUF source gets), plus forward files for perplexity and a mixed-batch file pair;
3. quality: held-out exact match (greedy, ONNX Runtime) and held-out perplexity of the
   answers, per file;
4. speed, greedy, 64 new tokens forced, 2 threads, rounds interleaved (medians after a
   warm-up): batch 1 against llama.cpp on the same GGUF file (llama-cpp-python, the base
   model; skipped with the reason where it is not installed), batch 4, and a mixed batch
   of 4 rows on 4 different adapters;
5. file sizes, ONNX Runtime's profile of the int4 and fp32 decode steps, the int4 file at
   opset 18 (attention, norms and rotations written out) against the default (fused), and
   one MLP-sized matmul alone, int4 against fp32, for 1 and 4 rows;
6. in PyTorch, the base quantized with torchao (int8 weight-only) against fp32, both
   rewritten: base weight bytes, a training step, greedy generation (skipped with the
   reason where torchao is not installed: it is no dependency of ours).

``--quick`` runs the same code on a tiny random Llama (no training, no task, no llama.cpp)
so that tests/test_bench_quantized.py keeps it from rotting.

Results: ``bench/results/quantized.json`` and ``quantized.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, median_ms, race, ratio

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a haiku about the sea."
logger = logging.getLogger("bench.quantized")


@dataclass
class Config:
    quick: bool = False
    threads: int = 2
    new_tokens: int = 64
    batch: int = 4
    warmup: int = 1
    repeats: int = 5
    held_out: int = 100
    out: str = str(ROOT / "bench" / "results")


# ------------------------------------------------------------------------ the model
def _embedded(cfg: Config, work: Path) -> dict[str, Any]:
    """The demo's trained adapter on the embedded model, its held-out split and tokenizer."""
    from adaption_fx.app.demo import DemoSettings, run_demo
    from adaption_fx.app.demo_task import make_splits
    from adaption_fx.app.pretrained import embedded_model_file, load_pretrained
    from adaption_fx.rewrite import rewrite
    from adaption_fx.training.data import example_prompt, parse_record

    settings = DemoSettings(out=work / "demo", held_out_size=cfg.held_out, progress=False)
    demo = run_demo(settings)
    loaded = load_pretrained(None)
    model = rewrite(loaded.model, demo.paths["adapter"])
    splits = make_splits(settings.train_size, settings.held_out_size, settings.seed)
    held_out = [parse_record(r, f"held_out[{i}]") for i, r in enumerate(splits.held_out)]
    pairs = [example_prompt(loaded.tokenizer, e) for e in held_out]
    return {
        "model": model,
        "tokenizer": loaded.tokenizer,
        "gguf": embedded_model_file(),
        "held_out": held_out,
        "prompts": [p for p, _ in pairs],
        "references": [r for _, r in pairs],
        "eager_exact_match": demo.adapted_score,
        "adapter_dir": demo.paths["adapter"],
    }


def _tiny_llama(tied: bool) -> Any:
    """--quick's model: a 2-layer random Llama with grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def _tiny() -> dict[str, Any]:
    from adaption_fx import AdaptionConfig, rewrite

    model = rewrite(_tiny_llama(tied=True), AdaptionConfig(adapter_len=4, adapter_layers=2))
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.adapter_state_dict().items()
    }
    model.load_state_dict(state)
    return {"model": model, "tokenizer": None, "gguf": None}


# ---------------------------------------------------------------------- the files
FILES = {
    # name: (weights, from the GGUF's blocks)
    "fp32": ("fp32", False),
    "int4 (GGUF blocks)": ("int4", True),
    "int4 (ORT quantizer)": ("int4", False),
    "int8 (ORT quantizer)": ("int8", False),
}


def _export(setup: dict[str, Any], work: Path, cfg: Config) -> dict[str, Any]:
    from adaption_fx.export import to_onnx

    model = setup["model"]

    def options(name: str) -> dict[str, Any]:
        weights, from_gguf = FILES[name]
        return {
            "weights": weights,
            "gguf_file": setup["gguf"] if from_gguf else None,
            "progress": False,
        }

    out: dict[str, Any] = {"decode": {}, "forward": {}, "mixed": {}, "export_s": {}}
    for name, (_, from_gguf) in FILES.items():
        if from_gguf and setup["gguf"] is None:
            continue
        kwargs = options(name)
        stem = name.split(" ")[0] + ("-gguf" if from_gguf else "")
        started = time.perf_counter()
        out["decode"][name] = to_onnx(
            model, work / f"decode-{stem}.onnx", for_generation=True, **kwargs
        )
        out["export_s"][name] = time.perf_counter() - started
        out["forward"][name] = to_onnx(model, work / f"forward-{stem}.onnx", **kwargs)
    # Mixed batches: fp32 and the int4 file a user would serve (the GGUF's blocks where
    # there are any).
    int4 = "int4 (GGUF blocks)" if setup["gguf"] is not None else "int4 (ORT quantizer)"
    for name in ("fp32", int4):
        out["mixed"][name] = to_onnx(
            model,
            work / f"mixed-{name.split(' ')[0]}.onnx",
            for_generation=True,
            adapter_as_inputs=True,
            mixed_batch=True,
            **options(name),
        )
    out["int4"] = int4
    # The same int4 decode file at opset 18: every op written out (export/onnx/fuse.py).
    out["written_out"] = to_onnx(
        model,
        work / "decode-int4-opset18.onnx",
        for_generation=True,
        opset=18,
        **options(int4),
    )
    return out


WRITTEN_OUT = "int4, opset 18 (attention, norms and rotations written out)"


# ----------------------------------------------------------------------- quality
def _perplexity(ort: Any, setup: dict[str, Any]) -> float:
    from adaption_fx.training.data import collate, encode_dataset, resolve_pad_token_id

    tokenizer = setup["tokenizer"]
    encoded = encode_dataset(setup["held_out"], tokenizer, max_length=256).examples
    pad = resolve_pad_token_id(tokenizer)
    nll, count = 0.0, 0
    for start in range(0, len(encoded), 16):
        batch = collate(encoded[start : start + 16], pad)
        logits = ort(
            input_ids=batch["input_ids"].numpy(), attention_mask=batch["attention_mask"].numpy()
        )
        logits = torch.from_numpy(logits[:, :-1]).double()
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float(picked[keep].sum())
        count += int(keep.sum())
    return math.exp(nll / count)


def _quality(files: dict[str, Any], setup: dict[str, Any], cfg: Config) -> dict[str, Any]:
    from adaption_fx.app.demo_task import score
    from adaption_fx.export import OrtModel
    from adaption_fx.generation.text import generate_in_batches

    if setup["tokenizer"] is None:
        return {"skipped": "--quick: no task (tiny random model)"}
    out: dict[str, Any] = {"eager_exact_match": setup["eager_exact_match"], "files": {}}
    for name, path in files["decode"].items():
        ort = OrtModel(path, intra_op_num_threads=cfg.threads)
        answers = generate_in_batches(
            ort, setup["tokenizer"], setup["prompts"], 16, max_new_tokens=24
        )
        forward = OrtModel(files["forward"][name], intra_op_num_threads=cfg.threads)
        out["files"][name] = {
            "exact_match": score([a.strip() for a in answers], setup["references"]),
            "perplexity": _perplexity(forward, setup),
        }
    base = out["files"]["fp32"]
    for entry in out["files"].values():
        entry["exact_match_points_vs_fp32"] = 100 * (entry["exact_match"] - base["exact_match"])
        entry["perplexity_vs_fp32"] = entry["perplexity"] / base["perplexity"]
    return out


# ------------------------------------------------------------------------- speed
def _prompt_batch(setup: dict[str, Any], batch: int) -> tuple[np.ndarray, np.ndarray]:
    tokenizer = setup["tokenizer"]
    if tokenizer is None:
        ids = np.random.default_rng(0).integers(3, 200, size=(batch, 24))
        return ids, np.ones_like(ids)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer([text] * batch, return_tensors="np", add_special_tokens=False)["input_ids"]
    return ids.astype(np.int64), np.ones_like(ids, dtype=np.int64)


def _llama_cpp(setup: dict[str, Any], cfg: Config, ids: np.ndarray) -> tuple[Any, str | None]:
    """A llama.cpp contender on the GGUF file (the base model), or why there is none."""
    if setup["gguf"] is None:
        return None, "--quick: no GGUF file"
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return None, f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python"
    llm = Llama(
        model_path=str(setup["gguf"]),
        n_threads=cfg.threads,
        n_threads_batch=cfg.threads,
        n_ctx=512,
        verbose=False,
    )
    prompt = [int(t) for t in ids[0]]

    def run() -> list[int]:
        out = []
        # Greedy; generate() never stops at end-of-sequence, so every run makes n tokens.
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == cfg.new_tokens:
                break
        return out

    return run, None


def _speed(files: dict[str, Any], setup: dict[str, Any], cfg: Config) -> dict[str, Any]:
    from adaption_fx.export import OrtModel

    n = cfg.new_tokens
    int4 = files["int4"]
    out: dict[str, Any] = {"new_tokens": n, "threads": cfg.threads}

    def ort_run(path: Path, ids: np.ndarray, mask: np.ndarray, **kwargs: Any) -> Any:
        ort = OrtModel(path, intra_op_num_threads=cfg.threads)
        return lambda: ort.generate(ids, mask, max_new_tokens=n, eos_token_id=None, **kwargs)

    # Batch 1: every decode file, and llama.cpp.
    ids, mask = _prompt_batch(setup, 1)
    contenders = {name: ort_run(path, ids, mask) for name, path in files["decode"].items()}
    contenders[WRITTEN_OUT] = ort_run(files["written_out"], ids, mask)
    llama, why = _llama_cpp(setup, cfg, ids)
    if llama is not None:
        contenders["llama.cpp (base model)"] = llama
    times = race(contenders, cfg.warmup, cfg.repeats)
    out["batch1"] = _rates(times, 1, n)
    out["batch1"]["prompt_tokens"] = int(ids.shape[1])
    out["llama_cpp_skipped"] = why
    out["batch1"]["fused / written out"] = ratio(times["wall"], WRITTEN_OUT, int4)
    if llama is not None:
        out["batch1"][f"{int4} / llama.cpp"] = ratio(times["wall"], "llama.cpp (base model)", int4)

    # Batch 4: int4 against fp32.
    ids, mask = _prompt_batch(setup, cfg.batch)
    pair = {name: ort_run(files["decode"][name], ids, mask) for name in ("fp32", int4)}
    times = race(pair, cfg.warmup, cfg.repeats)
    out[f"batch{cfg.batch}"] = _rates(times, cfg.batch, n)
    out[f"batch{cfg.batch}"][f"{int4} / fp32"] = ratio(times["wall"], "fp32", int4)

    # A mixed batch: each row on its own adapter (four random ones of the model's shape).
    mixed = {}
    names = [f"adapter{i}" for i in range(cfg.batch)]
    _add_random_adapters(setup["model"], names)
    for name, path in files["mixed"].items():
        ort = OrtModel(path, intra_op_num_threads=cfg.threads)
        for adapter in names:
            ort.set_adapter_weights(setup["model"], adapter_name=adapter)
        mixed[name] = lambda ort=ort: ort.generate(
            ids, mask, max_new_tokens=n, eos_token_id=None, adapter_names=names
        )
    times = race(mixed, cfg.warmup, cfg.repeats)
    out["mixed"] = _rates(times, cfg.batch, n)
    out["mixed"][f"{int4} / fp32"] = ratio(times["wall"], "fp32", int4)
    return out


def _add_random_adapters(model: Any, names: list[str]) -> None:
    """Random adapters of the active adapter's shape under ``names`` (gate scale 0.05);
    the active adapter stays active."""
    active = model.active_adapter
    config = model.adapters[active]
    for i, name in enumerate(names):
        if name not in model.adapters:
            model.add_adapter(name, config)
        model.set_adapter(name)
        g = torch.Generator().manual_seed(i)
        model.load_state_dict(
            {
                k: torch.randn(v.shape, generator=g) * (0.05 if k.endswith("adaption_gate") else 1)
                for k, v in model.adapter_state_dict().items()
            }
        )
    model.set_adapter(active)


def _rates(times: dict[str, dict[str, list[float]]], batch: int, n: int) -> dict[str, Any]:
    ms = median_ms(times["wall"])
    return {
        "ms": ms,
        "tokens_per_s": {k: batch * n / (v / 1000) for k, v in ms.items()},
        "wall": times["wall"],
    }


# ------------------------------------------------------------------ one matmul
def _matmul(setup: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """One MLP-sized matmul (the model's up projection) on its own: int4 ``MatMulNBits``
    (block 32, ``accuracy_level=4``) against fp32 ``MatMul``, for one row and for
    ``cfg.batch`` rows; microseconds per matmul. Each session runs 32 independent matmuls
    of that shape per call, so a call's own overhead is spread thin (median of
    interleaved rounds of 50 calls). It shows how each kernel's cost grows with the rows
    of a batch."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from adaption_fx.export.onnx.blocks import quantize_block_weight

    weights = dict(setup["model"].captured.graph_module.named_parameters())
    n, k = next(w.shape for name, w in weights.items() if "up_proj" in name)
    rng = np.random.default_rng(0)
    copies, calls = 32, 50
    # Each copy its own weight, as each layer has: the fp32 ones (over 100 MB together)
    # are then read from memory, not from a cache.
    fp32 = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(copies)]
    int4 = [quantize_block_weight(w, 4) for w in fp32]

    def matmul_nbits(i: int) -> Any:
        return helper.make_node(
            "MatMulNBits",
            ["x", f"w{i}", f"s{i}", f"z{i}"],
            [f"y{i}"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=32,
            accuracy_level=4,
        )

    kernels = {
        "int4 MatMulNBits": (
            matmul_nbits,
            [
                numpy_helper.from_array(array, f"{prefix}{i}")
                for i, b in enumerate(int4)
                for prefix, array in (
                    ("w", b.packed),
                    ("s", b.scales),
                    ("z", b.packed_zero_points()),
                )
            ],
        ),
        "fp32 MatMul": (
            lambda i: helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]),
            [
                numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}")
                for i, w in enumerate(fp32)
            ],
        ),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg.threads
    options.inter_op_num_threads = 1
    sessions = {}
    for name, (node, initializers) in kernels.items():
        graph = helper.make_graph(
            [node(i) for i in range(copies)],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
            [
                helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None)
                for i in range(copies)
            ],
            initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
            ir_version=10,
        )
        sessions[name] = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    out: dict[str, Any] = {"shape": [k, n], "us": {}}
    for rows in (1, cfg.batch):
        feed = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
        contenders = {
            name: (lambda s=session, f=feed: [s.run(None, f) for _ in range(calls)])
            for name, session in sessions.items()
        }
        times = race(contenders, cfg.warmup, cfg.repeats)
        out["us"][str(rows)] = {
            name: ms * 1000 / (calls * copies) for name, ms in median_ms(times["wall"]).items()
        }
    return out


# ----------------------------------------------------------------------- profile
def _profile(path: Path, setup: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """ONNX Runtime's own profile of ``cfg.new_tokens`` decode steps at batch 1: nodes run
    per step and each op type's share of kernel time (the profiler's own overhead
    inflates small nodes, so shares, not times, are what it tells)."""
    import onnxruntime as ort

    from adaption_fx.export import OrtModel

    with tempfile.TemporaryDirectory(prefix="adaption-fx-profile-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = cfg.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        model = OrtModel(path, session_options=options)
        ids, mask = _prompt_batch(setup, 1)
        model.generate(ids, mask, max_new_tokens=cfg.new_tokens, eos_token_id=None)
        events = json.loads(Path(model.session.end_profiling()).read_text())
    kernel: dict[str, float] = {}
    nodes = 0
    runs = 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs += 1
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            kernel[op] = kernel.get(op, 0.0) + float(event["dur"])
            nodes += 1
    total = sum(kernel.values())
    shares = sorted(((v / total, k) for k, v in kernel.items()), reverse=True)
    return {
        "runs": runs,
        "nodes_per_step": nodes / max(runs, 1),
        "kernel_share": {k: v for v, k in shares},
    }


# ------------------------------------------------------------- a torchao base in PyTorch
def _torch_base(cfg: Config) -> dict[str, Any]:
    """The base model with torchao's int8 weight-only linears against fp32, both rewritten
    (adapter_len 10, every layer): the bytes of the base weights, one AdamW step on the
    prompts and gates (batch 8 x 64 tokens), and greedy generation at batch 1."""
    import copy

    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        return {"skipped": f"torchao is not installed ({exc}); pip install torchao==0.18.0"}
    from adaption_fx import AdaptionConfig, rewrite

    if cfg.quick:
        fp32 = _tiny_llama(tied=False)
        seq, vocab = 16, 256
    else:
        from adaption_fx.app.pretrained import load_pretrained

        fp32 = load_pretrained(None).model
        seq, vocab = 64, fp32.config.vocab_size
    int8 = copy.deepcopy(fp32)
    quantize_(int8, Int8WeightOnlyConfig())
    layers = fp32.config.num_hidden_layers
    config = AdaptionConfig(adapter_len=10, adapter_layers=layers)
    models = {name: rewrite(m, config) for name, m in (("fp32", fp32), ("int8", int8))}

    def weight_bytes(model: torch.nn.Module) -> int:
        total = 0
        for p in model.parameters():
            inner = [getattr(p, a) for a in ("qdata", "scale") if hasattr(p, a)]
            total += sum(t.nbytes for t in inner) if inner else p.nbytes
        return total

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, seq), generator=g)
    steppers = {}
    for name, model in models.items():
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)

        def step(model: Any = model, optimizer: Any = optimizer) -> None:
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()

        steppers[name] = step
    train = race(steppers, cfg.warmup, cfg.repeats)
    prompt = ids[:1, :16]
    n = cfg.new_tokens

    def generate(model: Any) -> Any:
        return lambda: model.generate(prompt, max_new_tokens=n, eos_token_id=None)

    with torch.no_grad():
        gen = race({k: generate(m) for k, m in models.items()}, cfg.warmup, cfg.repeats)
    sizes = {"fp32": weight_bytes(fp32), "int8": weight_bytes(int8)}
    return {
        "base_weight_bytes": sizes,
        "base_weights_int8/fp32": sizes["int8"] / sizes["fp32"],
        "train_step_ms": median_ms(train["wall"]),
        "train_step_int8/fp32": ratio(train["wall"], "int8", "fp32"),
        "generate_tokens_per_s": {k: n / (v / 1000) for k, v in median_ms(gen["wall"]).items()},
        "generate_time_int8/fp32": ratio(gen["wall"], "int8", "fp32"),
        "batch": list(ids.shape),
    }


# ------------------------------------------------------------------------ report
def _sizes(files: dict[str, Any]) -> dict[str, Any]:
    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))

    sizes = {name: size(path) for name, path in files["decode"].items()}
    return {
        "bytes": sizes,
        "vs_fp32": {name: b / sizes["fp32"] for name, b in sizes.items()},
    }


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    speed = results["speed"]
    int4 = results["int4"]
    lines = [
        f"Model: `{results['model']}`; decode-step files of the adapted model (demo adapter, "
        f"10-token prompt in every layer); greedy, {speed['new_tokens']} new tokens forced, "
        f"{speed['threads']} threads, medians of {cfg['repeats']} interleaved rounds after "
        f"{cfg['warmup']} warm-up.",
        "",
        "| file | size / fp32 | tokens/s, batch 1 | quality: held-out exact match | "
        "held-out perplexity (vs fp32) |",
        "|---|---|---|---|---|",
    ]
    quality = results["quality"].get("files", {})
    for name in results["sizes"]["bytes"]:
        q = quality.get(name)
        em = f"{q['exact_match']:.0%} ({q['exact_match_points_vs_fp32']:+.0f} points)" if q else "-"
        ppl = f"{q['perplexity']:.4f} ({q['perplexity_vs_fp32']:.4f}x)" if q else "-"
        lines.append(
            f"| {name} | {results['sizes']['vs_fp32'][name]:.3f} | "
            f"{speed['batch1']['tokens_per_s'][name]:.1f} | {em} | {ppl} |"
        )
    llama = speed["batch1"]["tokens_per_s"].get("llama.cpp (base model)")
    lines += [
        "",
        "| measurement | value |",
        "|---|---|",
    ]
    if llama is not None:
        lines += [
            f"| llama.cpp, the same GGUF file, base model: tokens/s, batch 1 | {llama:.1f} |",
            f"| generation, batch 1: {int4} ORT / llama.cpp (tokens/s) | "
            f"{speed['batch1'][f'{int4} / llama.cpp']:.2f} |",
        ]
    else:
        lines.append(f"| llama.cpp | skipped: {speed['llama_cpp_skipped']} |")
    b = f"batch{cfg['batch']}"
    written = speed["batch1"]["tokens_per_s"][WRITTEN_OUT]
    lines += [
        f"| {WRITTEN_OUT}: tokens/s, batch 1 | {written:.1f} |",
        f"| generation, batch 1: {int4} with opset 23's fused ops / written out (tokens/s) | "
        f"{speed['batch1']['fused / written out']:.2f} |",
        f"| generation, batch {cfg['batch']}: {int4} / fp32 ORT (tokens/s) | "
        f"{speed[b][f'{int4} / fp32']:.2f} |",
        f"| mixed batch of {cfg['batch']} adapters: {int4} / fp32 ORT (tokens/s) | "
        f"{speed['mixed'][f'{int4} / fp32']:.2f} |",
    ]
    mm = results["matmul"]
    k, n = mm["shape"]
    rows = str(cfg["batch"])
    lines += [
        f"| one {k}x{n} matmul alone, us per matmul (1 row / {rows} rows): {name} | "
        f"{mm['us']['1'][name]:.0f} / {mm['us'][rows][name]:.0f} |"
        for name in mm["us"]["1"]
    ]
    for name, profile in results["profile"].items():
        top = ", ".join(
            f"{op} {share:.0%}" for op, share in list(profile["kernel_share"].items())[:4]
        )
        lines.append(
            f"| profile, {name} decode step: nodes run per step; largest kernel-time shares | "
            f"{profile['nodes_per_step']:.0f}; {top} |"
        )
    base = results.get("torch_base", {})
    if "skipped" in base:
        lines.append(f"| PyTorch, torchao int8 weight-only base | skipped: {base['skipped']} |")
    elif base:
        batch = "x".join(str(d) for d in base["batch"])
        lines += [
            "| PyTorch, torchao int8 weight-only base: base weight bytes / fp32 | "
            f"{base['base_weights_int8/fp32']:.3f} |",
            f"| PyTorch, torchao int8 base: training step (batch {batch}) time / fp32 | "
            f"{base['train_step_int8/fp32']:.2f} |",
            "| PyTorch, torchao int8 base: greedy generation time / fp32 | "
            f"{base['generate_time_int8/fp32']:.2f} |",
        ]
    if "eager_exact_match" in results["quality"]:
        eager = results["quality"]["eager_exact_match"]
        lines.append(f"| held-out exact match, PyTorch eager fp32 | {eager:.0%} |")
    lines += ["", f"Machine: {results['machine']}.", ""]
    return "\n".join(lines)


def run(cfg: Config) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="adaption-fx-bench-quantized-") as tmp:
        work = Path(tmp)
        setup = _tiny() if cfg.quick else _embedded(cfg, work)
        files = _export(setup, work, cfg)
        results: dict[str, Any] = {
            "config": asdict(cfg),
            "machine": machine(),
            "model": "tiny random Llama" if cfg.quick else Path(str(setup["gguf"])).name,
            "int4": files["int4"],
            "export_s": files["export_s"],
            "sizes": _sizes(files),
        }
        results["quality"] = _quality(files, setup, cfg)
        results["speed"] = _speed(files, setup, cfg)
        results["matmul"] = _matmul(setup, cfg)
        results["torch_base"] = _torch_base(cfg)
        profiled = {name: files["decode"][name] for name in ("fp32", files["int4"])}
        profiled[WRITTEN_OUT] = files["written_out"]
        results["profile"] = {name: _profile(path, setup, cfg) for name, path in profiled.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quantized", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model (seconds)")
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument(
        "--only-torch-base",
        action="store_true",
        help="rerun only the torchao-base rows, into the existing results file",
    )
    args = parser.parse_args(argv)
    cfg = Config(quick=args.quick, repeats=args.repeats)
    if args.quick:
        cfg.repeats, cfg.new_tokens = 1, 8
    if args.out:
        cfg.out = args.out
    logging.basicConfig(level=logging.WARNING)
    out = Path(cfg.out)
    if args.only_torch_base:
        torch.set_num_threads(cfg.threads)
        results = json.loads((out / "quantized.json").read_text())
        results["torch_base"] = _torch_base(cfg)
    else:
        results = run(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (
        (".json", json.dumps(results, indent=1, default=str)),
        (".md", markdown(results)),
    ):
        target = out / f"quantized{suffix}"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
