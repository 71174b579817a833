"""Which graph an AdaptedModel runs eagerly: the graph as rewritten for inference, a
training twin where autograd records.

The training twin computes the same function with less kept for the backward and, where
gradient checkpointing is on, recomputes each adapted decoder layer in the backward:

- the adapter attention written out as matmul, softmax, matmul (``passes/unfuse.py``).
  The insert pass writes it as one ``scaled_dot_product_attention`` call, the fastest
  eager form for inference, but its backward is the flash kernel's backward over a key of
  adapter_len (10) positions: in a torch.profiler run of one training step of the
  embedded SmolLM2-135M (batch 8 x 128, all 30 layers adapted) that backward took 86 ms
  fused and about 35 ms written out, about 1% of a 4.7 s step (within the bench's
  round-to-round noise in wall time);
- gated activations (``act(gate) * up``) that recompute ``act(gate)`` in the backward
  instead of keeping it (``passes/recompute.py``): a third less of the MLP's saved
  activations, bit-identical outputs and gradients;
- with gradient checkpointing, each decoder layer that holds an adapted attention site
  runs under ``torch.utils.checkpoint`` (``passes/activation_checkpoint.py``). Layers below
  the lowest adapted one are left alone: nothing there needs a gradient, so they save
  nothing anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from adaption_fx.capture.variants import graph_variant
from adaption_fx.passes.activation_checkpoint import (
    CheckpointRegions,
    check_options,
    decoder_layer_regions,
)
from adaption_fx.passes.graph_copy import copy_sharing_weights
from adaption_fx.passes.infra import run_passes
from adaption_fx.passes.insert import ADAPTION_META_KEY
from adaption_fx.passes.recompute import RecomputeGatedActivations
from adaption_fx.passes.unfuse import UnfuseAdapterAttention


@dataclass(frozen=True)
class GradientCheckpointing:
    """Gradient checkpointing of a model's adapted decoder layers.

    Attributes:
        site_paths: the module paths of every attention site of the model.
        options: keyword arguments for ``torch.utils.checkpoint.checkpoint`` (sorted items).
    """

    site_paths: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def build(
        cls, site_paths: Sequence[str], options: Mapping[str, Any] | None = None
    ) -> GradientCheckpointing:
        return cls(tuple(site_paths), tuple(sorted(check_options(options).items())))


def adapted_site_paths(gm: torch.fx.GraphModule) -> list[str]:
    """The attention sites the insert pass adapted in ``gm``, in graph order."""
    paths: list[str] = []
    for node in gm.graph.nodes:
        tag = node.meta.get(ADAPTION_META_KEY)
        if tag is not None and tag["site"] not in paths:
            paths.append(tag["site"])
    return paths


def training_graph(
    gm: torch.fx.GraphModule, checkpointing: GradientCheckpointing | None = None
) -> torch.fx.GraphModule:
    """The training twin of ``gm`` (see the module docstring), sharing its weights; ``gm``
    itself for a graph without adapters (nothing in it needs a gradient)."""
    adapted = adapted_site_paths(gm)
    if not adapted:
        return gm
    # One copy sharing gm's weights, which the in-place passes rewrite; gm itself where
    # they find nothing to do (a graph that is its own twin, e.g. a twin).
    result = run_passes(
        copy_sharing_weights(gm), [UnfuseAdapterAttention(), RecomputeGatedActivations()]
    )
    twin = result.graph_module if result.modified else gm
    if checkpointing is not None:
        twin = checkpoint_adapted_layers(twin, checkpointing)
    return twin


def checkpoint_adapted_layers(
    gm: torch.fx.GraphModule, checkpointing: GradientCheckpointing
) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its weights) in which every decoder layer holding an
    adapted attention site runs under ``torch.utils.checkpoint``; ``gm`` itself for a graph
    without adapters."""
    adapted = adapted_site_paths(gm)
    if not adapted:
        return gm
    regions = decoder_layer_regions(gm.graph, checkpointing.site_paths, only=adapted)
    return run_passes(gm, [CheckpointRegions(regions, checkpointing.options)]).graph_module


def eager_graph(
    graph_module: torch.fx.GraphModule, checkpointing: GradientCheckpointing | None = None
) -> torch.fx.GraphModule:
    """``graph_module`` when autograd is not recording (``torch.is_grad_enabled()``), else
    its training twin, built on first use."""
    if not torch.is_grad_enabled():
        return graph_module
    return graph_variant(
        graph_module,
        ("training", checkpointing),
        lambda: training_graph(graph_module, checkpointing),
    )


__all__ = [
    "GradientCheckpointing",
    "adapted_site_paths",
    "checkpoint_adapted_layers",
    "eager_graph",
    "training_graph",
]
