"""Insert LLaMA-Adapter prompts into located attention sites.

For each site the pass adds, right after the attention call::

    K_a = replay(key path, prompt)      # the layer's own key path, positional encoding bypassed
    V_a = replay(value path, prompt)    # (projection, bias, fused split, norms, repeat_kv)
    S_a = softmax(Q @ (scale * K_a)^T [soft-capped as the layer does], float32).to(Q.dtype)
    out = attention(Q, K, V) + S_a @ (act(gate) * V_a)

where Q is the node the attention already consumes (after RoPE) and ``scale`` is the
attention's own. Nothing is recomputed: no second query, no second output projection.
(``S_a @ (g * V_a)`` equals PEFT's ``(g * S_a) @ V_a``; the gate meets the small adapter
values instead of the scores.)

The prompt and gate of every site become extra graph inputs, appended after the model's
own inputs. One rewritten graph therefore serves every adapter of the same structure
(adapter_len, adapted sites, gate kind), and the caller binds whichever adapter is active.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from adaption_fx.passes.graph_copy import copy_flat_graph, graph_module_sharing
from adaption_fx.passes.infra import NewModuleResult
from adaption_fx.passes.locate import ADAPTION_META_KEY, check_aten_graph
from adaption_fx.passes.site import AttentionSite, TensorPath

aten = torch.ops.aten

PROMPT_SUFFIX = "adaption_prompt"
GATE_SUFFIX = "adaption_gate"


@dataclass(frozen=True)
class AdapterStructure:
    """What the inserted nodes depend on: the prompt length and the gate's kind and activation.

    Plain data defined here, so that the passes depend on nothing else in the library;
    ``AdaptionConfig.structure`` gives the one a configuration describes.

    Attributes:
        adapter_len: prompt tokens per adapted layer.
        gate: ``"scalar"`` (one gate per layer) or ``"per_head"`` (one per query head).
        gate_activation: ``"identity"`` or ``"tanh"``, applied to the gate before it scales
            the adapter values.
    """

    adapter_len: int
    gate: Literal["scalar", "per_head"] = "scalar"
    gate_activation: Literal["identity", "tanh"] = "identity"


def prompt_key(site: AttentionSite) -> str:
    """State-dict key of a site's prompt: PEFT's key without ``base_model.model.``."""
    return f"{site.module_path}.{PROMPT_SUFFIX}" if site.module_path else PROMPT_SUFFIX


def gate_key(site: AttentionSite) -> str:
    """State-dict key of a site's gate."""
    return f"{site.module_path}.{GATE_SUFFIX}" if site.module_path else GATE_SUFFIX


def adapter_tensor_shapes(
    sites: Sequence[AttentionSite], structure: AdapterStructure
) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter tensors for ``sites``, keyed as in the state dict, in input order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for site in sites:
        shapes[prompt_key(site)] = (1, structure.adapter_len, site.hidden_size)
        gate_shape = (1,) if structure.gate == "scalar" else (1, site.num_heads, 1, 1)
        shapes[gate_key(site)] = gate_shape
    return shapes


@dataclass(frozen=True)
class AdaptionGraph(NewModuleResult):
    """A rewritten graph and how to call it.

    Attributes:
        graph_module: takes the model's flat inputs followed by one tensor per entry of
            ``adapter_inputs``, in that order.
        sites: the adapted sites, in execution order.
        adapter_inputs: state-dict keys of the extra inputs, in input order.
    """

    graph_module: torch.fx.GraphModule
    sites: tuple[AttentionSite, ...]
    adapter_inputs: tuple[str, ...]


class BranchBuilder:
    """Appends nodes one after another after a site's attention, each tagged as part of
    that site's adapter branch (``role_prefix + role``) and named after the site.

    ``role_prefix`` tells branches apart: passes that rewrite this pass's branch know it
    by its unprefixed roles (``out``, ``gate_tanh``...), so another pass's branch
    (``passes/mixed_batch.py``: ``mixed_``) is left alone by them.
    """

    def __init__(
        self,
        graph: torch.fx.Graph,
        after: torch.fx.Node,
        site: AttentionSite,
        role_prefix: str = "",
    ):
        self.graph = graph
        self.cursor = after
        self.site = site
        self.role_prefix = role_prefix
        self.stack = after.meta.get("nn_module_stack")
        self.prefix = (site.module_path or "root").replace(".", "_")

    def __call__(self, target, args: tuple, role: str, kwargs: dict | None = None) -> torch.fx.Node:
        name = f"{self.prefix}_{self.role_prefix or 'adapter_'}{role}"
        with self.graph.inserting_after(self.cursor):
            node = self.graph.create_node("call_function", target, args, kwargs, name=name)
        node.meta[ADAPTION_META_KEY] = {
            "site": self.site.module_path,
            "role": self.role_prefix + role,
        }
        if self.stack is not None:
            node.meta["nn_module_stack"] = dict(self.stack)
        self.cursor = node
        return node


def _symbol_map(source: torch.fx.Node, adapter_len: int) -> dict:
    """Hidden states are (batch, seq, hidden); the prompt is (1, adapter_len, hidden)."""
    shape = source.meta["val"].shape
    mapping = {}
    for dim, value in ((0, 1), (1, adapter_len)):
        size = shape[dim]
        if isinstance(size, int):
            raise ValueError(
                f"the capture fixed the {('batch', 'sequence')[dim]} size of {source.name!r} "
                f"to {size}; the adapter needs it dynamic"
            )
        mapping[size.node.expr] = value
    return mapping


class _Replay:
    """Replays a layer's key/value paths on the prompt (see TensorPath)."""

    def __init__(
        self,
        b: BranchBuilder,
        nodes: dict[str, torch.fx.Node],
        prompt: torch.fx.Node,
        adapter_len: int,
    ):
        self.b = b
        self.nodes = nodes
        self.prompt = prompt
        self.adapter_len = adapter_len
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.symbols: dict | None = None
        # Sizes of a bypassed region's exit that its entry does not have: a key/value cache
        # concatenated inside the region makes the exit (past + seq) long, the prompt's
        # replay is adapter_len long.
        self.region_sizes: dict = {}

    def _size(self, node: torch.fx.Node) -> int:
        # A shape argument computed from the batch/sequence sizes, evaluated for the prompt.
        expr = node.meta["val"].node.expr.subs(self.region_sizes).subs(self.symbols)
        if not expr.is_Integer:
            raise ValueError(f"shape argument {node.name!r} = {expr} depends on other sizes")
        return int(expr)

    def _map(self, arg: torch.fx.Node) -> object:
        if arg in self.env:
            return self.env[arg]
        if isinstance(arg.meta.get("val"), torch.SymInt):
            return self._size(arg)
        return arg  # a weight, a constant or something computed from weights only

    def _region_sizes(self, entry: torch.fx.Node, exit_: torch.fx.Node) -> None:
        before, after = entry.meta.get("val"), exit_.meta.get("val")
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            return
        if before.dim() != after.dim():
            return
        for a, b in zip(before.shape, after.shape, strict=True):
            if isinstance(b, torch.SymInt) and not isinstance(a, int):
                a_expr, b_expr = a.node.expr, b.node.expr
                if a_expr != b_expr:
                    self.region_sizes[b_expr] = a_expr

    def run(self, path: TensorPath, role: str) -> tuple[torch.fx.Node, torch.fx.Node]:
        source = self.nodes[path.source]
        if self.symbols is None:
            self.symbols = _symbol_map(source, self.adapter_len)
        self.env.setdefault(source, self.prompt)
        aliases = {self.nodes[entry]: self.nodes[exit_] for exit_, entry in path.aliases}
        for entry, exit_ in aliases.items():
            self._region_sizes(entry, exit_)
        for entry, exit_ in aliases.items():
            if entry in self.env:
                self.env[exit_] = self.env[entry]
        for name in path.nodes:
            node = self.nodes[name]
            if node not in self.env:
                with self.b.graph.inserting_after(self.b.cursor):
                    new = self.b.graph.node_copy(node, self._map)
                new.meta = {
                    ADAPTION_META_KEY: {
                        "site": self.b.site.module_path,
                        "role": f"{role}_path",
                        "of": name,
                    }
                }
                if self.b.stack is not None:
                    new.meta["nn_module_stack"] = dict(self.b.stack)
                self.b.cursor = new
                self.env[node] = new
            if node in aliases:
                self.env[aliases[node]] = self.env[node]
        kv = self.env[self.nodes[path.per_kv_head]]
        kv.meta[ADAPTION_META_KEY]["kv_role"] = f"{role}_kv"
        return kv, self.env[self.nodes[path.output]]


def _share_heads(
    b: BranchBuilder, x: torch.fx.Node, heads: int, dim: int, role: str, adapter_len: int
) -> torch.fx.Node:
    """Repeat key/value heads for query groups (head i serves queries i*G .. i*G+G-1)."""
    site = b.site
    if heads == site.num_heads:
        return x
    groups = site.num_heads // heads
    x = b(aten.unsqueeze.default, (x, 2), f"{role}_group")
    x = b(aten.expand.default, (x, [1, heads, groups, adapter_len, dim]), f"{role}_expand")
    return b(aten.reshape.default, (x, [1, site.num_heads, adapter_len, dim]), f"{role}_repeat")


def soft_capped_attention(
    b: BranchBuilder,
    query: torch.fx.Node,
    key: torch.fx.Node,
    value: torch.fx.Node,
    softcap: float,
    mask: torch.fx.Node | None = None,
) -> torch.fx.Node:
    """``softmax(cap(Q @ K^T) + mask, float32).to(Q.dtype) @ V`` with the layer's own logit
    soft-capping ``cap(s) = softcap * tanh(s / softcap)`` (applied after scaling, as the
    layer's attention applies it; the keys come scaled)."""
    scores = b(
        aten.matmul.default, (query, b(aten.transpose.int, (key, -2, -1), "key_t")), "scores"
    )
    scores = b(aten.div.Tensor, (scores, softcap), "capped")
    scores = b(aten.tanh.default, (scores,), "capped_tanh")
    scores = b(aten.mul.Tensor, (scores, softcap), "capped_scaled")
    if mask is not None:
        scores = b(aten.add.Tensor, (scores, mask), "masked")
    probs = b(aten.softmax.int, (scores, -1, torch.float32), "probs")
    query_dtype = query.meta["val"].dtype
    if query_dtype != torch.float32:
        probs = b(aten._to_copy.default, (probs,), "probs_cast", {"dtype": query_dtype})
    return b(aten.matmul.default, (probs, value), "out")


def _insert_site(
    graph: torch.fx.Graph,
    nodes: dict[str, torch.fx.Node],
    site: AttentionSite,
    structure: AdapterStructure,
    prompt: torch.fx.Node,
    gate: torch.fx.Node,
) -> None:
    attn = nodes[site.attention_node]
    query = nodes[site.query_node]
    b = BranchBuilder(graph, attn, site)
    n = structure.adapter_len
    replay = _Replay(b, nodes, prompt, n)
    _, k = replay.run(site.key_path, "key")
    _, v = replay.run(site.value_path, "value")
    # With SDPA's enable_gqa the attention receives fewer key heads than query heads.
    k = _share_heads(b, k, site.key_heads or site.num_heads, site.head_dim, "key", n)
    v = _share_heads(b, v, site.key_heads or site.num_heads, site.value_head_dim, "value", n)
    # The scale and the gate act on the adapter keys/values, (1, heads, adapter_len, dim),
    # rather than on the (batch, heads, seq, adapter_len) scores: same result, two fewer
    # passes over activations per layer. With a zero gate, gate * V is exactly zero.
    k = b(aten.mul.Tensor, (k, site.scale), "key_scaled")
    if structure.gate_activation == "tanh":
        gate = b(aten.tanh.default, (gate,), "gate_tanh")
    v = b(aten.mul.Tensor, (v, gate), "value_gated")
    if site.softcap is None:
        # One fused kernel: the (batch, heads, seq, adapter_len) scores never reach memory.
        # SDPA wants the batch size on keys and values too; expand() copies nothing.
        batch = b(aten.sym_size.int, (query, 0), "batch")
        k = b(aten.expand.default, (k, [batch, -1, -1, -1]), "key_batch")
        v = b(aten.expand.default, (v, [batch, -1, -1, -1]), "value_batch")
        out = b(
            aten.scaled_dot_product_attention.default,
            (query, k, v),
            "out",
            {"scale": 1.0},
        )
    else:
        out = soft_capped_attention(b, query, k, v, site.softcap)
    total = b(aten.add.Tensor, (attn, out), "sum")
    attn.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


def copy_for_sites(
    gm: torch.fx.GraphModule, sites: Sequence[AttentionSite]
) -> tuple[torch.fx.Graph, dict[str, torch.fx.Node]]:
    """A copy of ``gm``'s graph to rewrite at ``sites`` (see ``copy_flat_graph``), after
    checking the insert passes' precondition: an unrewritten ATen graph, at least one site,
    every site's attention in it."""
    check_aten_graph(gm)
    if not sites:
        raise ValueError("no sites to adapt")
    graph, nodes = copy_flat_graph(gm)
    missing = [s.attention_node for s in sites if s.attention_node not in nodes]
    if missing:
        raise ValueError(f"sites do not belong to this graph: nodes {missing} not found")
    return graph, nodes


def insert_adaption_prompt(
    gm: torch.fx.GraphModule,
    sites: Sequence[AttentionSite],
    structure: AdapterStructure,
) -> AdaptionGraph:
    """Rewrite a copy of ``gm`` so that each of ``sites`` carries an adaption prompt.

    ``gm`` itself is not modified; the returned graph module shares its weights (the same
    tensor objects, reached through the same submodules).

    Precondition: ``sites`` were located in ``gm`` (``locate_attention``) and ``gm`` has not
    been rewritten. Postcondition: with every gate zero the output equals ``gm``'s exactly.
    """
    graph, nodes = copy_for_sites(gm, sites)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    cursor = placeholders[-1] if placeholders else None
    keys: list[str] = []
    inputs: list[tuple[AttentionSite, torch.fx.Node, torch.fx.Node]] = []
    for site in sites:
        created = []
        for key in (prompt_key(site), gate_key(site)):
            if cursor is None:
                with graph.inserting_before(next(iter(graph.nodes))):
                    node = graph.placeholder(key.replace(".", "_"))
            else:
                with graph.inserting_after(cursor):
                    node = graph.placeholder(key.replace(".", "_"))
            node.meta[ADAPTION_META_KEY] = {"site": site.module_path, "role": "input", "key": key}
            cursor = node
            created.append(node)
            keys.append(key)
        inputs.append((site, created[0], created[1]))

    for site, prompt, gate in inputs:
        _insert_site(graph, nodes, site, structure, prompt, gate)
    graph.lint()
    rewritten = graph_module_sharing(gm, graph, class_name="AdaptedGraphModule")
    return AdaptionGraph(graph_module=rewritten, sites=tuple(sites), adapter_inputs=tuple(keys))


def is_adapter_attention(node: torch.fx.Node) -> bool:
    """The adapter branch's fused attention (an SDPA node this pass wrote, role ``out``)."""
    tag = node.meta.get(ADAPTION_META_KEY) or {}
    return node.target == aten.scaled_dot_product_attention.default and tag.get("role") == "out"


def without_batch_expand(node: object) -> object:
    """The adapter keys or values before the batch expand this pass adds for SDPA (SDPA
    needs the batch; broadcasting ops do not); ``node`` itself where it is no such expand."""
    if (
        isinstance(node, torch.fx.Node)
        and node.target == aten.expand.default
        and node.meta.get(ADAPTION_META_KEY)
    ):
        return node.args[0]
    return node


__all__ = [
    "ADAPTION_META_KEY",
    "AdapterStructure",
    "AdaptionGraph",
    "BranchBuilder",
    "adapter_tensor_shapes",
    "copy_for_sites",
    "gate_key",
    "insert_adaption_prompt",
    "is_adapter_attention",
    "prompt_key",
    "soft_capped_attention",
    "without_batch_expand",
]
