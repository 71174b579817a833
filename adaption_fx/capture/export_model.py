"""Capture a model as a flat torch.export ATen graph, and bind call arguments to it."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.fx

from adaption_fx.capture.captured import CapturedModel, CaptureError
from adaption_fx.capture.graph_cache import cache_enabled, cache_entry, cached_export
from adaption_fx.capture.hf_compat import (
    causal_attention_without_mask,
    check_versions,
    vmap_free_masks,
    without_cache,
)
from adaption_fx.capture.repeated import capture_once_per_layer, same_outputs
from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.graph_copy import copy_flat_graph, graph_module_sharing
from adaption_fx.passes.locate import check_aten_graph
from adaption_fx.passes.normalize import normalize_export_graph
from adaption_fx.passes.patterns import SDPA_TARGETS, SOFTMAX_TARGETS

logger = logging.getLogger(__name__)


def _is_hf_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is a dependency, but capture works without it
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    params = inspect.signature(model.forward).parameters
    return "input_ids" in params and "attention_mask" in params


def device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _hf_example(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    # Two rows of eight tokens: sizes above 1 keep batch and sequence symbolic in export.
    device = device_of(model)
    ids = torch.ones(2, 8, dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dynamic: dict[str, Any] = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: seq},
    }
    for name, value in without_cache(model.forward).items():
        kwargs[name] = value  # logits only: no cache object in the captured outputs
        dynamic[name] = None
    return kwargs, dynamic


def _auto_dynamic(value: Any) -> Any:
    # Batch and sequence dims (the first two) may vary; torch.export decides which can.
    if isinstance(value, torch.Tensor):
        return {d: torch.export.Dim.AUTO for d in range(min(value.dim(), 2))} or None
    return None


def export_program(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    dynamic: Any,
    *,
    what: str | None = None,
    cache: bool = False,
) -> Any:
    """torch.export of ``model`` in eval mode; read from and written to the graph cache
    (see :mod:`adaption_fx.capture.graph_cache`) under the name ``what`` when ``cache`` is on."""
    if what is not None and cache_enabled(cache):
        return cached_export(
            model, args, kwargs, dynamic, what, lambda: export_program(model, args, kwargs, dynamic)
        )
    was_training = model.training
    model.eval()  # the frozen base runs deterministically (no dropout) in the captured graph
    try:
        with vmap_free_masks():
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs the first line
        first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {first}"
        ) from exc
    finally:
        model.train(was_training)


def capture(model: Any, example_inputs: Any = None, *, cache: bool = True) -> CapturedModel:
    """Capture ``model`` (nn.Module, ExportedProgram or GraphModule) as a flat ATen graph.

    For an nn.Module, ``example_inputs`` is a dict of keyword inputs, a tuple of positional
    inputs, or ``(args_tuple, kwargs_dict)``; the first two dims of each tensor are made
    dynamic where torch.export allows. Hugging Face causal LMs need none: input_ids and
    attention_mask examples are built, and use_cache is fixed to False.

    ``cache``: read Hugging Face causal LMs' captures from, and write them to, the
    persistent graph cache (see :mod:`adaption_fx.capture.graph_cache`).
    """
    cache_enabled(cache)  # checks its type
    if isinstance(model, torch.export.ExportedProgram):
        return captured_from_graph_module(model.module(), type(model).__name__)
    if isinstance(model, torch.fx.GraphModule):
        return captured_from_graph_module(model, type(model).__name__)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "model must be an nn.Module, a torch.fx.GraphModule or a "
            f"torch.export.ExportedProgram, got {type(model).__name__}"
        )
    hf = _is_hf_causal_lm(model)
    check_versions(("torch", "transformers") if hf else ("torch",))
    if example_inputs is None:
        if not hf:
            raise ValueError(
                f"example_inputs are needed to capture {type(model).__name__} (only Hugging "
                "Face causal LMs get them built automatically)"
            )
        kwargs, dynamic = _hf_example(model)
        args: tuple = ()
        dynamic_spec: Any = dynamic
    else:
        args, kwargs = _split_example(example_inputs)
        names = _positional_names(model, len(args))
        dynamic_spec = {n: _auto_dynamic(a) for n, a in zip(names, args, strict=True)}
        dynamic_spec.update({k: _auto_dynamic(v) for k, v in kwargs.items()})
    logger.info("capturing %s with torch.export", type(model).__name__)
    if hf and example_inputs is None:
        feed = check_feed(kwargs, masked=True)
        captured = _capture_hf(model, kwargs, dynamic_spec, feed, "masked", cache)
    else:
        ep = export_program(model, args, kwargs, dynamic_spec)
        captured = captured_from_graph_module(ep.module(), type(model).__name__)
    if hf:
        captured.loss_function = getattr(model, "loss_function", None)
        captured.task_type = "CAUSAL_LM"
        captured.name_or_path = getattr(model, "name_or_path", None) or None
        if example_inputs is None:
            captured.causal = capture_causal(model, kwargs, dynamic_spec, cache=cache)
        captured.cache = cache
    return captured


def check_feed(example: dict[str, Any], masked: bool) -> dict[str, Any]:
    """Inputs to check a grown capture on (see :mod:`adaption_fx.capture.repeated`): two rows of
    varied tokens, the second left-padded by two where the capture takes a mask."""
    ids = example["input_ids"]
    tokens = (torch.arange(ids.numel(), device=ids.device).reshape(ids.shape) * 7) % 5 % 2
    feed = {**example, "input_ids": tokens.to(ids.dtype)}
    if masked:
        mask = torch.ones_like(tokens)
        mask[1:, :2] = 0
        feed["attention_mask"] = mask
    return feed


def eager_outputs(model: torch.nn.Module, feed: dict[str, Any]) -> Any:
    """The model's own outputs for ``feed``, in eval mode (as captured), without autograd."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**feed)
    finally:
        model.train(was_training)


def graph_outputs(captured: CapturedModel, feed: dict[str, Any]) -> Any:
    """A capture's outputs for ``feed``, structured like the model's, without autograd."""
    with torch.no_grad():
        return captured.unflatten(captured.graph_module(*captured.bind((), feed)))


def _capture_hf(
    model: torch.nn.Module,
    kwargs: dict[str, Any],
    dynamic: dict[str, Any],
    feed: dict[str, Any],
    what: str,
    cache: bool,
) -> CapturedModel:
    """Capture a Hugging Face model through one of its alike layers where possible (see
    :mod:`adaption_fx.capture.repeated`), else whole."""
    name = type(model).__name__

    def capture_one(_layers: Any = None) -> CapturedModel:
        program = export_program(model, (), kwargs, dynamic, what=what, cache=cache)
        captured = captured_from_graph_module(program.module(), name)
        captured.cache_entry = cache_entry(program)
        return captured

    def check(grown: CapturedModel) -> str | None:
        return same_outputs(graph_outputs(grown, feed), eager_outputs(model, feed))

    grown = capture_once_per_layer(model, capture_one, check)
    return grown if grown is not None else capture_one()


def _only_causal_sdpa(gm: torch.fx.GraphModule) -> str | None:
    """Why ``gm`` is not a graph whose attention is all mask-free causal SDPA, or None."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    if not calls:
        return "it has no scaled_dot_product_attention call"
    for node in calls:
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        if mask is not None or is_causal is not True:
            return f"{node.name} has attn_mask={mask} is_causal={is_causal}"
    softmax = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_TARGETS]
    if softmax:
        return f"it also computes softmax outside SDPA ({softmax[0].name})"
    return None


def capture_causal(
    model: torch.nn.Module, kwargs: dict[str, Any], dynamic: dict[str, Any], *, cache: bool = False
) -> CapturedModel | None:
    """Capture a Hugging Face causal LM without ``attention_mask``, its attention as SDPA
    with ``is_causal=True`` and no mask tensor, or return None where that is not what the
    model computes (sliding windows, eager attention, an unknown transformers).

    The result is kept only when the graph shows it: every attention node is SDPA with no
    mask and ``is_causal=True``, so for unpadded input it equals the masked capture.
    """
    kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    dynamic = {k: v for k, v in dynamic.items() if k != "attention_mask"}
    with causal_attention_without_mask() as available:
        if not available:
            logger.info("no mask-free causal capture: transformers lacks the masking hooks")
            return None
        try:
            feed = check_feed(kwargs, masked=False)
            causal = _capture_hf(model, kwargs, dynamic, feed, "causal", cache)
        except CaptureError as exc:
            logger.info("no mask-free causal capture: %s", exc)
            return None
    why_not = _only_causal_sdpa(causal.graph_module)
    if why_not is not None:
        logger.info("no mask-free causal capture of %s: %s", type(model).__name__, why_not)
        return None
    return causal


def _positional_names(model: torch.nn.Module, n: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < n:
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(params)} positional "
            f"inputs, example_inputs has {n}"
        )
    return params[:n]


def _split_example(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], dict)
    ):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a dict of keyword inputs, a tuple of positional inputs or "
        f"(args, kwargs), got {type(example_inputs).__name__}"
    )


def captured_from_graph_module(gm: torch.fx.GraphModule, source_name: str) -> CapturedModel:
    check_aten_graph(gm)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    graph, _ = copy_flat_graph(gm)
    flat = graph_module_sharing(gm, graph, class_name="BaseGraphModule")
    try:
        # On the copy: a GraphModule the user passed in is left as it was.
        normalize_export_graph(flat, source_name)
    except UnsupportedGraphError as exc:
        raise CaptureError(str(exc)) from exc
    captured = CapturedModel(
        graph_module=flat,
        in_spec=info.in_spec if info is not None else None,
        out_spec=info.out_spec if info is not None else None,
        source_name=source_name,
    )
    captured.reference_weight = next((p for p in flat.parameters() if p.is_floating_point()), None)
    if captured.reference_weight is not None:
        captured.placement = (captured.reference_weight.device, captured.reference_weight.dtype)
    names = captured.keyword_names
    captured.fill_attention_mask = "input_ids" in names and "attention_mask" in names
    # Placeholders carry what export saw: fake tensors for tensor inputs (rank and dtype to
    # check calls against) and the values of inputs it baked in as constants.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    leaf_names = [None] * captured.positional_count + names
    if info is not None and len(leaf_names) == len(placeholders):
        for name, node in zip(leaf_names, placeholders, strict=True):
            val = node.meta.get("val")
            if name is None or val is None:
                continue
            if isinstance(val, torch.Tensor):
                captured.examples[name] = val
            elif isinstance(val, (bool, int, float, str)):
                captured.defaults[name] = val
    return captured
