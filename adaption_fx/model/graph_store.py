"""Every graph an AdaptedModel runs, in one place: built on first use, dropped together.

An :class:`~adaption_fx.model.adapted.AdaptedModel` holds adapters; the graphs they run
depend only on each adapter's *structure* (:func:`structure_key`: prompt length, adapted
layers, gate), so adapters that agree on it share them. For one capture, the store owns:

- per structure: the rewritten graph of the masked capture and of the mask-free causal
  capture where the model has one (built together, so both always hold the same
  adapters), the folded inference graph, and the adapter projection (prompts and gates to
  folded keys, values and gates) that the folded graphs and the mixed-batch table read;
- the mixed-batch graph of each capture and the adapter table built from the adapters'
  current tensors;
- the decode-step twin (``decode_twin``), a second AdaptedModel over the decode-step
  capture with a store of its own.

What is derived from one of these graph modules (its training twin, the eager decode step
program) is kept with that module in :mod:`adaption_fx.capture.variants` and lives as long
as it does; a compiled module belongs to its ``CompiledModel``; captures persisted across
processes are the disk cache's (:mod:`adaption_fx.capture.graph_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch
import torch.fx

from adaption_fx.capture.captured import CapturedModel
from adaption_fx.config import AdaptionConfig
from adaption_fx.passes.errors import AttentionNotFoundError, UnsupportedGraphError
from adaption_fx.passes.fold import adapter_projection, fold_adapter_kv
from adaption_fx.passes.insert import AdaptionGraph, insert_adaption_prompt
from adaption_fx.passes.locate import locate_attention, select_top_sites
from adaption_fx.passes.mixed_batch import MixedGraph, insert_mixed_adapters
from adaption_fx.passes.site import AttentionSite

logger = logging.getLogger(__name__)

# A rewritten graph depends only on these; adapters that agree on them share one graph.
StructureKey = tuple[int, tuple[int, ...], str, str]


def structure_key(config: AdaptionConfig, sites: Sequence[AttentionSite]) -> StructureKey:
    """What the rewritten graph of ``config`` on ``sites`` depends on."""
    return (config.adapter_len, tuple(s.index for s in sites), config.gate, config.gate_activation)


class StructureGraphs(NamedTuple):
    """One adapter structure's rewritten graphs: of the masked capture, and of the
    mask-free causal capture where the model has one."""

    masked: AdaptionGraph
    causal: AdaptionGraph | None


def matching_sites(
    captured: CapturedModel | None, sites: Sequence[AttentionSite]
) -> list[AttentionSite] | None:
    """The causal capture's attention sites, if they are the masked capture's one for one."""
    if captured is None:
        return None
    try:
        found = locate_attention(captured.graph_module)
    except (UnsupportedGraphError, AttentionNotFoundError) as exc:
        logger.info("not using the mask-free causal capture: %s", exc)
        return None
    if [s.module_path for s in found] != [s.module_path for s in sites]:
        logger.info("not using the mask-free causal capture: its attention sites differ")
        return None
    return found


class GraphStore:
    """The graphs of one capture and its adapter structures (see the module docstring).

    Building never changes the store (:meth:`build`); :meth:`install` and :meth:`drop` do,
    so a failed ``add_adapter`` or ``load_adapter`` leaves it as it was.
    """

    def __init__(self, captured: CapturedModel, sites: Sequence[AttentionSite]):
        self.captured = captured
        self.sites = list(sites)
        self.causal_sites = matching_sites(captured.causal, self.sites)
        self._rewritten: dict[StructureKey, StructureGraphs] = {}
        self._folded: dict[StructureKey, tuple[torch.fx.GraphModule, tuple[str, ...]]] = {}
        self._projections: dict[StructureKey, tuple[torch.fx.GraphModule, tuple[str, ...]]] = {}
        self._mixed: dict[bool, tuple[tuple[str, ...], MixedGraph]] = {}
        self._table: tuple[Hashable, Any] | None = None
        # The decode-step twin (an AdaptedModel of the decode-step capture), set by
        # AdaptedModel.decoder on first use.
        self.decode_twin: Any = None

    # ----------------------------------------------------------------- rewritten graphs
    def build(
        self, config: AdaptionConfig
    ) -> tuple[list[AttentionSite], StructureKey, StructureGraphs]:
        """The sites ``config`` adapts, its structure key and its rewritten graphs (the
        installed ones for that structure, else new ones; the store is not changed)."""
        selected = select_top_sites(self.sites, config.adapter_layers)
        key = structure_key(config, selected)
        installed = self._rewritten.get(key)
        if installed is not None:
            return selected, key, installed
        graph = insert_adaption_prompt(self.captured.graph_module, selected, config.structure)
        logger.info("built rewritten graph for %s (%d sites)", key, len(selected))
        causal = None
        if self.causal_sites is not None:
            causal_selected = select_top_sites(self.causal_sites, config.adapter_layers)
            causal = insert_adaption_prompt(
                self.captured.causal.graph_module, causal_selected, config.structure
            )
        return selected, key, StructureGraphs(graph, causal)

    def install(self, key: StructureKey, graphs: StructureGraphs) -> None:
        """Keep ``graphs`` as the graphs of structure ``key``."""
        self._rewritten[key] = graphs

    def drop(self, key: StructureKey) -> None:
        """Forget a structure no adapter has any more, with what was derived from it."""
        del self._rewritten[key]
        self._folded.pop(key, None)
        self._projections.pop(key, None)

    def structures(self) -> list[StructureKey]:
        """The structures with installed graphs, in the order they were installed."""
        return list(self._rewritten)

    def rewritten(self, key: StructureKey, *, causal: bool = False) -> AdaptionGraph:
        """The rewritten graph of a structure: of the masked capture, or the causal one."""
        graphs = self._rewritten[key]
        if causal:
            if graphs.causal is None:
                raise ValueError("this model has no mask-free causal capture")
            return graphs.causal
        return graphs.masked

    # ----------------------------------------------------------------- inference
    def projection(self, key: StructureKey) -> tuple[torch.fx.GraphModule, tuple[str, ...]]:
        """A structure's adapter projection (prompts and gates to folded tensors) and the
        names of its outputs, built once."""
        cached = self._projections.get(key)
        if cached is None:
            cached = adapter_projection(self._rewritten[key].masked)
            self._projections[key] = cached
        return cached

    def folded(
        self, key: StructureKey, tensors: Sequence[torch.Tensor]
    ) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
        """The folded inference graph of a structure (built once) and its folded inputs,
        computed now from the adapter ``tensors`` (in the rewritten graph's input order)."""
        cached = self._folded.get(key)
        if cached is None:
            folded = fold_adapter_kv(self._rewritten[key].masked, tensors, as_inputs=True)
            cached = (folded.graph_module, folded.adapter_inputs)
            self._folded[key] = cached
        folded_gm, inputs = cached
        projection, names = self.projection(key)
        with torch.no_grad():
            values = dict(zip(names, projection(*tensors), strict=True))
        return folded_gm, [values[name].detach() for name in inputs]

    # ----------------------------------------------------------------- mixed batches
    def mixed(self, paths: tuple[str, ...], *, causal: bool = False) -> MixedGraph:
        """The mixed-batch graph adapting the sites at ``paths`` (of the causal capture
        with ``causal``); built again when the paths change."""
        if causal:
            if self.causal_sites is None:
                raise ValueError("this model has no mask-free causal capture")
            sites, gm = self.causal_sites, self.captured.causal.graph_module
        else:
            sites, gm = self.sites, self.captured.graph_module
        cached = self._mixed.get(causal)
        if cached is None or cached[0] != paths:
            selected = [s for s in sites if s.module_path in paths]
            cached = (paths, insert_mixed_adapters(gm, selected))
            self._mixed[causal] = cached
            logger.info("built the mixed-batch graph for %d sites", len(selected))
        return cached[1]

    def table(self, state: Hashable, build: Callable[[], Any]) -> Any:
        """The adapter table for the adapters' ``state`` (names, structures, tensor
        versions): the kept one while the state is the same, else ``build()``."""
        if self._table is None or self._table[0] != state:
            self._table = (state, build())
        return self._table[1]

    # ----------------------------------------------------------------- sharding
    def release_base_holders(self) -> None:
        """Drop every graph that holds base weights beyond the masked rewritten graphs: the
        decode twin, the causal capture and its graphs, folded and mixed graphs, the table
        and the projections (for sharding the base: no full copy may stay alive)."""
        self.decode_twin = None
        self.captured.reference_weight = None
        self.captured.causal = None
        self.causal_sites = None
        self._rewritten = {k: StructureGraphs(g.masked, None) for k, g in self._rewritten.items()}
        self._folded.clear()
        self._mixed.clear()
        self._table = None
        self._projections.clear()


__all__ = ["GraphStore", "StructureGraphs", "StructureKey", "matching_sites", "structure_key"]
