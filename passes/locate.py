"""Locate attention sites in a torch.export ATen graph.

Precondition: ``gm`` comes from torch.export (call_function targets are ATen OpOverloads and
nodes carry ``meta["val"]``), with parameters reachable through ``get_attr`` nodes (an
unlifted graph, as ``ExportedProgram.module()`` gives). Every number in a site is read from
node metadata: head counts and sizes from tensor shapes, the scale from the attention call.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from adaption_fx.passes.errors import AttentionNotFoundError, UnsupportedGraphError
from adaption_fx.passes.paths import ancestors, hidden_states_source, tensor_path
from adaption_fx.passes.patterns import AttentionMatch, find_attention
from adaption_fx.passes.site import AttentionSite, Projection

aten = torch.ops.aten


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
    return plain_module_path(list(stack.values())[-1][0])


def plain_module_path(path: str) -> str:
    """An ``nn_module_stack`` entry's path as a module path (``model.layers.0``)."""
    # strict-mode export spells the root as L['self']; non-strict gives plain paths.
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            return path[len(prefix) :]
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


def _projection_parts(node: torch.fx.Node):
    """(input, weight, bias) of a projection node with a parameter weight, else None."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        x, weight = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    elif node.target == aten.addmm.default:  # Conv1D (GPT-2): addmm(bias, x, weight)
        bias, x, weight = node.args[:3]
    elif node.target == aten.mm.default:
        # A tensor-subclass weight (torchao's quantized tensors), which torch.export
        # unwraps: mm(x, <weight computed from the parameter's inner tensors>).
        x, computed = node.args[:2]
        weight = subclass_parameter(computed)
        return None if weight is None else (x, weight, None)
    else:
        return None
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return None
    return x, weight, bias


def subclass_parameter(weight: Any) -> torch.fx.Node | None:
    """The stored tensor-subclass parameter a computed weight unwraps, where the weight is
    computed from that parameter's inner tensors alone (no graph input), else None."""
    if not isinstance(weight, torch.fx.Node):
        return None
    upstream = ancestors(weight) | {weight}
    if any(n.op == "placeholder" for n in upstream):
        return None
    owners = {
        n.args[0]
        for n in upstream
        if n.op == "call_function"
        and "access_subclass_inner_tensor" in str(n.target)
        and isinstance(n.args[0], torch.fx.Node)
        and n.args[0].op == "get_attr"
    }
    return owners.pop() if len(owners) == 1 else None


def _find_projection(start: torch.fx.Node, scope: str) -> torch.fx.Node | None:
    """The nearest projection with a parameter weight upstream of ``start``.

    The walk stays inside the attention module (``scope``) so it cannot run past the
    layer's input into the previous layer's projections, and it skips the rotary tables,
    which are computed outside the module.
    """
    seen = {start}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        if _projection_parts(node) is not None:
            return node
        for parent in node.all_input_nodes:
            if parent in seen or parent.op != "call_function":
                continue
            if not within(module_path_of(parent), scope):
                continue
            seen.add(parent)
            queue.append(parent)
    return None


def _projection(node: torch.fx.Node, source: torch.fx.Node) -> Projection:
    _, weight, bias = _projection_parts(node)
    if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
        raise AttentionNotFoundError(
            f"projection {node.name!r} has a bias that is not a parameter ({bias})"
        )
    in_features = _static(_tensor_meta(source).shape[-1], "hidden size", node)
    out_features = _static(_tensor_meta(node).shape[-1], "projection output width", node)
    return Projection(
        node=node.name,
        weight=str(weight.target),
        bias=str(bias.target) if bias is not None else None,
        in_features=in_features,
        out_features=out_features,
    )


def _computed_weight_hint(start: torch.fx.Node, scope: str) -> str:
    """Why no projection was found, when a linear with a computed weight is the cause."""
    seen, queue = {start}, collections.deque([start])
    while queue:
        node = queue.popleft()
        if node.op == "call_function" and node.target == aten.linear.default:
            weight = node.args[1]
            upstream = ancestors(weight) if isinstance(weight, torch.fx.Node) else set()
            stored = sorted(
                (
                    a
                    for a in upstream
                    if a.op == "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)
                ),
                key=lambda a: a.name,
            )
            dtypes = sorted({str(a.meta["val"].dtype) for a in stored})
            return (
                f"; linear {node.name!r} computes its weight at run time from "
                f"{[str(a.target) for a in stored][:2]} ({', '.join(dtypes) or 'no stored tensor'})"
                ": quantised or computed weights are not supported"
            )
        for parent in node.all_input_nodes:
            if (
                parent not in seen
                and parent.op == "call_function"
                and within(module_path_of(parent), scope)
            ):
                seen.add(parent)
                queue.append(parent)
    return ""


def _find_output_projection(attn: torch.fx.Node, scope: str) -> str | None:
    # Follow the attention output through layout ops to the first projection that reads it.
    queue = collections.deque([attn])
    seen = {attn}
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            if _projection_parts(user) is not None:
                return user.name
            if not within(module_path_of(user), scope):
                continue
            seen.add(user)
            queue.append(user)
    return None


def _check_weights(node: torch.fx.Node, gm: torch.fx.GraphModule, what: str) -> None:
    _, weight, _ = _projection_parts(node)
    val = weight.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else None
    if dtype is None:
        try:
            dtype = gm.get_parameter(str(weight.target)).dtype
        except AttributeError:
            dtype = gm.get_buffer(str(weight.target)).dtype
    if not dtype.is_floating_point:
        raise AttentionNotFoundError(
            f"{what} projection {node.name!r} has {dtype} weights "
            f"({weight.target}); adapter prompts need a floating-point projection "
            "(quantised or integer weights are not supported)"
        )


def _build_site(
    match: AttentionMatch,
    index: int,
    gm: torch.fx.GraphModule,
    order: dict[torch.fx.Node, int],
    nodes: dict[str, torch.fx.Node],
) -> AttentionSite:
    node = match.output
    where = f"attention at {node.name!r}"
    q_val, k_val, v_val = (_tensor_meta(n) for n in (match.query, match.key, match.value))
    if q_val.dim() != 4 or k_val.dim() != 4 or v_val.dim() != 4:
        raise AttentionNotFoundError(
            f"{where} has query/key/value of ranks {q_val.dim()}/{k_val.dim()}/{v_val.dim()}; "
            "expected 4-d (batch, heads, seq, head_dim)"
        )
    num_heads = _static(q_val.shape[1], "query head count", node)
    head_dim = _static(q_val.shape[-1], "query head size", node)
    key_heads = _static(k_val.shape[1], "key head count", node)
    scope = module_path_of(node)
    paths = {}
    projections = {}
    for role, start in (("key", match.key), ("value", match.value)):
        proj = _find_projection(start, scope)
        if proj is None:
            raise AttentionNotFoundError(
                f"{where} in {scope or '<root>'!r}: found no projection with a parameter "
                f"weight upstream of its {role} input ({start.name!r})"
                + _computed_weight_hint(start, scope)
            )
        _check_weights(proj, gm, role)
        source = hidden_states_source(proj, _projection_parts(proj)[0])
        paths[role] = tensor_path(start, source, order)
        projections[role] = _projection(proj, source)
    key_path, value_path = paths["key"], paths["value"]
    kv = _tensor_meta(nodes[key_path.per_kv_head])
    vv = _tensor_meta(nodes[value_path.per_kv_head])
    num_kv_heads = _static(kv.shape[1], "key/value head count", node)
    value_head_dim = _static(vv.shape[-1], "value head size", node)
    if _static(kv.shape[-1], "key head size", node) != head_dim:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: key head size {kv.shape[-1]} != query head size {head_dim}"
        )
    if num_heads % key_heads or num_heads % num_kv_heads:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: {num_heads} query heads are not a multiple of "
            f"{key_heads} key heads"
        )
    if projections["key"].in_features != projections["value"].in_features:
        raise AttentionNotFoundError(
            f"{where} in {scope!r}: key and value projections read hidden states of "
            f"different widths"
        )
    return AttentionSite(
        index=index,
        module_path=scope,
        attention_node=node.name,
        query_node=match.query.name,
        key_projection=projections["key"],
        value_projection=projections["value"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        value_head_dim=value_head_dim,
        scale=match.scale,
        output_projection=_find_output_projection(node, scope),
        key_path=key_path,
        value_path=value_path,
        kind=match.kind,
        softcap=match.softcap,
        key_heads=key_heads,
    )


def locate_attention(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Find every attention site in ``gm``, in execution order.

    Raises:
        UnsupportedGraphError: ``gm`` is not an unrewritten torch.export ATen graph.
        AttentionNotFoundError: no attention site at all, or one that does not match fully
            (the message names the node it stopped at).
    """
    check_aten_graph(gm)
    misses: list[str] = []
    matches = find_attention(gm, misses)
    if not matches:
        ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        common = ", ".join(f"{op} x{c}" for op, c in ops.most_common(6)) or "none"
        raise AttentionNotFoundError(
            f"found no attention in the graph: no scaled_dot_product_attention node and no "
            f"matmul/softmax/matmul pattern among {sum(ops.values())} operator calls "
            f"(most common: {common})" + "".join(f"\n  {m}" for m in misses[:4])
        )
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in order}
    sites = [_build_site(m, i, gm, order, nodes) for i, m in enumerate(matches)]
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
