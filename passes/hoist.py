"""Hoist what does not change between calls out of a graph that runs many times.

In generation the decode step runs once per token with the same adapter tensors. What the
step computes from them alone (the folded adapter keys and values shared across query
heads, scaled and gated) is the same in every step. :func:`hoist_invariant` splits such a
graph in two: a *prologue* that computes those values once, and a *main* graph that takes
them as inputs.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.fx

from adaption_fx.passes.cleanup import is_pure


@dataclass(frozen=True)
class HoistedGraph:
    """A graph split into a once-per-session prologue and a per-call main graph.

    Attributes:
        prologue: takes the invariant inputs (in their original order) and returns the
            hoisted values, as a tuple in ``main``'s extra-input order.
        main: takes the graph's other inputs (in their original order) followed by the
            hoisted values; returns what the original graph returned.
        hoisted: how many values the prologue returns.
    """

    prologue: torch.fx.Graph
    main: torch.fx.Graph
    hoisted: int


def hoist_invariant(graph: torch.fx.Graph, invariant: Collection[str]) -> HoistedGraph:
    """Split ``graph`` at the values computed from the placeholders named ``invariant`` (and
    from attributes and constants) alone.

    Only pure nodes are hoisted. An invariant value the rest of the graph reads becomes an
    input of ``main``; one read only by other hoisted nodes stays inside the prologue. An
    invariant placeholder read directly by the rest of the graph passes through the
    prologue unchanged. Attributes (``get_attr``) stay where they are read: they are not
    computed.

    ``graph`` itself is not changed.
    """
    names = set(invariant)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    unknown = names - {n.name for n in placeholders}
    if unknown:
        raise ValueError(f"no placeholders named {sorted(unknown)}")
    hoisted: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in names:
                hoisted.add(node)
        elif node.op == "call_function" and is_pure(node):
            inputs = node.all_input_nodes
            if inputs and all(i in hoisted or i.op == "get_attr" for i in inputs):
                if any(i in hoisted for i in inputs):
                    hoisted.add(node)
    # The values main reads: hoisted nodes with a user outside the hoisted set.
    boundary = [n for n in graph.nodes if n in hoisted and any(u not in hoisted for u in n.users)]

    prologue = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node in hoisted or (node.op == "get_attr" and any(u in hoisted for u in node.users)):
            env[node] = prologue.node_copy(node, lambda n: env[n])
    prologue.output(tuple(env[n] for n in boundary))

    main = torch.fx.Graph()
    env = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node not in hoisted:
            env[node] = main.node_copy(node, lambda n: env[n])
    extra = {}
    for node in boundary:
        extra[node] = main.placeholder(f"hoisted_{node.name}")
        extra[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node.op == "placeholder" or node in hoisted:
            continue
        env[node] = main.node_copy(node, lambda n: extra[n] if n in extra else env[n])
    return HoistedGraph(prologue=prologue, main=main, hoisted=len(boundary))


__all__ = ["HoistedGraph", "hoist_invariant"]
