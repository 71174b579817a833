"""What is derived from a graph module, kept with it: one registry for every variant.

A rewritten graph runs in more than one form: its training twin (per
gradient-checkpointing setting, ``adaption_fx.model.eager``) and the eager decode step
program (``adaption_fx.generation.loop``). Each is built on first use and kept here, keyed
by the graph module it came from (weakly: a variant lives exactly as long as its graph
module) and by what distinguishes it. Compiled modules are not kept here: they belong to
the ``CompiledModel`` whose ``torch.compile`` options made them, and go with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch.fx

T = TypeVar("T")

_VARIANTS: weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[Hashable, Any]] = (
    weakref.WeakKeyDictionary()
)


def graph_variant(graph_module: torch.fx.GraphModule, key: Hashable, build: Callable[[], T]) -> T:
    """The variant ``key`` of ``graph_module``: the kept one, else ``build()`` (kept).

    ``key`` names the kind first, e.g. ``("training", checkpointing)``. A ``build`` that
    raises keeps nothing.
    """
    variants = _VARIANTS.setdefault(graph_module, {})
    if key not in variants:
        variants[key] = build()
    return variants[key]


def variant_keys(graph_module: torch.fx.GraphModule) -> list[Hashable]:
    """The keys of the variants kept for ``graph_module`` (for inspection and tests)."""
    return list(_VARIANTS.get(graph_module, {}))


__all__ = ["graph_variant", "variant_keys"]
