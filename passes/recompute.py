"""Recompute gated activations in the backward instead of saving them.

A gated MLP (SwiGLU, GeGLU, ...) computes ``act(gate) * up``. Run as separate ops,
autograd keeps three (tokens, intermediate) tensors for the backward: ``gate`` (for the
activation's derivative), ``act(gate)`` and ``up`` (for the product's). The activation is
cheap to recompute from ``gate``, so keeping ``act(gate)`` costs a third of the MLP's saved
activations, the largest share of what a decoder layer saves. This pass replaces each such
pair of ops by one autograd function that saves ``gate`` and ``up`` only and recomputes the
activation in its backward. Outputs and gradients are the same ops on the same values, so
they are bit-identical; only what is kept between forward and backward changes.

The pass only matches on ops (an element-wise activation whose one user multiplies it by
another tensor); it knows no model types.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from adaption_fx.passes.infra import GraphPass

aten = torch.ops.aten

# Element-wise activations whose derivative needs their input only.
ACTIVATIONS = frozenset(
    {
        aten.silu.default,
        aten.gelu.default,
        aten.relu.default,
        aten.sigmoid.default,
        aten.tanh.default,
        aten.mish.default,
    }
)


class _GatedProduct(torch.autograd.Function):
    """``activation(gate) * up``, saving ``gate`` and ``up`` and recomputing the rest."""

    @staticmethod
    def forward(ctx: Any, gate, up, activation, act_args, act_kwargs):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        ctx.activation = (activation, act_args, act_kwargs)
        return activation(gate, *act_args, **act_kwargs) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        activation, act_args, act_kwargs = ctx.activation
        need_gate, need_up = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            gate = gate.detach().requires_grad_(need_gate)
            up = up.detach().requires_grad_(need_up)
            out = activation(gate, *act_args, **act_kwargs) * up
        wanted = [t for t, need in ((gate, need_gate), (up, need_up)) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (
            next(grads) if need_gate else None,
            next(grads) if need_up else None,
            None,
            None,
            None,
        )


def gated_product(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: Any,
    act_args: tuple = (),
    act_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``activation(gate, *act_args, **act_kwargs) * up`` that keeps only ``gate`` and ``up``
    for the backward."""
    return _GatedProduct.apply(gate, up, activation, tuple(act_args), dict(act_kwargs or {}))


def find_gated_activations(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(activation, product) node pairs: an element-wise activation whose only user is a
    tensor-by-tensor multiplication with another node."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ACTIVATIONS:
            continue
        if len(node.users) != 1:
            continue
        (user,) = node.users
        if user.target is not aten.mul.Tensor or len(user.args) != 2 or user.kwargs:
            continue
        other = user.args[1] if user.args[0] is node else user.args[0]
        if not isinstance(other, torch.fx.Node) or other is node:
            continue
        found.append((node, user))
    return found


class RecomputeGatedActivations(GraphPass):
    """Make each gated activation recompute the activation in the backward (see the module
    docstring), in place.

    Precondition: a flat ATen graph (torch.export's, or one of our rewrites of it).
    Postcondition: the same function; no ``act(gate) * up`` left as two nodes.
    """

    def transform(self, graph: torch.fx.Graph) -> int:
        found = find_gated_activations(graph)
        for act, product in found:
            up = product.args[1] if product.args[0] is act else product.args[0]
            with graph.inserting_before(product):
                fused = graph.call_function(
                    gated_product,
                    (act.args[0], up, act.target, tuple(act.args[1:]), dict(act.kwargs)),
                )
            fused.meta.update({k: v for k, v in product.meta.items() if k != "val"})
            if "val" in product.meta:
                fused.meta["val"] = product.meta["val"]
            product.replace_all_uses_with(fused)
            graph.erase_node(product)
            graph.erase_node(act)
        return len(found)


__all__ = [
    "ACTIVATIONS",
    "RecomputeGatedActivations",
    "find_gated_activations",
    "gated_product",
]
