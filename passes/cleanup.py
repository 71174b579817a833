"""Drop what an inference graph computes for nothing: export's checks, no-op casts, repeats.

torch.export keeps every ``.to()`` of the source (a no-op when the tensor already has that
dtype, device and layout) next to an ``_assert_tensor_metadata`` check of it, a ``detach``
for each ``no_grad`` region, and each layer's own copy of shared work (the rotary
``unsqueeze`` of cos and sin, ``sym_size`` reads of one dimension). Eagerly each of these is
one more dispatcher call per step; none changes a value. These passes are for graphs that
run without autograd and mutate nothing (the folded decode step of generation); they
change a graph in place.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

from adaption_fx.passes.infra import GraphPass, PassNotApplicable

aten = torch.ops.aten

_CHECKS = {aten._assert_tensor_metadata.default}
_IDENTITIES = {aten.detach.default, aten.alias.default}
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout}
_PURE_BUILTINS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg}
INT64_MAX = 2**63 - 1


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def is_functional(graph: torch.fx.Graph, *, allow_fresh_inplace: bool = False) -> bool:
    """True when no node of ``graph`` mutates a tensor (the precondition of these passes).

    ``allow_fresh_inplace``: also True where the only mutations are ones
    :class:`FunctionalizeFreshInplace` rewrites (so the graph is functional after it).
    """
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target in _CHECKS:
            continue
        if target._schema.is_mutable:
            if allow_fresh_inplace and _functional_twin(node) is not None:
                continue
            return False
    return True


def _out_of_place(target: Any) -> Any:
    """The out-of-place twin of an in-place ATen overload (``add_.Tensor`` -> ``add.Tensor``)."""
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    overload = target._overloadname
    return getattr(packet, overload, None) if packet is not None else None


def _is_fresh(node: Any) -> bool:
    """``node`` returns a new tensor that aliases nothing (a factory's or an op's result)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    returns = target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is None


def _example(value: Any) -> Any:
    # A real stand-in with the dtype and rank type promotion reads (dims of size 1).
    if isinstance(value, torch.Tensor):
        return torch.empty([1] * value.dim(), dtype=value.dtype)
    return value


def _functional_twin(node: torch.fx.Node) -> Any:
    """The out-of-place op computing what in-place ``node`` does, where ``node`` mutates
    only a tensor created for it alone (and keeps its dtype); else None."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if not target._schema.is_mutable or target in _CHECKS or not node.args:
        return None
    functional = _out_of_place(target)
    created = node.args[0]
    if functional is None or not _is_fresh(created) or len(created.users) != 1:
        return None
    value = _val(created)
    if not isinstance(value, torch.Tensor):
        return None
    others = [_example(_val(a) if isinstance(a, torch.fx.Node) else a) for a in node.args[1:]]
    try:
        promoted = torch.result_type(_example(value), others[0]) if others else value.dtype
    except (TypeError, RuntimeError):
        return None
    return functional if promoted == value.dtype else None


class FunctionalizeFreshInplace(GraphPass):
    """Rewrite each in-place op on a tensor created just for it (``arange(n).add_(k)``, as
    transformers 4.x builds its mask indices) as the out-of-place op: nothing else can see
    that tensor, so the function is the same. Only where the in-place op is the created
    tensor's only user and type promotion keeps its dtype. Returns how many changed."""

    def transform(self, graph: torch.fx.Graph) -> int:
        changed = 0
        for node in list(graph.nodes):
            functional = _functional_twin(node)
            if functional is None:
                continue
            with graph.inserting_before(node):
                replacement = graph.call_function(functional, node.args, dict(node.kwargs))
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            changed += 1
        return changed


def _contiguous(value: torch.Tensor) -> bool:
    try:
        return bool(value.is_contiguous())
    except Exception:  # a symbolic size export could not decide
        return False


def _cast_is_noop(node: torch.fx.Node) -> bool:
    """``node`` is a cast to what its input already is (same dtype, device and layout)."""
    source = _val(node.args[0])
    if not isinstance(source, torch.Tensor):
        return False
    kwargs = dict(node.kwargs)
    target = node.target
    if target == aten.to.dtype:
        names = ("dtype", "non_blocking", "copy", "memory_format")
    elif target == aten.to.device:
        names = ("device", "dtype", "non_blocking", "copy", "memory_format")
    elif target == aten.to.dtype_layout:
        names = ("dtype", "layout", "device", "pin_memory", "non_blocking", "copy", "memory_format")
    else:
        return False
    kwargs.update(zip(names, node.args[1:], strict=False))
    if kwargs.get("copy") or kwargs.get("pin_memory"):
        return False
    if kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    dtype, device, layout = kwargs.get("dtype"), kwargs.get("device"), kwargs.get("layout")
    return (
        (dtype is None or dtype == source.dtype)
        and (device is None or torch.device(device) == source.device)
        and (layout is None or layout == source.layout)
    )


def _identity_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input ``node`` returns unchanged (as a value), or None."""
    if node.op != "call_function" or not node.args:
        return None
    target, args = node.target, node.args
    first = args[0]
    if not isinstance(first, torch.fx.Node):
        return None
    if target in _IDENTITIES:
        return first
    if target in _CASTS:
        return first if _cast_is_noop(node) else None
    source = _val(first)
    if not isinstance(source, torch.Tensor) or node.kwargs:
        return None
    if target == aten.slice.Tensor:  # a view with the input's own strides
        _, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
        whole = (start is None or (type(start) is int and start == 0)) and (
            end is None or (type(end) is int and end >= INT64_MAX)
        )
        if whole and type(step) is int and step == 1:
            return first
        return None
    # Arithmetic returns a fresh dense tensor: the same as its input only where that is one.
    if not _contiguous(source):
        return None
    if target == aten.mul.Tensor and len(args) == 2 and not isinstance(args[1], torch.fx.Node):
        # x * 1 is x bit for bit (NaNs, infinities and signed zeros included).
        scalar = args[1]
        same_dtype = source.is_floating_point() or (
            type(scalar) is int and source.dtype != torch.bool
        )
        if type(scalar) in (int, float) and scalar == 1 and same_dtype:
            return first
    if target == aten.add.Tensor and len(args) == 2 and not isinstance(args[1], torch.fx.Node):
        # Integers only: for floats, -0.0 + 0 is +0.0.
        scalar = args[1]
        integral = not source.is_floating_point() and not source.is_complex()
        if type(scalar) is int and scalar == 0 and integral and source.dtype != torch.bool:
            return first
    return None


class DropNoopNodes(GraphPass):
    """Remove export's tensor-metadata checks and every node that returns its input: casts to
    the input's own dtype/device/layout, ``detach``, ``alias``, ``x * 1``, integer ``x + 0``
    and full slices. Returns how many nodes were removed.

    Precondition: :func:`is_functional` (checked) (no node mutates its input), and the graph runs
    without autograd (``detach`` is dropped).
    """

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if not is_functional(graph_module.graph, allow_fresh_inplace=True):
            raise PassNotApplicable(f"{type(self).__name__} needs a functional graph")

    def transform(self, graph: torch.fx.Graph) -> int:
        removed = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _CHECKS and not node.users:
                graph.erase_node(node)
                removed += 1
                continue
            source = _identity_input(node)
            if source is not None:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                removed += 1
        return removed


def _key(value: Any) -> Any:
    """A hashable stand-in for an argument (nodes by identity, floats by bits)."""
    if isinstance(value, torch.fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, float):
        # 0.0 == -0.0 and nan != nan: compare the values' representations instead.
        return ("float", math.copysign(1.0, value), repr(value))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return (type(value).__name__, value)


def is_pure(node: torch.fx.Node) -> bool:
    target = node.target
    if target in _PURE_BUILTINS:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target in _CHECKS:
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return True


class EliminateCommonSubexpressions(GraphPass):
    """Merge pure nodes that apply the same op to the same arguments. Returns how many
    nodes were removed."""

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if not is_functional(graph_module.graph, allow_fresh_inplace=True):
            raise PassNotApplicable(f"{type(self).__name__} needs a functional graph")

    def transform(self, graph: torch.fx.Graph) -> int:
        seen: dict[Any, torch.fx.Node] = {}
        removed = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or not is_pure(node):
                continue
            key = (node.target, _key(node.args), _key(dict(node.kwargs)))
            earlier = seen.get(key)
            if earlier is None:
                seen[key] = node
                continue
            node.replace_all_uses_with(earlier)
            graph.erase_node(node)
            removed += 1
        return removed


class ShareSizeReads(GraphPass):
    """Read each size symbol of the graph's inputs once: every ``sym_size`` whose value is
    such a symbol (the batch, the new length, ...) becomes one read of it from the first
    input that has it. Each layer reads the batch size from its own tensors; one read
    lets the layers share what is computed from it (the adapter's batch expansion's
    shape). Returns how many reads were replaced."""

    def transform(self, graph: torch.fx.Graph) -> int:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        sources: dict[Any, tuple[torch.fx.Node, int]] = {}
        for node in placeholders:
            val = _val(node)
            if not isinstance(val, torch.Tensor):
                continue
            for dim, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    sources.setdefault(size.node.expr, (node, dim))
        shared: dict[Any, torch.fx.Node] = {}
        replaced = 0
        for node in list(graph.nodes):
            val = _val(node)
            if node.target != aten.sym_size.int or not isinstance(val, torch.SymInt):
                continue
            expr = val.node.expr
            if expr not in sources:
                continue
            if expr not in shared:
                with graph.inserting_after(placeholders[-1]):
                    shared[expr] = graph.call_function(aten.sym_size.int, sources[expr])
                shared[expr].meta["val"] = val
            node.replace_all_uses_with(shared[expr])
            graph.erase_node(node)
            replaced += 1
        return replaced


class EliminateDeadCode(GraphPass):
    """Remove pure nodes (and unused ``get_attr``) nobody uses. Returns how many."""

    def transform(self, graph: torch.fx.Graph) -> int:
        removed = 0
        for node in reversed(list(graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr" or (node.op == "call_function" and is_pure(node)):
                graph.erase_node(node)
                removed += 1
        return removed


__all__ = [
    "DropNoopNodes",
    "EliminateCommonSubexpressions",
    "EliminateDeadCode",
    "FunctionalizeFreshInplace",
    "ShareSizeReads",
    "is_functional",
    "is_pure",
]
