"""RMS normalisation written out op by op, as one ``aten.rms_norm``.

Hugging Face's RMSNorm modules compute ``w * (x * rsqrt(mean(x ** 2, -1) + eps))``: five
ops per norm, two norms per layer. ``aten.rms_norm`` is the same function as one op, which
an exporter translates into ONNX's ``RMSNormalization`` (one kernel instead of five). Only
the exact form is rewritten: every intermediate in ``x``'s dtype (a cast between the steps,
as half-precision models do, keeps the written-out form), the mean over the last dimension
only, a scalar ``eps``, and a weight of the normalised dimension's size. Rounding may differ
from the written-out ops in the last bit (the kernel sums and scales in its own order).
"""

from __future__ import annotations

import torch
import torch.fx

from adaption_fx.passes.infra import GraphPass

aten = torch.ops.aten


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _call(node: object, target: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _only_user(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    return len(node.users) == 1 and next(iter(node.users)) is user


def _normalized(mul: torch.fx.Node) -> tuple[torch.fx.Node, float, list[torch.fx.Node]] | None:
    """(x, eps, intermediate nodes) if ``mul`` is ``x * rsqrt(mean(x ** 2, [-1], True) +
    eps)`` (either operand order), every intermediate used once."""
    if not _call(mul, aten.mul.Tensor) or len(mul.args) != 2 or mul.kwargs:
        return None
    for x, rsqrt in (mul.args, mul.args[::-1]):
        if not _call(rsqrt, aten.rsqrt.default) or not _only_user(rsqrt, mul):
            continue
        add = rsqrt.args[0]
        if not _call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
            continue
        mean, eps = add.args
        if not isinstance(eps, float) or not _call(mean, aten.mean.dim):
            continue
        if not _only_user(add, rsqrt) or not _only_user(mean, add):
            continue
        dims = mean.args[1] if len(mean.args) > 1 else None
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        extra = set(mean.kwargs) - {"keepdim"}
        x_val = _val(x)
        if not isinstance(x_val, torch.Tensor) or extra or keepdim is not True:
            continue
        if list(dims or []) not in ([-1], [x_val.dim() - 1]):
            continue
        square = mean.args[0]
        if not (
            _call(square, aten.pow.Tensor_Scalar)
            and square.args == (x, 2)
            and _only_user(square, mean)
        ):
            continue
        steps = [square, mean, add, rsqrt, mul]
        if any(_val(n).dtype != x_val.dtype for n in steps):
            continue
        return x, eps, steps
    return None


class FuseRmsNorm(GraphPass):
    """Rewrite each written-out RMS norm ``w * (x * rsqrt(mean(x ** 2, -1) + eps))`` (the
    weight on either side) into ``aten.rms_norm(x, [d], w, eps)``. Precondition: nodes
    carry ``meta["val"]``; postcondition: the same function up to rounding, the replaced
    nodes removed. Returns how many norms were fused."""

    def transform(self, graph: torch.fx.Graph) -> int:
        changed = 0
        for node in list(graph.nodes):
            if not _call(node, aten.mul.Tensor) or len(node.args) != 2 or node.kwargs:
                continue
            for weight, inner in (node.args, node.args[::-1]):
                if not isinstance(inner, torch.fx.Node) or not _only_user(inner, node):
                    continue
                found = _normalized(inner)
                if found is None:
                    continue
                x, eps, steps = found
                x_val, w_val, out = _val(x), _val(weight), _val(node)
                size = x_val.shape[-1]
                if (
                    not isinstance(w_val, torch.Tensor)
                    or type(size) is not int
                    or tuple(w_val.shape) != (size,)
                    or w_val.dtype != x_val.dtype
                    or out.dtype != x_val.dtype
                    or out.shape != x_val.shape
                ):
                    continue
                with graph.inserting_before(node):
                    fused = graph.call_function(aten.rms_norm.default, (x, [size], weight, eps))
                fused.meta = dict(node.meta)
                node.replace_all_uses_with(fused)
                graph.erase_node(node)
                for step in reversed(steps):
                    graph.erase_node(step)
                changed += 1
                break
        return changed


__all__ = ["FuseRmsNorm"]
