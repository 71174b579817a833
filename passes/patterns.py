"""Attention patterns the locate pass recognises, each reduced to one AttentionMatch.

- ``scaled_dot_product_attention`` (Hugging Face's default "sdpa" implementation, and any
  module calling F.scaled_dot_product_attention);
- eager attention: ``matmul(q, k^T)`` -> constant scaling -> optional logit soft-capping
  (``tanh(s / cap) * cap``) -> optional mask add -> ``softmax`` -> ``matmul(p, v)``.

New patterns are new matchers returning the same AttentionMatch; nothing downstream
changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from adaption_fx.passes.errors import AttentionNotFoundError

aten = torch.ops.aten

SDPA_TARGETS = (aten.scaled_dot_product_attention.default,)
SOFTMAX_TARGETS = (aten.softmax.int, aten._softmax.default)
MATMUL_TARGETS = (aten.matmul.default, aten.bmm.default)
# Between softmax and the value matmul: casts and inference-mode dropout.
_PASS_THROUGH = (
    aten.to.dtype,
    aten._to_copy.default,
    aten.type_as.default,
    aten.clone.default,
    aten.contiguous.default,
)


@dataclass(frozen=True)
class AttentionMatch:
    """One attention computation: where its inputs come from and how it scores."""

    kind: str
    output: torch.fx.Node  # (batch, heads, seq, head_dim) attention output
    query: torch.fx.Node
    key: torch.fx.Node  # (batch, key heads, seq, head_dim), before the k^T transpose
    value: torch.fx.Node
    scale: float
    softcap: float | None


def _arg(node: torch.fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _head_dim(node: torch.fx.Node) -> int:
    val = node.meta.get("val")
    size = val.shape[-1] if isinstance(val, torch.Tensor) else None
    if not isinstance(size, int):
        raise AttentionNotFoundError(f"node {node.name!r} has no fixed head size ({size})")
    return size


def match_sdpa(node: torch.fx.Node) -> AttentionMatch:
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    if dropout_p not in (0, 0.0):
        raise AttentionNotFoundError(
            f"attention node {node.name!r} applies dropout (p={dropout_p}); capture the model "
            "in eval mode"
        )
    query, key, value = node.args[:3]
    scale = _arg(node, 7, "scale", None)
    if scale is None:
        scale = 1.0 / math.sqrt(_head_dim(query))  # SDPA's own default
    if not isinstance(scale, (int, float)):
        raise AttentionNotFoundError(f"attention node {node.name!r} has a non-constant scale")
    return AttentionMatch("sdpa", node, query, key, value, float(scale), None)


def _scalar(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _score_chain(node: torch.fx.Node) -> tuple[torch.fx.Node, float, float | None] | None:
    """Walk back from the pre-softmax scores to ``matmul(q, k^T)``: (matmul, scale, softcap)."""
    scale, softcap = 1.0, None
    while node.op == "call_function":
        if node.target in MATMUL_TARGETS:
            return node, scale, softcap
        if node.target == aten.mul.Tensor:
            a, b = node.args[:2]
            # Soft-capping: mul(tanh(div(s, cap)), cap)
            if (
                isinstance(a, torch.fx.Node)
                and a.target == aten.tanh.default
                and isinstance(a.args[0], torch.fx.Node)
                and a.args[0].target == aten.div.Tensor
                and _scalar(a.args[0].args[1]) is not None
                and _scalar(b) == _scalar(a.args[0].args[1])
                and softcap is None
            ):
                softcap = _scalar(b)
                node = a.args[0].args[0]
                continue
            if _scalar(b) is not None and isinstance(a, torch.fx.Node):
                scale *= _scalar(b)
                node = a
                continue
            if _scalar(a) is not None and isinstance(b, torch.fx.Node):
                scale *= _scalar(a)
                node = b
                continue
            return None
        if node.target == aten.div.Tensor and _scalar(node.args[1]) is not None:
            scale /= _scalar(node.args[1])
            node = node.args[0]
            continue
        return None
    return None


def _describe(node: object) -> str:
    if isinstance(node, torch.fx.Node):
        return f"{node.name!r} ({node.target})"
    return repr(node)


def match_eager(softmax: torch.fx.Node, misses: list[str] | None = None) -> AttentionMatch | None:
    """Match eager attention around a softmax node; None if it is not attention.

    When it is not, a line saying where matching stopped is appended to ``misses``.
    """

    def miss(reason: str) -> None:
        if misses is not None:
            misses.append(f"softmax {softmax.name!r}: {reason}")

    scores = softmax.args[0]
    if not isinstance(scores, torch.fx.Node):
        return miss("its input is not a node")
    chain = _score_chain(scores)
    if chain is None and scores.target == aten.add.Tensor:  # the mask
        for candidate in scores.args[:2]:
            if isinstance(candidate, torch.fx.Node) and (chain := _score_chain(candidate)):
                break
    if chain is None:
        return miss(
            f"no matmul(q, k^T) behind its scores {_describe(scores)} through constant "
            "scaling, soft-capping and a mask add"
        )
    qk, scale, softcap = chain
    query, key_t = qk.args[:2]
    if not (
        isinstance(key_t, torch.fx.Node)
        and key_t.target == aten.transpose.int
        and sorted(d % 4 for d in key_t.args[1:3]) == [2, 3]
    ):
        return miss(f"the keys of {_describe(qk)} are not a transpose of the last two dims")
    node = softmax
    while True:
        users = [
            u
            for u in node.users
            if u.op == "call_function" and u.target != aten._assert_tensor_metadata.default
        ]
        if len(users) != 1:
            return miss(f"{_describe(node)} has {len(users)} users, expected one matmul(p, v)")
        (user,) = users
        if user.target in MATMUL_TARGETS and user.args[0] is node:
            return AttentionMatch("eager", user, query, key_t.args[0], user.args[1], scale, softcap)
        if user.target == aten.dropout.default:
            if user.args[1] not in (0, 0.0) and user.args[2]:
                raise AttentionNotFoundError(
                    f"attention at {softmax.name!r} applies dropout in training mode; capture "
                    "the model in eval mode"
                )
        elif user.target not in _PASS_THROUGH:
            return miss(f"stopped at {_describe(user)} on the way to matmul(p, v)")
        node = user


def find_attention(
    gm: torch.fx.GraphModule, misses: list[str] | None = None
) -> list[AttentionMatch]:
    """Every attention computation in ``gm``, in execution order.

    Softmax nodes that do not match eager attention are described in ``misses``.
    """
    matches = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_TARGETS:
            matches.append(match_sdpa(node))
        elif node.target in SOFTMAX_TARGETS and (m := match_eager(node, misses)) is not None:
            matches.append(m)
    return matches
