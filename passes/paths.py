"""Extract the path from a layer's hidden states to an attention input, minus positions.

Positional encoding is recognised by what it reads, not by its shape: a node on the path
that takes a tensor derived from the model's inputs (the rotary tables come from position
ids) is positional. The positional region is then the part of the path between the
nearest node that dominates every positional node and the nearest node that post-dominates
them; replaying the path with that region bypassed yields the keys without positional
encoding, whatever form the encoding takes (full or partial rotary, cat/slice layouts).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import torch
import torch.fx

from adaption_fx.passes.errors import AttentionNotFoundError
from adaption_fx.passes.site import TensorPath

aten = torch.ops.aten

# Ops whose second tensor argument only supplies a dtype or shape, not data.
_METADATA_ONLY = {aten.type_as.default}
# Ops that lay out key/value heads for sharing across query groups (repeat_kv).
_REPEAT_OPS = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.slice.Tensor,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
}
HIDDEN_LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _shape(node: torch.fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def hidden_states_source(projection: torch.fx.Node, x: torch.fx.Node) -> torch.fx.Node:
    """The (batch, seq, hidden) node a projection reads, through flattening views (Conv1D)."""
    node = x
    while (shape := _shape(node)) is not None and len(shape) != 3:
        if node.op != "call_function" or node.target not in HIDDEN_LAYOUT_OPS:
            break
        node = node.args[0]
    shape = _shape(node)
    if shape is None or len(shape) != 3:
        raise AttentionNotFoundError(
            f"projection {projection.name!r} does not read (batch, seq, hidden) states "
            f"(found {node.name!r} with shape {shape})"
        )
    return node


class _Reach:
    """Memoised 'depends on a graph input' for nodes outside a path."""

    def __init__(self) -> None:
        self.memo: dict[torch.fx.Node, bool] = {}

    def __call__(self, node: torch.fx.Node) -> bool:
        stack, order = [node], []
        while stack:
            n = stack.pop()
            if n in self.memo or n in order:
                continue
            order.append(n)
            stack.extend(n.all_input_nodes)
        for n in reversed(order):
            self.memo[n] = n.op == "placeholder" or any(
                self.memo.get(a, False) for a in n.all_input_nodes
            )
        return self.memo[node]


def ancestors(node: torch.fx.Node, within: set[torch.fx.Node] | None = None) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen and (within is None or n in within):
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _between(source: torch.fx.Node, target: torch.fx.Node) -> set[torch.fx.Node]:
    """Nodes downstream of ``source`` and upstream of (or equal to) ``target``."""
    upstream = ancestors(target)
    found, queue = set(), collections.deque([source])
    while queue:
        n = queue.popleft()
        for user in n.users:
            if user in upstream and user not in found:
                found.add(user)
                queue.append(user)
    return found


def _reaches(
    starts: Iterable[torch.fx.Node],
    goals: set[torch.fx.Node],
    within: set[torch.fx.Node],
    blocked: torch.fx.Node,
) -> bool:
    queue = collections.deque(s for s in starts if s is not blocked)
    seen = set(queue)
    while queue:
        n = queue.popleft()
        if n in goals:
            return True
        for user in n.users:
            if user in within and user is not blocked and user not in seen:
                seen.add(user)
                queue.append(user)
    return False


def _positional(path: set[torch.fx.Node], source: torch.fx.Node) -> list[torch.fx.Node]:
    reads_inputs = _Reach()
    found = []
    for node in path:
        if node.target in _METADATA_ONLY:
            continue
        for arg in node.all_input_nodes:
            if arg in path or arg is source:
                continue
            if isinstance(arg.meta.get("val"), torch.Tensor) and reads_inputs(arg):
                found.append(node)
                break
    return found


def _bypass(
    positional: list[torch.fx.Node],
    path: set[torch.fx.Node],
    source: torch.fx.Node,
    target: torch.fx.Node,
    order: dict[torch.fx.Node, int],
):
    if not positional:
        return (), set()
    goals = set(positional)
    scope = path | {source}
    up = {n: ancestors(n, scope) for n in path}
    upstream_of_all = set.intersection(*(up[p] for p in positional))
    entries = [n for n in upstream_of_all if (n in path or n is source) and n not in goals]
    entry = None
    for cand in sorted(entries, key=order.__getitem__, reverse=True):
        if cand is source or not _reaches([source], goals, path, blocked=cand):
            entry = cand
            break
    exits = [n for n in path if all(n is p or p in up[n] for p in positional)]
    exit_ = None
    for cand in sorted(exits, key=order.__getitem__):
        if cand is target or not _reaches(positional, {target}, path, blocked=cand):
            exit_ = cand
            break
    if entry is None or exit_ is None:
        raise AttentionNotFoundError(
            f"cannot isolate the positional encoding at {[p.name for p in positional]}"
        )
    below_entry = {n for n in path if entry in up[n] and n is not entry}
    region = {n for n in below_entry if n is exit_ or n in up[exit_]}
    for node in path - region:
        leaked = [a.name for a in node.all_input_nodes if a in region and a is not exit_]
        if leaked:
            raise AttentionNotFoundError(
                f"node {node.name!r} reads {leaked} from inside the positional encoding "
                f"({entry.name!r} .. {exit_.name!r}); cannot bypass it"
            )
    return ((exit_.name, entry.name),), region


def _per_kv_head(target: torch.fx.Node, path: set[torch.fx.Node]) -> torch.fx.Node:
    """The node before key/value heads are repeated for query groups (``target`` if none)."""
    node, expand = target, None
    while node in path and node.target in _REPEAT_OPS:
        shape, parent = _shape(node), _shape(node.args[0])
        if (
            node.target == aten.expand.default
            and shape
            and parent
            and len(shape) == 5
            and parent[2] == 1
            and shape[2] != 1
        ):
            expand = node
            break
        node = node.args[0]
    if expand is None:
        return target
    node = expand.args[0]
    while (shape := _shape(node)) is not None and len(shape) != 4 and node in path:
        node = node.args[0]
    if _shape(node) is None or len(_shape(node)) != 4:
        return target
    return node


def tensor_path(
    target: torch.fx.Node, source: torch.fx.Node, order: dict[torch.fx.Node, int]
) -> TensorPath:
    """The replayable path from ``source`` (hidden states) to ``target`` (attention input)."""
    path = _between(source, target) | {target}
    positional = _positional(path, source)
    aliases, region = _bypass(positional, path, source, target, order)
    kv_node = _per_kv_head(target, path)
    if kv_node in region and kv_node.name != aliases[0][0]:
        kv_node = target  # inside the bypassed region: fold at the output instead
    nodes = sorted(path - region, key=order.__getitem__)
    return TensorPath(
        source=source.name,
        nodes=tuple(n.name for n in nodes),
        aliases=aliases,
        output=target.name,
        per_kv_head=kv_node.name,
        positional=tuple(sorted(p.name for p in positional)),
    )
