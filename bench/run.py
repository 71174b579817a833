"""Benchmarks of adaption-fx against the base model and PEFT's AdaptionPromptModel.

Everything runs in ONE process and one run. Each comparison runs its contenders
interleaved, round after round, after warm-up; a ratio is the median over rounds of the
per-round ratio, so slow drifts of the machine cancel. Thread counts are fixed.

    python -m bench                 # the default configs (a few minutes on 2 CPU cores)
    python -m bench --quick         # tiny sizes, seconds (the test suite's smoke run)
    python -m bench --help
    python -m bench --model embedded  # the real-model table (bench/embedded.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.capture.export_model import capture
from adaption_fx.passes import insert_adaption_prompt, locate_attention, select_top_sites
from bench.common import machine, median_ms, race, ratio, step_flops

logger = logging.getLogger("bench")


@dataclass
class Config:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 1408
    vocab: int = 4096  # small, so the decoder layers (not the lm_head) dominate the time
    batch: int = 4
    seq: int = 256
    adapter_len: int = 10
    adapter_layers: int = 8
    repeats: int = 10
    warmup: int = 3
    threads: int = 2
    rewrite_layers: int = 32
    seq_sweep: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    len_sweep: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    sweep_batch: int = 1
    compile_backend: str = "inductor"
    gen_prompt: int = 32
    gen_tokens: int = 32


QUICK = dict(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=4,
    intermediate=96,
    vocab=128,
    batch=2,
    seq=16,
    adapter_len=4,
    adapter_layers=2,
    repeats=3,
    warmup=1,
    rewrite_layers=4,
    seq_sweep=[8, 16],
    len_sweep=[1, 4],
    sweep_batch=1,
    gen_prompt=6,
    gen_tokens=4,
)


def build_llama(cfg: Config, kv_heads: int | None = None, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab,
            hidden_size=cfg.hidden,
            intermediate_size=cfg.intermediate,
            num_hidden_layers=layers or cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=kv_heads or cfg.kv_heads,
            max_position_embeddings=4096,
        )
    ).eval()


def adapted_pair(base, cfg: Config, adapter_len: int | None = None):
    """Ours and PEFT's adapted models on the same weights, with the same random adapter."""
    from peft import AdaptionPromptConfig, get_peft_model

    n = adapter_len or cfg.adapter_len
    ours = rewrite(base, AdaptionConfig(adapter_len=n, adapter_layers=cfg.adapter_layers))
    g = torch.Generator().manual_seed(1)
    state = {
        k: torch.randn(v.shape, generator=g) * 0.1 for k, v in ours.adapter_state_dict().items()
    }
    ours.load_state_dict(state)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        AdaptionPromptConfig(
            adapter_len=n, adapter_layers=cfg.adapter_layers, task_type="CAUSAL_LM"
        ),
    ).eval()
    missing = peft_model.load_state_dict(
        {"base_model.model." + k: v for k, v in state.items()}, strict=False
    )
    assert not missing.unexpected_keys, missing.unexpected_keys
    return ours, peft_model


def inputs(cfg: Config, batch: int | None = None, seq: int | None = None):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab, (batch or cfg.batch, seq or cfg.seq), generator=g)
    return ids, torch.ones_like(ids)


def _disabled(model):
    """Our model with adapters disabled: the captured base graph alone."""

    def call(**feed):
        with model.disable_adapter():
            return model(**feed)

    return call


def _forward_race(cfg: Config, base, ours, peft_model, feed: dict, repeats: int):
    captured = _disabled(ours)
    with torch.no_grad():
        times = race(
            {
                "base": lambda: base(**feed),
                "captured": lambda: captured(**feed),
                "ours": lambda: ours(**feed),
                "peft": lambda: peft_model(**feed),
            },
            cfg.warmup,
            repeats,
        )["wall"]
    return times, {
        "ours/base": ratio(times, "ours", "base"),
        "peft/base": ratio(times, "peft", "base"),
        # Diagnostics: what the capture itself costs, and what the adapter adds to it.
        "captured/base": ratio(times, "captured", "base"),
        "ours/captured": ratio(times, "ours", "captured"),
    }


def section_eager(cfg: Config, kv_heads: int) -> dict[str, Any]:
    base = build_llama(cfg, kv_heads=kv_heads)
    ours, peft_model = adapted_pair(base, cfg)
    ids, mask = inputs(cfg)
    feed = {"input_ids": ids, "attention_mask": mask}
    times, ratios = _forward_race(cfg, base, ours, peft_model, feed, cfg.repeats)
    return {"ms": median_ms(times), **ratios, "kv_heads": kv_heads}


def section_train(cfg: Config) -> dict[str, Any]:
    base = build_llama(cfg)
    ours, peft_model = adapted_pair(base, cfg)
    ids, mask = inputs(cfg)

    def stepper(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            opt.step()

        return step

    contenders = {"ours": stepper(ours), "peft": stepper(peft_model)}
    times = race(contenders, cfg.warmup, cfg.repeats)["wall"]
    flops = {name: step_flops(stepper(m)) for name, m in (("ours", ours), ("peft", peft_model))}
    return {
        "ms": median_ms(times),
        "ours/peft": ratio(times, "ours", "peft"),
        # What the time ratio can at best be: the arithmetic each step does. Ours is the
        # base model's forward and backward plus the adapter's small attention; PEFT adds
        # a second query projection and a second output projection per layer.
        "gflops": {k: v / 1e9 for k, v in flops.items()},
        "flops ours/peft": flops["ours"] / flops["peft"],
    }


def section_compile(cfg: Config) -> dict[str, Any]:
    from adaption_fx.export import compile as compile_adapted

    torch._dynamo.reset()
    base = build_llama(cfg)
    ours, peft_model = adapted_pair(base, cfg)
    ids, mask = inputs(cfg)
    backend = cfg.compile_backend
    compiled = {
        "base": torch.compile(base, backend=backend),
        "ours": compile_adapted(ours, backend=backend),
        "peft": torch.compile(peft_model, backend=backend),
    }
    started = time.perf_counter()
    with torch.no_grad():
        times = race(
            {k: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for k, m in compiled.items()},
            max(cfg.warmup, 2),
            cfg.repeats,
        )["wall"]
    return {
        "ms": median_ms(times),
        "ours/base": ratio(times, "ours", "base"),
        "peft/base": ratio(times, "peft", "base"),
        "seconds_including_compile": time.perf_counter() - started,
    }


def section_ort(cfg: Config) -> dict[str, Any]:
    from adaption_fx.export import OrtModel, to_onnx

    base = build_llama(cfg)
    ours, _ = adapted_pair(base, cfg)
    ids, mask = inputs(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        to_onnx(ours, Path(tmp) / "ours.onnx")
        with ours.disable_adapter():
            to_onnx(ours, Path(tmp) / "base.onnx")
        ort_ours = OrtModel(Path(tmp) / "ours.onnx", intra_op_num_threads=cfg.threads)
        ort_base = OrtModel(Path(tmp) / "base.onnx", intra_op_num_threads=cfg.threads)
        np_ids, np_mask = ids.numpy(), mask.numpy()
        with torch.no_grad():
            times = race(
                {
                    "ours_eager": lambda: ours(input_ids=ids, attention_mask=mask),
                    "ort_ours": lambda: ort_ours(input_ids=np_ids, attention_mask=np_mask),
                    "ort_base": lambda: ort_base(input_ids=np_ids, attention_mask=np_mask),
                },
                cfg.warmup,
                cfg.repeats,
            )["wall"]
        providers = ort_ours.providers
    return {
        "ms": median_ms(times),
        "ort_ours/ours_eager": ratio(times, "ort_ours", "ours_eager"),
        "ort_ours/ort_base": ratio(times, "ort_ours", "ort_base"),
        "providers": providers,
    }


def section_generate(cfg: Config) -> dict[str, Any]:
    """Greedy generation, tokens per second: ours (PyTorch and ORT) vs HF generate."""
    from adaption_fx.export import OrtModel, to_onnx

    base = build_llama(cfg)
    base.generation_config.eos_token_id = None  # every contender makes all the tokens
    ours, peft_model = adapted_pair(base, cfg)
    peft_model.base_model.generation_config.eos_token_id = None
    ids, mask = inputs(cfg, seq=cfg.gen_prompt)
    n = cfg.gen_tokens
    hf_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = to_onnx(ours, Path(tmp) / "decode.onnx", for_generation=True)
        ort_ours = OrtModel(path, intra_op_num_threads=cfg.threads)
        with ours.disable_adapter():
            base_path = to_onnx(ours, Path(tmp) / "decode_base.onnx", for_generation=True)
        ort_base = OrtModel(base_path, intra_op_num_threads=cfg.threads)
        with torch.no_grad():
            contenders = {
                "base_hf": lambda: base.generate(input_ids=ids, attention_mask=mask, **hf_kwargs),
                "peft_hf": lambda: peft_model.generate(
                    input_ids=ids, attention_mask=mask, **hf_kwargs
                ),
                "ours": lambda: ours.generate(ids, mask, max_new_tokens=n),
                "ort_ours": lambda: ort_ours.generate(ids, mask, max_new_tokens=n),
                "ort_base": lambda: ort_base.generate(ids, mask, max_new_tokens=n),
            }
            # Same tokens from every contender (greedy, same weights and adapter).
            tokens = {k: torch.as_tensor(fn())[:, -n:] for k, fn in contenders.items()}
            times = race(contenders, cfg.warmup, cfg.repeats)["wall"]
    produced = ids.shape[0] * n
    return {
        "ms": median_ms(times),
        "tokens_per_s": {k: produced / (v / 1000) for k, v in median_ms(times).items()},
        "ours/base_hf": ratio(times, "ours", "base_hf"),
        "peft_hf/base_hf": ratio(times, "peft_hf", "base_hf"),
        "ort_ours/ours": ratio(times, "ort_ours", "ours"),
        "ort_ours/ort_base": ratio(times, "ort_ours", "ort_base"),
        "same_tokens": {
            "ours==peft_hf": bool(torch.equal(tokens["ours"], tokens["peft_hf"])),
            "ort_ours==ours": bool(torch.equal(tokens["ort_ours"], tokens["ours"])),
            "ort_base==base_hf": bool(torch.equal(tokens["ort_base"], tokens["base_hf"])),
        },
        "batch": ids.shape[0],
        "prompt": cfg.gen_prompt,
        "new_tokens": n,
    }


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def section_rewrite(cfg: Config) -> dict[str, Any]:
    base = build_llama(cfg, layers=cfg.rewrite_layers)
    model_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    config = AdaptionConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.rewrite_layers)
    peak_before = _peak_rss_mb()
    started = time.perf_counter()
    captured = capture(base)
    captured_at = time.perf_counter()
    rewrite_times = []
    for _ in range(max(3, cfg.warmup)):
        t0 = time.perf_counter()
        sites = locate_attention(captured.graph_module)
        insert_adaption_prompt(
            captured.graph_module, select_top_sites(sites, len(sites)), config.structure
        )
        rewrite_times.append(time.perf_counter() - t0)
    full_started = time.perf_counter()
    adapted = rewrite(base, config)
    full = time.perf_counter() - full_started
    peak_after = _peak_rss_mb()
    shared = all(
        p is dict(base.named_parameters())[k]
        for k, p in adapted.base_graph_module.named_parameters()
    )
    return {
        "layers": cfg.rewrite_layers,
        "model_mb": model_mb,
        "capture_s": captured_at - started,
        "rewrite_alone_s": statistics.median(rewrite_times),
        "capture_and_rewrite_s": full,
        "peak_rss_growth_mb": peak_after - peak_before,
        "weights_shared": shared,
    }


def section_scaling(cfg: Config) -> dict[str, Any]:
    base = build_llama(cfg)
    rows_seq, rows_len = [], []
    ours, peft_model = adapted_pair(base, cfg)
    repeats = max(5, cfg.repeats // 2)
    for seq in cfg.seq_sweep:
        ids, mask = inputs(cfg, batch=cfg.sweep_batch, seq=seq)
        feed = {"input_ids": ids, "attention_mask": mask}
        _, ratios = _forward_race(cfg, base, ours, peft_model, feed, repeats)
        rows_seq.append({"seq": seq, **ratios})
    ids, mask = inputs(cfg)
    feed = {"input_ids": ids, "attention_mask": mask}
    for length in cfg.len_sweep:
        ours_n, peft_n = adapted_pair(base, cfg, adapter_len=length)
        _, ratios = _forward_race(cfg, base, ours_n, peft_n, feed, repeats)
        rows_len.append({"adapter_len": length, **ratios})
    return {"seq": rows_seq, "adapter_len": rows_len, "batch": cfg.sweep_batch}


TARGETS = {
    ("eager", "ours/base"): 1.03,
    ("train", "ours/peft"): 0.85,
    ("compile", "ours/base"): 1.03,
    ("ort", "ort_ours/ours_eager"): 1.0,
    ("rewrite", "rewrite_alone_s"): 0.2,
}


def table(results: dict[str, Any]) -> str:
    lines = ["| measurement | value | target | met |", "|---|---|---|---|"]

    def row(label, value, target=None, fmt="{:.3f}"):
        met = "" if target is None else ("yes" if value <= target else "NO")
        tgt = "" if target is None else f"<= {target}"
        lines.append(f"| {label} | {fmt.format(value)} | {tgt} | {met} |")

    for key in ("eager", "eager_gqa"):
        if key in results:
            r = results[key]
            name = f"eager forward ({'GQA' if key.endswith('gqa') else 'MHA'})"
            row(f"{name}: ours / base", r["ours/base"], TARGETS[("eager", "ours/base")])
            row(f"{name}: PEFT / base", r["peft/base"])
            row(f"{name}: captured base graph / base (diagnostic)", r["captured/base"])
            row(f"{name}: ours / captured base graph (diagnostic)", r["ours/captured"])
    if "train" in results:
        row("training step: ours / PEFT", results["train"]["ours/peft"], 0.85)
        row("training step FLOPs: ours / PEFT (diagnostic)", results["train"]["flops ours/peft"])
    if "compile" in results:
        row("compiled forward: ours / compiled base", results["compile"]["ours/base"], 1.03)
        row("compiled forward: compiled PEFT / compiled base", results["compile"]["peft/base"])
    if "ort" in results:
        row(
            "ORT forward (folded): ours / our eager PyTorch",
            results["ort"]["ort_ours/ours_eager"],
            1.0,
        )
        row("ORT forward: ours folded / ORT base", results["ort"]["ort_ours/ort_base"])
    if "generate" in results:
        r = results["generate"]
        what = f"batch {r['batch']}, prompt {r['prompt']}, {r['new_tokens']} new tokens"
        for key, label in (
            ("base_hf", "base model, HF generate"),
            ("peft_hf", "PEFT, HF generate"),
            ("ours", "ours, PyTorch"),
            ("ort_ours", "ours, ONNX Runtime"),
            ("ort_base", "base model, ONNX Runtime (our decode-step export)"),
        ):
            row(
                f"greedy generation tokens/s ({what}): {label}",
                r["tokens_per_s"][key],
                None,
                "{:.0f}",
            )
        row("generation time: ours PyTorch / base HF generate", r["ours/base_hf"])
        row("generation time: PEFT HF generate / base HF generate", r["peft_hf/base_hf"])
        row("generation time: ours ORT / ours PyTorch", r["ort_ours/ours"])
        row("generation time: ours ORT / base ORT", r["ort_ours/ort_base"])
    if "rewrite" in results:
        r = results["rewrite"]
        row(f"rewrite alone, {r['layers']} layers (s)", r["rewrite_alone_s"], 0.2)
        row(f"capture + rewrite, {r['layers']} layers (s)", r["capture_and_rewrite_s"])
        row(
            f"peak RSS growth (MB; model is {r['model_mb']:.0f} MB)",
            r["peak_rss_growth_mb"],
            fmt="{:.0f}",
        )
    if "scaling" in results:
        for key, label in (("seq", "seq"), ("adapter_len", "adapter_len")):
            for r in results["scaling"][key]:
                row(
                    f"{label} {r[key]}: ours / base (PEFT / base {r['peft/base']:.3f}; "
                    f"captured / base {r['captured/base']:.3f}; ours / captured "
                    f"{r['ours/captured']:.3f})",
                    r["ours/base"],
                )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["scaling"]["seq"]
    seqs = [r["seq"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(seqs, [r["ours/base"] for r in rows], "o-", label="adaption-fx (graph pass)")
    ax.plot(seqs, [r["peft/base"] for r in rows], "s--", label="PEFT (wrapped modules)")
    ax.plot(
        seqs,
        [r["ours/captured"] for r in rows],
        "^:",
        label="adaption-fx / its own captured base graph",
    )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [str(s) for s in seqs])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward time / base model")
    ax.set_title("Eager forward overhead vs sequence length (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SECTIONS = ("eager", "train", "compile", "ort", "generate", "rewrite", "scaling")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=("toy", "embedded"),
        default="toy",
        help="toy: this table (default); embedded: the real-model table on SmolLM2-135M "
        "(bench/embedded.py; `python -m bench --model embedded --help`)",
    )
    for name, value in asdict(Config()).items():
        if isinstance(value, list):
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, nargs="+")
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    values = asdict(Config())
    if args.quick:
        values.update(QUICK)
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    cfg = Config(**values)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(cfg.threads)
    sections = args.only or SECTIONS
    results: dict[str, Any] = {"config": asdict(cfg), "machine": machine()}
    runners = {
        "eager": lambda: section_eager(cfg, cfg.kv_heads),
        "train": lambda: section_train(cfg),
        "compile": lambda: section_compile(cfg),
        "ort": lambda: section_ort(cfg),
        "generate": lambda: section_generate(cfg),
        "rewrite": lambda: section_rewrite(cfg),
        "scaling": lambda: section_scaling(cfg),
    }
    for name in sections:
        started = time.perf_counter()
        results[name] = runners[name]()
        if name == "eager":
            results["eager_gqa"] = section_eager(cfg, max(1, cfg.heads // 4))
        print(f"[bench] {name} done in {time.perf_counter() - started:.1f} s", flush=True)
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "latest.md").write_text(text + "\n")
    if "scaling" in results:
        plot(results, args.out / "overhead_vs_seq.png")
    return 0
