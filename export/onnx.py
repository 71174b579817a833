"""Export an AdaptedModel's graph to ONNX (dynamic batch and sequence) for ONNX Runtime.

The exported graph is the one the model runs now: the active adapter's rewritten graph,
folded for inference by default, or the base graph while adapters are disabled. With
``adapter_as_inputs=True`` the adapter tensors are graph inputs, so one file serves every
adapter of the same structure. A small companion file (``<name>.adapter.onnx``) then maps a
checkpoint's prompts and gates to those inputs, so ONNX Runtime can load an adapter
directory without PyTorch weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from adaption_fx.model import AdaptedModel
from adaption_fx.passes.fold import adapter_projection, fold_adapter_kv
from adaption_fx.passes.insert import AdaptionGraph

logger = logging.getLogger(__name__)

METADATA_KEY = "adaption_fx"
PROJECTION_SUFFIX = ".adapter.onnx"


class _FlatCall(torch.nn.Module):
    """Calls a flat graph with tensor inputs positionally, filling captured constants."""

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        layout: list[tuple[str, Any]],
        buffers: dict[str, torch.Tensor],
    ):
        super().__init__()
        self.graph_module = graph_module
        self.layout = layout
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.buffer_names = list(buffers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(inputs)
        flat = [next(it) if kind == "input" else value for kind, value in self.layout]
        rest = list(it)
        rest.extend(getattr(self, name) for name in self.buffer_names)
        return tuple(self.graph_module(*flat, *rest))


@dataclass
class _Plan:
    graph_module: torch.fx.GraphModule
    adapter_inputs: list[str]
    adapter_values: dict[str, torch.Tensor]
    baked: dict[str, torch.Tensor]
    folded: bool
    adapter: dict[str, Any] | None
    source: AdaptionGraph | None = None  # the adapter's rewritten graph, before folding
    source_tensors: list[torch.Tensor] | None = None  # its prompts and gates, in input order

    @property
    def raw_inputs(self) -> list[str]:
        return list(self.source.adapter_inputs) if self.source is not None else []


def _plan(
    model: AdaptedModel, adapter_name: str | None, adapter_as_inputs: bool, fold: bool
) -> _Plan:
    disabled = adapter_name is None and (not model.adapters_enabled or not model.active_adapter)
    if disabled:
        if adapter_as_inputs:
            raise ValueError("adapter_as_inputs=True needs an adapter; adapters are disabled")
        return _Plan(model.base_graph_module, [], {}, {}, False, None)
    name = model.active_adapter if adapter_name is None else adapter_name
    graph = model.adaption_graph(name)
    tensors = [t.detach() for t in model.adapter_tensors(name)]
    adapter = {"name": name, **model.adapters[name].to_dict()}
    if fold:
        folded = fold_adapter_kv(graph, tensors, as_inputs=adapter_as_inputs)
        values = {k: folded.values[k] for k in folded.adapter_inputs}
        inputs = list(folded.adapter_inputs)
        return _Plan(folded.graph_module, inputs, values, {}, True, adapter, graph, tensors)
    named = dict(zip(graph.adapter_inputs, tensors, strict=True))
    if adapter_as_inputs:
        return _Plan(graph.graph_module, list(named), named, {}, False, adapter, graph, tensors)
    baked = {k.replace(".", "_"): v for k, v in named.items()}
    return _Plan(graph.graph_module, [], {}, baked, False, adapter, graph, tensors)


def _concrete(example: torch.Tensor) -> torch.Tensor:
    # Placeholder metadata holds fake tensors with symbolic sizes; export needs real ones.
    shape = [d if isinstance(d, int) else int(d.node.hint) for d in example.shape]
    if example.dtype.is_floating_point:
        return torch.randn(shape, dtype=example.dtype)
    return torch.ones(shape, dtype=example.dtype)


def _model_inputs(model: AdaptedModel, example_inputs: dict[str, torch.Tensor] | None):
    captured = model.captured
    if captured.in_spec is None or captured.positional_count:
        raise ValueError(
            "to_onnx supports models captured with keyword inputs (Hugging Face causal LMs "
            "and keyword example_inputs)"
        )
    layout: list[tuple[str, Any]] = []
    names: list[str] = []
    examples: list[torch.Tensor] = []
    for name in captured.keyword_names:
        if name in captured.defaults:
            layout.append(("const", captured.defaults[name]))
            continue
        example = (example_inputs or {}).get(name)
        if example is None:
            fake = captured.examples.get(name)
            if fake is None:
                raise ValueError(f"no example for input {name!r}; pass example_inputs")
            example = _concrete(fake)
        layout.append(("input", None))
        names.append(name)
        examples.append(example)
    return layout, names, examples


def _dynamic_shapes(
    names: list[str], examples: list[torch.Tensor], hf: bool, decode: bool = False
) -> list[Any]:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    specs: list[Any] = []
    if decode:
        # The mask spans past + new: its length is left for export to relate to the others.
        past = torch.export.Dim("past")
        for name in names:
            if name in ("input_ids", "position_ids"):
                specs.append({0: batch, 1: seq})
            elif name == "attention_mask":
                specs.append({0: batch, 1: torch.export.Dim.AUTO})
            else:
                specs.append({0: batch, 2: past})
        return specs
    for name, example in zip(names, examples, strict=True):
        if hf and name in ("input_ids", "attention_mask"):
            specs.append({0: batch, 1: seq})
        else:
            specs.append({d: torch.export.Dim.AUTO for d in range(min(example.dim(), 2))})
    return specs


def _output_names(model: AdaptedModel, count: int) -> list[str]:
    spec = model.captured.out_spec
    context = getattr(spec, "context", None)
    if (
        isinstance(context, (list, tuple))
        and len(context) == count
        and all(isinstance(c, str) for c in context)
    ):
        return list(context)
    return [f"output_{i}" for i in range(count)]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notices that say nothing about this export.

    It logs that torchvision is missing (its ops are irrelevant here) and warns that named
    axes were renamed; it reports real problems by raising, which passes through.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
            yield
    finally:
        registration.setLevel(level)


def _export(
    module: torch.nn.Module,
    args: tuple,
    *,
    input_names: list[str],
    output_names: list[str] | None,
    dynamic_shapes: Any,
    opset: int | None,
):
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with _quiet_exporter():
        return torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            **kwargs,
        )


def to_onnx(
    model: AdaptedModel,
    path: str | os.PathLike,
    *,
    adapter_as_inputs: bool = False,
    fold: bool = True,
    opset: int | None = None,
    adapter_name: str | None = None,
    external_data: bool | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    for_generation: bool = False,
) -> Path:
    """Export the graph ``model`` runs now to an ONNX file.

    Args:
        model: the AdaptedModel. Its active adapter is exported (or ``adapter_name``); with
            adapters disabled, the base graph.
        path: the ``.onnx`` file to write. Files are written in a temporary directory and
            moved into place, so a failed export leaves no partial file at ``path``.
        adapter_as_inputs: make the adapter tensors graph inputs (folded key/value/gate when
            ``fold``; raw prompts and gates otherwise), so one file serves every adapter of
            this structure. A ``<name>.adapter.onnx`` companion maps a checkpoint's prompts
            and gates to the folded inputs (see ``OrtModel.set_adapter_weights``).
        fold: precompute the adapter keys/values (see ``passes.fold``); no prompt
            projection is left in the graph.
        opset: ONNX opset (default: the exporter's).
        external_data: store weights in ``<name>.onnx.data``. None: only when the model
            would exceed protobuf's 2 GB limit.
        example_inputs: concrete inputs for the export trace (built from the capture's
            metadata when omitted).
        for_generation: export the decode step instead (``model.decoder()``): inputs
            ``input_ids``, ``attention_mask`` (past + new), ``position_ids`` and
            ``past_<i>_key``/``past_<i>_value``; outputs ``logits`` (last token) and
            ``present_<i>_key``/``present_<i>_value``. Batch, new length and past length
            are dynamic, so the file serves prefill (past length 0) and every step; run it
            with ``OrtModel.generate``. The source model's generation defaults
            (``AdaptedModel.default_token_ids``: eos and pad ids) are stored with it, as
            ``eos_token_id`` and ``pad_token_id`` in the metadata's ``generation`` entry.

    Returns:
        The path written. The file is checked with ``onnx.checker``; batch and sequence
        axes are dynamic; its metadata (key ``adaption_fx``) describes the inputs.
    """
    import onnx

    if not isinstance(model, AdaptedModel):
        raise TypeError(f"to_onnx expects an AdaptedModel, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    if not isinstance(for_generation, bool):
        raise TypeError(f"for_generation must be a bool, got {for_generation!r}")
    model.captured.check_placement()
    # Read from the model the caller holds, not from the decode-step twin below: the twin
    # has no source model to read them from.
    eos_token_id, pad_token_id = model.default_token_ids
    if for_generation:
        model = model.decoder()
    plan = _plan(model, adapter_name, adapter_as_inputs, fold)
    layout, names, examples = _model_inputs(model, example_inputs)
    wrapper = _FlatCall(plan.graph_module, layout, plan.baked)
    # Only the top module's flag: .eval() would recurse into submodules shared with the
    # user's model. The ATen graph does not read training flags; the exporter checks it.
    wrapper.training = False
    adapter_examples = [plan.adapter_values[k] for k in plan.adapter_inputs]
    with torch.no_grad():
        n_out = len(wrapper(*examples, *adapter_examples))
    output_names = _output_names(model, n_out)
    hf = model.captured.fill_attention_mask
    dynamic = _dynamic_shapes(names, examples, hf, decode=for_generation)
    dynamic += [None] * len(adapter_examples)
    logger.info("exporting %s to %s", plan.adapter["name"] if plan.adapter else "base", path)
    program = _export(
        wrapper,
        tuple(examples + adapter_examples),
        input_names=names + plan.adapter_inputs,
        output_names=output_names,
        dynamic_shapes=(tuple(dynamic),),  # forward(*inputs): one varargs argument
        opset=opset,
    )
    projection_name = None
    projection = None
    if adapter_as_inputs and plan.folded:
        proj_module, proj_outputs = adapter_projection(plan.source)
        proj_module.training = False
        projection = _export(
            proj_module,
            tuple(plan.source_tensors),
            input_names=plan.raw_inputs,
            output_names=list(proj_outputs),
            dynamic_shapes=None,
            opset=opset,
        )
        projection_name = path.stem + PROJECTION_SUFFIX
    metadata = {
        "format": 1,
        "model_inputs": names,
        "outputs": output_names,
        "adapter_inputs": plan.adapter_inputs,
        "adapter_shapes": {k: list(v.shape) for k, v in plan.adapter_values.items()},
        "folded": plan.folded,
        "adapter": plan.adapter,
        "raw_adapter_inputs": plan.raw_inputs,
        "projection": projection_name,
    }
    if for_generation:
        cache = model.cache_layout
        metadata["generation"] = {
            "max_length": model.max_length,
            "past_inputs": cache.past_inputs,
            "present_outputs": cache.present_outputs,
            "cache_shapes": [list(shape) for pair in cache.shapes for shape in pair],
            "cache_dtype": str(cache.dtype).removeprefix("torch."),
            # OrtModel.generate's defaults (an int, a list or null); OrtModel reads a file
            # written before these keys as having none.
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        }
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        program.save(str(tmp / path.name), external_data=external_data)
        if projection is not None:
            projection.save(str(tmp / projection_name))
        onnx.checker.check_model(str(tmp / path.name))
        # Companions first, the main file last: a reader never sees a new .onnx without
        # the files it refers to.
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
