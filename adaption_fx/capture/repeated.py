"""Capture a decoder's repeated layers once: export the model cut to its first layer, then
copy that layer's nodes for the others (``passes.replicate``).

torch.export spends most of its time tracing layer after layer of the same code; on
SmolLM2-135M's 30 layers a capture takes about 6 s, a one-layer capture about 1 s. This is
only done where it cannot change the result:

- the model holds one ``nn.ModuleList`` of at least two modules of one class, with the same
  parameter and buffer names, shapes, dtypes and devices, the same settings on every
  submodule (only the layer's own index may differ) and no hooks;
- the grown graph is run once against the model itself on a small input; any difference
  beyond rounding, or any failure on the way, and the model is captured whole instead.
  When the one-layer capture came from the persistent graph cache and the graph grown
  from that same entry passed this check before, the pass is recorded beside the entry
  and the check is not run again.

``ADAPTION_FX_REPLICATE_LAYERS=0`` in the environment turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from adaption_fx.capture.captured import CapturedModel
from adaption_fx.passes.graph_copy import copy_flat_graph, graph_module_sharing, owner_at
from adaption_fx.passes.locate import within
from adaption_fx.passes.replicate import ReplicateLayer

logger = logging.getLogger(__name__)

ENV_SWITCH = "ADAPTION_FX_REPLICATE_LAYERS"
# Settings a layer may hold that differ between layers by construction: its own index.
_INDEX_NAMES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number"})


def replication_enabled() -> bool:
    """False when ``ADAPTION_FX_REPLICATE_LAYERS`` is set to 0, false, no or off."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class RepeatedLayers:
    """A model's list of alike decoder layers.

    Attributes:
        container: the ``nn.ModuleList``'s path, e.g. ``model.layers``.
        paths: each layer's path, in order (``model.layers.0``, ...).
    """

    container: str
    paths: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.paths)


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # a value whose == does not give a bool cannot be shown equal
        return False


def _description(layer: torch.nn.Module) -> tuple[Any, ...]:
    tensors = [
        (name, tuple(t.shape), t.dtype, t.device, isinstance(t, torch.nn.Parameter))
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]
    ]
    return type(layer), tuple(tensors)


def _difference(first: torch.nn.Module, other: torch.nn.Module, path: str) -> str | None:
    """Why ``other`` may not run the code traced for ``first``, or None."""
    if _description(first) != _description(other):
        return f"{path} differs from the first layer in its class or tensors"
    for (name, a), (_, b) in zip(first.named_modules(), other.named_modules(), strict=True):
        where = f"{path}.{name}" if name else path
        if type(a) is not type(b):
            return f"{where} is a {type(b).__name__}, not a {type(a).__name__}"
        for module in (a, b):
            if module._forward_hooks or module._forward_pre_hooks:
                return f"{where} has hooks"
        settings_a = {k: v for k, v in vars(a).items() if not k.startswith("_")}
        settings_b = {k: v for k, v in vars(b).items() if not k.startswith("_")}
        if settings_a.keys() != settings_b.keys():
            return (
                f"{where} has settings {sorted(settings_b.keys() ^ settings_a.keys())} only on one"
            )
        for key, value in settings_a.items():
            if (
                key not in _INDEX_NAMES
                and key != "training"
                and not _same_value(value, settings_b[key])
            ):
                return f"{where}.{key} is {settings_b[key]!r}, {value!r} in the first layer"
    return None


def find_repeated_layers(model: torch.nn.Module) -> RepeatedLayers | None:
    """The model's longest list of alike layers, or None (logged) if it has none."""
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and name
    ]
    if not lists:
        return None
    name, layers = max(lists, key=lambda item: len(item[1]))
    first = layers[0]
    for index, layer in enumerate(layers):
        why = _difference(first, layer, f"{name}.{index}")
        if why is not None:
            logger.info("capturing every layer of %s: %s", type(model).__name__, why)
            return None
    return RepeatedLayers(name, tuple(f"{name}.{i}" for i in range(len(layers))))


@contextlib.contextmanager
def first_layer_only(model: torch.nn.Module, layers: RepeatedLayers) -> Iterator[None]:
    """The model with its layer list cut to the first layer; restored afterwards."""
    parent_path, _, attribute = layers.container.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = parent._modules[attribute]
    parent._modules[attribute] = torch.nn.ModuleList([original[0]])
    try:
        yield
    finally:
        parent._modules[attribute] = original


def _install(root: torch.nn.Module, path: str, value: Any, owner: torch.nn.Module | None) -> None:
    module, name = owner_at(root, path)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(name, value)
    elif isinstance(value, torch.nn.Module):
        module.add_module(name, value)
    elif isinstance(value, torch.Tensor) and owner is not None and name in owner._buffers:
        module.register_buffer(
            name, value, persistent=name not in owner._non_persistent_buffers_set
        )
    else:
        setattr(module, name, value)


def _root(graph: torch.fx.Graph, model: torch.nn.Module, one: torch.fx.GraphModule, layers):
    """A module holding what ``graph`` reads: the layers' tensors from ``model`` itself,
    everything else from the one-layer capture (the same tensor objects)."""
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        source = model if any(within(target, p) for p in layers.paths) else one
        owner_path = target.rpartition(".")[0]
        owner = operator.attrgetter(owner_path)(source) if owner_path else source
        _install(root, target, operator.attrgetter(target)(source), owner)
    return root


def grow_capture(
    one: CapturedModel,
    model: torch.nn.Module,
    layers: RepeatedLayers,
    *,
    per_layer_inputs: dict[str, list[str]] | None = None,
    in_spec: pytree.TreeSpec | None = None,
    out_spec: pytree.TreeSpec | None = None,
) -> CapturedModel:
    """The capture of the whole model, grown from ``one``, the capture of its first layer.

    ``per_layer_inputs`` names each layer's own graph inputs (see
    ``passes.replicate.ReplicateLayer``); ``in_spec`` / ``out_spec`` replace the one-layer
    structures where the inputs or outputs depend on the layer count.
    """
    graph, _ = copy_flat_graph(one.graph_module)  # a graph of its own: lint checks attributes
    ReplicateLayer(layers.paths[0], list(layers.paths), per_layer_inputs).transform(graph)
    gm = graph_module_sharing(
        _root(graph, model, one.graph_module, layers), graph, "BaseGraphModule"
    )
    examples = dict(one.examples)
    for name, names in (per_layer_inputs or {}).items():
        if name in examples:
            examples.update({other: examples[name] for other in names})
    return dataclasses.replace(
        one,
        graph_module=gm,
        in_spec=in_spec if in_spec is not None else one.in_spec,
        out_spec=out_spec if out_spec is not None else one.out_spec,
        examples=examples,
    )


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if not expected.is_floating_point():
        return torch.equal(got, expected)
    tol = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(got, expected, rtol=tol, atol=tol * max(scale, 1.0)))


def same_outputs(got: Any, expected: Any) -> str | None:
    """Why two output structures differ beyond rounding, or None."""
    got_leaves = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    want_leaves = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    if len(got_leaves) != len(want_leaves):
        return f"{len(got_leaves)} output tensors, the model gives {len(want_leaves)}"
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        if not _close(a, b):
            return f"output {i} differs from the model's ({tuple(a.shape)}, {a.dtype})"
    return None


# The name under which a grown capture's check is recorded beside its cache entry.
GROWN_CHECK = "grown"


def capture_once_per_layer(
    model: torch.nn.Module,
    capture_one: Callable[[RepeatedLayers], CapturedModel],
    check: Callable[[CapturedModel], str | None],
    grow_options: Callable[[RepeatedLayers], dict[str, Any]] | None = None,
) -> CapturedModel | None:
    """Capture ``model`` through its first layer only and grow the rest, or return None
    (logged) where that is not possible or not exact; the caller then captures it whole.

    Args:
        capture_one: exports the model (called while it holds its first layer only) and
            returns the flat capture.
        check: runs the grown capture against the model; returns why they differ, or None.
            Skipped where ``capture_one``'s result came from a cache entry whose grown
            graph passed it before (``CapturedModel.cache_entry``).
        grow_options: keyword arguments of :func:`grow_capture` for these layers.
    """
    if not replication_enabled():
        return None
    layers = find_repeated_layers(model)
    if layers is None:
        return None
    name = type(model).__name__
    try:
        with first_layer_only(model, layers):
            one = capture_one(layers)
        options = grow_options(layers) if grow_options is not None else {}
        grown = grow_capture(one, model, layers, **options)
        entry = one.cache_entry
        if entry is not None and entry.verified(GROWN_CHECK):
            # The graph grown from this very entry matched the model when the entry was
            # made: the entry's key pins the model's code, config and tensor layout, and
            # growing is deterministic, so the same graph is grown again.
            logger.debug("grown %s capture already checked against the model", name)
            why = None
        else:
            why = check(grown)
            if why is None and entry is not None:
                entry.mark_verified(GROWN_CHECK)
    except Exception as exc:  # any failure here means: capture the model whole
        first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
        logger.info("capturing every layer of %s: the one-layer capture failed: %s", name, first)
        return None
    if why is not None:
        logger.warning(
            "capturing every layer of %s: the graph grown from its first layer does not "
            "match the model (%s)",
            name,
            why,
        )
        return None
    logger.info("captured %s through 1 of its %d layers", name, layers.count)
    return grown


__all__ = [
    "ENV_SWITCH",
    "GROWN_CHECK",
    "RepeatedLayers",
    "capture_once_per_layer",
    "find_repeated_layers",
    "first_layer_only",
    "grow_capture",
    "replication_enabled",
    "same_outputs",
]
