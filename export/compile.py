"""torch.compile for AdaptedModel: each graph compiled once, adapters bound as inputs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx

from adaption_fx.generation.options import EosTokenIds
from adaption_fx.model.adapted import AdaptedModel
from adaption_fx.model.eager import GradientCheckpointing, checkpoint_adapted_layers
from adaption_fx.passes.graph_copy import copy_sharing_weights
from adaption_fx.passes.infra import run_passes
from adaption_fx.passes.unfuse import UnfuseAdapterAttention

logger = logging.getLogger(__name__)


def unfused_for_inductor(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``graph_module`` (sharing its weights) with the adapter attention written
    out (``passes/unfuse.py``: inductor does better with it), or ``graph_module`` itself
    where it has none."""
    result = run_passes(copy_sharing_weights(graph_module), [UnfuseAdapterAttention()])
    return result.graph_module if result.modified else graph_module


class CompiledModel(torch.nn.Module):
    """An AdaptedModel whose graphs run through ``torch.compile``.

    It follows the wrapped model's state: the active adapter, enable/disable and the
    adapter tensors are read on every call. Each distinct graph (the base graph, one per
    adapter structure) is compiled on its first call. Adapter prompts and gates are inputs
    of those graphs, so switching between adapters of one structure, or training them,
    does not recompile.
    """

    def __init__(self, model: AdaptedModel, options: dict[str, Any]):
        super().__init__()
        self.model = model
        self._options = dict(options)
        # Keyed by the model's graph module itself (not its id, which a freed graph's could
        # alias), whatever graph is compiled for it.
        # A graph is compiled again with gradient checkpointing for calls under autograd
        # while the model has it enabled (see AdaptedModel.gradient_checkpointing_enable).
        self._compiled: dict[tuple[torch.fx.GraphModule, GradientCheckpointing | None], Any] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.run_graphs(self._compiled_graph, args, kwargs)

    def generate(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``AdaptedModel.generate`` with the decode-step graphs compiled.

        The prefill and the single-token steps have different shapes: the first call of
        each compiles, after which torch.compile treats the lengths as dynamic. The
        arguments (``generation_config`` and Hugging Face's options) go through as given,
        so options left out take the source model's defaults there.
        """
        return self.model.generate(input_ids, *args, _runner=self._compiled_graph, **kwargs)

    def stream(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """``AdaptedModel.stream`` with the decode-step graphs compiled."""
        return self.model.stream(input_ids, *args, _runner=self._compiled_graph, **kwargs)

    @property
    def default_token_ids(self) -> tuple[EosTokenIds, int | None]:
        """The wrapped model's ``(eos_token_id, pad_token_id)`` generation defaults."""
        return self.model.default_token_ids

    def _compiled_graph(self, graph_module: torch.fx.GraphModule) -> Any:
        plan = self.model.checkpointing_plan if torch.is_grad_enabled() else None
        compiled = self._compiled.get((graph_module, plan))
        if compiled is None:
            logger.info("compiling %s with %s", type(graph_module).__name__, self._options)
            target = graph_module
            if self._options.get("backend", "inductor") == "inductor":
                # Inductor does better with the adapter attention written out (see unfuse);
                # other backends compile the graph as captured (what eager inference runs).
                target = unfused_for_inductor(graph_module)
            if plan is not None:
                # Dynamo keeps torch.utils.checkpoint regions (non-reentrant) as regions the
                # partitioner recomputes in the backward.
                target = checkpoint_adapted_layers(target, plan)
            compiled = torch.compile(target, **self._options)
            self._compiled[(graph_module, plan)] = compiled
        return compiled


def compile(model: AdaptedModel, **torch_compile_kwargs: Any) -> CompiledModel:
    """Compile an AdaptedModel with ``torch.compile`` (``fullgraph=True`` by default).

    Returns a module called like ``model`` that follows its adapter state. Keyword
    arguments go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).
    """
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"compile expects an AdaptedModel, got {type(model).__name__}")
    torch_compile_kwargs.setdefault("fullgraph", True)
    return CompiledModel(model, torch_compile_kwargs)
