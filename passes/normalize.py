"""Normalise a torch.export graph so that every later pass sees one flat ATen graph.

What torch.export leaves in a graph depends on what built the model: Hugging Face computes
rotary tables under ``torch.no_grad()`` (and, in some releases, under a disabled
``torch.autocast``), which export keeps as higher-order ops calling submodules; some
transformers releases build attention masks with ``torch.vmap``, which non-strict export
keeps as functorch calls around a ``flat_apply`` higher-order op. Neither is something the
passes, torch.compile with dynamic shapes, or the ONNX exporter should have to know about.

:class:`InlineWrappedRegions` inlines the regions that compute the same values as plain
ATen ops; :class:`LowerVmapRegions` retraces each vmap region into the batched ATen ops
functorch runs for it; :func:`check_normalized` then names whatever is left that is not
plain ATen. :func:`normalize_export_graph` runs the two passes and the check.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.infra import PassBase, PassResult, run_passes

_HOP = torch.ops.higher_order
_aten = torch.ops.aten

# The functorch primitives non-strict export records when a model calls torch.vmap.
_VMAP_CALLS = frozenset(
    {
        "_vmap_increment_nesting",
        "_vmap_decrement_nesting",
        "_add_batch_dim",
        "_remove_batch_dim",
        "lazy_load_decompositions",
    }
)


def _region(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple, bool] | None:
    """(submodule node, region inputs, detach outputs) for a region that inlines exactly,
    else None.

    ``wrap_with_set_grad_enabled(False, f, *xs)`` computes ``f(*xs)`` without recording
    gradients: inlined, its outputs are detached, which gives the same values and the same
    (absent) gradients. ``wrap_with_autocast(device, dtype, False, cache, f, *xs)`` is an
    autocast region that is switched off: it computes ``f(*xs)`` as written.
    """
    if node.op != "call_function":
        return None
    if node.target is _HOP.wrap_with_set_grad_enabled:
        enabled, sub, *inputs = node.args
        if enabled is False and isinstance(sub, torch.fx.Node) and sub.op == "get_attr":
            return sub, tuple(inputs), True
    elif node.target is _HOP.wrap_with_autocast:
        _device, _dtype, enabled, _cache, sub, *inputs = node.args
        if enabled is False and isinstance(sub, torch.fx.Node) and sub.op == "get_attr":
            return sub, tuple(inputs), False
    return None


def _fresh_attribute(gm: torch.fx.GraphModule, stem: str) -> str:
    name, i = stem.replace(".", "_"), 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    return f"{name}_{i}"


def _inline_one(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    sub_node, inputs, detach = _region(node)  # type: ignore[misc]
    graph = gm.graph
    sub = getattr(gm, sub_node.target)
    env: dict[torch.fx.Node, object] = {}
    placeholders = iter(inputs)
    outputs: tuple = ()
    with graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(placeholders)
            elif inner.op == "output":
                result = torch.fx.map_arg(inner.args[0], env.__getitem__)
                outputs = tuple(result) if isinstance(result, (tuple, list)) else (result,)
            elif inner.op == "get_attr":
                # A nested region's own submodule (or a constant): lift it onto gm.
                name = _fresh_attribute(gm, f"{sub_node.target}_{inner.target}")
                setattr(
                    gm,
                    name,
                    sub.get_submodule(inner.target)
                    if _is_module(sub, inner)
                    else getattr(sub, inner.target),
                )
                copied = graph.get_attr(name)
                copied.meta = dict(inner.meta)
                env[inner] = copied
            else:
                env[inner] = graph.node_copy(inner, env.__getitem__)
    for user in list(node.users):
        if user.target is not operator.getitem:
            raise UnsupportedGraphError(
                f"{node.name} ({node.target}) is used by {user.name} directly; expected only "
                "getitem users of a wrapped region"
            )
        value = outputs[user.args[1]]
        if detach and isinstance(value, torch.fx.Node):
            with graph.inserting_before(user):
                value = graph.call_function(_aten.detach.default, (value,))
            value.meta = dict(user.meta)
        user.replace_all_uses_with(value)
        graph.erase_node(user)
    graph.erase_node(node)
    if not sub_node.users:
        graph.erase_node(sub_node)
        if not any(n.op == "get_attr" and n.target == sub_node.target for n in graph.nodes):
            delattr(gm, sub_node.target)


def _is_module(root: torch.nn.Module, node: torch.fx.Node) -> bool:
    try:
        root.get_submodule(node.target)
    except AttributeError:
        return False
    return True


class InlineWrappedRegions(PassBase):
    """Inline every no-grad and disabled-autocast region of a graph module, nested ones
    too (in place).

    Precondition: a torch.export graph module. Postcondition: no
    ``wrap_with_set_grad_enabled(False, ...)`` or disabled ``wrap_with_autocast`` remains;
    the module computes the same values with the same gradients.
    """

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        count = 0
        while True:
            regions = [n for n in graph_module.graph.nodes if _region(n) is not None]
            if not regions:
                break
            for node in regions:
                _inline_one(graph_module, node)
                count += 1
        return PassResult(graph_module, count > 0)


def _call_name(node: torch.fx.Node) -> str | None:
    return getattr(node.target, "__name__", None) if node.op == "call_function" else None


def _vmap_region(nodes: list[torch.fx.Node], start: int) -> list[torch.fx.Node] | None:
    """The nodes of the outermost vmap call that begins at ``nodes[start]``.

    Non-strict export records a vmap call while the vmapped function runs, so its nodes are
    contiguous: from the first functorch call to the decrement that closes the outermost
    nesting level.
    """
    depth = 0
    for end in range(start, len(nodes)):
        name = _call_name(nodes[end])
        if name == "_vmap_increment_nesting":
            depth += 1
        elif name == "_vmap_decrement_nesting":
            depth -= 1
            if depth == 0:
                return nodes[start : end + 1]
    return None


def _lower_region(gm: torch.fx.GraphModule, region: list[torch.fx.Node]) -> None:
    inside = set(region)
    inputs: list[torch.fx.Node] = []
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    values = [a.meta.get("val") for a in inputs if a.op != "get_attr"]
    if any(v is None for v in values) or detect_fake_mode(values) is None:
        raise UnsupportedGraphError(
            f"the vmap region at {region[0].name} has inputs without export's fake values; "
            "it cannot be retraced into plain ATen ops"
        )
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for arg in inputs:
        env[arg] = sub.get_attr(arg.target) if arg.op == "get_attr" else sub.placeholder(arg.name)
    for node in region:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    # Symbolic make_fx in export's own fake mode (found from the inputs' values): functorch
    # runs the batching rules, the tracer records the ATen ops they call, and the sizes stay
    # export's symbols.
    traced = make_fx(torch.fx.GraphModule(gm, sub), tracing_mode="symbolic")(*values)

    graph = gm.graph
    outer = iter([a for a in inputs if a.op != "get_attr"])
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    spliced: list[torch.fx.Node] = []
    results: tuple = ()
    with graph.inserting_before(region[0]):
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                mapping[node] = next(outer)
            elif node.op == "output":
                results = tuple(torch.fx.map_arg(node.args[0], mapping.__getitem__))
            elif node.op == "get_attr":
                raise UnsupportedGraphError(
                    f"the vmap region at {region[0].name} retraced into attribute reads "
                    f"({node.target}); it cannot be inlined"
                )
            else:
                mapping[node] = graph.node_copy(node, mapping.__getitem__)
                spliced.append(mapping[node])
    for old, new in zip(outputs, results, strict=True):
        old.replace_all_uses_with(new)
    attributes = {a.target for a in inputs if a.op == "get_attr"}
    for node in reversed(region):
        graph.erase_node(node)
    for arg in inputs:
        if arg.op == "get_attr" and not arg.users:
            graph.erase_node(arg)
    for node in reversed(spliced):  # batching rules compute some values nobody reads
        if not node.users:
            graph.erase_node(node)
    for target in attributes:
        if hasattr(gm, target) and not any(
            n.op == "get_attr" and n.target == target for n in graph.nodes
        ):
            delattr(gm, target)


class LowerVmapRegions(PassBase):
    """Replace every vmap call recorded in a graph module by the batched ATen ops it
    computes (in place).

    Precondition: a torch.export graph module with fake values in its metadata.
    Postcondition: no functorch call or ``flat_apply`` from a vmap region remains; the
    module computes the same values. A region that does not close raises
    UnsupportedGraphError.
    """

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        count = 0
        while True:
            nodes = list(graph_module.graph.nodes)
            start = next((i for i, n in enumerate(nodes) if _call_name(n) in _VMAP_CALLS), None)
            if start is None:
                break
            region = _vmap_region(nodes, start)
            if region is None:
                raise UnsupportedGraphError(
                    f"the vmap region starting at {nodes[start].name} is not closed in the graph"
                )
            _lower_region(graph_module, region)
            count += 1
        return PassResult(graph_module, count > 0)


def _describe(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return f"{node.name} ({name})"


def leftover_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes of ``gm`` that are not plain ATen after normalisation: higher-order ops,
    functorch (vmap) calls and submodule calls other than export's input guard."""
    left = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target != "_guards_fn":
            left.append(node)
        elif node.op == "call_function":
            target = node.target
            if isinstance(target, torch._ops.HigherOrderOperator):
                left.append(node)
            elif getattr(target, "__name__", None) in _VMAP_CALLS:
                left.append(node)
    return left


def check_normalized(gm: torch.fx.GraphModule, source_name: str = "the model") -> None:
    """Raise UnsupportedGraphError naming what in ``gm`` is not plain ATen."""
    left = leftover_nodes(gm)
    if not left:
        return
    vmap = [n for n in left if getattr(n.target, "__name__", None) in _VMAP_CALLS]
    found = ", ".join(_describe(n) for n in left[:4])
    more = f" and {len(left) - 4} more" if len(left) > 4 else ""
    hint = " (a torch.vmap call that could not be lowered)" if vmap else ""
    raise UnsupportedGraphError(
        f"the captured graph of {source_name} is not plain ATen after normalisation: "
        f"found {found}{more}{hint}"
    )


def normalize_export_graph(gm: torch.fx.GraphModule, source_name: str = "the model") -> PassResult:
    """Inline wrapped regions and lower vmap regions of ``gm`` in place (one pass list),
    then check that plain ATen is left (the postcondition: UnsupportedGraphError naming
    what is not)."""
    result = run_passes(gm, [InlineWrappedRegions(), LowerVmapRegions()])
    check_normalized(gm, source_name)
    return result


__all__ = [
    "InlineWrappedRegions",
    "LowerVmapRegions",
    "check_normalized",
    "leftover_nodes",
    "normalize_export_graph",
]
