"""Grow a graph captured with one decoder layer into the graph of ``count`` such layers.

torch.export's cost grows with the number of layers it traces, yet a decoder's layers run
the same code on weights of the same shapes. Capturing a model cut down to its first layer
and copying that layer's nodes gives the graph of the whole model for the price of one
layer. This pass does the copying; ``adaption_fx.capture.repeated`` decides when a model's layers
are alike enough for it and checks the result against the model.

Precondition: ``graph`` is a flat ATen graph from torch.export whose nodes carry
``nn_module_stack`` metadata, holding exactly one layer under ``layer_path`` (e.g.
``model.layers.0``), whose weights are ``get_attr`` nodes under that path. The layer reads
one *carried* value (the hidden states it takes from the layer before) plus values shared
by every layer (position embeddings, the mask, sizes), and optionally per-layer graph
inputs (a decode step's past keys and values). Its results are the next hidden states and
optionally per-layer graph outputs (the present keys and values).

Postcondition: layers ``1 .. count-1`` follow layer 0, each a copy of it reading the one
before, its weights renamed to its own path, its module stacks renamed likewise; per-layer
inputs and outputs are added in layer order; what read layer 0's result reads the last
layer's. Every shared value is computed once, as in a full capture.
"""

from __future__ import annotations

import torch
import torch.fx

from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.infra import GraphPass
from adaption_fx.passes.locate import plain_module_path, within


class ReplicationError(UnsupportedGraphError):
    """The one-layer graph does not have the shape this pass copies."""


def _in_layer(node: torch.fx.Node, layer_path: str) -> bool:
    if node.op == "get_attr":
        return within(str(node.target), layer_path)
    if node.op != "call_function":
        return False
    stack = node.meta.get("nn_module_stack") or {}
    return any(within(plain_module_path(path), layer_path) for path, _ in stack.values())


def layer_region(graph: torch.fx.Graph, layer_path: str) -> list[torch.fx.Node]:
    """The nodes of the layer at ``layer_path``, in graph order.

    A node that is not in the layer's module stack but reads a layer value and is read by
    the layer (a size taken with an empty stack, say) belongs to it too: a copy of the
    layer must recompute it from its own values.
    """
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    region = {n for n in nodes if _in_layer(n, layer_path)}
    if not any(n.op == "call_function" for n in region):
        raise ReplicationError(f"the graph has no operation inside {layer_path!r}")
    changed = True
    while changed:
        changed = False
        first = min(order[n] for n in region if n.op == "call_function")
        last = max(order[n] for n in region if n.op == "call_function")
        for node in nodes[first : last + 1]:
            if node in region or node.op != "call_function":
                continue
            reads = any(a in region for a in node.all_input_nodes)
            read_by = any(u in region for u in node.users)
            if reads and read_by:
                region.add(node)
                changed = True
    return sorted(region, key=order.__getitem__)


def _same_meta(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    return va.dtype == vb.dtype and [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def _renamed_stack(stack: dict, old: str, new: str) -> dict:
    renamed = {}
    for key, (path, cls) in stack.items():
        plain = plain_module_path(path)
        if within(plain, old):
            path = path[: len(path) - len(plain)] + new + plain[len(old) :]
            key = key.replace(old, new, 1)
        renamed[key] = (path, cls)
    return renamed


class ReplicateLayer(GraphPass):
    """Grow a one-layer graph to every layer (in place; see :func:`_replicate_layer` for
    the arguments and the errors).

    Precondition: the graph runs the layer at ``layer_path`` once, reading one carried
    value and writing one value the rest of the graph reads. Postcondition: it runs
    ``len(layer_path_of)`` layers, each reading its own weights.
    """

    def __init__(
        self,
        layer_path: str,
        layer_path_of: list[str],
        per_layer_inputs: dict[str, list[str]] | None = None,
    ):
        self.layer_path = layer_path
        self.layer_path_of = list(layer_path_of)
        self.per_layer_inputs = per_layer_inputs

    def transform(self, graph: torch.fx.Graph) -> int:
        _replicate_layer(graph, self.layer_path, self.layer_path_of, self.per_layer_inputs)
        return len(self.layer_path_of) - 1


def _replicate_layer(
    graph: torch.fx.Graph,
    layer_path: str,
    layer_path_of: list[str],
    per_layer_inputs: dict[str, list[str]] | None = None,
) -> None:
    """Copy the layer at ``layer_path`` so that ``graph`` runs ``len(layer_path_of)`` layers.

    Args:
        graph: the one-layer graph (changed in place).
        layer_path: the module path of the captured layer, e.g. ``model.layers.0``.
        layer_path_of: the module path of every layer, in order; the first is
            ``layer_path``.
        per_layer_inputs: for each placeholder the layer reads that every layer needs its
            own of, the placeholder names for all layers (the first being its own name).

    Raises:
        ReplicationError: the layer does not read exactly one carried value and write
            exactly one value read on by the rest of the graph, or a per-layer input is
            missing.
    """
    if not layer_path_of or layer_path_of[0] != layer_path:
        raise ValueError(f"layer_path_of must start with {layer_path!r}, got {layer_path_of[:2]}")
    count = len(layer_path_of)
    per_layer_inputs = per_layer_inputs or {}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for name, names in per_layer_inputs.items():
        if name not in placeholders:
            raise ReplicationError(f"the graph has no input {name!r}")
        if len(names) != count or names[0] != name:
            raise ValueError(f"per_layer_inputs[{name!r}] must name {count} inputs from {name!r}")
    per_layer = {placeholders[name] for name in per_layer_inputs}

    region = layer_region(graph, layer_path)
    members = set(region)
    output = next(n for n in graph.nodes if n.op == "output")
    inputs = {
        a for n in region for a in n.all_input_nodes if a not in members and a not in per_layer
    }
    carried_out = [n for n in region if any(u not in members and u is not output for u in n.users)]
    if len(carried_out) != 1:
        raise ReplicationError(
            f"{layer_path} passes {len(carried_out)} values to the rest of the graph "
            f"({[n.name for n in carried_out][:4]}); expected one (the hidden states)"
        )
    result = carried_out[0]
    if result in output.all_input_nodes:
        raise ReplicationError(f"{layer_path}'s result {result.name} is also a graph output")
    carried_in = [n for n in inputs if n.op != "get_attr" and _same_meta(n, result)]
    if len(carried_in) != 1:
        raise ReplicationError(
            f"{layer_path} reads {len(carried_in)} values shaped like its result "
            f"({sorted(n.name for n in carried_in)[:4]}); expected one (the hidden states)"
        )
    hidden = carried_in[0]
    layer_outputs = [n for n in region if output in n.users]
    readers = [u for u in result.users if u not in members and u is not output]

    # Per-layer inputs go after the last placeholder, grouped by layer (past_1_key,
    # past_1_value, past_2_key, ...), as the caller's input names are ordered.
    new_inputs: list[dict[torch.fx.Node, torch.fx.Node]] = [{} for _ in range(count)]
    anchor = list(placeholders.values())[-1]
    for i in range(1, count):
        for name, names in per_layer_inputs.items():
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(names[i])
            anchor.meta = dict(placeholders[name].meta)
            new_inputs[i][placeholders[name]] = anchor

    attrs: dict[str, torch.fx.Node] = {}
    first_call = next(n for n in graph.nodes if n.op == "call_function")
    tail = region[-1]
    previous = result
    copies: list[dict[torch.fx.Node, torch.fx.Node]] = [{n: n for n in region}]
    for i in range(1, count):
        old, new = layer_path, layer_path_of[i]
        env: dict[torch.fx.Node, torch.fx.Node] = {hidden: previous, **new_inputs[i]}
        for node in region:
            if node.op == "get_attr":
                target = new + str(node.target)[len(old) :]
                if target not in attrs:
                    with graph.inserting_before(first_call):
                        attrs[target] = graph.get_attr(target)
                    attrs[target].meta = dict(node.meta)
                env[node] = attrs[target]
                continue
            with graph.inserting_after(tail):
                copy = graph.node_copy(node, lambda a, env=env: env.get(a, a))
            copy.meta = dict(node.meta)
            stack = node.meta.get("nn_module_stack")
            if stack:
                copy.meta["nn_module_stack"] = _renamed_stack(stack, old, new)
            env[node] = copy
            tail = copy
        copies.append(env)
        previous = env[result]

    for user in readers:
        user.replace_input_with(result, previous)
    if layer_outputs:
        flat = output.args[0]
        if not isinstance(flat, (list, tuple)):
            raise ReplicationError("the graph's output is not a flat list")
        positions = [i for i, v in enumerate(flat) if v in set(layer_outputs)]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise ReplicationError("the layer's graph outputs are not next to each other")
        ordered = [flat[i] for i in positions]
        grown = [env[n] for env in copies for n in ordered]
        start = positions[0]
        output.args = (
            [*flat[:start], *grown, *flat[start + len(ordered) :]],
            *output.args[1:],
        )
    graph.lint()


__all__ = ["ReplicateLayer", "ReplicationError", "layer_region"]
