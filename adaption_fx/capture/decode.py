"""Capture a Hugging Face causal LM's decode step as one flat ATen graph.

Inputs: ``input_ids`` (the new tokens), ``attention_mask`` (past and new positions),
``position_ids`` (of the new tokens) and each layer's past keys and values as plain tensors
``past_<i>_key`` / ``past_<i>_value`` of shape (batch, kv_heads, past_len, head_dim).
Outputs: ``logits`` of the last new token, (batch, 1, vocab), and ``present_<i>_key`` /
``present_<i>_value`` (past followed by the new tokens). Batch, new-token length and past
length are dynamic; a past of length 0 makes the same graph the prefill.

The adaption pass applies to this graph as to the full-sequence capture: the prompt's key
and value path is replayed from the layer's projections, bypassing position encoding and
the cache concatenation, so adapter keys and values never enter the present tensors, and
the adapter branch attends from the new queries only.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from adaption_fx.capture.captured import CapturedModel, CaptureError
from adaption_fx.capture.export_model import (
    captured_from_graph_module,
    device_of,
    eager_outputs,
    export_program,
    graph_outputs,
)
from adaption_fx.capture.graph_cache import cache_entry
from adaption_fx.capture.hf_compat import CacheCall, cache_call, cache_tensors, dynamic_cache
from adaption_fx.capture.repeated import RepeatedLayers, capture_once_per_layer, same_outputs

logger = logging.getLogger(__name__)


def past_names(layer: int) -> tuple[str, str]:
    return f"past_{layer}_key", f"past_{layer}_value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present_{layer}_key", f"present_{layer}_value"


@dataclass(frozen=True)
class CacheLayout:
    """What the model's key/value cache holds, read from one eager run of the model.

    Attributes:
        shapes: per layer, the (key, value) shapes without batch and length:
            ((kv_heads, head_dim), (kv_heads, value_head_dim)).
        dtype: the cache dtype.
    """

    shapes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self.shapes)

    @property
    def past_inputs(self) -> list[str]:
        """The decode step's cache input names, in input order."""
        return [name for i in range(self.num_layers) for name in past_names(i)]

    @property
    def present_outputs(self) -> list[str]:
        """The decode step's cache output names, in the order of :attr:`past_inputs`."""
        return [name for i in range(self.num_layers) for name in present_names(i)]

    def empty(self, batch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Zero-length past tensors, in input order (the prefill's past)."""
        return self.filled(batch, 0, device)

    def filled(
        self, batch: int, length: int, device: torch.device | str = "cpu", fill: float = 0.0
    ) -> list[torch.Tensor]:
        tensors = []
        for key_shape, value_shape in self.shapes:
            for heads, dim in (key_shape, value_shape):
                tensors.append(
                    torch.full((batch, heads, length, dim), fill, dtype=self.dtype, device=device)
                )
        return tensors


@dataclass
class DecodeCapture:
    """The decode-step graph, how its inputs are laid out, and the longest sequence it takes.

    Attributes:
        captured: the graph and its binding (keyword inputs, dict output).
        layout: the cache tensors' shapes and dtype.
        max_length: the longest past + new length the graph was captured for.
    """

    captured: CapturedModel
    layout: CacheLayout
    max_length: int


def _cache_pairs(cache: object, owner: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    try:
        return cache_tensors(cache)
    except TypeError as exc:
        raise CaptureError(f"{owner}: {exc}") from None


def cache_layout(model: torch.nn.Module, call: CacheCall | None = None) -> CacheLayout:
    """Run the model once on two tokens and read the cache it returns."""
    call = call or cache_call(model)
    ids = torch.ones(1, 2, dtype=torch.long, device=device_of(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), **call.step_kwargs(None)
            )
    finally:
        model.train(was_training)
    cache = call.returned_cache(out)
    if cache is None:
        raise CaptureError(
            f"{type(model).__name__} returned no {call.argument} when asked for its cache"
        )
    pairs = _cache_pairs(cache, type(model).__name__)
    if not pairs or any(k is None or k.dim() != 4 or v.dim() != 4 for k, v in pairs):
        raise CaptureError(
            f"{type(model).__name__}'s cache does not hold (batch, heads, length, dim) tensors "
            "per layer; generation supports plain key/value caches"
        )
    shapes = tuple(((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])) for k, v in pairs)
    return CacheLayout(shapes=shapes, dtype=pairs[0][0].dtype)


@contextlib.contextmanager
def _decode_forward(model: torch.nn.Module, layout: CacheLayout, call: CacheCall) -> Iterator[None]:
    """Make ``model.forward`` the flat decode step for the duration of an export.

    The model is exported as itself (not wrapped) so that its parameters keep their own
    names, which the adapter tensors' keys are derived from. The instance attribute is
    removed afterwards, on success or failure. ``call`` names the installed release's
    cache argument.
    """
    hf_forward = type(model).forward
    n = layout.num_layers

    def forward(input_ids, attention_mask, position_ids, **past):
        # Tells export that the mask spans past + new, so no guard of its own bounds it.
        if n:
            torch._check(
                attention_mask.shape[1] == past[past_names(0)[0]].shape[2] + input_ids.shape[1]
            )
        cache = dynamic_cache([(past[past_names(i)[0]], past[past_names(i)[1]]) for i in range(n)])
        out = hf_forward(
            model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **call.step_kwargs(cache, last_logits_only=True),
        )
        logits = out.logits
        if not call.logits_to_keep:  # every position's logits were computed: keep the last
            logits = logits[:, -1:]
        result = {"logits": logits}
        returned = call.returned_cache(out)
        for i, (key, value) in enumerate(_cache_pairs(returned, type(model).__name__)):
            result[present_names(i)[0]] = key
            result[present_names(i)[1]] = value
        return result

    P = inspect.Parameter
    params = [
        P(name, P.POSITIONAL_OR_KEYWORD) for name in ("input_ids", "attention_mask", "position_ids")
    ]
    params.extend(P(name, P.KEYWORD_ONLY) for name in layout.past_inputs)

    def signature_forward(*args, **kwargs):
        return forward(*args, **kwargs)

    signature_forward.__signature__ = inspect.Signature(params)
    had = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    model.forward = signature_forward
    try:
        yield
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward


def capture_decode(
    model: torch.nn.Module, max_length: int, *, cache: bool = False
) -> DecodeCapture:
    """Capture ``model``'s decode step (see the module docstring).

    Args:
        model: a Hugging Face causal LM whose forward takes a key/value cache (as
            ``cache`` or ``past_key_values``: :func:`adaption_fx.capture.hf_compat.cache_call`).
        max_length: the longest past + new length the graph must take.
        cache: read the capture from, and write it to, the persistent graph cache.

    Raises:
        MissingArgumentError: (a TypeError) the forward lacks an argument the step needs;
            it names the argument and the installed transformers release.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 4:
        raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
    call = cache_call(model, "generation (a key/value cache decode step)")
    layout = cache_layout(model, call)
    device = device_of(model)
    # Sizes above 1 and all different, so export keeps each dimension symbolic.
    batch, new, past = 2, 3, 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2, (batch, new), generator=g).to(device)
    kwargs: dict[str, torch.Tensor] = {
        "input_ids": ids,
        "attention_mask": torch.ones(batch, past + new, dtype=torch.long, device=device),
        "position_ids": (torch.arange(new) + past).repeat(batch, 1).to(device),
    }
    b = torch.export.Dim("batch", max=1 << 16)
    s = torch.export.Dim("seq", max=max_length)
    p = torch.export.Dim("past", min=0, max=max_length - 1)
    dynamic: dict[str, object] = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: torch.export.Dim.AUTO},
        "position_ids": {0: b, 1: s},
    }
    example = layout.filled(batch, past, device, fill=0.01)
    for name, tensor in zip(layout.past_inputs, example, strict=True):
        kwargs[name] = tensor
        dynamic[name] = {0: b, 2: p}
    logger.info("capturing the decode step of %s", type(model).__name__)
    name = type(model).__name__

    def capture_with(step_layout: CacheLayout) -> CapturedModel:
        names = set(step_layout.past_inputs)
        step_kwargs = {k: v for k, v in kwargs.items() if k in _STEP_INPUTS or k in names}
        step_dynamic = {k: v for k, v in dynamic.items() if k in step_kwargs}
        with _decode_forward(model, step_layout, call):
            program = export_program(
                model, (), step_kwargs, step_dynamic, what="decode", cache=cache
            )
            graph_module = program.module()
        _drop_export_guards(graph_module)
        _skip_empty_concatenations(graph_module)
        captured = captured_from_graph_module(graph_module, name)
        captured.cache_entry = cache_entry(program)
        return captured

    def capture_one(layers: RepeatedLayers) -> CapturedModel:
        if len(set(layout.shapes)) != 1 or layout.num_layers != layers.count:
            raise CaptureError(
                f"the cache has {layout.num_layers} layers of shapes {layout.shapes}"
            )
        return capture_with(CacheLayout(shapes=layout.shapes[:1], dtype=layout.dtype))

    def grow_options(layers: RepeatedLayers) -> dict:
        return {
            "per_layer_inputs": {
                first: [past_names(i)[k] for i in range(layers.count)]
                for k, first in enumerate(past_names(0))
            },
            "in_spec": _input_spec(layout),
            "out_spec": _output_spec(layout),
        }

    def check(grown: CapturedModel) -> str | None:
        feed = _check_feed(layout, device)
        with _decode_forward(model, layout, call):
            expected = eager_outputs(model, feed)
        return same_outputs(graph_outputs(grown, feed), expected)

    captured = capture_once_per_layer(model, capture_one, check, grow_options)
    if captured is None:
        captured = capture_with(layout)
    captured.fill_attention_mask = False
    captured.validate = _checker(layout)
    return DecodeCapture(captured=captured, layout=layout, max_length=max_length)


_STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _input_spec(layout: CacheLayout) -> pytree.TreeSpec:
    names = [*_STEP_INPUTS, *layout.past_inputs]
    return pytree.tree_flatten(((), dict.fromkeys(names, 0)))[1]


def _output_spec(layout: CacheLayout) -> pytree.TreeSpec:
    return pytree.tree_flatten(dict.fromkeys(["logits", *layout.present_outputs], 0))[1]


def _check_feed(layout: CacheLayout, device: torch.device) -> dict[str, torch.Tensor]:
    """A decode step to check a grown capture on: two rows, a past of three, two new."""
    g = torch.Generator().manual_seed(1)
    batch, past, new = 2, 3, 2
    feed = {
        "input_ids": torch.randint(0, 2, (batch, new), generator=g).to(device),
        "attention_mask": torch.ones(batch, past + new, dtype=torch.long, device=device),
        "position_ids": (torch.arange(new) + past).repeat(batch, 1).to(device),
    }
    for name, tensor in zip(layout.past_inputs, layout.filled(batch, past, device), strict=True):
        feed[name] = torch.randn(tensor.shape, generator=g).to(tensor)
    return feed


def _drop_export_guards(graph_module: torch.fx.GraphModule) -> None:
    """Remove the input-shape guards torch.export put in front of the graph.

    Export traces as if every dynamic size were at least 2, so its guards demand a mask of
    length >= 4 (past >= 2 plus new >= 2), which would refuse a 1-token prompt and a
    1-token step on a 1-token past. The traced ops are valid for sizes 0 and 1 (the tests
    check past lengths 0, 1, 2 and new lengths 1 and 3 against the model's own cached
    forward); what the guards checked about the inputs is checked by :func:`_checker`.
    """
    graph = graph_module.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)
    if hasattr(graph_module, "_guards_fn"):
        delattr(graph_module, "_guards_fn")
    graph_module.recompile()


def _skip_empty_concatenations(graph_module: torch.fx.GraphModule) -> None:
    """Drop the empty tensor transformers' cache starts each layer with from ``cat``.

    ``DynamicCache`` begins a layer as ``torch.tensor([])`` and appends the given past with
    ``cat([empty, past])``, which copies the whole past in every step; ``cat`` skips empty
    1-d inputs, so the past itself is the same value without the copy.
    """
    graph = graph_module.graph
    for node in [n for n in graph.nodes if n.target == torch.ops.aten.cat.default]:
        inputs = node.args[0]
        kept = [
            a
            for a in inputs
            if not (
                isinstance(a, torch.fx.Node)
                and isinstance(a.meta.get("val"), torch.Tensor)
                and a.meta["val"].dim() == 1
                and a.meta["val"].shape[0] == 0
            )
        ]
        if len(kept) == len(inputs):
            continue
        if len(kept) == 1:
            node.replace_all_uses_with(kept[0])
            graph.erase_node(node)
        else:
            node.args = (kept, *node.args[1:])
    fresh = torch.ops.aten.lift_fresh_copy.default
    for node in reversed(list(graph.nodes)):
        # The empty tensors, now unused but for an in-place detach of their own.
        if node.op != "call_function" or node.users:
            continue
        if node.target == fresh or (
            node.target == torch.ops.aten.detach_.default and node.args[0].target == fresh
        ):
            graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        value = getattr(graph_module, node.target, None)
        if isinstance(value, torch.Tensor) and value.numel() == 0:  # the empty tensors
            graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == node.target for n in graph.nodes):
                delattr(graph_module, node.target)
    graph.lint()
    graph_module.recompile()


def _checker(layout: CacheLayout):
    names = layout.past_inputs
    shapes = [shape for pair in layout.shapes for shape in pair]

    def validate(named: dict) -> None:
        ids, mask, positions = named["input_ids"], named["attention_mask"], named["position_ids"]
        batch, new = ids.shape
        past = named[names[0]].shape[2] if names else 0
        if tuple(positions.shape) != (batch, new):
            raise ValueError(
                f"position_ids has shape {tuple(positions.shape)}; expected {(batch, new)}"
            )
        if tuple(mask.shape) != (batch, past + new):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; expected (batch, past + new) "
                f"= {(batch, past + new)}"
            )
        for name, (heads, dim) in zip(names, shapes, strict=True):
            tensor = named[name]
            if tuple(tensor.shape) != (batch, heads, past, dim):
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}; expected "
                    f"{(batch, heads, past, dim)} (batch, kv heads, past length, head dim)"
                )
            if tensor.dtype != layout.dtype:
                raise TypeError(f"{name} has dtype {tensor.dtype}; expected {layout.dtype}")

    return validate
