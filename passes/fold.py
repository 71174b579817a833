"""Fold an adapter's key/value projections into tensors, for inference.

The adapter keys and values depend only on the prompt and frozen weights, and the gate
activation only on the gate, so at inference they can be computed once. ``fold_adapter_kv``
replaces, in a copy of a rewritten graph, each site's adapter key/value (per key/value head,
before GQA sharing) and its activated gate with either constants or graph inputs. The
prompt projections disappear from the graph.

Precondition: ``graph`` comes from ``insert_adaption_prompt`` (its nodes carry the insert
pass's role tags). The training graph itself is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx

from adaption_fx.passes.graph_copy import copy_flat_graph, graph_module_sharing
from adaption_fx.passes.infra import NewModuleResult
from adaption_fx.passes.insert import ADAPTION_META_KEY, AdaptionGraph
from adaption_fx.passes.site import AttentionSite

FOLDED_SUFFIXES = ("adaption_key", "adaption_value", "adaption_gate_act")
CONSTANTS_MODULE = "adaption_constants"


def folded_keys(site: AttentionSite) -> tuple[str, str, str]:
    """Names of a site's folded tensors: key, value (1, kv_heads, len, dim), activated gate."""
    prefix = f"{site.module_path}." if site.module_path else ""
    return tuple(prefix + s for s in FOLDED_SUFFIXES)  # type: ignore[return-value]


@dataclass(frozen=True)
class FoldedGraph(NewModuleResult):
    """A rewritten graph with its adapter folded.

    Attributes:
        graph_module: takes the model's flat inputs, followed by ``adapter_inputs`` when
            the folded tensors are inputs.
        adapter_inputs: names of the folded tensors taken as inputs, in order (empty when
            they are constants inside the graph).
        values: the folded tensors by name, as computed from the adapter given.
    """

    graph_module: torch.fx.GraphModule
    adapter_inputs: tuple[str, ...]
    values: dict[str, torch.Tensor]


def _role_nodes(graph: AdaptionGraph) -> dict[str, tuple[torch.fx.Node, ...]]:
    """Per site path: the nodes producing its adapter key, value and activated gate."""
    by_site: dict[str, dict[str, torch.fx.Node]] = {s.module_path: {} for s in graph.sites}
    for node in graph.graph_module.graph.nodes:
        tag = node.meta.get(ADAPTION_META_KEY)
        if not tag or tag["site"] not in by_site:
            continue
        by_role = by_site[tag["site"]]
        role = tag["role"]
        if role == "input" and tag["key"].endswith("adaption_gate"):
            by_role.setdefault("gate_act", node)
        elif role == "gate_tanh":
            by_role["gate_act"] = node
        if tag.get("kv_role") in ("key_kv", "value_kv"):
            by_role[tag["kv_role"]] = node
    result = {}
    for path, by_role in by_site.items():
        missing = {"key_kv", "value_kv", "gate_act"} - set(by_role)
        if missing:
            raise ValueError(
                f"site {path!r}: graph has no adapter nodes with roles {sorted(missing)}; "
                "fold_adapter_kv needs a graph produced by insert_adaption_prompt"
            )
        result[path] = (by_role["key_kv"], by_role["value_kv"], by_role["gate_act"])
    return result


def adapter_projection(graph: AdaptionGraph) -> tuple[torch.fx.GraphModule, tuple[str, ...]]:
    """The part of ``graph`` that maps adapter tensors to folded ones, as its own module.

    It takes the adapter inputs (``graph.adapter_inputs`` order) and returns the folded
    tensors in the order of the returned names. The same nodes the full graph runs, so
    folded values cannot drift from what the unfolded graph computes.
    """
    gm = graph.graph_module
    roles = _role_nodes(graph)
    outputs: list[torch.fx.Node] = []
    names: list[str] = []
    for site in graph.sites:
        outputs.extend(roles[site.module_path])
        names.extend(folded_keys(site))
    needed: set[torch.fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node in needed:
            if node.op == "placeholder" and ADAPTION_META_KEY not in node.meta:
                raise ValueError(f"adapter tensors depend on model input {node.name!r}")
            env[node] = sub.node_copy(node, lambda n: env[n])
    # Every adapter input, in order, even one a variant leaves unused.
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    if len(placeholders) != len(graph.adapter_inputs):
        raise ValueError("adapter inputs of the graph and of its projection differ")
    sub.output(tuple(env[n] for n in outputs))
    return graph_module_sharing(gm, sub, class_name="AdapterProjection"), tuple(names)


def compute_folded(
    graph: AdaptionGraph, tensors: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Folded key/value/gate tensors of one adapter (``tensors`` in adapter_inputs order)."""
    if len(tensors) != len(graph.adapter_inputs):
        raise ValueError(
            f"expected {len(graph.adapter_inputs)} adapter tensors, got {len(tensors)}"
        )
    projection, names = adapter_projection(graph)
    with torch.no_grad():
        values = projection(*tensors)
    return {n: v.detach().contiguous() for n, v in zip(names, values, strict=True)}


def fold_adapter_kv(
    graph: AdaptionGraph,
    tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    as_inputs: bool = False,
) -> FoldedGraph:
    """A copy of ``graph`` with the adapter's key/value projections and gate folded.

    Args:
        graph: a rewritten graph from ``insert_adaption_prompt``.
        tensors: the adapter's prompts and gates, in ``graph.adapter_inputs`` order or keyed
            by those names.
        as_inputs: make the folded tensors graph inputs (one graph serves every adapter of
            this structure) instead of constants.

    Postcondition: the result computes what ``graph`` computes with ``tensors`` bound (to
    rounding), and contains no projection of the prompt.
    """
    if isinstance(tensors, Mapping):
        missing = [k for k in graph.adapter_inputs if k not in tensors]
        if missing:
            raise ValueError(f"missing adapter tensors {missing}")
        tensors = [tensors[k] for k in graph.adapter_inputs]
    values = compute_folded(graph, tensors)
    roles = _role_nodes(graph)
    new_graph, nodes = copy_flat_graph(graph.graph_module)
    model_placeholders = [
        n for n in new_graph.nodes if n.op == "placeholder" and ADAPTION_META_KEY not in n.meta
    ]
    anchor = model_placeholders[-1] if model_placeholders else None
    constants = torch.nn.Module()
    inputs: list[str] = []
    for site in graph.sites:
        old = [nodes[n.name] for n in roles[site.module_path]]
        for name, node in zip(folded_keys(site), old, strict=True):
            attr = name.replace(".", "_")
            if anchor is None:
                ctx = new_graph.inserting_before(next(iter(new_graph.nodes)))
            else:
                ctx = new_graph.inserting_after(anchor)
            with ctx:
                if as_inputs:
                    new = new_graph.placeholder(attr)
                    inputs.append(name)
                else:
                    constants.register_buffer(attr, values[name])
                    new = new_graph.get_attr(f"{CONSTANTS_MODULE}.{attr}")
            new.meta[ADAPTION_META_KEY] = {"site": site.module_path, "role": "folded", "key": name}
            new.meta["val"] = values[name]
            anchor = new
            node.replace_all_uses_with(new)
    # Drop the adapter nodes left without users (prompt projections, old inputs).
    for node in reversed(list(new_graph.nodes)):
        tag = node.meta.get(ADAPTION_META_KEY)
        if tag and tag["role"] != "folded" and not node.users:
            new_graph.erase_node(node)
    new_graph.lint()
    holder = torch.nn.Module()
    for name in {
        str(n.target).split(".")[0] for n in new_graph.nodes if n.op in ("get_attr", "call_module")
    }:
        if name != CONSTANTS_MODULE:
            setattr(holder, name, getattr(graph.graph_module, name))
    holder.add_module(CONSTANTS_MODULE, constants)
    folded = graph_module_sharing(holder, new_graph, class_name="FoldedGraphModule")
    return FoldedGraph(graph_module=folded, adapter_inputs=tuple(inputs), values=values)
