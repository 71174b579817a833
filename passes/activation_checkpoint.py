"""Activation checkpointing as a graph pass: each decoder layer recomputed in the backward.

Matching (:func:`decoder_layer_regions`) reads the graph's ``nn_module_stack`` metadata:
the decoder layer of an attention site is the outermost module on the site's stack that
holds no other attention site (``model.layers.3`` for ``model.layers.3.self_attn``), and
its region is the run of nodes that module produced. Nothing depends on a model type.

Rewriting (:class:`CheckpointRegions`) moves each region into a sub-GraphModule that shares
the graph's weights and calls it through ``torch.utils.checkpoint.checkpoint``: the forward
keeps only the region's inputs (the layer's input hidden states, the rotary tables and the
mask, which are shared by every layer), and the backward runs the region again to get the
activations it needs. The computed values are the same ops on the same inputs, so outputs
and gradients are unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils.checkpoint

from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.graph_copy import copy_flat_graph, graph_module_sharing
from adaption_fx.passes.infra import PassBase, PassNotApplicable, PassResult
from adaption_fx.passes.locate import plain_module_path, within

# The keyword arguments torch.utils.checkpoint.checkpoint takes that a caller may set.
CHECKPOINT_OPTIONS = frozenset({"use_reentrant", "preserve_rng_state", "determinism_check"})
REGION_PREFIX = "checkpointed_"


@dataclass(frozen=True)
class Region:
    """One decoder layer: its module path and its nodes' names, in graph order."""

    module_path: str
    nodes: tuple[str, ...]


def _stack_paths(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [plain_module_path(entry[0]) for entry in stack.values()]


def _layer_of(site_path: str, site_paths: Sequence[str], stacks: list[list[str]]) -> str:
    """The outermost module on ``site_path``'s stacks that holds no other site."""
    ancestors: list[str] = []
    for paths in stacks:
        if site_path in paths:
            for path in paths[: paths.index(site_path) + 1]:
                if path and path not in ancestors:
                    ancestors.append(path)
    for path in ancestors:
        if not any(within(other, path) for other in site_paths if other != site_path):
            return path
    return site_path


def decoder_layer_regions(
    graph: torch.fx.Graph, site_paths: Sequence[str], only: Sequence[str] | None = None
) -> list[Region]:
    """The decoder layer region of each attention site in ``only`` (default: all of
    ``site_paths``). ``site_paths`` are module paths such as ``model.layers.3.self_attn``;
    every site of the model must be listed, so that a layer is told apart from a module
    holding several layers.

    A region is every node from the layer's first node to its last: nodes in between that
    carry no module stack (ones a pass inserted) belong to it; a node of another module in
    between means the layer is not one run of nodes, and UnsupportedGraphError says so.
    """
    nodes = list(graph.nodes)
    stacks = [_stack_paths(n) for n in nodes]
    regions = []
    for site in site_paths if only is None else only:
        layer = _layer_of(site, site_paths, stacks)
        members = [
            i
            for i, (n, paths) in enumerate(zip(nodes, stacks, strict=True))
            if n.op == "call_function" and layer in paths
        ]
        if not members:
            raise UnsupportedGraphError(f"no nodes of attention site {site!r} in the graph")
        span = []
        for i in range(members[0], members[-1] + 1):
            node, paths = nodes[i], stacks[i]
            if node.op != "call_function":
                continue
            if paths and layer not in paths:
                raise UnsupportedGraphError(
                    f"decoder layer {layer!r} is not one run of nodes: node {node.name!r} of "
                    f"{paths[-1]!r} lies between its nodes; it cannot be checkpointed as a region"
                )
            span.append(node.name)
        regions.append(Region(layer, tuple(span)))
    return regions


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checkpoint options as given, after checking their names and types."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"gradient_checkpointing_kwargs must be a dict or None, got {type(options).__name__}"
        )
    unknown = sorted(set(options) - CHECKPOINT_OPTIONS)
    if unknown:
        raise ValueError(
            f"unsupported gradient_checkpointing_kwargs {unknown}; supported: "
            f"{sorted(CHECKPOINT_OPTIONS)} (passed to torch.utils.checkpoint.checkpoint)"
        )
    for key in ("use_reentrant", "preserve_rng_state"):
        if key in options and not isinstance(options[key], bool):
            raise TypeError(f"gradient_checkpointing_kwargs[{key!r}] must be a bool")
    return dict(options)


def _outline(
    gm: torch.fx.GraphModule, members: list[torch.fx.Node]
) -> tuple[torch.fx.GraphModule, list[torch.fx.Node], list[torch.fx.Node]]:
    """A sub-GraphModule computing ``members`` (sharing ``gm``'s weights), its inputs (nodes
    outside the region it reads) and its outputs (region nodes read outside)."""
    inside = set(members)
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs: list[torch.fx.Node] = []

    def outer(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:
            if node.op == "get_attr":  # weights are read inside; only activations cross
                env[node] = sub.get_attr(node.target)
            else:
                env[node] = sub.placeholder(f"input_{len(inputs)}")
                inputs.append(node)
            env[node].meta.update(node.meta)
        return env[node]

    for node in members:
        env[node] = sub.node_copy(node, outer)
    outputs = [n for n in members if any(user not in inside for user in n.users)]
    sub.output(tuple(env[n] for n in outputs))
    sub.lint()
    return graph_module_sharing(gm, sub, class_name="CheckpointedRegion"), inputs, outputs


class CheckpointRegions(PassBase):
    """Run each of ``regions`` under ``torch.utils.checkpoint.checkpoint`` (non-reentrant
    unless ``options`` say otherwise).

    The result names a new module (a copy sharing the input's weights) in which each region
    is a submodule ``checkpointed_<i>``; the input module is left as it was.
    Precondition: the regions' node names exist in the graph and each region is a run of
    nodes. Postcondition: the same outputs and gradients.
    """

    def __init__(self, regions: Sequence[Region], options: Mapping[str, Any] | None = None):
        self.regions = list(regions)
        self.options = dict(options or {})
        check_options(self.options)

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        names = {n.name for n in graph_module.graph.nodes}
        for region in self.regions:
            missing = [name for name in region.nodes if name not in names]
            if missing:
                raise PassNotApplicable(
                    f"region {region.module_path}: the graph has no nodes {missing[:3]}"
                )

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        if not self.regions:
            return PassResult(graph_module, False)
        return PassResult(_checkpoint_regions(graph_module, self.regions, self.options), True)


def _checkpoint_regions(
    gm: torch.fx.GraphModule,
    regions: Sequence[Region],
    options: Mapping[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its weights) in which each region runs under
    ``torch.utils.checkpoint.checkpoint`` (non-reentrant unless ``options`` say otherwise).

    Each region becomes a submodule ``checkpointed_<i>`` of the copy. Precondition: the
    regions' node names exist in ``gm.graph`` and each region is a run of nodes.
    """
    kwargs = {"use_reentrant": False, **check_options(options)}
    graph, by_name = copy_flat_graph(gm)
    twin = graph_module_sharing(gm, graph, class_name=type(gm).__name__)
    for index, region in enumerate(regions):
        members = [by_name[name] for name in region.nodes]
        sub, inputs, outputs = _outline(gm, members)
        inside = set(members)
        name = f"{REGION_PREFIX}{index}"
        twin.add_module(name, sub)
        with graph.inserting_after(members[-1]):
            module = graph.get_attr(name)
        with graph.inserting_after(module):
            call = graph.call_function(
                torch.utils.checkpoint.checkpoint, (module, *inputs), dict(kwargs)
            )
        call.meta["checkpointed_region"] = region.module_path
        results = []
        last = call
        for i in range(len(outputs)):
            with graph.inserting_after(last):
                last = graph.call_function(operator.getitem, (call, i))
            results.append(last)
        for old, new in zip(outputs, results, strict=True):
            new.meta.update(old.meta)
            old.replace_all_uses_with(
                new, delete_user_cb=lambda user, inside=inside: user not in inside
            )
        for node in reversed(members):
            graph.erase_node(node)
    graph.lint()
    twin.recompile()
    return twin


def checkpointed_regions(gm: torch.fx.GraphModule) -> list[str]:
    """The module paths of the regions :class:`CheckpointRegions` put in ``gm``."""
    return [
        n.meta["checkpointed_region"] for n in gm.graph.nodes if "checkpointed_region" in n.meta
    ]


__all__ = [
    "CHECKPOINT_OPTIONS",
    "CheckpointRegions",
    "Region",
    "check_options",
    "checkpointed_regions",
    "decoder_layer_regions",
]
