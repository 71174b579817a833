"""Locate attention sites in a torch.export ATen graph.

Precondition: ``gm`` comes from torch.export (call_function targets are ATen OpOverloads and
nodes carry ``meta["val"]``), with parameters reachable through ``get_attr`` nodes (an
unlifted graph, as ``ExportedProgram.module()`` gives). Every number in a site is read from
node metadata: head counts and sizes from tensor shapes, the scale from the attention call.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence

import torch
import torch.fx

from adaption_fx.passes.errors import AttentionNotFoundError, UnsupportedGraphError
from adaption_fx.passes.site import AttentionSite, Projection

aten = torch.ops.aten

SDPA_TARGETS = (aten.scaled_dot_product_attention.default,)
LINEAR_TARGETS = (aten.linear.default,)

# Set on every node the insert pass adds; its presence means the graph was already rewritten.
ADAPTION_META_KEY = "adaption_fx"


def _tensor_meta(node: torch.fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise UnsupportedGraphError(
            f"node {node.name!r} ({node.target}) has no tensor metadata (meta['val']); "
            "the passes need a graph captured by torch.export"
        )
    return val


def _static(value: object, what: str, node: torch.fx.Node) -> int:
    # Head counts and head sizes must be fixed by the graph; a symbolic one means the
    # attention layout is not the (batch, heads, seq, head_dim) one the adapter expects.
    if isinstance(value, int):
        return value
    raise AttentionNotFoundError(
        f"{what} at node {node.name!r} is symbolic ({value}); expected a fixed size"
    )


def module_path_of(node: torch.fx.Node) -> str:
    """The innermost module that produced ``node``, from torch.export's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # strict-mode export spells the root as L['self']; non-strict gives plain paths.
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path


def within(path: str, scope: str) -> bool:
    """True if ``path`` is ``scope`` or nested in it (``layers.1`` does not hold ``layers.10``)."""
    return not scope or path == scope or path.startswith(scope + ".")


def check_aten_graph(gm: torch.fx.GraphModule) -> None:
    """Raise UnsupportedGraphError unless ``gm`` is an unrewritten torch.export ATen graph."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    rewritten = [n.name for n in gm.graph.nodes if ADAPTION_META_KEY in n.meta]
    if rewritten:
        raise UnsupportedGraphError(
            f"the graph already carries adaption-prompt nodes ({', '.join(rewritten[:3])}, ...); "
            "rewriting a rewritten graph is not supported: add adapters with "
            "AdaptedModel.add_adapter instead"
        )
    # torch.export's unlifted modules call their own input-guard module; any other submodule
    # call means the graph was not produced by torch.export.
    if any(n.op == "call_module" and n.target != "_guards_fn" for n in gm.graph.nodes):
        raise UnsupportedGraphError(
            "the graph calls submodules (call_module nodes): it is not a torch.export ATen "
            "graph; pass the nn.Module or an ExportedProgram instead"
        )
    has_aten = any(isinstance(n.target, torch._ops.OpOverload) for n in calls)
    has_meta = any(isinstance(n.meta.get("val"), torch.Tensor) for n in calls)
    if calls and not (has_aten and has_meta):
        raise UnsupportedGraphError(
            "the graph has no ATen operators with tensor metadata: it is not a torch.export "
            "graph (symbolic_trace graphs are not supported); pass the nn.Module or an "
            "ExportedProgram instead"
        )


def _arg(node: torch.fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _input_nodes(node: torch.fx.Node) -> Iterable[torch.fx.Node]:
    return node.all_input_nodes


def _find_projection(
    start: torch.fx.Node, gm: torch.fx.GraphModule, scope: str
) -> torch.fx.Node | None:
    """The nearest linear node with a parameter weight upstream of ``start``.

    The walk stays inside the attention module (``scope``) so it cannot run past the
    layer's input into the previous layer's projections, and it skips the rotary tables,
    which are computed outside the module.
    """
    seen = {start}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                return node
        for parent in _input_nodes(node):
            if parent in seen or parent.op != "call_function":
                continue
            if not within(module_path_of(parent), scope):
                continue
            seen.add(parent)
            queue.append(parent)
    return None


def _projection(node: torch.fx.Node) -> Projection:
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
        raise AttentionNotFoundError(
            f"projection {node.name!r} has a bias that is not a parameter ({bias})"
        )
    weight_val = _tensor_meta(weight) if "val" in weight.meta else None
    x_val = _tensor_meta(node.args[0])
    out_val = _tensor_meta(node)
    in_features = _static(x_val.shape[-1], "projection input width", node)
    out_features = _static(out_val.shape[-1], "projection output width", node)
    if weight_val is not None and tuple(weight_val.shape) != (out_features, in_features):
        raise AttentionNotFoundError(
            f"projection {node.name!r} weight has shape {tuple(weight_val.shape)}, "
            f"expected ({out_features}, {in_features})"
        )
    return Projection(
        node=node.name,
        weight=str(weight.target),
        bias=str(bias.target) if bias is not None else None,
        in_features=in_features,
        out_features=out_features,
    )


def _find_output_projection(attn: torch.fx.Node, scope: str) -> str | None:
    # Follow the attention output through layout ops to the first linear that reads it.
    queue = collections.deque([attn])
    seen = {attn}
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            if user.target in LINEAR_TARGETS and user.args[0] is node:
                return user.name
            if not within(module_path_of(user), scope):
                continue
            seen.add(user)
            queue.append(user)
    return None


def _match_sdpa(node: torch.fx.Node, index: int, gm: torch.fx.GraphModule) -> AttentionSite:
    query, key, value = node.args[:3]
    where = f"attention node {node.name!r}"
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    if dropout_p not in (0, 0.0):
        raise AttentionNotFoundError(
            f"{where} applies dropout (p={dropout_p}); capture the model in eval mode"
        )
    q_val, k_val, v_val = (_tensor_meta(n) for n in (query, key, value))
    if q_val.dim() != 4 or k_val.dim() != 4 or v_val.dim() != 4:
        raise AttentionNotFoundError(
            f"{where} has query/key/value of ranks {q_val.dim()}/{k_val.dim()}/{v_val.dim()}; "
            "expected 4-d (batch, heads, seq, head_dim)"
        )
    num_heads = _static(q_val.shape[1], "query head count", node)
    head_dim = _static(q_val.shape[-1], "query head size", node)
    value_head_dim = _static(v_val.shape[-1], "value head size", node)

    scope = module_path_of(node)
    key_node = _find_projection(key, gm, scope)
    value_node = _find_projection(value, gm, scope)
    if key_node is None or value_node is None:
        missing, start = ("key", key) if key_node is None else ("value", value)
        raise AttentionNotFoundError(
            f"{where} in {scope or '<root>'!r}: found no linear projection with a parameter "
            f"weight upstream of its {missing} input ({start.name!r}); "
            "fused or non-linear key/value projections are not supported yet"
        )
    if key_node is value_node:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: key and value come from one fused projection "
            f"({key_node.name!r}); fused projections are not supported yet"
        )
    k_proj, v_proj = _projection(key_node), _projection(value_node)
    if k_proj.out_features % head_dim:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: key projection width {k_proj.out_features} is not a "
            f"multiple of head_dim {head_dim}"
        )
    num_kv_heads = k_proj.out_features // head_dim
    if v_proj.out_features != num_kv_heads * value_head_dim:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: value projection width {v_proj.out_features} != "
            f"{num_kv_heads} kv heads x value head_dim {value_head_dim}"
        )
    if num_heads % num_kv_heads:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: {num_heads} query heads are not a multiple of "
            f"{num_kv_heads} key/value heads"
        )
    if k_proj.in_features != v_proj.in_features:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: key and value projections read inputs of different widths "
            f"({k_proj.in_features} vs {v_proj.in_features})"
        )
    scale = _arg(node, 7, "scale", None)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)  # SDPA's own default
    if not isinstance(scale, (int, float)):
        raise AttentionNotFoundError(f"{where} has a non-constant scale ({scale})")
    return AttentionSite(
        index=index,
        module_path=scope,
        attention_node=node.name,
        query_node=query.name,
        key_projection=k_proj,
        value_projection=v_proj,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        value_head_dim=value_head_dim,
        scale=float(scale),
        output_projection=_find_output_projection(node, scope),
    )


def locate_attention(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Find every attention site in ``gm``, in execution order.

    Raises:
        UnsupportedGraphError: ``gm`` is not an unrewritten torch.export ATen graph.
        AttentionNotFoundError: no attention site at all, or one that does not match fully
            (the message names the node it stopped at).
    """
    check_aten_graph(gm)
    attention_nodes = [
        n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS
    ]
    if not attention_nodes:
        ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        common = ", ".join(f"{op} x{c}" for op, c in ops.most_common(6)) or "none"
        raise AttentionNotFoundError(
            f"found no attention in the graph: no scaled_dot_product_attention node among "
            f"{sum(ops.values())} operator calls (most common: {common})"
        )
    sites = [_match_sdpa(n, i, gm) for i, n in enumerate(attention_nodes)]
    paths = [s.module_path for s in sites]
    duplicated = sorted({p for p in paths if paths.count(p) > 1})
    if duplicated:
        raise AttentionNotFoundError(
            f"several attention calls share one owning module ({duplicated}); adapter "
            "tensors are keyed by module path, so each attention needs its own module"
        )
    return sites


def select_top_sites(sites: Sequence[AttentionSite], adapter_layers: int) -> list[AttentionSite]:
    """The last ``adapter_layers`` sites in execution order (the paper's top L layers)."""
    if adapter_layers > len(sites):
        where = ", ".join(s.module_path or "<root>" for s in sites)
        raise ValueError(
            f"adapter_layers={adapter_layers} but the model has only {len(sites)} attention "
            f"site(s): {where}"
        )
    return list(sites[len(sites) - adapter_layers :])
