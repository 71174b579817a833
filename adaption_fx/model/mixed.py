"""Batches whose rows use different adapters (``adapter_names=[...]``, PEFT's spelling).

One base model serves many adapters; a batch may hold rows for several of them, and rows
for the base model itself (``"__base__"``). The graph (``passes/mixed_batch.py``) takes a
table of every registered adapter's folded keys, values and gates and a per-row index into
it; this module builds that table and checks the names.

Adapters of different structures share the table: it is as long as the longest prompt
(shorter prompts are padded with keys the mask removes from their row's softmax), it
covers every site any adapter adapts (an adapter that does not adapt a site has a zero
gate there), and scalar gates are repeated per head. Row 0 is the base model: zero gates
everywhere. A row's result therefore depends only on its own adapter, never on which
other rows share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adaption_fx.passes.fold import folded_keys
from adaption_fx.passes.mixed_batch import KEY_MASK_INPUT, ROWS_INPUT
from adaption_fx.passes.site import AttentionSite

BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class TableEntry:
    """One adapter's part of the table.

    Attributes:
        adapter_len: its prompt length.
        values: its folded tensors (``passes.fold.compute_folded``) by name, for the sites
            it adapts: key and value (1, kv_heads, adapter_len, dim), activated gate (1,)
            or (1, heads, 1, 1).
    """

    adapter_len: int
    values: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterTable:
    """Every adapter's folded tensors stacked for a mixed-batch graph.

    Attributes:
        names: the adapter of each table row; row 0 is ``"__base__"``.
        tensors: ``adapter_key_mask`` (rows, keys) and each site's stacked key, value and
            activated gate, by input name.
    """

    names: tuple[str, ...]
    tensors: dict[str, torch.Tensor]

    @property
    def keys(self) -> int:
        """Adapter keys per row (the longest prompt)."""
        return int(self.tensors[KEY_MASK_INPUT].shape[1])

    @property
    def device(self) -> torch.device:
        return self.tensors[KEY_MASK_INPUT].device

    def rows(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """Each row's table index, (batch,) int64, on the table's device. The names must
        have been checked (:func:`check_adapter_names`)."""
        index = {name: i for i, name in enumerate(self.names)}
        return torch.tensor(
            [index[n] for n in adapter_names], dtype=torch.int64, device=self.device
        )

    def inputs(self, table_inputs: Sequence[str], rows: torch.Tensor) -> list[torch.Tensor]:
        """The tensors for a mixed graph's ``table_inputs``, in that order."""
        return [rows if name == ROWS_INPUT else self.tensors[name] for name in table_inputs]


def check_adapter_names(adapter_names: object, batch: int, known: Sequence[str]) -> list[str]:
    """``adapter_names`` as a list of one known name per row, or a ValueError/TypeError
    naming what is wrong."""
    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"adapter_names must be a list of adapter names, one per batch row, got "
            f"{adapter_names!r}"
        )
    names = list(adapter_names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold str names, got {bad[:4]}")
    if len(names) != batch:
        raise ValueError(
            f"adapter_names has {len(names)} names but the batch has {batch} rows: give one "
            "name per row"
        )
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise ValueError(
            f"adapter_names: no adapter named {unknown}; adapters are {list(known)} "
            f"(or {BASE_ADAPTER!r} for the base model)"
        )
    return names


def union_sites(
    sites: Sequence[AttentionSite], adapted: Sequence[Sequence[AttentionSite]]
) -> list[AttentionSite]:
    """The sites of ``sites`` that any of ``adapted`` adapts, in execution order."""
    paths = {s.module_path for group in adapted for s in group}
    return [s for s in sites if s.module_path in paths]


def _per_head_gate(gate: torch.Tensor, heads: int, where: str) -> torch.Tensor:
    if gate.numel() == 1:
        return gate.reshape(1).expand(heads)
    if gate.numel() != heads:
        raise ValueError(f"{where}: a gate of shape {tuple(gate.shape)} for {heads} heads")
    return gate.reshape(heads)


def build_adapter_table(
    sites: Sequence[AttentionSite],
    adapters: Mapping[str, TableEntry],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    min_keys: int = 1,
) -> AdapterTable:
    """Stack ``adapters`` (in order, after the base row) into one table over ``sites``.

    The table is ``max(adapter_len, min_keys)`` keys long; the keys beyond a row's own
    prompt are zero and masked (-inf). Sites an adapter does not adapt get zero keys,
    values and gates for its row.
    """
    keys = max([min_keys, *(entry.adapter_len for entry in adapters.values())])
    names = (BASE_ADAPTER, *adapters)
    rows = len(names)
    mask = torch.zeros(rows, keys, dtype=dtype, device=device)
    for i, entry in enumerate(adapters.values(), start=1):
        mask[i, entry.adapter_len :] = -math.inf
    tensors: dict[str, torch.Tensor] = {KEY_MASK_INPUT: mask}
    for site in sites:
        key_name, value_name, gate_name = folded_keys(site)
        key_table = torch.zeros(
            rows, site.num_kv_heads, keys, site.head_dim, dtype=dtype, device=device
        )
        value_table = torch.zeros(
            rows, site.num_kv_heads, keys, site.value_head_dim, dtype=dtype, device=device
        )
        gate_table = torch.zeros(rows, site.num_heads, dtype=dtype, device=device)
        for i, (name, entry) in enumerate(adapters.items(), start=1):
            if key_name not in entry.values:
                continue  # a site this adapter does not adapt: zero gate, zero values
            length = entry.adapter_len
            where = f"adapter {name!r} at {site.module_path or '<root>'}"
            for table, value in (
                (key_table, entry.values[key_name]),
                (value_table, entry.values[value_name]),
            ):
                expected = (1, *table.shape[1:2], length, *table.shape[3:])
                if tuple(value.shape) != expected:
                    raise ValueError(
                        f"{where}: folded tensor of shape {tuple(value.shape)}, expected {expected}"
                    )
                table[i, :, :length] = value[0]
            gate_table[i] = _per_head_gate(entry.values[gate_name], site.num_heads, where)
        tensors[key_name] = key_table
        tensors[value_name] = value_table
        tensors[gate_name] = gate_table
    return AdapterTable(names=names, tensors=tensors)


__all__ = [
    "BASE_ADAPTER",
    "AdapterTable",
    "TableEntry",
    "build_adapter_table",
    "check_adapter_names",
    "union_sites",
]
