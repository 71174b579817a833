"""Memory kept for the backward in one training step: ours, ours with gradient
checkpointing, and PEFT, on the toy model and on the embedded SmolLM2-135M.

    python -m bench.memory                    # toy model, then the embedded model
    python -m bench.memory --model toy        # one of them
    python -m bench.memory --quick            # tiny sizes (the test suite's run)

Two counts per contender, both taken over the forward of one training step (loss
included) and deduplicated by storage, parameters and inputs excluded:

- **saved**: the tensors autograd saves for the backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks``. (Non-reentrant ``torch.utils.checkpoint``
  keeps a region's inputs as saved tensors too, so they are counted.)
- **held**: every tensor the forward created that is still alive once the forward has
  returned and only the loss is kept: what the backward will need, however it is kept.
  An independent count of the same thing; the two agree, and the targets read this one.

A third table splits ours' saved bytes by decoder layer (the graph's module stacks, read
while a ``torch.fx.Interpreter`` runs the training graph): layers below the lowest adapted
layer save nothing, since nothing there needs a gradient.

Counts are deterministic (no timing), so the targets are also checked by
``tests/test_memory.py`` on a tiny model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from adaption_fx import AdaptedModel, AdaptionConfig, rewrite
from adaption_fx.passes.insert import ADAPTION_META_KEY
from adaption_fx.passes.locate import plain_module_path, within
from bench.run import build_llama

OUTSIDE = "outside the layers"
TARGETS = {"ours/peft": 0.9, "checkpointed/ours": 0.35}


@dataclass
class MemoryConfig:
    """One model's memory comparison."""

    name: str
    batch: int
    seq: int
    adapter_len: int = 10
    adapter_layers: int | None = None  # None: every layer
    split_layers: int | None = None  # adapted layers in the by-layer table
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 1408
    vocab: int = 4096
    threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


TOY = MemoryConfig(name="toy", batch=4, seq=256, split_layers=4)
TOY_QUICK = MemoryConfig(
    name="toy",
    batch=2,
    seq=32,
    adapter_len=4,
    split_layers=2,
    hidden=64,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate=160,
    vocab=128,
)
EMBEDDED = MemoryConfig(name="embedded", batch=4, seq=128, split_layers=10)


# --------------------------------------------------------------------- counting
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Created(TorchDispatchMode):
    """Records a weak reference to the storage of every tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out


@dataclass
class StepMemory:
    """What one training step's forward keeps for the backward, in bytes."""

    saved: int
    held: int
    by_layer: dict[str, int] | None = None


def _excluded(model: torch.nn.Module, feed: dict[str, Any]) -> set[int]:
    tensors = [*model.parameters(), *model.buffers(), *tree_leaves(feed)]
    return {_storage_key(t) for t in tensors if isinstance(t, torch.Tensor)}


def step_memory(
    model: torch.nn.Module,
    feed: dict[str, Any],
    *,
    forward: Callable[..., Any] | None = None,
    layer_of: Callable[[], str] | None = None,
) -> StepMemory:
    """Run one training forward (``model(**feed).loss``, or ``forward(**feed).loss``) and
    count what it keeps for the backward (see the module docstring); then run the
    backward, so the step completes.

    ``layer_of``: called in the pack hook, names the layer saving a tensor (by-layer split).
    """
    excluded = _excluded(model, feed)
    saved: dict[int, int] = {}
    per_layer: Counter[str] = Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            if layer_of is not None:
                per_layer[layer_of()] += saved[key]
        return t

    created = _Created()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), created:
        loss = (forward or model)(**feed).loss
    keep = {_storage_key(loss)}
    held = sum(
        nbytes
        for key, (ref, nbytes) in created.storages.items()
        if key not in excluded and key not in keep and not ref.expired()
    )
    loss.backward()
    model.zero_grad(set_to_none=True)
    return StepMemory(sum(saved.values()), held, dict(per_layer) if layer_of else None)


class _LayerTracker(torch.fx.Interpreter):
    """Runs a graph node by node, remembering the decoder layer of the node running."""

    def __init__(self, gm: torch.fx.GraphModule, layers: list[str]) -> None:
        super().__init__(gm)
        self.layers = layers
        self.current = OUTSIDE

    def run_node(self, n: torch.fx.Node) -> Any:
        tag = n.meta.get(ADAPTION_META_KEY)
        if tag is not None:  # inserted by the pass: no module stack, but its site's layer
            self.current = next((p for p in self.layers if within(tag["site"], p)), OUTSIDE)
        else:
            stack = n.meta.get("nn_module_stack") or {}
            paths = [plain_module_path(entry[0]) for entry in stack.values()]
            self.current = next((p for p in paths if p in self.layers), OUTSIDE)
        return super().run_node(n)


def ours_by_layer(model: AdaptedModel, feed: dict[str, Any]) -> StepMemory:
    """:func:`step_memory` of ours with the saved bytes split by decoder layer."""
    from adaption_fx.model.eager import eager_graph
    from adaption_fx.passes.activation_checkpoint import decoder_layer_regions

    sites = [s.module_path for s in model.sites]
    layers = [r.module_path for r in decoder_layer_regions(model.base_graph_module.graph, sites)]
    tracker: list[_LayerTracker] = []

    def runner(gm: torch.fx.GraphModule) -> Callable[..., Any]:
        tracker.append(_LayerTracker(eager_graph(gm), layers))
        return tracker[-1].run

    result = step_memory(
        model,
        feed,
        forward=lambda **kw: model.run_graphs(runner, (), kw),
        layer_of=lambda: tracker[-1].current,
    )
    split = result.by_layer or {}
    result.by_layer = {layer: split.get(layer, 0) for layer in [*layers, OUTSIDE]}
    return result


# --------------------------------------------------------------------- models
def embedded_model() -> Any:
    """The embedded SmolLM2-135M-Instruct (fp32, CPU, eval)."""
    from adaption_fx.app.pretrained import load_pretrained

    return load_pretrained(None).model


def _peft(base: Any, adapter: AdaptionConfig, state: dict[str, torch.Tensor]) -> Any:
    from peft import AdaptionPromptConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(base),
        AdaptionPromptConfig(
            adapter_len=adapter.adapter_len,
            adapter_layers=adapter.adapter_layers,
            task_type="CAUSAL_LM",
        ),
    )
    missing = peft_model.load_state_dict(
        {"base_model.model." + k: v for k, v in state.items()}, strict=False
    )
    if missing.unexpected_keys:
        raise RuntimeError(f"PEFT did not take {missing.unexpected_keys[:4]}")
    return peft_model


def _feed(base: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : seq // 4] = 0  # one left-padded row: the masked path, as in fine-tuning
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(cfg: MemoryConfig, base: Any | None = None) -> dict[str, Any]:
    """Ours, ours with gradient checkpointing and PEFT on one model; plus ours' saved
    bytes by layer with only the top ``split_layers`` adapted."""
    with torch_threads(cfg.threads):
        base = base if base is not None else build_llama(cfg)  # same fields as run.Config
        layers = base.config.num_hidden_layers
        adapter = AdaptionConfig(
            adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers or layers
        )
        ours = rewrite(base, adapter)
        g = torch.Generator().manual_seed(1)
        state = {
            k: torch.randn(v.shape, generator=g) * 0.1 for k, v in ours.adapter_state_dict().items()
        }
        ours.load_state_dict(state)
        feed = _feed(base, cfg.batch, cfg.seq)
        counts = {"ours": step_memory(ours, feed)}
        ours.gradient_checkpointing_enable()
        counts["checkpointed"] = step_memory(ours, feed)
        ours.gradient_checkpointing_disable()
        counts["peft"] = step_memory(_peft(base, adapter, state), feed)
        split = None
        if cfg.split_layers:
            partial = rewrite(
                base,
                AdaptionConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.split_layers),
            )
            split = ours_by_layer(partial, feed).by_layer
    held = {k: v.held for k, v in counts.items()}
    return {
        "config": asdict(cfg),
        "layers": layers,
        "adapted_layers": adapter.adapter_layers,
        "tokens": cfg.batch * cfg.seq,
        "saved_bytes": {k: v.saved for k, v in counts.items()},
        "held_bytes": held,
        "ratios": {
            "ours/peft": held["ours"] / held["peft"],
            "checkpointed/ours": held["checkpointed"] / held["ours"],
            "checkpointed/peft": held["checkpointed"] / held["peft"],
        },
        "by_layer": {"adapted_layers": cfg.split_layers, "saved_bytes": split},
    }


# --------------------------------------------------------------------- report
def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"### {cfg['name']}: batch {cfg['batch']} x {cfg['seq']} tokens, "
        f"{result['adapted_layers']} of {result['layers']} layers adapted "
        f"(adapter_len {cfg['adapter_len']}), fp32",
        "",
        "| contender | held for backward (MiB) | saved, hooks (MiB) | per token (KiB) |",
        "|---|---|---|---|",
    ]
    names = {"ours": "ours", "checkpointed": "ours, gradient checkpointing", "peft": "PEFT"}
    for key, label in names.items():
        held = result["held_bytes"][key]
        lines.append(
            f"| {label} | {_mib(held)} | {_mib(result['saved_bytes'][key])} | "
            f"{held / result['tokens'] / 1024:.1f} |"
        )
    lines += ["", "| ratio (held bytes) | value | target | met |", "|---|---|---|---|"]
    for key, value in result["ratios"].items():
        target = TARGETS.get(key)
        met = "" if target is None else ("yes" if value <= target else "**no**")
        lines.append(
            f"| {key} | {value:.3f} | {'' if target is None else f'<= {target}'} | {met} |"
        )
    split = result["by_layer"]["saved_bytes"]
    if split:
        lines += [
            "",
            f"Ours' saved bytes by decoder layer, top {result['by_layer']['adapted_layers']} "
            "adapted:",
            "",
            "| layer | saved (MiB) |",
            "|---|---|",
        ]
        lines += [f"| {layer} | {_mib(n)} |" for layer, n in split.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", choices=("toy", "embedded", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="tiny toy sizes, no embedded model")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {}
    if args.model in ("toy", "both"):
        results["toy"] = compare(TOY_QUICK if args.quick else TOY)
    if args.model in ("embedded", "both") and not args.quick:
        results["embedded"] = compare(EMBEDDED, base=embedded_model())
    text = "\n\n".join(table(r) for r in results.values())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory_quick" if args.quick else "memory"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
