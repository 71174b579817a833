"""Rotary embeddings' ``rotate_half`` as one ``roll``, for graphs run op by op.

Hugging Face applies rotary position embeddings as ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])``: two slices, a negation and a cat per
query and key of every layer. The same product is ``roll(x, d/2) * sin'`` with
``sin' = cat(-sin[..., :d/2], sin[..., d/2:])``: ``(-a) * b`` and ``a * (-b)`` are the same
float, so the result is bit for bit the same. ``sin'`` is computed once for all layers, and
each rotation is one op instead of four.
"""

from __future__ import annotations

import torch
import torch.fx

from adaption_fx.passes.infra import GraphPass

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _last_dim(node: torch.fx.Node) -> int | None:
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    size = val.shape[-1]
    return size if type(size) is int else None


def _is_last(dim, rank: int) -> bool:
    return type(dim) is int and dim in (-1, rank - 1)


def _slice(node, source: torch.fx.Node) -> tuple[int, int] | None:
    """(start, end) of ``node`` = ``slice(source, last dim, start, end)`` with step 1."""
    if not isinstance(node, torch.fx.Node) or node.target != aten.slice.Tensor or node.kwargs:
        return None
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
    x, dim, start, end, step = args[:5]
    val = _val(source)
    if x is not source or not isinstance(val, torch.Tensor) or not _is_last(dim, val.dim()):
        return None
    if step != 1 or type(start) is not int or not (end is None or type(end) is int):
        return None
    return start, INT64_MAX if end is None else end


def _rotate_half_source(cat: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(x, d/2) if ``cat`` is ``cat([neg(x[..., d/2:]), x[..., :d/2]], -1)``."""
    if cat.target != aten.cat.default or cat.kwargs or len(cat.args[0]) != 2:
        return None
    neg, first = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else 0
    if not isinstance(neg, torch.fx.Node) or neg.target != aten.neg.default:
        return None
    second = neg.args[0]
    if not isinstance(first, torch.fx.Node) or first.target != aten.slice.Tensor:
        return None
    source = first.args[0]
    size = _last_dim(source) if isinstance(source, torch.fx.Node) else None
    if size is None or size % 2 or not _is_last(dim, _val(source).dim()):
        return None
    half = size // 2
    if _slice(first, source) != (0, half):
        return None
    rest = _slice(second, source)
    if rest is None or rest[0] != half or rest[1] < size:
        return None
    return source, half


class RollRotateHalf(GraphPass):
    """Rewrite each ``rotate_half(x) * sin`` into ``roll(x, d/2) * sin'`` (see the module
    docstring). Only where every user of the rotation is such a product with a tensor of
    the same last dimension. Returns how many rotations were rewritten."""

    def transform(self, graph: torch.fx.Graph) -> int:
        signed: dict[torch.fx.Node, torch.fx.Node] = {}
        changed = 0
        for cat in [n for n in graph.nodes if n.op == "call_function"]:
            found = _rotate_half_source(cat)
            if found is None or not cat.users:
                continue
            source, half = found
            products = []
            for user in cat.users:
                if user.target != aten.mul.Tensor or user.kwargs or len(user.args) != 2:
                    break
                other = user.args[1] if user.args[0] is cat else user.args[0]
                if (
                    other is cat
                    or not isinstance(other, torch.fx.Node)
                    or _last_dim(other) != 2 * half
                    or _val(other).dtype != _val(source).dtype
                ):
                    break
                products.append((user, other))
            else:
                for user, other in products:
                    if other not in signed:
                        with graph.inserting_after(other):
                            low = graph.call_function(aten.slice.Tensor, (other, -1, 0, half))
                        with graph.inserting_after(low):
                            high = graph.call_function(
                                aten.slice.Tensor, (other, -1, half, INT64_MAX)
                            )
                        with graph.inserting_after(high):
                            negated = graph.call_function(aten.neg.default, (low,))
                        with graph.inserting_after(negated):
                            signed[other] = graph.call_function(
                                aten.cat.default, ([negated, high], -1)
                            )
                        signed[other].meta["val"] = _val(other)
                    with graph.inserting_before(user):
                        rolled = graph.call_function(aten.roll.default, (source, [half], [-1]))
                    user.args = (rolled, signed[other])
                changed += 1
        return changed


__all__ = ["RollRotateHalf"]
