"""Plain data describing one attention site found in an ATen graph.

Matching (``locate``) produces these; rewriting (``insert``) consumes them. They hold node
names and parameter paths rather than node objects so that they stay valid for any copy of
the graph they were found in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Projection:
    """A linear projection feeding the attention's keys or values.

    Attributes:
        node: name of the projection node (``aten.linear``, or ``aten.addmm`` for Conv1D).
        weight: attribute path of its weight (``model.layers.0.self_attn.k_proj.weight``).
        bias: attribute path of its bias, or None.
        in_features: width of the hidden states it reads (the hidden size the prompt must
            have).
        out_features: width of its output (all of q, k and v for a fused projection).
    """

    node: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int


@dataclass(frozen=True)
class TensorPath:
    """How a layer turns its hidden states into one attention input (keys or values).

    The insert pass replays these nodes on the prompt instead of the hidden states, so the
    adapter keys/values go through exactly what the layer's own do (projection, bias,
    split of a fused projection, per-head normalisation, head split, sharing across query
    groups), except the positional encoding, which is bypassed.

    Attributes:
        source: node of the hidden states (batch, seq, hidden) the path starts from.
        nodes: nodes to replay, in graph order (the positional-encoding region left out).
        aliases: (exit, entry) pairs: the replay of ``exit`` is the replay of ``entry``,
            which bypasses the positional-encoding region between them.
        output: node whose replay is the adapter tensor in the attention's layout.
        per_kv_head: node whose replay is the tensor before key/value heads are shared
            across query groups (what the fold pass precomputes).
        positional: nodes recognised as positional encoding (they read position data).
    """

    source: str
    nodes: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...]
    output: str
    per_kv_head: str
    positional: tuple[str, ...]


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation and everything the adaption prompt needs from it.

    Attributes:
        index: position of the site in execution order (0 = first attention in the graph).
        module_path: path of the module that owns the attention (``model.layers.3.self_attn``).
        attention_node: name of the ``scaled_dot_product_attention`` node.
        query_node: name of the node giving the query as the attention sees it, i.e. after
            positional encoding; shape (batch, num_heads, seq, head_dim).
        key_projection, value_projection: the projections that feed the attention's keys
            and values.
        num_heads: query heads; num_kv_heads: key/value heads (== num_heads without GQA).
        head_dim: per-head size of queries and keys; value_head_dim: per-head size of values.
        scale: the factor the attention applies to q @ k^T.
        output_projection: name of the linear node the attention output flows into, or None
            if there is none within the attention module.
        key_path, value_path: how to compute the adapter keys and values (see TensorPath).
        kind: "sdpa" (scaled_dot_product_attention) or "eager" (matmul/softmax/matmul).
        softcap: the attention's logit soft-capping value, or None.
        key_heads: heads of the key as the attention receives it (num_kv_heads with
            SDPA's enable_gqa, num_heads after the model's own repeat_kv).
    """

    index: int
    module_path: str
    attention_node: str
    query_node: str
    key_projection: Projection
    value_projection: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    scale: float
    output_projection: str | None
    key_path: TensorPath
    value_path: TensorPath
    kind: str = "sdpa"
    softcap: float | None = None
    key_heads: int = 0

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states the projections read, and so of the prompt."""
        return self.key_projection.in_features

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads
