"""The one verb: rewrite(model, config) -> AdaptedModel."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from adaption_fx.capture.export_model import capture
from adaption_fx.capture.gc_pause import paused_gc
from adaption_fx.checkpoint import adapter_directory, check_sizes_against_tensors
from adaption_fx.config import AdaptionConfig
from adaption_fx.model.adapted import AdaptedModel, check_adapter_name
from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.locate import locate_attention

logger = logging.getLogger(__name__)


@paused_gc()
def rewrite(
    model: Any,
    config: AdaptionConfig | str | os.PathLike | None,
    *,
    example_inputs: Any = None,
    adapter_name: str = "default",
    generator: torch.Generator | None = None,
    cache: bool = True,
) -> AdaptedModel:
    """Give ``model`` LLaMA-Adapter prompts in its top ``config.adapter_layers`` attention layers.

    Args:
        model: an nn.Module (captured with torch.export, batch and sequence dynamic), a
            torch.fx.GraphModule from torch.export, or a torch.export.ExportedProgram.
        config: the adapter to add first: an AdaptionConfig (fresh prompts, zero gates), or
            the directory of a saved adapter (ours or PEFT's), loaded with its tensors, or
            None: no adapter yet (``sites`` tells how many attention layers there are; add
            one with ``add_adapter``).
        example_inputs: inputs for capturing an nn.Module: a dict of keyword inputs, a tuple
            of positional inputs, or (args, kwargs). Built automatically for Hugging Face
            causal LMs (input_ids + attention_mask).
        adapter_name: name of the first adapter.
        generator: random generator for the prompt initialisation (default: torch's global).
        cache: keep Hugging Face causal LMs' torch.export captures (without weights) in the
            persistent graph cache and reuse them, so that a second process starts in a
            fraction of the time (see :mod:`adaption_fx.capture.graph_cache`; the environment
            variable ``ADAPTION_FX_CACHE=0`` also turns it off).

    Returns:
        An AdaptedModel sharing the model's weights, which are frozen (requires_grad=False);
        only the adapter prompts and gates train. With the zero-initialised gates its output
        equals the model's exactly.

    Raises:
        TypeError / ValueError: bad arguments; the model is left as it was.
        CaptureError: torch.export could not capture the model.
        AttentionNotFoundError / UnsupportedGraphError: no attention the pass recognises.
    """
    if isinstance(model, AdaptedModel):
        raise UnsupportedGraphError(
            "model is already an AdaptedModel; add more adapters with model.add_adapter(...)"
        )
    check_adapter_name(adapter_name)  # before the (slow) capture
    if isinstance(config, (str, os.PathLike)):
        # A bad directory fails here, before the (slow) capture: its config, and the
        # config's sizes against the file's tensors (read from its header only).
        folder = adapter_directory(config, adapter_name)
        found = AdaptionConfig.from_pretrained(folder)
        check_sizes_against_tensors(folder, found.adapter_len, found.adapter_layers)
    elif config is not None and not isinstance(config, AdaptionConfig):
        raise TypeError(
            "config must be an AdaptionConfig, an adapter checkpoint directory or None, "
            f"got {type(config).__name__}"
        )
    captured = capture(model, example_inputs, cache=cache)
    sites = locate_attention(captured.graph_module)
    logger.info("found %d attention sites: %s", len(sites), [s.module_path for s in sites])
    # The source module is kept for generate() (a causal LM's decode step is captured
    # from it on first use) and Hugging Face's attributes.
    source = (
        model if captured.task_type == "CAUSAL_LM" and isinstance(model, torch.nn.Module) else None
    )
    adapted = AdaptedModel(captured, sites, source=source)
    if isinstance(config, AdaptionConfig):
        adapted.add_adapter(adapter_name, config, generator=generator)
    elif config is not None:
        adapted.load_adapter(config, adapter_name)
    for param in adapted.base_graph_module.parameters():
        param.requires_grad_(False)
    return adapted
