"""Copying a GraphModule's graph without copying its weights."""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.graph import CodeGen


def copy_flat_graph(gm: torch.fx.GraphModule) -> tuple[torch.fx.Graph, dict[str, torch.fx.Node]]:
    """A copy of ``gm.graph`` whose forward takes the flat inputs positionally.

    torch.export's unlifted modules flatten pytree inputs in generated code; the copy uses
    plain codegen so callers (and extra adapter inputs) work with the flat list directly.
    Returns the copy and a map from node name to copied node (names are preserved).
    """
    graph = torch.fx.Graph()
    old_to_new: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, old_to_new)
    graph.output(output)
    graph._codegen = CodeGen()
    by_name = {old.name: new for old, new in old_to_new.items()}
    renamed = [old.name for old, new in old_to_new.items() if old.name != new.name]
    if renamed:  # names are how sites refer to nodes; a fresh graph must keep them.
        raise RuntimeError(f"graph copy renamed nodes {renamed[:5]}")
    return graph, by_name


def owner_at(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    """The module that holds ``path`` inside ``root`` and the attribute name there; empty
    container modules are created for the parts of the path that do not exist yet."""
    *parents, name = path.split(".")
    module = root
    for part in parents:
        if part not in module._modules:
            module.add_module(part, torch.nn.Module())
        module = module._modules[part]
    return module, name


def graph_module_sharing(
    root: torch.fx.GraphModule, graph: torch.fx.Graph, class_name: str
) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` whose attributes ARE ``root``'s (same objects).

    ``GraphModule(root, graph)`` shares leaf tensors but builds fresh intermediate modules,
    so a later ``.to()`` or buffer swap on ``root`` would not reach it. Re-pointing the
    top-level attributes at ``root``'s own objects makes every weight lookup go through
    ``root`` at call time.
    """
    gm = torch.fx.GraphModule(root, graph, class_name=class_name)
    tops = {str(n.target).split(".")[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}
    for name in tops:
        value = getattr(root, name)
        if name in gm._buffers:
            gm._buffers[name] = value
        elif name in gm._parameters:
            gm._parameters[name] = value
        elif name in gm._modules:
            gm._modules[name] = value
        else:
            setattr(gm, name, value)
    return gm


def copy_sharing_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (flat inputs, see :func:`copy_flat_graph`) whose attributes are
    ``gm``'s own objects (:func:`graph_module_sharing`): what an in-place pass runs on to
    leave ``gm`` as it was."""
    graph, _ = copy_flat_graph(gm)
    return graph_module_sharing(gm, graph, class_name=type(gm).__name__)


def shares_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True if every tensor of ``a`` is the very tensor object ``b`` holds at that path."""
    b_tensors = dict(b.named_parameters(remove_duplicate=False))
    b_tensors.update(b.named_buffers(remove_duplicate=False))
    pairs = list(a.named_parameters(remove_duplicate=False)) + list(
        a.named_buffers(remove_duplicate=False)
    )
    return all(b_tensors.get(k) is v for k, v in pairs)


__all__ = ["copy_flat_graph", "graph_module_sharing", "shares_weights"]
