"""Mixed-adapter batches: what serving rows of several adapters in one batch costs.

    python -m bench.mixed                    # toy model, then the embedded model
    python -m bench.mixed --model embedded   # one of them
    python -m bench.mixed --quick            # tiny sizes, a few rounds (the test suite's run)

Four adapters (same structure: ``adapter_len`` 10 on every layer), eight rows, two per
adapter. Per engine (eager PyTorch, ONNX Runtime) and task (a forward over ``seq`` tokens,
greedy generation of ``new_tokens`` tokens), three contenders run interleaved, round by
round, after warm-up, in one process:

- ``single``: one batch of 8 rows, all with one adapter (the plain single-adapter path:
  the active adapter in PyTorch, an ``adapter_as_inputs`` file in ORT);
- ``mixed``: one batch of 8 rows naming 4 adapters (``adapter_names=[...]``; a
  ``mixed_batch=True`` file in ORT);
- ``separate``: 4 calls of 2 rows, each with its own adapter (what serving does without
  mixed batches).

Ratios are medians of per-round ratios. The target: ``mixed / single <= 1.1`` (mixing costs
almost nothing). One more eager forward row mixes structures (prompt lengths 16, 10, 4
and 1 on all, half and a quarter of the layers): its union graph costs what its widest
adapter costs, so it is reported against a single batch of that widest adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adaption_fx import AdaptedModel, AdaptionConfig, rewrite
from bench.common import median_ms, race, ratio
from bench.memory import embedded_model, torch_threads
from bench.run import Config as ToyConfig
from bench.run import build_llama

TARGET = 1.1
ADAPTERS = ("a", "b", "c", "d")


@dataclass
class MixedConfig:
    batch: int = 8
    seq: int = 128
    prompt: int = 24
    new_tokens: int = 16
    adapter_len: int = 10
    warmup: int = 2
    repeats: int = 10
    threads: int = 2


TOY = MixedConfig()
TOY_QUICK = MixedConfig(seq=16, prompt=6, new_tokens=3, warmup=1, repeats=2)
EMBEDDED = MixedConfig(repeats=7)


def _summary(times: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "ms": median_ms(times),
        "mixed/single": ratio(times, "mixed", "single"),
        "separate/single": ratio(times, "separate", "single"),
        "separate/mixed": ratio(times, "separate", "mixed"),
    }


# --------------------------------------------------------------------- models and inputs
def _toy_model(quick: bool) -> Any:
    cfg = ToyConfig()
    if quick:
        cfg = ToyConfig(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=96, vocab=96)
    return build_llama(cfg)


def _randomize(model: AdaptedModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.set_adapter(name)
    state = model.adapter_state_dict()
    model.load_state_dict(
        {k: (torch.randn(v.shape, generator=g) * 0.1).to(v.dtype) for k, v in state.items()}
    )


def adapted(base: Any, structures: dict[str, AdaptionConfig]) -> AdaptedModel:
    """``base`` rewritten with the named adapters, each with random prompts and gates."""
    first, *rest = structures
    model = rewrite(base, structures[first], adapter_name=first)
    for name in rest:
        model.add_adapter(name, structures[name])
    for seed, name in enumerate(structures):
        _randomize(model, name, seed)
    model.set_adapter(first)
    return model


def _feeds(
    base: Any, cfg: MixedConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, : cfg.seq // 4] = 0  # padded rows: the masked path serving takes
    prompts = torch.randint(0, vocab, (cfg.batch, cfg.prompt), generator=g)
    prompt_mask = torch.ones_like(prompts)
    for row in range(1, cfg.batch, 2):
        prompt_mask[row, : row % cfg.prompt] = 0  # left padding, for generation
    return {"input_ids": ids, "attention_mask": mask}, prompts, prompt_mask


def _names(cfg: MixedConfig) -> list[str]:
    per = cfg.batch // len(ADAPTERS)
    return [name for name in ADAPTERS for _ in range(per)]


def _slices(cfg: MixedConfig) -> list[tuple[str, slice]]:
    per = cfg.batch // len(ADAPTERS)
    return [(name, slice(i * per, (i + 1) * per)) for i, name in enumerate(ADAPTERS)]


# --------------------------------------------------------------------- sections
def forward_contenders(model: AdaptedModel, cfg: MixedConfig, feed) -> dict[str, Callable]:
    """The eager forward contenders (single, mixed, separate) on ``model``."""
    names = _names(cfg)

    def single():
        model.set_adapter("a")
        model(**feed)

    def mixed():
        model(**feed, adapter_names=names)

    def separate():
        for name, rows in _slices(cfg):
            model.set_adapter(name)
            model(**{k: v[rows] for k, v in feed.items()})

    return {"single": single, "mixed": mixed, "separate": separate}


def generate_contenders(
    model: AdaptedModel, cfg: MixedConfig, prompts, prompt_mask
) -> dict[str, Callable]:
    """The eager generation contenders (single, mixed, separate) on ``model``."""
    names = _names(cfg)
    gen = dict(max_new_tokens=cfg.new_tokens, eos_token_id=None)

    def single():
        model.set_adapter("a")
        model.generate(prompts, prompt_mask, **gen)

    def mixed():
        model.generate(prompts, prompt_mask, adapter_names=names, **gen)

    def separate():
        for name, rows in _slices(cfg):
            model.set_adapter(name)
            model.generate(prompts[rows], prompt_mask[rows], **gen)

    return {"single": single, "mixed": mixed, "separate": separate}


def ort_contenders(model: AdaptedModel, cfg: MixedConfig, feed, prompts, prompt_mask, tmp: Path):
    from adaption_fx.export import OrtModel, to_onnx

    names = _names(cfg)
    gen = dict(max_new_tokens=cfg.new_tokens, eos_token_id=None)
    model.set_adapter("a")
    files = {}
    for kind, for_generation in (("forward", False), ("generate", True)):
        for mixed in (False, True):
            path = tmp / f"{kind}_{'mixed' if mixed else 'single'}.onnx"
            to_onnx(
                model,
                path,
                adapter_as_inputs=True,
                mixed_batch=mixed,
                for_generation=for_generation,
                progress=False,
            )
            ort = OrtModel(path, intra_op_num_threads=cfg.threads)
            if mixed:
                for name in ADAPTERS:
                    ort.set_adapter_weights(model, adapter_name=name)
            else:
                ort.set_adapter_weights(model)
            files[(kind, mixed)] = ort
    feed_np = {k: v.numpy() for k, v in feed.items()}
    single, mixed = files[("forward", False)], files[("forward", True)]
    forward = {
        "single": lambda: single(**feed_np),
        "mixed": lambda: mixed(**feed_np, adapter_names=names),
        "separate": lambda: [
            mixed(**{k: v[rows] for k, v in feed_np.items()}, adapter_names=_repeat(name, rows))
            for name, rows in _slices(cfg)
        ],
    }
    single_gen, mixed_gen = files[("generate", False)], files[("generate", True)]
    generate = {
        "single": lambda: single_gen.generate(prompts, prompt_mask, **gen),
        "mixed": lambda: mixed_gen.generate(prompts, prompt_mask, adapter_names=names, **gen),
        "separate": lambda: [
            mixed_gen.generate(
                prompts[rows], prompt_mask[rows], adapter_names=_repeat(name, rows), **gen
            )
            for name, rows in _slices(cfg)
        ],
    }
    return forward, generate, mixed_gen


def _repeat(name: str, rows: slice) -> list[str]:
    return [name] * (rows.stop - rows.start)


def _check_tokens(model: AdaptedModel, cfg: MixedConfig, prompts, prompt_mask, ort=None) -> bool:
    """Mixed generation gives each row the tokens it gets alone (the bench's sanity)."""
    gen = dict(max_new_tokens=cfg.new_tokens, eos_token_id=None)
    names = _names(cfg)
    mixed = (ort or model).generate(prompts, prompt_mask, adapter_names=names, **gen)
    for name, rows in _slices(cfg):
        model.set_adapter(name)
        alone = model.generate(prompts[rows], prompt_mask[rows], **gen)
        if not torch.equal(torch.as_tensor(mixed[rows]), alone):
            return False
    return True


def compare(cfg: MixedConfig, base: Any, ort: bool = True) -> dict[str, Any]:
    """The races on one base model."""
    structures = {
        name: AdaptionConfig(adapter_len=cfg.adapter_len, adapter_layers=len_layers(base))
        for name in ADAPTERS
    }
    model = adapted(base, structures)
    feed, prompts, prompt_mask = _feeds(base, cfg)
    result: dict[str, Any] = {"config": asdict(cfg), "layers": len_layers(base)}
    with torch_threads(cfg.threads), torch.no_grad():
        result["same_tokens_eager"] = _check_tokens(model, cfg, prompts, prompt_mask)
        forward = forward_contenders(model, cfg, feed)
        generate = generate_contenders(model, cfg, prompts, prompt_mask)
        result["eager_forward"] = _summary(race(forward, cfg.warmup, cfg.repeats)["wall"])
        result["eager_generate"] = _summary(race(generate, cfg.warmup, cfg.repeats)["wall"])
        result["eager_forward_structures"] = _structures(base, cfg, feed)
        if ort:
            with tempfile.TemporaryDirectory() as tmp:
                forward, generate, ort_model = ort_contenders(
                    model, cfg, feed, prompts, prompt_mask, Path(tmp)
                )
                result["same_tokens_ort"] = _check_tokens(
                    model, cfg, prompts, prompt_mask, ort_model
                )
                result["ort_forward"] = _summary(race(forward, cfg.warmup, cfg.repeats)["wall"])
                result["ort_generate"] = _summary(race(generate, cfg.warmup, cfg.repeats)["wall"])
    return result


def len_layers(base: Any) -> int:
    return int(base.config.num_hidden_layers)


def _structures(base: Any, cfg: MixedConfig, feed: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Mixed structures in one batch, against one batch of the widest adapter."""
    layers = len_layers(base)
    structures = {
        "a": AdaptionConfig(adapter_len=16, adapter_layers=layers, gate="per_head"),
        "b": AdaptionConfig(adapter_len=10, adapter_layers=layers),
        "c": AdaptionConfig(
            adapter_len=4, adapter_layers=max(1, layers // 2), gate_activation="tanh"
        ),
        "d": AdaptionConfig(adapter_len=1, adapter_layers=max(1, layers // 4)),
    }
    model = adapted(base, structures)
    return _summary(race(forward_contenders(model, cfg, feed), cfg.warmup, cfg.repeats)["wall"])


# --------------------------------------------------------------------- report
ROWS = (
    ("eager_forward", "eager, forward"),
    ("eager_forward_structures", "eager, forward, mixed structures"),
    ("eager_generate", "eager, generate"),
    ("ort_forward", "ORT, forward"),
    ("ort_generate", "ORT, generate"),
)


def table(name: str, result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"### {name}: {result['layers']} layers, batch {cfg['batch']} over {len(ADAPTERS)} "
        f"adapters; forward {cfg['seq']} tokens, generate {cfg['new_tokens']} tokens after "
        f"a {cfg['prompt']}-token prompt; {cfg['threads']} threads, median of "
        f"{cfg['repeats']} rounds",
        "",
        "| engine, task | single 8 (ms) | mixed 8 (ms) | 4 x 2 separate (ms) | mixed / single "
        f"(target <= {TARGET}) | separate / mixed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        row = result.get(key)
        if row is None:
            continue
        ms = row["ms"]
        verdict = "met" if row["mixed/single"] <= TARGET else "MISSED"
        lines.append(
            f"| {label} | {ms['single']:.1f} | {ms['mixed']:.1f} | {ms['separate']:.1f} | "
            f"{row['mixed/single']:.3f} ({verdict}) | {row['separate/mixed']:.2f} |"
        )
    same = [str(result[k]) for k in ("same_tokens_eager", "same_tokens_ort") if k in result]
    lines += [
        "",
        "Mixed generation gives every row the tokens it generates alone (eager"
        + (", ORT" if len(same) > 1 else "")
        + f"): {', '.join(same)}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mixed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", choices=("toy", "embedded", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="tiny toy sizes, no embedded model")
    parser.add_argument("--no-ort", action="store_true", help="PyTorch only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {}
    if args.model in ("toy", "both"):
        cfg = TOY_QUICK if args.quick else TOY
        results["toy"] = compare(cfg, _toy_model(args.quick), ort=not args.no_ort)
    if args.model in ("embedded", "both") and not args.quick:
        results["embedded"] = compare(EMBEDDED, embedded_model(), ort=not args.no_ort)
    text = "\n\n".join(table(name, r) for name, r in results.items())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "mixed_quick" if args.quick else "mixed"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
