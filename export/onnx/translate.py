"""FX graph to ONNX: the direct translation of a captured ATen graph with torch.onnx's own
torchlib, and the fallback through ``torch.onnx.export``.

Every private ``torch.onnx`` API this project uses is used here and nowhere else."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import operator
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.fx
import torch.utils._pytree as pytree

from adaption_fx.export.onnx.fuse import FUSED_OPSET, fuse_for_onnx
from adaption_fx.export.onnx.plan import (
    BATCH_DIM,
    FlatCall,
)
from adaption_fx.passes.cleanup import FunctionalizeFreshInplace, is_functional
from adaption_fx.passes.rotary import ROTARY_EMBEDDING

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
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


# The opset files are written in by default (see fuse.py).
DEFAULT_OPSET = FUSED_OPSET


class NotDirect(Exception):
    """The direct translation does not cover this graph; torch.onnx.export does."""


@functools.cache
def _registry(opset_version: int) -> Any:
    from torch.onnx._internal.exporter import _registration

    with quiet_exporter():
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset_version)
    if opset_version >= FUSED_OPSET:
        registry.register_op(ROTARY_EMBEDDING, _rotary_embedding_onnx)
    return registry


def _rotary_embedding_onnx(x: Any, cos: Any, sin: Any) -> Any:
    """``passes.rotary.rotary_embedding`` is ONNX's RotaryEmbedding (4-D input), whose
    cos/sin tables must have the input's batch size (ONNX Runtime does not broadcast a
    table of one row, as a forward pass without ``position_ids`` builds)."""
    from onnxscript import opset23 as op

    if x.shape is None or cos.shape is None or x.shape[0] != cos.shape[0]:
        sizes = op.Concat(op.Shape(x, start=0, end=1), op.Shape(cos, start=1), axis=0)
        cos, sin = op.Expand(cos, sizes), op.Expand(sin, sizes)
    return op.RotaryEmbedding(x, cos, sin)


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
    FunctionalizeFreshInplace().transform(graph)
    if not is_functional(graph):
        mutating = next(
            n.target
            for n in graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        )
        raise NotDirect(f"{mutating} mutates its input")
    return _DirectGraph(graph, inputs, weights)


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
    opset = opset or DEFAULT_OPSET
    registry = _registry(max(opset, _constants.TORCHLIB_OPSET))
    if registry.opset_version >= FUSED_OPSET:
        fuse_for_onnx(direct.graph)
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
    with quiet_exporter(), _lean_translation():
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
    return onnxscript_apis.convert_version(model, opset)


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
    # torch.onnx.export at its own default opset: at 23 its optimizer fuses rotary
    # embeddings with one-row cos/sin tables, which ONNX Runtime refuses for a batch.
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with quiet_exporter():
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


def wraps_torch_tensor(tensor: Any) -> bool:
    """Whether an ONNX IR tensor holds a torch tensor (torch.onnx's ``TorchTensor``), whose
    bytes are read from the torch tensor itself."""
    from torch.onnx._internal.exporter import _core

    return isinstance(tensor, _core.TorchTensor)
