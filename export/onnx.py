"""Export an AdaptedModel's graph to ONNX (dynamic batch and sequence) for ONNX Runtime.

The exported graph is the one the model runs now: the active adapter's rewritten graph,
folded for inference by default, or the base graph while adapters are disabled. With
``adapter_as_inputs=True`` the adapter tensors are graph inputs, so one file serves every
adapter of the same structure. A small companion file (``<name>.adapter.onnx``) then maps a
checkpoint's prompts and gates to those inputs, so ONNX Runtime can load an adapter
directory without PyTorch weights.

With ``mixed_batch=True`` the file is the mixed-batch graph (``passes/mixed_batch.py``):
each batch row picks its adapter from tables that are inputs too, so one file serves a
batch mixing any adapters (and the base model) whose layers it covers. Its companion
projects prompts, zero-padded to the file's ``mixed_max_adapter_len``, at every covered
layer: the key and value paths work token by token (the prompt gets no positional
encoding), so the first ``adapter_len`` keys and values of a padded prompt are those of
the prompt itself, and one projection serves adapters of every length and layer set.
Gates need no projection: the reader applies the checkpoint's gate activation and repeats
a scalar gate per head.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import operator
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.fx
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from adaption_fx.model.adapted import AdaptedModel
from adaption_fx.passes.cleanup import functionalize_fresh_inplace, is_functional
from adaption_fx.passes.fold import FOLDED_SUFFIXES, adapter_projection, fold_adapter_kv
from adaption_fx.passes.insert import (
    PROMPT_SUFFIX,
    AdapterStructure,
    AdaptionGraph,
    insert_adaption_prompt,
    prompt_key,
)
from adaption_fx.passes.locate import select_top_sites
from adaption_fx.passes.mixed_batch import (
    KEY_MASK_INPUT,
    ROWS_INPUT,
    MixedGraph,
    insert_mixed_adapters,
)

logger = logging.getLogger(__name__)

METADATA_KEY = "adaption_fx"
PROJECTION_SUFFIX = ".adapter.onnx"


class FlatCall(torch.nn.Module):
    """Calls a flat graph with tensor inputs positionally, filling captured constants.

    ``input_dims``: for the inputs after the model's own (the adapter inputs), each one's
    dynamic axes as ``{axis: name}``; the name ``"batch"`` is the model inputs' batch size,
    any other name a size of its own, shared by every axis of that name (see
    :func:`_symbolic_inputs`). None: those inputs have static sizes.
    """

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        layout: list[tuple[str, Any]],
        buffers: dict[str, torch.Tensor],
        input_dims: list[dict[int, str]] | None = None,
    ):
        super().__init__()
        self.graph_module = graph_module
        self.layout = layout
        self.input_dims = input_dims
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.buffer_names = list(buffers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(inputs)
        flat = [next(it) if kind == "input" else value for kind, value in self.layout]
        rest = list(it)
        rest.extend(getattr(self, name) for name in self.buffer_names)
        return tuple(self.graph_module(*flat, *rest))


@dataclass
class _Plan:
    graph_module: torch.fx.GraphModule
    adapter_inputs: list[str]
    adapter_values: dict[str, torch.Tensor]
    baked: dict[str, torch.Tensor]
    folded: bool
    adapter: dict[str, Any] | None
    source: AdaptionGraph | None = None  # the adapter's rewritten graph, before folding
    source_tensors: list[torch.Tensor] | None = None  # its prompts and gates, in input order

    @property
    def raw_inputs(self) -> list[str]:
        return list(self.source.adapter_inputs) if self.source is not None else []


def _plan(
    model: AdaptedModel, adapter_name: str | None, adapter_as_inputs: bool, fold: bool
) -> _Plan:
    disabled = adapter_name is None and (not model.adapters_enabled or not model.active_adapter)
    if disabled:
        if adapter_as_inputs:
            raise ValueError("adapter_as_inputs=True needs an adapter; adapters are disabled")
        return _Plan(model.base_graph_module, [], {}, {}, False, None)
    name = model.active_adapter if adapter_name is None else adapter_name
    graph = model.adaption_graph(name)
    tensors = [t.detach() for t in model.adapter_tensors(name)]
    adapter = {"name": name, **model.adapters[name].to_dict()}
    if fold:
        folded = fold_adapter_kv(graph, tensors, as_inputs=adapter_as_inputs)
        values = {k: folded.values[k] for k in folded.adapter_inputs}
        inputs = list(folded.adapter_inputs)
        return _Plan(folded.graph_module, inputs, values, {}, True, adapter, graph, tensors)
    named = dict(zip(graph.adapter_inputs, tensors, strict=True))
    if adapter_as_inputs:
        return _Plan(graph.graph_module, list(named), named, {}, False, adapter, graph, tensors)
    baked = {k.replace(".", "_"): v for k, v in named.items()}
    return _Plan(graph.graph_module, [], {}, baked, False, adapter, graph, tensors)


# ----------------------------------------------------------------------- mixed batches
# Names of the table inputs' dynamic axes (``torch.export.Dim`` names, and the ONNX inputs'
# axis names): the number of table rows (the base model's row and one per adapter) and the
# adapter keys per row (the longest prompt in the table).
ADAPTERS_DIM = "adapters"
ADAPTER_KEYS_DIM = "adapter_keys"


@dataclass
class _MixedPlan:
    """What a ``mixed_batch=True`` export needs beyond the model inputs."""

    graph: MixedGraph
    examples: list[torch.Tensor]  # one per table input
    input_dims: list[dict[int, str]]  # per table input: axis -> dim name
    dtype: torch.dtype
    max_adapter_len: int
    adapter_layers: int
    projection: torch.fx.GraphModule  # prompts (max_adapter_len long) -> keys and values
    projection_inputs: list[str]
    projection_outputs: list[str]
    projection_examples: list[torch.Tensor]


def _table_dims(table_inputs: tuple[str, ...]) -> list[dict[int, str]]:
    """Each table input's dynamic axes: rows (batch,), key mask (adapters, keys), per site
    key/value (adapters, kv_heads, keys, dim) and activated gate (adapters, heads)."""
    dims = []
    for name in table_inputs:
        if name == ROWS_INPUT:
            dims.append({0: BATCH_DIM})
        elif name == KEY_MASK_INPUT:
            dims.append({0: ADAPTERS_DIM, 1: ADAPTER_KEYS_DIM})
        elif name.endswith(FOLDED_SUFFIXES[2]):
            dims.append({0: ADAPTERS_DIM})
        else:
            dims.append({0: ADAPTERS_DIM, 2: ADAPTER_KEYS_DIM})
    return dims


def _fresh_sizes(taken: set[int], count: int) -> list[int]:
    """``count`` distinct sizes >= 2 that no example input has: the export trace then ties
    no table size to another input's size, nor specialises it as 0 or 1."""
    sizes: list[int] = []
    size = 3
    while len(sizes) < count:
        if size not in taken:
            sizes.append(size)
        size += 1
    return sizes


def _prompt_projection(
    graph: AdaptionGraph,
) -> tuple[torch.fx.GraphModule, list[str], list[str]]:
    """The adapter projection of ``graph`` (``passes.fold.adapter_projection``) without its
    gates: prompts in, per-site folded keys and values out (the gate activation is applied
    by the reader, from the checkpoint's config). Returns the module, its input names (the
    prompts' state-dict keys) and its output names."""
    module, names = adapter_projection(graph)
    g = module.graph
    output = next(n for n in g.nodes if n.op == "output")
    keep = [
        (name, node)
        for name, node in zip(names, output.args[0], strict=True)
        if not name.endswith(FOLDED_SUFFIXES[2])
    ]
    output.args = (tuple(node for _, node in keep),)
    g.eliminate_dead_code()
    for node in list(g.nodes):
        if node.op == "placeholder" and not node.users:
            g.erase_node(node)
    inputs = [k for k in graph.adapter_inputs if k.endswith(PROMPT_SUFFIX)]
    if sum(n.op == "placeholder" for n in g.nodes) != len(inputs):
        raise RuntimeError("the adapter projection reads more than the prompts")
    g.lint()
    module.recompile()
    return module, inputs, [name for name, _ in keep]


def _mixed_settings(
    model: AdaptedModel, max_adapter_len: int | None, adapter_layers: int | None
) -> tuple[int, int]:
    """The prompt length and the number of top layers a mixed file covers: the keywords'
    values, checked against the model's adapters, else its longest and widest adapter's."""
    for name, value in (
        ("mixed_max_adapter_len", max_adapter_len),
        ("mixed_adapter_layers", adapter_layers),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}")
    configs = model.adapters
    if not configs and (max_adapter_len is None or adapter_layers is None):
        raise ValueError(
            "a mixed_batch export needs at least one adapter, or both mixed_max_adapter_len "
            "and mixed_adapter_layers to size the file for adapters loaded later"
        )
    longest = max(configs.items(), key=lambda kv: kv[1].adapter_len, default=None)
    widest = max(configs.items(), key=lambda kv: kv[1].adapter_layers, default=None)
    if max_adapter_len is None:
        max_adapter_len = longest[1].adapter_len  # type: ignore[index]
    elif longest is not None and max_adapter_len < longest[1].adapter_len:
        raise ValueError(
            f"mixed_max_adapter_len={max_adapter_len} is shorter than adapter "
            f"{longest[0]!r} (adapter_len={longest[1].adapter_len}): the file could not load "
            "its checkpoint"
        )
    sites = len(model.sites)
    if adapter_layers is None:
        adapter_layers = widest[1].adapter_layers  # type: ignore[index]
    elif widest is not None and adapter_layers < widest[1].adapter_layers:
        raise ValueError(
            f"mixed_adapter_layers={adapter_layers} covers fewer layers than adapter "
            f"{widest[0]!r} adapts (adapter_layers={widest[1].adapter_layers})"
        )
    if adapter_layers > sites:
        raise ValueError(
            f"mixed_adapter_layers={adapter_layers} but the model has only {sites} attention sites"
        )
    return max_adapter_len, adapter_layers


def _mixed_plan(
    model: AdaptedModel,
    max_adapter_len: int,
    adapter_layers: int,
    examples: list[torch.Tensor],
) -> _MixedPlan:
    """The mixed-batch graph over the top ``adapter_layers`` sites (``model.mixed_graph()``
    where that is what the model's adapters adapt), example tables, and the projection of
    prompts ``max_adapter_len`` long over the same sites."""
    selected = select_top_sites(model.sites, adapter_layers)
    paths = [s.module_path for s in selected]
    mixed = model.mixed_graph() if model.adapters else None
    if mixed is None or [s.module_path for s in mixed.sites] != paths:
        mixed = insert_mixed_adapters(model.base_graph_module, selected)
    weight = model.base_graph_module.get_parameter(selected[0].key_projection.weight)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    device = weight.device
    batch = int(examples[0].shape[0]) if examples and examples[0].dim() else 2
    taken = {int(d) for e in examples for d in e.shape}
    adapters, keys = _fresh_sizes(taken | {batch}, 2)
    dims = _table_dims(mixed.table_inputs)
    by_path = {s.module_path: s for s in mixed.sites}
    tables: list[torch.Tensor] = []
    for name in mixed.table_inputs:
        if name == ROWS_INPUT:
            tables.append(torch.arange(batch, device=device) % adapters)
            continue
        if name == KEY_MASK_INPUT:
            tables.append(torch.zeros(adapters, keys, dtype=dtype, device=device))
            continue
        path, suffix = name.rsplit(".", 1) if "." in name else ("", name)
        site = by_path[path]
        shape = {
            FOLDED_SUFFIXES[0]: (adapters, site.num_kv_heads, keys, site.head_dim),
            FOLDED_SUFFIXES[1]: (adapters, site.num_kv_heads, keys, site.value_head_dim),
            FOLDED_SUFFIXES[2]: (adapters, site.num_heads),
        }[suffix]
        tables.append(torch.randn(shape, dtype=dtype, device=device))

    union = insert_adaption_prompt(
        model.base_graph_module,
        list(mixed.sites),
        AdapterStructure(adapter_len=max_adapter_len, gate="per_head"),
    )
    projection, proj_inputs, proj_outputs = _prompt_projection(union)
    hidden = {prompt_key(s): s.hidden_size for s in mixed.sites}
    proj_examples = [
        torch.randn(1, max_adapter_len, hidden[k]).to(device=device, dtype=dtype)
        for k in proj_inputs
    ]
    return _MixedPlan(
        graph=mixed,
        examples=tables,
        input_dims=dims,
        dtype=dtype,
        max_adapter_len=max_adapter_len,
        adapter_layers=adapter_layers,
        projection=projection,
        projection_inputs=proj_inputs,
        projection_outputs=proj_outputs,
        projection_examples=proj_examples,
    )


def _mixed_metadata(model: AdaptedModel, mixed: _MixedPlan, projection_name: str) -> dict[str, Any]:
    """The metadata's ``mixed_batch`` entry: what ``OrtModel`` needs to build tables and
    project checkpoints without the PyTorch model."""
    return {
        "sites": [
            {
                "module_path": s.module_path,
                "num_heads": s.num_heads,
                "num_kv_heads": s.num_kv_heads,
                "head_dim": s.head_dim,
                "value_head_dim": s.value_head_dim,
                "hidden_size": s.hidden_size,
            }
            for s in mixed.graph.sites
        ],
        # Every attention site, in execution order: an adapter's adapter_layers=L adapts
        # the last L of them.
        "all_sites": [s.module_path for s in model.sites],
        "adapter_layers": mixed.adapter_layers,
        "max_adapter_len": mixed.max_adapter_len,
        "dtype": str(mixed.dtype).removeprefix("torch."),
        "table_inputs": list(mixed.graph.table_inputs),
        "rows_input": ROWS_INPUT,
        "key_mask_input": KEY_MASK_INPUT,
        "projection": projection_name,
        "projection_inputs": mixed.projection_inputs,
        "projection_outputs": mixed.projection_outputs,
        # The adapters the model held at export (for reference: OrtModel loads its own).
        "adapters": {name: config.to_dict() for name, config in model.adapters.items()},
    }


def _concrete(example: torch.Tensor) -> torch.Tensor:
    # Placeholder metadata holds fake tensors with symbolic sizes; export needs real ones.
    shape = [d if isinstance(d, int) else int(d.node.hint) for d in example.shape]
    if example.dtype.is_floating_point:
        return torch.randn(shape, dtype=example.dtype)
    return torch.ones(shape, dtype=example.dtype)


def _model_inputs(model: AdaptedModel, example_inputs: dict[str, torch.Tensor] | None):
    captured = model.captured
    if captured.in_spec is None or captured.positional_count:
        raise ValueError(
            "to_onnx supports models captured with keyword inputs (Hugging Face causal LMs "
            "and keyword example_inputs)"
        )
    layout: list[tuple[str, Any]] = []
    names: list[str] = []
    examples: list[torch.Tensor] = []
    for name in captured.keyword_names:
        if name in captured.defaults:
            layout.append(("const", captured.defaults[name]))
            continue
        example = (example_inputs or {}).get(name)
        if example is None:
            fake = captured.examples.get(name)
            if fake is None:
                raise ValueError(f"no example for input {name!r}; pass example_inputs")
            example = _concrete(fake)
        layout.append(("input", None))
        names.append(name)
        examples.append(example)
    return layout, names, examples


def _dynamic_shapes(
    names: list[str], examples: list[torch.Tensor], hf: bool, decode: bool = False
) -> list[Any]:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    specs: list[Any] = []
    if decode:
        # The mask spans past + new: its length is left for export to relate to the others.
        past = torch.export.Dim("past")
        for name in names:
            if name in ("input_ids", "position_ids"):
                specs.append({0: batch, 1: seq})
            elif name == "attention_mask":
                specs.append({0: batch, 1: torch.export.Dim.AUTO})
            else:
                specs.append({0: batch, 2: past})
        return specs
    for name, example in zip(names, examples, strict=True):
        if hf and name in ("input_ids", "attention_mask"):
            specs.append({0: batch, 1: seq})
        else:
            specs.append({d: torch.export.Dim.AUTO for d in range(min(example.dim(), 2))})
    return specs


def _output_names(model: AdaptedModel, count: int) -> list[str]:
    spec = model.captured.out_spec
    context = getattr(spec, "context", None)
    if (
        isinstance(context, (list, tuple))
        and len(context) == count
        and all(isinstance(c, str) for c in context)
    ):
        return list(context)
    return [f"output_{i}" for i in range(count)]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notices that say nothing about this export.

    It logs that torchvision is missing (its ops are irrelevant here) and warns that named
    axes were renamed; it reports real problems by raising, which passes through.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
            yield
    finally:
        registration.setLevel(level)


# --------------------------------------------------------------------- direct translation
# torch.onnx.export of the graph would trace it again (torch.export of a FlatCall), trace it a
# third time to decompose it, translate it, then run onnxscript's optimizer: about 99 s for
# the embedded 30-layer model, nearly all of it the two traces and the optimizer's pattern
# matching. The captured graph is already a flat ATen graph with fake-tensor metadata, so it
# is translated directly, node by node, with the exporter's own translation (torchlib). What
# the decompositions would do to such a graph is done here for the few ops that need it
# (tensor conversions, operator aliases, assertions). Of the optimizer, the cheap passes run
# (constant folding, common subexpressions, weights stored transposed); ONNX Runtime's own
# graph optimisations do the rest at session start (same logits, bit for bit, and the same
# generation speed on the embedded model). A graph holding anything else (an op torchlib
# lacks, a mutation, a submodule) goes through torch.onnx.export instead.

_aten = torch.ops.aten
# Runtime checks that say nothing to ONNX (torch.onnx.export drops them too).
_ASSERTIONS = frozenset(
    {
        _aten._assert_tensor_metadata.default,
        _aten._assert_scalar.default,
        _aten._assert_async.default,
        _aten._assert_async.msg,
        _aten.sym_constrain_range_for_size.default,
    }
)
# Operator aliases the decompositions would rename; torchlib registers the other name.
_ALIASES = {
    _aten.__and__.Tensor: _aten.bitwise_and.Tensor,
    _aten.__or__.Tensor: _aten.bitwise_or.Tensor,
    _aten.__xor__.Tensor: _aten.bitwise_xor.Tensor,
}
# Bytes of weights above which torch.onnx writes external data (ONNXProgram.save's rule).
_EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


class NotDirect(Exception):
    """The direct translation does not cover this graph; torch.onnx.export does."""


@functools.cache
def _registry(opset_version: int) -> Any:
    from torch.onnx._internal.exporter import _registration

    with _quiet_exporter():
        return _registration.ONNXRegistry.from_torchlib(opset_version=opset_version)


@dataclass
class _DirectGraph:
    graph: torch.fx.Graph
    inputs: list[torch.fx.Node]  # the ONNX graph inputs, in order
    weights: list[tuple[torch.fx.Node, str, torch.Tensor]]  # placeholder, initializer, value


def direct_graph(module: FlatCall, args: tuple, prefix: str, static: bool) -> _DirectGraph:
    """A copy of the wrapper's graph to translate: its inputs as placeholders, every tensor
    attribute and baked adapter tensor as a placeholder that becomes an initializer (named
    ``prefix`` + its attribute path), captured constants (``use_cache=False``) filled in,
    and every node's ``meta["val"]`` set.

    A captured graph keeps the fake tensors (symbolic batch and sequence sizes) of its
    capture, and only the nodes our passes inserted are run on fake tensors for theirs. A
    graph whose inputs have none (the adapter projection) is run on fake copies of
    ``args``, every node, so its sizes are those of ``args``: only where no size is to be
    dynamic (``static``)."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import extract_val

    gm = module.graph_module
    source = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([n.meta["val"] for n in source if "val" in n.meta])
    fresh = fake_mode is None
    if fresh:
        if not static:
            raise NotDirect("the graph's inputs have no fake tensors with dynamic sizes")
        fake_mode = FakeTensorMode()
    baked = {name: getattr(module, name) for name in module.buffer_names}
    n_inputs = sum(kind == "input" for kind, _ in module.layout)
    expected = len(module.layout) + len(args) - n_inputs + len(baked)
    if len(source) != expected:
        raise NotDirect(f"the graph takes {len(source)} inputs, the wrapper passes {expected}")

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    inputs: list[torch.fx.Node] = []
    weights: list[tuple[torch.fx.Node, str, torch.Tensor]] = []

    def placeholder(
        node: torch.fx.Node, value: torch.Tensor, fixed: bool, val: Any = None
    ) -> torch.fx.Node:
        """``fixed``: the input's sizes never vary (weights, adapter tensors); ``val``: the
        fake tensor to give it (one with symbolic sizes)."""
        new = graph.placeholder(node.name)
        new.meta = dict(node.meta)
        if val is not None:
            new.meta["val"] = val
        elif fresh or not isinstance(new.meta.get("val"), (FakeTensor, torch.SymInt)):
            if not (fixed or fresh):
                raise NotDirect(f"input {node.name} has no fake tensor")
            new.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
        env[node] = new
        return new

    feed, given = iter(source), iter(args)
    for kind, value in module.layout:
        node = next(feed)
        if kind == "const":
            env[node] = value
        else:
            inputs.append(placeholder(node, next(given), fixed=False))
    extra = list(given)  # the adapter inputs
    vals: list[Any] = [None] * len(extra)
    if module.input_dims is not None:
        if fresh:
            raise NotDirect("dynamic adapter inputs need the capture's fake tensors")
        vals = _symbolic_inputs(fake_mode, inputs, extra, module.input_dims)
    for value, val in zip(extra, vals, strict=True):
        inputs.append(placeholder(next(feed), value, fixed=True, val=val))
    for name, value in baked.items():
        weights.append((placeholder(next(feed), value, fixed=True), name, value.detach()))
    lifted: dict[int, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = operator.attrgetter(node.target)(gm)
        if not isinstance(value, torch.Tensor):
            raise NotDirect(f"get_attr {node.target} is a {type(value).__name__}")
        if id(value) in lifted:  # tied weights: one initializer
            env[node] = lifted[id(value)]
            continue
        new = placeholder(node, value, fixed=True)
        lifted[id(value)] = new
        weights.append((new, prefix + node.target, value.detach()))

    def val(arg: Any) -> Any:
        return pytree.tree_map_only(torch.fx.Node, lambda n: n.meta["val"], arg)

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            graph.output(pytree.tree_map_only(torch.fx.Node, env.__getitem__, node.args[0]))
            continue
        if node.op == "call_module" and not node.users:
            continue  # torch.export's input guards (_guards_fn): nothing to compute
        if node.op != "call_function":
            raise NotDirect(f"{node.op} node {node.name}")
        target = node.target
        if target in _ASSERTIONS:
            continue
        args_ = pytree.tree_map_only(torch.fx.Node, env.__getitem__, node.args)
        kwargs = pytree.tree_map_only(torch.fx.Node, env.__getitem__, node.kwargs)
        meta = dict(node.meta)
        if fresh or "val" not in meta:
            with fake_mode, enable_python_dispatcher():
                meta["val"] = extract_val(target(*val(args_), **val(kwargs)))
        if getattr(target, "overloadpacket", None) is _aten.to:
            # aten.to is an alias when the dtype stays, else a copy to the new dtype (the
            # device is the session's); its meta holds the dtype either way.
            source_val, out = args_[0].meta["val"], meta["val"]
            if source_val.dtype == out.dtype:
                env[node] = args_[0]
                continue
            target, args_, kwargs = _aten._to_copy.default, (args_[0],), {"dtype": out.dtype}
        new = graph.call_function(_ALIASES.get(target, target), tuple(args_), kwargs)
        new.meta = meta
        env[node] = new
    # transformers 4.x builds mask indices in place on fresh tensors (arange(n).add_(k)).
    functionalize_fresh_inplace(graph)
    if not is_functional(graph):
        mutating = next(
            n.target
            for n in graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        )
        raise NotDirect(f"{mutating} mutates its input")
    return _DirectGraph(graph, inputs, weights)


BATCH_DIM = "batch"
_SYMBOL_IDS = itertools.count()


def _symbolic_inputs(
    fake_mode: Any,
    model_inputs: list[torch.fx.Node],
    values: list[torch.Tensor],
    input_dims: list[dict[int, str]],
) -> list[Any]:
    """Fake tensors for inputs whose sizes vary (see ``FlatCall.input_dims``), in the
    capture's shape environment: an axis named ``"batch"`` gets the batch size of the
    model's first batched input (a symbol of the capture), every other name a new symbol
    of its own, hinted by the example's size. Nodes computed from these inputs (run on
    fake tensors by :func:`direct_graph`) then carry those symbols, and the ONNX inputs
    get a named dynamic axis for each (renamed after the ``torch.export.Dim`` names)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    shape_env = fake_mode.shape_env
    if shape_env is None:
        raise NotDirect("the capture's fake tensors have no shape environment")
    batched = [
        n.meta["val"]
        for n in model_inputs
        if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0
    ]
    if not batched:
        raise NotDirect("no batched model input to take the batch size from")
    sizes: dict[str, Any] = {BATCH_DIM: batched[0].shape[0]}
    device = batched[0].device
    vals = []
    for value, axes in zip(values, input_dims, strict=True):
        shape: list[Any] = list(value.shape)
        for axis, name in axes.items():
            if name not in sizes:
                hint = int(value.shape[axis])
                if hint < 2:
                    raise NotDirect(f"example size {hint} for {name!r}: 0 and 1 specialise")
                # A source of its own per export: the capture's environment outlives it.
                source = ConstantSource(f"adaption_fx_{name}_{next(_SYMBOL_IDS)}")
                # DYNAMIC, not DUCK: a size of its own even where another has the same hint.
                symbol = shape_env.create_symbol(
                    hint, source=source, dynamic_dim=DimDynamic.DYNAMIC
                )
                sizes[name] = shape_env.create_symintnode(symbol, hint=hint, source=source)
            shape[axis] = sizes[name]
        with fake_mode:
            vals.append(torch.empty(shape, dtype=value.dtype, device=device))
    return vals


def promotion_needed(graph: torch.fx.Graph) -> bool:
    """Whether the exporter's type-promotion pass would insert a cast anywhere: the pass
    runs every node again under fake tensors, where this reads the nodes' metadata."""
    from torch.onnx._internal.fx import type_utils
    from torch.onnx._internal.fx.passes import type_promotion

    table = type_promotion.TypePromotionTable()

    def differs(value: Any, dtype: torch.dtype) -> bool:
        if isinstance(value, torch.Tensor):
            return value.dtype != dtype
        if isinstance(value, (list, tuple)):
            return any(differs(v, dtype) for v in value)
        same = type_utils.from_scalar_type_to_torch_dtype(type(value))
        return same is not None and same != dtype

    for node in graph.nodes:
        if node.op != "call_function":
            continue
        rule = type_promotion.get_type_promotion_rule(node, table)
        if rule is None:
            continue
        args, kwargs = pytree.tree_map_only(
            torch.fx.Node, lambda n: n.meta["val"], (node.args, node.kwargs)
        )
        info = rule.preview_type_promotion(args, kwargs)
        wanted = [(a, info.args_dtypes.get(i)) for i, a in enumerate(args)]
        wanted += [(v, info.kwargs_dtypes.get(k)) for k, v in kwargs.items()]
        if any(dtype is not None and differs(a, dtype) for a, dtype in wanted):
            return True
    return False


def _dim_names(dynamic_shapes: Any) -> list[dict[int, str]]:
    """Per input: axis -> the name its torch.export.Dim was given (Dim.AUTO has none)."""
    names = []
    for spec in dynamic_shapes[0] if dynamic_shapes else ():
        named = {}
        for axis, dim in (spec or {}).items():
            name = getattr(dim, "__name__", None)
            if isinstance(name, str):
                named[axis] = name
        names.append(named)
    return names


@contextlib.contextmanager
def _lean_translation() -> Iterator[None]:
    """Two shortcuts in the exporter's per-node translation, which otherwise costs more
    than twice as long here:
    - no per-node provenance (the FX node printed, its stack trace, its module scope) in
      node metadata: over 10 MB for the embedded model, describing the capture, not the
      file;
    - each ONNX op's signature built once, not at every call (onnxscript's own ``Op``
      objects keep theirs the same way; nothing changes a signature).
    """
    from onnxscript import ir
    from torch.onnx._internal.exporter import _core

    signature = ir.schemas.OpSignature
    build = signature.from_op_schema
    built: dict[tuple[str, str, int], Any] = {}

    def from_op_schema(schema: Any) -> Any:
        key = (schema.domain, schema.name, schema.since_version)
        if key not in built:
            built[key] = build(schema)
        return built[key]

    with (
        mock.patch.object(_core, "_set_node_metadata", lambda fx_node, ir_node: None),
        mock.patch.object(signature, "from_op_schema", staticmethod(from_op_schema)),
    ):
        yield


def _translate(
    module: FlatCall,
    args: tuple,
    *,
    prefix: str,
    input_names: list[str],
    output_names: list[str] | None,
    dynamic_shapes: Any,
    opset: int | None,
) -> Any:
    """The ONNX model (``onnx_ir.Model``) of a FlatCall's graph, translated directly."""
    from onnxscript import ir
    from torch.onnx._internal._lazy_import import onnxscript_apis
    from torch.onnx._internal.exporter import _constants, _core, _fx_passes, _ir_passes

    static = not any(dynamic_shapes[0]) if dynamic_shapes else True
    direct = direct_graph(module, args, prefix, static)
    if promotion_needed(direct.graph):
        _fx_passes.insert_type_promotion_nodes(
            torch.fx.GraphModule(torch.nn.Module(), direct.graph)
        )
    registry = _registry(max(opset or 0, _constants.TORCHLIB_OPSET))
    for node in direct.graph.nodes:
        if (
            node.op == "call_function"
            and node.target is not operator.getitem
            and not registry.is_registered(node.target)
        ):
            raise NotDirect(f"torchlib has no translation of {node.target}")

    model = ir.Model(
        ir.Graph([], [], nodes=[], name="main_graph"),
        ir_version=_constants.ONNX_IR_VERSION,
        producer_name="pytorch",
        producer_version=torch.__version__,
    )
    with _quiet_exporter(), _lean_translation():
        values = _core._translate_fx_graph(
            direct.graph,
            model,
            graph_like=model.graph,
            owned_graphs={},
            lower="at_conversion",
            registry=registry,
        )
    model.graph.inputs.clear()
    model.graph.inputs.extend(values[node.name] for node in direct.inputs)
    for node, name, tensor in direct.weights:
        value = values[node.name]
        value.name = name
        value.const_value = _core.TorchTensor(tensor, name=name)
        model.graph.initializers[name] = value
    _ir_passes.add_opset_imports(model)
    _fold_weight_transposes(model)
    _simplify(model)
    # A graph output that is an input or another output gets an Identity node of its own,
    # so that naming the outputs below renames no input.
    ir.passes.common.OutputFixPass()(model)
    _ir_passes.rename_inputs(model, input_names)
    if output_names:
        _ir_passes.rename_outputs(model, output_names)
    renames = {}
    for value, axes in zip(model.graph.inputs, _dim_names(dynamic_shapes), strict=False):
        for axis, name in axes.items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                renames[dim.value] = name
    _ir_passes.rename_axis(model, renames)
    if opset is not None:
        model = onnxscript_apis.convert_version(model, opset)
    return model


def _simplify(model: Any) -> None:
    """Fold constants (shape arithmetic, scalar casts) and merge repeated subexpressions:
    the cheap part of onnxscript's optimizer (its pattern rewrites cost minutes here). It
    more than halves the node count, so ONNX Runtime starts a session sooner."""
    from onnxscript import ir, optimizer

    optimizer.fold_constants_ir(model, onnx_shape_inference=False)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)


def _fold_weight_transposes(model: Any) -> None:
    """Store each weight that is only read transposed (a linear layer's ``MatMul(x, Wᵀ)``)
    transposed, as onnxscript's optimizer did: the session then starts without transposing
    it, and a MatMul reads an initializer directly. A weight read otherwise too (a tied
    embedding) stays as it is rather than being stored twice."""
    from onnxscript import ir
    from torch.onnx._internal.exporter import _core

    graph = model.graph
    for source in list(graph.initializers.values()):
        tensor = source.const_value
        readers = [use.node for use in source.uses()]
        if not isinstance(tensor, _core.TorchTensor) or not readers or source in graph.outputs:
            continue
        perms = set()
        for node in readers:
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                break
            perm = node.attributes.get_ints("perm")
            perms.add(tuple(perm) if perm is not None else None)
        else:
            if len(perms) != 1 or any(node.outputs[0] in graph.outputs for node in readers):
                continue
            (perm,) = perms
            raw = tensor.raw
            permuted = raw.permute(*(perm or reversed(range(raw.dim()))))
            name = f"{source.name}.T"
            value = ir.Value(name=name, const_value=_core.TorchTensor(permuted, name=name))
            value.shape = value.const_value.shape
            value.type = ir.TensorType(value.const_value.dtype)
            for node in readers:
                node.outputs[0].replace_all_uses_with(value)
                graph.remove(node, safe=True)
            del graph.initializers[source.name]
            graph.register_initializer(value)


def onnx_model_of(
    module: torch.nn.Module,
    args: tuple,
    *,
    input_names: list[str],
    output_names: list[str] | None,
    dynamic_shapes: Any,
    opset: int | None,
) -> Any:
    """The ONNX model (``onnx_ir.Model``) of ``module`` called with ``args``: translated
    directly for an FX graph (or a FlatCall's) where that covers it, else by
    torch.onnx.export. Weights keep the names torch.onnx.export gives them (``.T`` added
    to those stored transposed)."""
    direct: FlatCall | None = None
    if isinstance(module, FlatCall):
        direct, prefix = module, "graph_module."
    elif isinstance(module, torch.fx.GraphModule):
        n_inputs = sum(node.op == "placeholder" for node in module.graph.nodes)
        direct, prefix = FlatCall(module, [("input", None)] * n_inputs, {}), ""
    if direct is not None:
        try:
            return _translate(
                direct,
                args,
                prefix=prefix,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset=opset,
            )
        except NotDirect as exc:
            logger.info("exporting with torch.onnx.export (slower): %s", exc)
        except Exception as exc:  # a translation this graph trips: the exporter may not
            logger.warning(
                "direct ONNX translation failed (%s: %s); exporting with torch.onnx.export "
                "(slower)",
                type(exc).__name__,
                exc,
            )
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            **kwargs,
        )
    return program.model


def save_onnx(model: Any, path: Path, external_data: bool | None) -> None:
    from onnxscript import ir

    if external_data is None:
        size = sum(
            v.const_value.nbytes
            for v in model.graph.initializers.values()
            if v.const_value is not None
        )
        external_data = size > _EXTERNAL_DATA_THRESHOLD
    if external_data:
        ir.save(model, path, external_data=path.name + ".data")
    elif not write_streamed(model, path):
        ir.save(model, path)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Protobuf keys (field number << 3 | 2, length-delimited): ModelProto.graph,
# GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = b"\x3a", b"\x2a", b"\x4a"


def write_streamed(model: Any, path: Path) -> bool:
    """Write ``model`` as one .onnx file, its weights copied from their tensors straight
    into the file; False (nothing written) where a weight is not plain numbers.

    ``onnx_ir.save`` builds the whole ModelProto in memory (each weight copied into it) and
    serialises that (copied again): most of the save time for a 500 MB model. Here the
    model is serialised without its initializers, and the graph message is written as that
    graph's fields followed by one ``initializer`` entry per weight: a TensorProto header
    (name, type, dims) and its ``raw_data``. Field order is free in protobuf, so this is
    the same message, and what ``onnx.load`` reads back equals the model.
    """
    import onnx
    from onnxscript import ir
    from torch.onnx._internal.exporter import _core

    graph = model.graph
    values = list(graph.initializers.values())
    if sys.byteorder != "little" or any(
        v.const_value is None or v.const_value.dtype == ir.DataType.STRING for v in values
    ):
        return False
    graph.initializers.clear()
    try:
        proto = ir.to_proto(model)
    finally:
        for value in values:
            graph.initializers.add(value)
    graph_fields = proto.graph.SerializeToString()
    proto.ClearField("graph")

    def data(tensor: Any) -> Any:
        if isinstance(tensor, _core.TorchTensor):  # its memory as bytes, copied if strided
            raw = tensor.raw.detach().cpu().contiguous()
            return raw.reshape(-1).view(torch.uint8).numpy() if raw.numel() else b""
        return tensor.tobytes()

    entries = []  # (value, header, raw_data if already made, raw_data size)
    for value in values:
        tensor = value.const_value
        if isinstance(tensor, _core.TorchTensor):
            made, size = None, tensor.raw.numel() * tensor.raw.element_size()
        else:
            made = data(tensor)
            size = len(made)
        header = onnx.TensorProto(
            name=value.name, data_type=tensor.dtype.value, dims=[int(d) for d in tensor.shape]
        ).SerializeToString()
        entries.append((value, header + _TENSOR_RAW_DATA + _varint(size), made, size))
    lengths = [len(header) + size for _, header, _, size in entries]
    graph_size = len(graph_fields) + sum(
        len(_GRAPH_INITIALIZER) + len(_varint(length)) + length for length in lengths
    )
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
        handle.write(_MODEL_GRAPH + _varint(graph_size))
        handle.write(graph_fields)
        for (value, header, made, size), length in zip(entries, lengths, strict=True):
            raw_data = data(value.const_value) if made is None else made
            if len(memoryview(raw_data).cast("B")) != size:
                raise RuntimeError(f"{value.name}: {size} bytes expected")
            handle.write(_GRAPH_INITIALIZER + _varint(length))
            handle.write(header)
            handle.write(raw_data)
    return True


class _Stages:
    """A tqdm bar over the export's stages, named as each starts."""

    def __init__(self, names: list[str], progress: bool | None):
        # disable=None: shown only on a terminal.
        self.bar = tqdm(
            total=len(names),
            desc="ONNX export",
            unit="stage",
            disable=None if progress is None else not progress,
            dynamic_ncols=True,
        )
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(name)

    def close(self, finished: bool) -> None:
        if finished:
            self.bar.update()
            self.bar.set_postfix_str("done")
        self.bar.close()


def to_onnx(
    model: AdaptedModel,
    path: str | os.PathLike,
    *,
    adapter_as_inputs: bool = False,
    fold: bool = True,
    opset: int | None = None,
    adapter_name: str | None = None,
    external_data: bool | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    for_generation: bool = False,
    mixed_batch: bool = False,
    mixed_max_adapter_len: int | None = None,
    mixed_adapter_layers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Export the graph ``model`` runs now to an ONNX file.

    Args:
        model: the AdaptedModel. Its active adapter is exported (or ``adapter_name``); with
            adapters disabled, the base graph.
        path: the ``.onnx`` file to write. Files are written in a temporary directory and
            moved into place, so a failed export leaves no partial file at ``path``.
        adapter_as_inputs: make the adapter tensors graph inputs (folded key/value/gate when
            ``fold``; raw prompts and gates otherwise), so one file serves every adapter of
            this structure. A ``<name>.adapter.onnx`` companion maps a checkpoint's prompts
            and gates to the folded inputs (see ``OrtModel.set_adapter_weights``).
        fold: precompute the adapter keys/values (see ``passes.fold``); no prompt
            projection is left in the graph.
        opset: ONNX opset (default: the exporter's).
        external_data: store weights in ``<name>.onnx.data``. None: only when the model
            would exceed protobuf's 2 GB limit.
        example_inputs: concrete inputs for the export trace (built from the capture's
            metadata when omitted).
        for_generation: export the decode step instead (``model.decoder()``): inputs
            ``input_ids``, ``attention_mask`` (past + new), ``position_ids`` and
            ``past_<i>_key``/``past_<i>_value``; outputs ``logits`` (last token) and
            ``present_<i>_key``/``present_<i>_value``. Batch, new length and past length
            are dynamic, so the file serves prefill (past length 0) and every step; run it
            with ``OrtModel.generate``. The source model's generation defaults
            (``AdaptedModel.default_token_ids``: eos and pad ids) are stored with it, as
            ``eos_token_id`` and ``pad_token_id`` in the metadata's ``generation`` entry.
        mixed_batch: export the mixed-batch graph (``AdaptedModel.mixed_graph``, of the
            masked capture; of ``model.decoder()`` with ``for_generation``), in which each
            batch row uses its own adapter. Needs ``adapter_as_inputs=True`` and ``fold``
            (the graph always takes folded tables). After the model inputs the file takes
            ``adapter_rows`` (batch,) int64, ``adapter_key_mask`` (adapters, adapter_keys)
            and per adapted site the stacked folded key (adapters, kv_heads, adapter_keys,
            head_dim), value and activated gate (adapters, heads) (see
            ``passes/mixed_batch.py``); ``adapters`` and ``adapter_keys`` are dynamic axes
            of their own, so any number of adapters of any length up to the file's fits
            without a new export. ``OrtModel`` builds these inputs from its table of named
            adapters (``set_adapter_weights(source, adapter_name=...)``,
            ``adapter_names=[...]`` per call). The ``<name>.adapter.onnx`` companion
            projects prompts of ``mixed_max_adapter_len`` tokens at every covered site to
            their keys and values, so checkpoint directories load without PyTorch
            weights. Which adapter is active, and whether adapters are enabled, does not
            matter here. The metadata's ``mixed_batch`` entry describes the tables.
        mixed_max_adapter_len: the longest prompt a checkpoint directory loaded into the
            file may have (default: the longest of the model's adapters). Adapters given
            as AdaptedModels or folded arrays may be longer.
        mixed_adapter_layers: the top layers the file covers (default: the most any of
            the model's adapters adapts); adapters adapting more layers cannot be loaded.
        progress: show a tqdm bar over the export's stages. None: only on a terminal.

    Returns:
        The path written. The file is checked with ``onnx.checker``; batch and sequence
        axes are dynamic; its metadata (key ``adaption_fx``) describes the inputs.
    """
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"to_onnx expects an AdaptedModel, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    if not isinstance(for_generation, bool):
        raise TypeError(f"for_generation must be a bool, got {for_generation!r}")
    if not isinstance(mixed_batch, bool):
        raise TypeError(f"mixed_batch must be a bool, got {mixed_batch!r}")
    settings = None
    if mixed_batch:
        if not adapter_as_inputs:
            raise ValueError(
                "mixed_batch=True needs adapter_as_inputs=True: the adapters' tables are "
                "inputs of the file"
            )
        if not fold:
            raise ValueError(
                "mixed_batch=True exports folded adapter tables (keys, values and gates); "
                "fold=False is not supported with it"
            )
        if adapter_name is not None:
            raise ValueError(
                "adapter_name picks the one adapter to export; a mixed_batch file serves "
                "every adapter (OrtModel.set_adapter_weights(..., adapter_name=...), then "
                "adapter_names=[...] per call)"
            )
        settings = _mixed_settings(model, mixed_max_adapter_len, mixed_adapter_layers)
    elif mixed_max_adapter_len is not None or mixed_adapter_layers is not None:
        raise ValueError(
            "mixed_max_adapter_len and mixed_adapter_layers apply to mixed_batch=True only"
        )
    model.captured.check_placement()
    # Read from the model the caller holds, not from the decode-step twin below: the twin
    # has no source model to read them from.
    eos_token_id, pad_token_id = model.default_token_ids
    projecting = adapter_as_inputs and fold
    stages = _Stages(
        ["capture the decode step"] * for_generation
        + ["prepare the graph", "translate to ONNX"]
        + ["export the adapter projection"] * projecting
        + ["save", "check"],
        progress,
    )
    finished = False
    try:
        path = _write(
            model,
            path,
            stages,
            adapter_as_inputs=adapter_as_inputs,
            fold=fold,
            opset=opset,
            adapter_name=adapter_name,
            external_data=external_data,
            example_inputs=example_inputs,
            for_generation=for_generation,
            token_ids=(eos_token_id, pad_token_id),
            mixed=settings,
        )
        finished = True
    finally:
        stages.close(finished)
    return path


def _write(
    model: AdaptedModel,
    path: Path,
    stage: Callable[[str], None],
    *,
    adapter_as_inputs: bool,
    fold: bool,
    opset: int | None,
    adapter_name: str | None,
    external_data: bool | None,
    example_inputs: dict[str, torch.Tensor] | None,
    for_generation: bool,
    token_ids: tuple[Any, Any],
    mixed: tuple[int, int] | None = None,
) -> Path:
    """``mixed``: (max_adapter_len, adapter_layers) of a mixed-batch export, else None."""
    import onnx

    eos_token_id, pad_token_id = token_ids
    if for_generation:
        stage("capture the decode step")
        model = model.decoder()
    stage("prepare the graph")
    layout, names, examples = _model_inputs(model, example_inputs)
    mixed_plan = None
    input_dims = None
    if mixed is not None:
        mixed_plan = _mixed_plan(model, *mixed, examples)
        table = mixed_plan.graph.table_inputs
        plan = _Plan(
            mixed_plan.graph.graph_module,
            list(table),
            dict(zip(table, mixed_plan.examples, strict=True)),
            {},
            True,
            None,
        )
        input_dims = mixed_plan.input_dims
    else:
        plan = _plan(model, adapter_name, adapter_as_inputs, fold)
    wrapper = FlatCall(plan.graph_module, layout, plan.baked, input_dims)
    # Only the top module's flag: .eval() would recurse into submodules shared with the
    # user's model. The ATen graph does not read training flags; the exporter checks it.
    wrapper.training = False
    adapter_examples = [plan.adapter_values[k] for k in plan.adapter_inputs]
    with torch.no_grad():
        n_out = len(wrapper(*examples, *adapter_examples))
    output_names = _output_names(model, n_out)
    hf = model.captured.fill_attention_mask
    dynamic = _dynamic_shapes(names, examples, hf, decode=for_generation)
    if input_dims is None:
        dynamic += [None] * len(adapter_examples)
    else:
        # The rows share the model inputs' batch Dim (the same object); the table sizes
        # get Dims of their own.
        batch = next((spec[0] for spec in dynamic if spec and 0 in spec), torch.export.Dim.AUTO)
        dims = {
            BATCH_DIM: batch,
            ADAPTERS_DIM: torch.export.Dim(ADAPTERS_DIM),
            ADAPTER_KEYS_DIM: torch.export.Dim(ADAPTER_KEYS_DIM),
        }
        dynamic += [{axis: dims[name] for axis, name in d.items()} for d in input_dims]
    what = "mixed batch" if mixed_plan else plan.adapter["name"] if plan.adapter else "base"
    logger.info("exporting %s to %s", what, path)
    stage("translate to ONNX")
    onnx_model = onnx_model_of(
        wrapper,
        tuple(examples + adapter_examples),
        input_names=names + plan.adapter_inputs,
        output_names=output_names,
        dynamic_shapes=(tuple(dynamic),),  # forward(*inputs): one varargs argument
        opset=opset,
    )
    projection_name = None
    projection = None
    if mixed_plan is not None:
        stage("export the adapter projection")
        mixed_plan.projection.training = False
        projection = onnx_model_of(
            mixed_plan.projection,
            tuple(mixed_plan.projection_examples),
            input_names=mixed_plan.projection_inputs,
            output_names=mixed_plan.projection_outputs,
            dynamic_shapes=None,
            opset=opset,
        )
        projection_name = path.stem + PROJECTION_SUFFIX
    elif adapter_as_inputs and plan.folded:
        stage("export the adapter projection")
        proj_module, proj_outputs = adapter_projection(plan.source)
        proj_module.training = False
        projection = onnx_model_of(
            proj_module,
            tuple(plan.source_tensors),
            input_names=plan.raw_inputs,
            output_names=list(proj_outputs),
            dynamic_shapes=None,
            opset=opset,
        )
        projection_name = path.stem + PROJECTION_SUFFIX
    if input_dims is None:
        shapes = {k: list(v.shape) for k, v in plan.adapter_values.items()}
    else:  # dynamic axes by name
        shapes = {
            k: [d.get(axis, size) for axis, size in enumerate(v.shape)]
            for (k, v), d in zip(plan.adapter_values.items(), input_dims, strict=True)
        }
    metadata = {
        "format": 1,
        "model_inputs": names,
        "outputs": output_names,
        "adapter_inputs": plan.adapter_inputs,
        "adapter_shapes": shapes,
        "folded": plan.folded,
        "adapter": plan.adapter,
        "raw_adapter_inputs": plan.raw_inputs,
        "projection": projection_name,
    }
    if mixed_plan is not None:
        metadata["mixed_batch"] = _mixed_metadata(model, mixed_plan, projection_name)
    if for_generation:
        cache = model.cache_layout
        metadata["generation"] = {
            "max_length": model.max_length,
            "past_inputs": cache.past_inputs,
            "present_outputs": cache.present_outputs,
            "cache_shapes": [list(shape) for pair in cache.shapes for shape in pair],
            "cache_dtype": str(cache.dtype).removeprefix("torch."),
            # OrtModel.generate's defaults (an int, a list or null); OrtModel reads a file
            # written before these keys as having none.
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        }
    onnx_model.metadata_props[METADATA_KEY] = json.dumps(metadata)

    stage("save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_onnx(onnx_model, tmp / path.name, external_data)
        if projection is not None:
            save_onnx(projection, tmp / projection_name, None)
        stage("check")
        # By path: the checker reads the file itself (and any external data beside it).
        onnx.checker.check_model(str(tmp / path.name))
        # Companions first, the main file last: a reader never sees a new .onnx without
        # the files it refers to.
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
