"""Insert adaption prompts that differ per batch row: one graph for a batch of mixed adapters.

Where ``insert_adaption_prompt`` binds one adapter to the whole batch, this pass makes each
row pick its own from a table. The graph takes, after the model's own inputs:

- ``adapter_rows`` (batch,) int64: each row's index into the tables;
- ``adapter_key_mask`` (adapters, keys): added to each row's adapter scores, 0 for the
  keys of that row's adapter and -inf for the padding of a shorter prompt;
- per adapted site, the folded tensors (``passes.fold``) of every adapter stacked on a
  leading axis: keys (adapters, kv_heads, keys, head_dim) and values (adapters, kv_heads,
  keys, value_head_dim), as the layer's own key/value paths give them before heads are
  shared, and the activated gate per head (adapters, heads).

and adds, after each site's attention::

    K = share_heads(K_table[rows]) * scale
    V = share_heads(V_table[rows]) * gate_table[rows]
    out = attention(Q, K_layer, V_layer) + SDPA(Q, K, V, attn_mask=key_mask[rows], scale=1)

(scores soft-capped first where the layer caps its own). A row whose adapter does not adapt
a site has a zero gate there, and the base model's row is zero everywhere: attention over
zero values adds exactly zero, so those rows are the base model's, bit for bit. The number
of adapters and the prompt length appear only as the tables' sizes, never as constants in
the graph: the same graph serves any table, and changing which row uses which adapter
changes only the values of ``adapter_rows``.

Precondition: ``sites`` were located in ``gm`` (``locate_attention``) and ``gm`` has not
been rewritten. The adapter keys are shared across query heads as the insert pass shares
them (key/value head ``i`` serves query heads ``i*G .. i*G+G-1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from adaption_fx.passes.fold import folded_keys
from adaption_fx.passes.graph_copy import graph_module_sharing
from adaption_fx.passes.infra import NewModuleResult
from adaption_fx.passes.insert import BranchBuilder, copy_for_sites, soft_capped_attention
from adaption_fx.passes.locate import ADAPTION_META_KEY
from adaption_fx.passes.site import AttentionSite

aten = torch.ops.aten

ROWS_INPUT = "adapter_rows"
KEY_MASK_INPUT = "adapter_key_mask"
MIXED_ROLE_PREFIX = "mixed_"


@dataclass(frozen=True)
class MixedGraph(NewModuleResult):
    """A graph whose adapter is chosen per batch row, and how to call it.

    Attributes:
        graph_module: takes the model's flat inputs followed by one tensor per entry of
            ``table_inputs``, in that order.
        sites: the sites it adapts, in execution order.
        table_inputs: ``adapter_rows``, ``adapter_key_mask``, then each site's
            ``folded_keys`` (key, value, activated gate), in input order.
    """

    graph_module: torch.fx.GraphModule
    sites: tuple[AttentionSite, ...]
    table_inputs: tuple[str, ...]


def _share_heads(b: BranchBuilder, x: torch.fx.Node, batch: torch.fx.Node, dim: int, role: str):
    """(batch, kv_heads, keys, dim) -> (batch, heads, keys, dim), key/value head i serving
    query heads i*G .. i*G+G-1."""
    site = b.site
    kv_heads = site.num_kv_heads
    if kv_heads == site.num_heads:
        return x
    groups = site.num_heads // kv_heads
    x = b(aten.unsqueeze.default, (x, 2), f"{role}_group")
    x = b(aten.expand.default, (x, [-1, -1, groups, -1, -1]), f"{role}_expand")
    return b(aten.reshape.default, (x, [batch, site.num_heads, -1, dim]), f"{role}_repeat")


def _insert_site(
    graph: torch.fx.Graph,
    nodes: dict[str, torch.fx.Node],
    site: AttentionSite,
    rows: torch.fx.Node,
    row_mask: torch.fx.Node,
    tables: tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node],
) -> None:
    attn = nodes[site.attention_node]
    query = nodes[site.query_node]
    b = BranchBuilder(graph, attn, site, role_prefix=MIXED_ROLE_PREFIX)
    key_table, value_table, gate_table = tables
    batch = b(aten.sym_size.int, (query, 0), "batch")
    k = b(aten.index_select.default, (key_table, 0, rows), "key_rows")
    v = b(aten.index_select.default, (value_table, 0, rows), "value_rows")
    k = _share_heads(b, k, batch, site.head_dim, "key")
    v = _share_heads(b, v, batch, site.value_head_dim, "value")
    k = b(aten.mul.Tensor, (k, site.scale), "key_scaled")
    gate = b(aten.index_select.default, (gate_table, 0, rows), "gate_rows")
    gate = b(aten.unsqueeze.default, (gate, -1), "gate_keys")
    gate = b(aten.unsqueeze.default, (gate, -1), "gate_dims")
    v = b(aten.mul.Tensor, (v, gate), "value_gated")
    if site.softcap is None:
        out = b(
            aten.scaled_dot_product_attention.default,
            (query, k, v),
            "out",
            {"attn_mask": row_mask, "scale": 1.0},
        )
    else:
        out = soft_capped_attention(b, query, k, v, site.softcap, mask=row_mask)
    total = b(aten.add.Tensor, (attn, out), "sum")
    attn.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


def insert_mixed_adapters(gm: torch.fx.GraphModule, sites: Sequence[AttentionSite]) -> MixedGraph:
    """Rewrite a copy of ``gm`` so that each of ``sites`` adds the adapter attention of the
    adapter each batch row names in ``adapter_rows`` (see the module docstring).

    ``gm`` itself is not modified; the returned graph module shares its weights.

    Postcondition: a row whose gate is zero at every site computes what ``gm`` computes
    for it, exactly.
    """
    graph, nodes = copy_for_sites(gm, sites)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ValueError("the graph has no inputs to take the batch size from")

    cursor = placeholders[-1]
    names: list[str] = [ROWS_INPUT, KEY_MASK_INPUT]
    for site in sites:
        names.extend(folded_keys(site))
    created: dict[str, torch.fx.Node] = {}
    for name in names:
        with graph.inserting_after(cursor):
            node = graph.placeholder(name.replace(".", "_"))
        node.meta[ADAPTION_META_KEY] = {"site": None, "role": "mixed_input", "key": name}
        created[name] = node
        cursor = node

    rows = created[ROWS_INPUT]
    # One (batch, 1, 1, keys) mask for every site: it broadcasts over heads and queries.
    with graph.inserting_after(cursor):
        row_mask = graph.call_function(
            aten.index_select.default, (created[KEY_MASK_INPUT], 0, rows)
        )
    with graph.inserting_after(row_mask):
        row_mask_heads = graph.call_function(aten.unsqueeze.default, (row_mask, 1))
    with graph.inserting_after(row_mask_heads):
        row_mask_queries = graph.call_function(aten.unsqueeze.default, (row_mask_heads, 2))
    for node in (row_mask, row_mask_heads, row_mask_queries):
        node.meta[ADAPTION_META_KEY] = {"site": None, "role": "mixed_key_mask"}

    for site in sites:
        tables = tuple(created[key] for key in folded_keys(site))
        _insert_site(graph, nodes, site, rows, row_mask_queries, tables)  # type: ignore[arg-type]
    graph.lint()
    rewritten = graph_module_sharing(gm, graph, class_name="MixedAdaptedGraphModule")
    return MixedGraph(graph_module=rewritten, sites=tuple(sites), table_inputs=tuple(names))


def is_mixed_node(node: torch.fx.Node) -> bool:
    """A node this pass wrote."""
    tag = node.meta.get(ADAPTION_META_KEY) or {}
    return str(tag.get("role", "")).startswith(MIXED_ROLE_PREFIX)


__all__ = [
    "KEY_MASK_INPUT",
    "ROWS_INPUT",
    "MixedGraph",
    "insert_mixed_adapters",
    "is_mixed_node",
]
