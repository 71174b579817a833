"""Rotary embeddings in fewer ops: ``rotate_half`` as one ``roll`` for graphs run op by op
(:class:`RollRotateHalf`), and the whole rotation as one ``rotary_embedding`` op for
exporters (:class:`FuseRotaryEmbedding`, ONNX's ``RotaryEmbedding``).

Hugging Face applies rotary position embeddings as ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])``: two slices, a negation and a cat per
query and key of every layer. The same product is ``roll(x, d/2) * sin'`` with
``sin' = cat(-sin[..., :d/2], sin[..., d/2:])``: ``(-a) * b`` and ``a * (-b)`` are the same
float, so the result is bit for bit the same. ``sin'`` is computed once for all layers, and
each rotation is one op instead of four.
"""

from __future__ import annotations

import contextlib

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


# ------------------------------------------------------------------ one rotary op
# ``rotary_embedding(x, cos, sin)`` rotates the two halves of ``x``'s last dimension by
# angles whose cosines and sines are ``cos`` and ``sin`` (batch, length, head_dim / 2):
# ``cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)`` for ``x`` (batch, heads, length,
# head_dim). It is ONNX's ``RotaryEmbedding`` (opset 23, 4-D input, not interleaved)
# exactly, so an exporter writes it as that one op.
@torch.library.custom_op("adaption_fx::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@rotary_embedding.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


ROTARY_EMBEDDING = torch.ops.adaption_fx.rotary_embedding.default
# Ops that map each element on its own (so a tensor whose two halves are equal keeps them
# equal), with a Python scalar as the only other operand.
_ELEMENTWISE = {
    aten.cos.default,
    aten.sin.default,
    aten._to_copy.default,
    aten.clone.default,
    aten.detach.default,  # transformers 4.x computes the tables under no_grad
    aten.alias.default,
    aten.mul.Tensor,
    aten.div.Tensor,
}


def _duplicated_halves(node: object) -> bool:
    """Whether ``node``'s last dimension is two equal halves by construction: element-wise
    ops on ``cat([f, f], -1)`` (how Hugging Face builds the cos/sin of its rotary
    embeddings: ``emb = cat((freqs, freqs), -1)``, ``emb.cos() * scaling``)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        if node.target in _ELEMENTWISE:
            if any(isinstance(a, torch.fx.Node) for a in node.args[1:]):
                return False
            node = node.args[0]
            continue
        if node.target == aten.cat.default and not node.kwargs:
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else 0
            rank = _val(node).dim()
            return len(parts) == 2 and parts[0] is parts[1] and _is_last(dim, rank)
        return False
    return False


def _same_size(a: object, b: object) -> bool:
    """Whether two sizes are the same, without guarding on a symbolic one."""
    if a is b:
        return True
    if type(a) is int and type(b) is int:
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def _rotation_table(node: object, x: torch.fx.Node) -> torch.fx.Node | None:
    """``c`` if ``node`` is ``unsqueeze(c, 1)`` with ``c`` (batch or 1, length, head_dim)
    of duplicated halves, broadcasting against ``x`` (batch, heads, length, head_dim)."""
    if not isinstance(node, torch.fx.Node) or node.target != aten.unsqueeze.default:
        return None
    if node.args[1] != 1:
        return None
    table = node.args[0]
    val, x_val = _val(table), _val(x)
    if not isinstance(val, torch.Tensor) or val.dim() != 3 or val.dtype != x_val.dtype:
        return None
    if not _same_size(val.shape[-1], x_val.shape[-1]) or not _same_size(
        val.shape[1], x_val.shape[2]
    ):
        return None
    if not (_same_size(val.shape[0], 1) or _same_size(val.shape[0], x_val.shape[0])):
        return None
    return table if _duplicated_halves(table) else None


def _products(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """(x, cos table, sin table) if ``add`` is ``x * unsqueeze(cos, 1) +
    rotate_half(x) * unsqueeze(sin, 1)`` (any operand order)."""
    if add.target != aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return None
    terms = []
    for mul in add.args:
        if not isinstance(mul, torch.fx.Node) or mul.target != aten.mul.Tensor:
            return None
        if mul.kwargs or len(mul.args) != 2 or len(mul.users) != 1:
            return None
        terms.append(mul.args)
    for (a, b), (c, d) in (terms, terms[::-1]):
        for x, cos_u in ((a, b), (b, a)):
            for cat, sin_u in ((c, d), (d, c)):
                if not isinstance(cat, torch.fx.Node) or len(cat.users) != 1:
                    continue
                found = _rotate_half_source(cat)
                if found is None or found[0] is not x or _val(x).dim() != 4:
                    continue
                cos, sin = _rotation_table(cos_u, x), _rotation_table(sin_u, x)
                if cos is not None and sin is not None:
                    return x, cos, sin
    return None


class FuseRotaryEmbedding(GraphPass):
    """Rewrite each ``x * cos + rotate_half(x) * sin`` whose cos/sin tables are built from
    ``cat([f, f], -1)`` (so each half equals the other) into ``rotary_embedding(x,
    cos[..., :d/2], sin[..., :d/2])``, one op. The halves of each table are sliced once.
    Precondition: nodes carry ``meta["val"]``. Postcondition: the same function up to
    rounding (the op may multiply in another order). Returns how many rotations fused."""

    def transform(self, graph: torch.fx.Graph) -> int:
        from torch._guards import detect_fake_mode

        halves: dict[torch.fx.Node, torch.fx.Node] = {}
        changed = 0

        def half_of(table: torch.fx.Node, half: int) -> torch.fx.Node:
            if table not in halves:
                with graph.inserting_after(table):
                    sliced = graph.call_function(aten.slice.Tensor, (table, -1, 0, half))
                val = _val(table)
                with detect_fake_mode([val]) or contextlib.nullcontext():
                    sliced.meta["val"] = aten.slice.Tensor(val, -1, 0, half)
                halves[table] = sliced
            return halves[table]

        for add in [n for n in graph.nodes if n.op == "call_function"]:
            found = _products(add)
            if found is None:
                continue
            x, cos, sin = found
            half = _val(x).shape[-1] // 2
            cos_half, sin_half = half_of(cos, half), half_of(sin, half)
            with graph.inserting_before(add):
                fused = graph.call_function(ROTARY_EMBEDDING, (x, cos_half, sin_half))
            fused.meta = dict(add.meta)
            add.replace_all_uses_with(fused)
            changed += 1
        graph.eliminate_dead_code()
        return changed


__all__ = ["ROTARY_EMBEDDING", "FuseRotaryEmbedding", "RollRotateHalf", "rotary_embedding"]
