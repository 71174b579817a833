"""Outlining decoder layers: each layer of a flat graph becomes a submodule called there.

A captured graph reads every weight with ``get_attr`` and never calls the model's modules,
so module hooks (FSDP2's ``fully_shard`` all-gather / reshard hooks) never fire. This pass
moves each decoder layer region (found by
:func:`adaption_fx.passes.activation_checkpoint.decoder_layer_regions`) into a
sub-GraphModule installed at the layer's module path and called with ``call_module``:

- the sub-GraphModule's top-level children ARE the layer's own container modules in the
  captured GraphModule (``self_attn``, ``mlp``, ...: the same objects, hence the very
  frozen ``Parameter`` objects), and its ``get_attr`` targets are relative to the layer
  (``self_attn.q_proj.weight``), so the layer reads its weights itself;
- the root GraphModule shares the modules that own the other weights (embedding, final
  norm, lm_head, rotary embedding) with the captured GraphModule (the module objects, not
  only their tensors): whatever later replaces their parameters (``fully_shard``) replaces
  them for the captured graph too, and nothing keeps the original full tensors alive.

``torch.fx.passes.split_module`` does not fit: it never assigns ``get_attr`` nodes to a
partition; it reads the weights in the root graph and passes them into the partitions as
arguments. The root would then read (sharded) weights itself, and a layer's hooks would
gather weights its graph never reads.

Matching (which nodes form a layer) is ``decoder_layer_regions``'; this module only
rewrites.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.fx

from adaption_fx.passes.activation_checkpoint import Region
from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.graph_copy import owner_at
from adaption_fx.passes.infra import PassBase, PassResult
from adaption_fx.passes.locate import within


def _install(root: torch.nn.Module, path: str, value: object) -> None:
    """Put ``value`` at ``path`` in ``root``, creating empty container modules."""
    module, name = owner_at(root, path)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(name, value)
    elif isinstance(value, torch.nn.Module):
        module.add_module(name, value)
    elif isinstance(value, torch.Tensor):
        module.register_buffer(name, value)
    else:
        setattr(module, name, value)


def _layer_graph_module(container: torch.nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` whose attributes are ``container``'s own children,
    parameters and buffers (the same objects)."""
    holder = torch.nn.Module()
    for name, child in container.named_children():
        holder.add_module(name, child)
    for name, param in container._parameters.items():
        holder.register_parameter(name, param)
    for name, buf in container._buffers.items():
        holder.register_buffer(name, buf)
    gm = torch.fx.GraphModule(holder, graph, class_name="OutlinedLayer")
    # GraphModule(holder, ...) builds fresh intermediate modules: point at the real ones.
    for name in list(gm._modules):
        if name in holder._modules:
            gm._modules[name] = holder._modules[name]
    return gm


class OutlineLayers(PassBase):
    """Call each decoder layer as a module of its own (see :func:`_outline_layers`); the
    result names the new module, the input module is left as it was.

    Precondition: ``regions`` are decoder-layer regions of the graph
    (``decoder_layer_regions(graph, site_paths)``). Postcondition: the same function, each
    region a ``call_module`` of a sub-GraphModule reading that layer's weights itself.
    """

    def __init__(self, regions: Sequence[Region]):
        self.regions = list(regions)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return PassResult(_outline_layers(graph_module, self.regions), bool(self.regions))


def _outline_layers(gm: torch.fx.GraphModule, regions: Sequence[Region]) -> torch.fx.GraphModule:
    """A GraphModule computing what ``gm`` computes, in which each region (a decoder layer,
    from ``decoder_layer_regions(gm.graph, site_paths)``) is replaced by
    ``call_module(region.module_path)`` of a sub-GraphModule reading that layer's weights
    itself. ``gm`` is not modified; no weight is copied.

    The layer sub-GraphModules are reachable at their module paths in the result (in a
    ``ModuleList`` where ``gm`` holds the layers in one). Raises UnsupportedGraphError when
    a region cannot be outlined: its module is not in ``gm``, one of its weights is read
    outside it (by another layer or the root), or a value it computes is used before its
    last node.
    """
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    position = {n: i for i, n in enumerate(nodes)}
    owner: dict[torch.fx.Node, int] = {}
    for index, region in enumerate(regions):
        for name in region.nodes:
            node = by_name.get(name)
            if node is None:
                raise UnsupportedGraphError(f"{region.module_path}: no node {name!r} in the graph")
            if node in owner:
                raise UnsupportedGraphError(
                    f"node {name!r} is in two regions ({regions[owner[node]].module_path!r} "
                    f"and {region.module_path!r})"
                )
            owner[node] = index
    # A layer's weights belong to it, and must be read by it alone.
    for node in nodes:
        if node.op != "get_attr":
            continue
        target = str(node.target)
        for index, region in enumerate(regions):
            if not within(target, region.module_path):
                continue
            readers = [u for u in node.users if owner.get(u) != index]
            if readers:
                raise UnsupportedGraphError(
                    f"weight {target!r} of {region.module_path!r} is read outside that layer "
                    f"(by {readers[0].name!r}); the layer cannot be outlined"
                )
            owner[node] = index

    subs: list[tuple[torch.fx.GraphModule, list[torch.fx.Node], list[torch.fx.Node]]] = []
    last: list[torch.fx.Node] = []
    for index, region in enumerate(regions):
        try:
            container = gm.get_submodule(region.module_path)
        except AttributeError as exc:
            raise UnsupportedGraphError(
                f"decoder layer {region.module_path!r} is not a module of the graph module"
            ) from exc
        members = [n for n in nodes if owner.get(n) == index]
        inside = set(members)
        end = max(position[by_name[name]] for name in region.nodes)
        sub = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        inputs: list[torch.fx.Node] = []

        def outer(node: torch.fx.Node, sub=sub, env=env, inputs=inputs) -> torch.fx.Node:
            if node not in env:  # a value computed outside the layer: an input
                env[node] = sub.placeholder(node.name)
                env[node].meta = dict(node.meta)
                inputs.append(node)
            return env[node]

        prefix = region.module_path + "."
        for node in members:
            if node.op == "get_attr":
                env[node] = sub.get_attr(str(node.target)[len(prefix) :])
                env[node].meta = dict(node.meta)
            else:
                env[node] = sub.node_copy(node, outer)
        outputs = [n for n in members if any(u not in inside for u in n.users)]
        for out in outputs:
            early = [u for u in out.users if u not in inside and position[u] < end]
            if early:
                raise UnsupportedGraphError(
                    f"{early[0].name!r} uses {out.name!r} of {region.module_path!r} before "
                    "the layer's last node; the layer cannot be outlined"
                )
        sub.output(tuple(env[o] for o in outputs))
        sub.lint()
        subs.append((_layer_graph_module(container, sub), inputs, outputs))
        last.append(nodes[end])

    root_graph = torch.fx.Graph()
    root_graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    ends = {node: index for index, node in enumerate(last)}
    for node in nodes:
        index = ends.get(node)
        if index is not None:
            sub_gm, inputs, outputs = subs[index]
            call = root_graph.call_module(regions[index].module_path, tuple(env[a] for a in inputs))
            call.meta["outlined_layer"] = regions[index].module_path
            for k, out in enumerate(outputs):
                env[out] = root_graph.call_function(operator.getitem, (call, k))
                env[out].meta = dict(out.meta)
        elif node not in owner:
            env[node] = root_graph.node_copy(node, lambda a: env[a])

    holder = torch.nn.Module()
    for node in root_graph.nodes:
        if node.op == "call_module" and "outlined_layer" not in node.meta:
            _install(holder, str(node.target), gm.get_submodule(str(node.target)))
        if node.op != "get_attr":
            continue
        target = str(node.target)
        path = target.rpartition(".")[0]
        if path and not any(within(r.module_path, path) for r in regions):
            # share the owning module itself, not only the tensor
            _install(holder, path, gm.get_submodule(path))
        else:
            _install(holder, target, getattr(gm, target))
    for region, (sub_gm, _, _) in zip(regions, subs, strict=True):
        _install(holder, region.module_path, sub_gm)
    # Layers numbered 0..n-1 under one parent (model.layers) go in a ModuleList there.
    parents = {r.module_path.rpartition(".")[0] for r in regions}
    for parent_path in parents:
        if not parent_path:
            continue
        built = holder.get_submodule(parent_path)
        if list(built._modules) == [str(i) for i in range(len(built._modules))]:
            _install(holder, parent_path, torch.nn.ModuleList(list(built.children())))
    out = torch.fx.GraphModule(holder, root_graph, class_name="OutlinedGraphModule")
    for name in list(out._modules):  # point the top-level names at holder's own modules
        out._modules[name] = holder._modules[name]
    out.graph.lint()
    return out


def outlined_layers(gm: torch.fx.GraphModule) -> dict[str, torch.fx.GraphModule]:
    """The layer sub-GraphModules :class:`OutlineLayers` put in ``gm``, by module path."""
    return {
        str(n.target): gm.get_submodule(str(n.target))
        for n in gm.graph.nodes
        if n.op == "call_module" and "outlined_layer" in n.meta
    }


__all__ = ["OutlineLayers", "outlined_layers"]
