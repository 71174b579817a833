"""Capture a model as a flat torch.export ATen graph, and bind call arguments to it."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from adaption_fx.graph_cache import CacheEntry, cache_enabled, cache_entry, cached_export
from adaption_fx.hf_compat import (
    causal_attention_without_mask,
    check_versions,
    vmap_free_masks,
    without_cache,
)
from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.graph_copy import copy_flat_graph, graph_module_sharing
from adaption_fx.passes.locate import check_aten_graph
from adaption_fx.passes.normalize import normalize_export_graph
from adaption_fx.passes.patterns import SDPA_TARGETS, SOFTMAX_TARGETS
from adaption_fx.repeated import capture_once_per_layer, same_outputs

logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """torch.export could not capture the model."""


@dataclass
class CapturedModel:
    """A model as one flat ATen graph plus what is needed to call it like the original.

    Attributes:
        graph_module: the base graph; takes the flat inputs positionally. Its weights are
            the source's own tensor objects.
        in_spec / out_spec: pytree specs of (args, kwargs) and of the output; None for a
            graph captured without them (the flat inputs and outputs are used as they are).
        defaults: keyword inputs captured as constants (e.g. ``use_cache=False``), filled in
            when the caller leaves them out.
        fill_attention_mask: the model is a Hugging Face causal LM, so a missing
            ``attention_mask`` means "attend to every token".
        loss_function: the source's Hugging Face loss (``labels=`` support), if any.
        source_name: class name of what was captured, for messages.
        causal: for Hugging Face causal LMs, a second capture of the same model without
            ``attention_mask``, whose attention calls SDPA with ``is_causal=True`` and no mask
            tensor (see :func:`capture_causal`). Used when every token is attended to, where
            it computes the same function without building and reading a mask.
        cache: whether captures made later for this model (the decode step) may use the
            persistent graph cache.
        cache_entry: the graph-cache entry (:class:`adaption_fx.graph_cache.CacheEntry`)
            this capture was read from or stored in; None when the cache was not used.
    """

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec | None
    out_spec: pytree.TreeSpec | None
    defaults: dict[str, Any] = field(default_factory=dict)
    fill_attention_mask: bool = False
    loss_function: Any = None
    source_name: str = "model"
    examples: dict[str, torch.Tensor] = field(default_factory=dict)
    task_type: str | None = None
    name_or_path: str | None = None
    reference_weight: torch.Tensor | None = None
    placement: tuple[torch.device, torch.dtype] | None = None
    causal: CapturedModel | None = None
    validate: Callable[[dict[str, Any]], None] | None = None
    cache: bool = False
    cache_entry: CacheEntry | None = None

    def check_placement(self) -> None:
        """Raise if the weights moved or were cast since capture.

        torch.export specialises the graph to the dtype and device it saw (it asserts them
        inside the graph), so a model cast after capture would otherwise fail deep in torch.
        """
        ref = self.reference_weight
        if ref is None or (ref.device, ref.dtype) == self.placement:
            return
        device, dtype = self.placement
        raise RuntimeError(
            f"{self.source_name} was captured with {dtype} weights on {device}, but they are "
            f"now {ref.dtype} on {ref.device}; the captured graph is specialised to its dtype "
            "and device: move or cast the source model first, then call rewrite()"
        )

    @property
    def positional_count(self) -> int:
        if self.in_spec is None:
            return 0
        return self.in_spec.child(0).num_children

    @property
    def keyword_names(self) -> list[str]:
        if self.in_spec is None:
            return []
        return list(self.in_spec.child(1).context)

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        """Flatten a call's arguments into the graph's flat inputs, checking them first."""
        if self.in_spec is None:
            if kwargs:
                raise TypeError(
                    f"this graph takes positional inputs only, got keywords {sorted(kwargs)}"
                )
            return list(args)
        return self.flatten(*self.bind_named(args, kwargs))

    def bind_named(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Check a call's arguments; return the positional inputs and the named ones."""
        n_pos = self.positional_count
        names = self.keyword_names
        pos = list(args[:n_pos])
        extra = list(args[n_pos:])
        if len(extra) > len(names):
            raise TypeError(
                f"{self.source_name} was captured with {n_pos + len(names)} inputs "
                f"({', '.join(names)}); got {len(args)} positional arguments"
            )
        given = dict(zip(names, extra, strict=False))
        dup = sorted(set(given) & set(kwargs))
        if dup:
            raise TypeError(f"got multiple values for {dup}")
        given.update(kwargs)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(
                f"{self.source_name} was captured with inputs {names}; unexpected {unknown}"
            )
        if (
            self.fill_attention_mask
            and "attention_mask" in names
            and given.get("attention_mask") is None
            and isinstance(given.get("input_ids"), torch.Tensor)
        ):
            given["attention_mask"] = torch.ones_like(given["input_ids"])
        for name, value in self.defaults.items():
            if name not in given:
                given[name] = value
            elif given[name] != value:
                raise ValueError(
                    f"{name}={given[name]!r} differs from the captured constant {value!r}; "
                    "the graph was captured with that value"
                )
        missing = [n for n in names if n not in given]
        if missing:
            raise TypeError(f"missing inputs {missing} (captured with {names})")
        for name in names:
            self._check_tensor(name, given[name])
        named = {n: given[n] for n in names}
        if self.validate is not None:
            self.validate(named)
        return tuple(pos), named

    def flatten(self, pos: tuple, named: dict[str, Any]) -> list[Any]:
        """The flat graph inputs for checked arguments (see :meth:`bind_named`)."""
        flat, spec = pytree.tree_flatten((tuple(pos), {n: named[n] for n in self.keyword_names}))
        if spec != self.in_spec:
            raise TypeError(
                f"inputs do not match the captured structure:\n  captured {self.in_spec}\n  "
                f"got      {spec}"
            )
        return flat

    def causal_inputs(self, pos: tuple, named: dict[str, Any]) -> list[Any] | None:
        """Flat inputs of the :attr:`causal` graph for these arguments, or None when it does
        not compute the same function for them (a padded ``attention_mask``)."""
        causal = self.causal
        if causal is None:
            return None
        mask, ids = named.get("attention_mask"), named.get("input_ids")
        if not (isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor)):
            return None
        if mask.shape != ids.shape or ids.shape[-1] < 1 or not bool(mask.all()):
            return None
        rest = {k: v for k, v in named.items() if k != "attention_mask"}
        return causal.flatten(pos, rest)

    def _check_tensor(self, name: str, value: Any) -> None:
        example = self.examples.get(name)
        if example is None:
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != example.dim():
            raise ValueError(
                f"{name} must be {example.dim()}-d like the capture example, got shape "
                f"{tuple(value.shape)}"
            )
        if value.dtype.is_floating_point != example.dtype.is_floating_point:
            raise TypeError(f"{name} must have a dtype like {example.dtype}, got {value.dtype}")

    def unflatten(self, outputs: Any) -> Any:
        if self.out_spec is None:
            return outputs
        return pytree.tree_unflatten(list(outputs), self.out_spec)


def _is_hf_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is a dependency, but capture works without it
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    params = inspect.signature(model.forward).parameters
    return "input_ids" in params and "attention_mask" in params


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _hf_example(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    # Two rows of eight tokens: sizes above 1 keep batch and sequence symbolic in export.
    device = _device_of(model)
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


def _export(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    dynamic: Any,
    *,
    what: str | None = None,
    cache: bool = False,
) -> Any:
    """torch.export of ``model`` in eval mode; read from and written to the graph cache
    (see :mod:`adaption_fx.graph_cache`) under the name ``what`` when ``cache`` is on."""
    if what is not None and cache_enabled(cache):
        return cached_export(
            model, args, kwargs, dynamic, what, lambda: _export(model, args, kwargs, dynamic)
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
    persistent graph cache (see :mod:`adaption_fx.graph_cache`).
    """
    cache_enabled(cache)  # checks its type
    if isinstance(model, torch.export.ExportedProgram):
        return _from_graph_module(model.module(), type(model).__name__)
    if isinstance(model, torch.fx.GraphModule):
        return _from_graph_module(model, type(model).__name__)
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
        ep = _export(model, args, kwargs, dynamic_spec)
        captured = _from_graph_module(ep.module(), type(model).__name__)
    if hf:
        captured.loss_function = getattr(model, "loss_function", None)
        captured.task_type = "CAUSAL_LM"
        captured.name_or_path = getattr(model, "name_or_path", None) or None
        if example_inputs is None:
            captured.causal = capture_causal(model, kwargs, dynamic_spec, cache=cache)
        captured.cache = cache
    return captured


def check_feed(example: dict[str, Any], masked: bool) -> dict[str, Any]:
    """Inputs to check a grown capture on (see :mod:`adaption_fx.repeated`): two rows of
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
    :mod:`adaption_fx.repeated`), else whole."""
    name = type(model).__name__

    def capture_one(_layers: Any = None) -> CapturedModel:
        program = _export(model, (), kwargs, dynamic, what=what, cache=cache)
        captured = _from_graph_module(program.module(), name)
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


def _from_graph_module(gm: torch.fx.GraphModule, source_name: str) -> CapturedModel:
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
