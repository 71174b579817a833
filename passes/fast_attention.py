"""Attention as an inference loop wants it: no head copies, one mask per step, few threads.

The decode step torch.export captures from a Hugging Face model attends the way the model
does under export, which is not how it runs eagerly:

- it shares key/value heads across query heads with ``repeat_kv`` (unsqueeze, expand,
  reshape: a copy of the whole cache per layer and step), where eager transformers passes
  the grouped heads to SDPA (``enable_gqa``) or, for one query token, folds the query
  heads into rows (``pack_gqa``);
- it always builds the (batch, 1, new, past + new) boolean mask, which SDPA converts to a
  float mask again in every layer, where eager transformers passes none when nothing is
  padded (``is_causal`` for a prefill, nothing for one new token).

The passes below rewrite a graph (in place) into those eager forms: same function, the
same kernels Hugging Face's ``generate`` runs. :class:`SerialAdapterAttention` writes the
small adapter attention as element-wise ops and reductions, which stay on the calling
thread at decode sizes: SDPA's CPU kernel and softmax always fan out to the thread pool,
which on a busy machine costs far more than the few thousand multiply-adds of the adapter.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

from adaption_fx.passes.infra import GraphPass, PassNotApplicable
from adaption_fx.passes.insert import (
    ADAPTION_META_KEY,
    is_adapter_attention,
    without_batch_expand,
)
from adaption_fx.passes.mixed_batch import is_mixed_node

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LOG2E = math.log2(math.e)
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def sdpa_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """An SDPA node's arguments by name, defaults filled in."""
    named = dict(_SDPA_DEFAULTS)
    named.update(zip(_SDPA_NAMES, node.args, strict=False))
    named.update(node.kwargs)
    return named


def _set_sdpa(node: torch.fx.Node, named: dict[str, Any]) -> None:
    node.args = (named["query"], named["key"], named["value"])
    node.kwargs = {k: named[k] for k in _SDPA_DEFAULTS if named[k] != _SDPA_DEFAULTS[k]}


def model_attention(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The model's own SDPA calls (not the adapter branch's)."""
    # Every adapter branch's nodes carry the insert passes' tag; the model's never do.
    return [n for n in graph.nodes if n.target == SDPA and ADAPTION_META_KEY not in n.meta]


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _static_int(value: Any) -> int | None:
    return value if type(value) is int else None


# --------------------------------------------------------------------------- native GQA
def _repeated_heads(node: Any) -> tuple[torch.fx.Node, int, int] | None:
    """(kv, kv_heads, groups) if ``node`` is ``repeat_kv(kv)``: reshape(expand(unsqueeze(kv,
    2), [b, kv_heads, groups, s, d]), [b, kv_heads * groups, s, d])."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    shape = node.args[1]
    if not isinstance(expand, torch.fx.Node) or expand.target != aten.expand.default:
        return None
    sizes = expand.args[1]
    unsqueeze = expand.args[0]
    if (
        len(sizes) != 5
        or len(shape) != 4
        or not isinstance(unsqueeze, torch.fx.Node)
        or unsqueeze.target != aten.unsqueeze.default
        or unsqueeze.args[1] != 2
    ):
        return None
    heads, groups, total = _static_int(sizes[1]), _static_int(sizes[2]), _static_int(shape[1])
    if heads is None or groups is None or total != heads * groups:
        return None
    # Batch, length and head size go through unchanged (-1 would let reshape merge dims).
    if shape[0] is not sizes[0] or shape[2] is not sizes[3] or shape[3] != sizes[4]:
        if not (shape[0] == sizes[0] and shape[2] == sizes[3] and shape[3] == sizes[4]):
            return None
    if any(type(s) is int and s < 0 for s in (*sizes, *shape)):
        return None
    kv = unsqueeze.args[0]
    val = _val(kv)
    if isinstance(val, torch.Tensor) and (val.dim() != 4 or val.shape[1] != heads):
        return None
    return kv, heads, groups


class NativeGqa(GraphPass):
    """Give SDPA the grouped key/value heads (``enable_gqa=True``) instead of ``repeat_kv``
    copies of them. Returns how many attention calls changed."""

    def transform(self, graph: torch.fx.Graph) -> int:
        changed = 0
        for node in model_attention(graph):
            named = sdpa_arguments(node)
            if named["enable_gqa"]:
                continue
            key, value = _repeated_heads(named["key"]), _repeated_heads(named["value"])
            if key is None or value is None or key[1:] != value[1:]:
                continue
            named.update(key=key[0], value=value[0], enable_gqa=True)
            _set_sdpa(node, named)
            changed += 1
        return changed


# --------------------------------------------------------------------------- masks
class FloatAttentionMasks(GraphPass):
    """Convert each boolean attention mask to SDPA's float form once (where the mask allows,
    0; elsewhere -inf; the query's dtype), where SDPA would convert it in every layer.
    Returns how many masks were converted."""

    def transform(self, graph: torch.fx.Graph) -> int:
        converted: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in model_attention(graph):
            named = sdpa_arguments(node)
            # The key's dtype is the query's (SDPA requires it); a packed query has no metadata.
            mask, key = named["attn_mask"], _val(named["key"])
            mask_val = _val(mask)
            if not (isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.bool):
                continue
            if not isinstance(key, torch.Tensor):
                continue
            if mask not in converted:
                with graph.inserting_after(mask):
                    zero = graph.call_function(
                        aten.scalar_tensor.default,
                        (0.0,),
                        {"dtype": key.dtype, "device": mask_val.device},
                    )
                with graph.inserting_after(zero):
                    additive = graph.call_function(
                        aten.where.ScalarOther, (mask, zero, float("-inf"))
                    )
                converted[mask] = additive
            named["attn_mask"] = converted[mask]
            _set_sdpa(node, named)
        return len(converted)


_MASK_OPS = {
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.add.Tensor,
    aten.unsqueeze.default,
    aten.new_ones.default,
    aten.le.Tensor,
    aten.to.dtype,
    aten.to.device,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.__and__.Tensor,
    aten.bitwise_and.Tensor,
    aten.logical_and.default,
    aten.index.Tensor,
    aten.expand.default,
    aten.sym_size.int,
    aten.view.default,
    aten.reshape.default,
    aten.slice.Tensor,
    aten._assert_tensor_metadata.default,
    operator.add,
}


def plain_causal_mask(mask: torch.fx.Node, attention_mask: str = "attention_mask") -> bool:
    """True if ``mask`` is computed as causal AND padding only: Hugging Face's mask of a
    plain causal model (one ``kv_idx <= q_idx`` comparison, the ``attention_mask`` input
    looked up by index), without sliding windows, chunks or packed-sequence terms.

    Such a mask is all True for one new token whose mask row is all ones, and is
    ``is_causal`` for a prefill (no past) without padding.
    """
    seen: set[torch.fx.Node] = set()
    stack = [mask]
    comparisons = 0
    reads_mask = False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if node.name != attention_mask:
                return False  # another input's values (not only its sizes) shape the mask
            reads_mask = True
            continue
        if node.op != "call_function" or node.target not in _MASK_OPS:
            return False
        if node.target == aten.le.Tensor:
            comparisons += 1
        if node.target == aten.sym_size.int:
            continue  # only a size of its input
        stack.extend(node.all_input_nodes)
    return comparisons == 1 and reads_mask


class DropAttentionMasks(GraphPass):
    """For inputs without padding: call the model's attention without its mask, with
    ``is_causal`` as given (True for a prefill without past, False for one new token).

    Precondition (``requires``, else :class:`PassNotApplicable`): the graph has model
    attention, and every call's mask is a :func:`plain_causal_mask` of the placeholder
    named ``attention_mask`` (not a sliding window, say), with no ``is_causal`` or dropout
    of its own. Postcondition: no model attention call takes a mask.
    """

    def __init__(self, *, is_causal: bool, attention_mask: str = "attention_mask"):
        self.is_causal = is_causal
        self.attention_mask = attention_mask

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        nodes = model_attention(graph_module.graph)
        if not nodes:
            raise PassNotApplicable("the graph has no model attention")
        for node in nodes:
            named = sdpa_arguments(node)
            mask = named["attn_mask"]
            if not isinstance(mask, torch.fx.Node) or not plain_causal_mask(
                mask, self.attention_mask
            ):
                raise PassNotApplicable(
                    f"{node.name}'s mask is not a plain causal mask of {self.attention_mask!r}"
                )
            if named["is_causal"] or named["dropout_p"]:
                raise PassNotApplicable(f"{node.name} has is_causal or dropout of its own")

    def transform(self, graph: torch.fx.Graph) -> int:
        nodes = model_attention(graph)
        for node in nodes:
            named = sdpa_arguments(node)
            named.update(attn_mask=None, is_causal=self.is_causal)
            _set_sdpa(node, named)
        return len(nodes)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        if any(
            sdpa_arguments(n)["attn_mask"] is not None for n in model_attention(graph_module.graph)
        ):
            raise RuntimeError("DropAttentionMasks left a mask in place")

    def __repr__(self) -> str:
        return f"DropAttentionMasks(is_causal={self.is_causal})"


class PackSingleQuery(GraphPass):
    """For one new token: fold each grouped-query attention's query heads into rows of its
    key/value heads, (batch, heads, 1, d) -> (batch, kv_heads, groups, d), as transformers'
    ``pack_gqa`` does, so that a masked attention needs no ``enable_gqa`` expansion.

    Only for attention with ``enable_gqa`` and a mask shared by all heads. Returns how many
    calls changed. Valid only where the query has one token. Run it before
    :class:`FloatAttentionMasks` (it reads the boolean mask's shape).
    """

    def transform(self, graph: torch.fx.Graph) -> int:
        changed = 0
        for node in model_attention(graph):
            named = sdpa_arguments(node)
            query, key, value = (_val(named[k]) for k in ("query", "key", "value"))
            mask = _val(named["attn_mask"]) if named["attn_mask"] is not None else None
            if not named["enable_gqa"] or named["is_causal"]:
                continue
            if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
                continue
            heads, kv_heads = _static_int(query.shape[1]), _static_int(key.shape[1])
            dim, value_dim = _static_int(query.shape[3]), _static_int(value.shape[3])
            if None in (heads, kv_heads, dim, value_dim) or heads % kv_heads:
                continue
            if mask is not None and not (mask.dim() == 4 and _static_int(mask.shape[1]) == 1):
                continue
            with graph.inserting_before(node):
                packed = graph.call_function(
                    aten.reshape.default, (named["query"], [-1, kv_heads, heads // kv_heads, dim])
                )
            named.update(query=packed, enable_gqa=False)
            with graph.inserting_after(node):
                unpacked = graph.call_function(
                    aten.reshape.default, (node, [-1, heads, 1, value_dim])
                )
            node.replace_all_uses_with(
                unpacked, delete_user_cb=lambda user, u=unpacked: user is not u
            )
            unpacked.meta = dict(node.meta)
            node.meta.pop("val", None)  # its shape is now the packed one
            _set_sdpa(node, named)
            changed += 1
        return changed


# --------------------------------------------------------------------------- adapter
class SerialAdapterAttention(GraphPass):
    """Write each fused adapter attention, ``SDPA(Q, K_a, V_a, scale=1)``, as
    ``sum(softmax(sum(Q * K_a)) * V_a)`` in element-wise ops and reductions (the softmax
    as max, subtract, exp2, sum, divide, the keys scaled by log2(e)), none of which starts
    threads at decode sizes. Same function; for float32/float64 queries only
    (lower precisions keep the fused kernel's float accumulation). The mixed-batch branch
    (``passes/mixed_batch.py``: keys and values per row, a key mask per row) is written
    the same way, its mask added to the scores. Returns how many attention calls changed."""

    def transform(self, graph: torch.fx.Graph) -> int:
        changed = 0
        adapter_sdpa = [
            n
            for n in graph.nodes
            if is_adapter_attention(n) or (n.target == SDPA and is_mixed_node(n))
        ]
        for node in adapter_sdpa:
            named = sdpa_arguments(node)
            query_val = _val(named["query"])
            if not isinstance(query_val, torch.Tensor) or query_val.dtype not in (
                torch.float32,
                torch.float64,
            ):
                continue
            mask = named["attn_mask"]
            if (
                (mask is not None and not is_mixed_node(node))
                or named["is_causal"]
                or named["dropout_p"]
                or named["enable_gqa"]
                or named["scale"] != 1.0
            ):
                continue
            tag = dict(node.meta[ADAPTION_META_KEY])
            query, key, value = (
                named["query"],
                without_batch_expand(named["key"]),
                without_batch_expand(named["value"]),
            )
            new: list[torch.fx.Node] = []

            def call(target, *args, _new=new):
                out = graph.call_function(target, args)
                _new.append(out)
                return out

            def mul_sum(x, x_dim, y, y_dim, reduce_dim, call=call):
                """sum(unsqueeze(x, x_dim) * unsqueeze(y, y_dim), reduce_dim): a matmul
                written as a broadcast product and a reduction."""
                x = call(aten.unsqueeze.default, x, x_dim)
                y = call(aten.unsqueeze.default, y, y_dim)
                return call(aten.sum.dim_IntList, call(aten.mul.Tensor, x, y), [reduce_dim])

            with graph.inserting_before(node):
                # Scores in base 2: exp(s - max) = exp2(s * log2(e) - max'), and the log2(e)
                # goes into the adapter keys (hoisted out of the step with them). exp2 stays on
                # the calling thread; exp is MKL's vector exp, which starts threads.
                key = call(aten.mul.Tensor, key, LOG2E)
                # (b, h, q, 1, d) * (1 or b, h, 1, a, d) -> scores (b, h, q, a)
                scores = mul_sum(query, -2, key, -3, -1)
                if mask is not None:  # 0 or -inf per key: the same in base 2
                    scores = call(aten.add.Tensor, scores, mask)
                shifted = call(aten.sub.Tensor, scores, call(aten.amax.default, scores, [-1], True))
                weights = call(aten.exp2.default, shifted)
                probs = call(
                    aten.div.Tensor, weights, call(aten.sum.dim_IntList, weights, [-1], True)
                )
                # (b, h, q, a, 1) * (1 or b, h, 1, a, dv) -> (b, h, q, dv)
                out = mul_sum(probs, -1, value, -3, -2)
            for created in new:
                created.meta[ADAPTION_META_KEY] = {**tag, "role": f"serial_{created.name}"}
            out.meta[ADAPTION_META_KEY] = tag
            out.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            changed += 1
        return changed


__all__ = [
    "DropAttentionMasks",
    "FloatAttentionMasks",
    "NativeGqa",
    "PackSingleQuery",
    "SerialAdapterAttention",
    "model_attention",
    "plain_causal_mask",
    "sdpa_arguments",
]
