"""Export an AdaptedModel's graph to ONNX (dynamic batch and sequence) for ONNX Runtime.

The exported graph is the one the model runs now: the active adapter's rewritten graph,
folded for inference by default, or the base graph while adapters are disabled. With
``adapter_as_inputs=True`` the adapter tensors are graph inputs, so one file serves every
adapter of the same structure. A small companion file (``<name>.adapter.onnx``) then maps a
checkpoint's prompts and gates to those inputs, so ONNX Runtime can load an adapter
directory without PyTorch weights.

With ``mixed_batch=True`` the file is the mixed-batch graph (``passes/mixed_batch.py``):
each batch row picks its adapter from tables that are inputs too, so one file serves a
batch mixing any adapters (and the base model) whose layers it covers. Its companion
projects prompts, zero-padded to the file's ``mixed_max_adapter_len``, at every covered
layer: the key and value paths work token by token (the prompt gets no positional
encoding), so the first ``adapter_len`` keys and values of a padded prompt are those of
the prompt itself, and one projection serves adapters of every length and layer set.
Gates need no projection: the reader applies the checkpoint's gate activation and repeats
a scalar gate per head.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx

from adaption_fx.export.onnx.plan import (
    ADAPTER_KEYS_DIM,
    ADAPTERS_DIM,
    BATCH_DIM,
    METADATA_KEY,
    PROJECTION_SUFFIX,
    ExportPlan,
    FlatCall,
    dynamic_input_shapes,
    example_model_inputs,
    export_plan,
    graph_output_names,
    mixed_metadata,
    mixed_settings,
    plan_mixed_export,
)
from adaption_fx.export.onnx.progress import ExportStages
from adaption_fx.export.onnx.protobuf import save_onnx
from adaption_fx.export.onnx.quantize import ACCURACY_LEVELS, WEIGHT_FORMATS, quantize_weights
from adaption_fx.export.onnx.translate import onnx_model_of
from adaption_fx.model.adapted import AdaptedModel
from adaption_fx.passes.fold import adapter_projection

logger = logging.getLogger(__name__)


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
    mixed_batch: bool = False,
    mixed_max_adapter_len: int | None = None,
    mixed_adapter_layers: int | None = None,
    progress: bool | None = None,
    weights: str = "fp32",
    gguf_file: str | os.PathLike | None = None,
    accuracy_level: int = 4,
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
        opset: ONNX opset. Default 23, whose ``Attention``, ``RMSNormalization`` and
            ``RotaryEmbedding`` ops replace the written-out attention, norms and rotary
            embeddings where the graph has Hugging Face's forms of them (see
            ``export/onnx/fuse.py``); needs ONNX Runtime >= 1.23. Below 23 every op is
            written out.
        external_data: store weights in ``<name>.onnx.data``. None: only when the model
            would exceed protobuf's 2 GB limit.
        example_inputs: concrete inputs for the export trace (built from the capture's
            metadata when omitted).
        for_generation: export the decode step instead (``model.decoder()``): inputs
            ``input_ids``, ``attention_mask`` (past + new), ``position_ids`` and
            ``past_<i>_key``/``past_<i>_value``; outputs ``logits`` (last token) and
            ``present_<i>_key``/``present_<i>_value``. Batch, new length and past length
            are dynamic, so the file serves prefill (past length 0) and every step; run it
            with ``OrtModel.generate``. The source model's generation defaults are
            stored with it, in the metadata's ``generation`` entry: ``eos_token_id`` and
            ``pad_token_id`` (``AdaptedModel.default_token_ids``) and ``config`` (its
            ``generation_config``, as ``to_diff_dict()``).
        mixed_batch: export the mixed-batch graph (``AdaptedModel.mixed_graph``, of the
            masked capture; of ``model.decoder()`` with ``for_generation``), in which each
            batch row uses its own adapter. Needs ``adapter_as_inputs=True`` and ``fold``
            (the graph always takes folded tables). After the model inputs the file takes
            ``adapter_rows`` (batch,) int64, ``adapter_key_mask`` (adapters, adapter_keys)
            and per adapted site the stacked folded key (adapters, kv_heads, adapter_keys,
            head_dim), value and activated gate (adapters, heads) (see
            ``passes/mixed_batch.py``); ``adapters`` and ``adapter_keys`` are dynamic axes
            of their own, so any number of adapters of any length up to the file's fits
            without a new export. ``OrtModel`` builds these inputs from its table of named
            adapters (``set_adapter_weights(source, adapter_name=...)``,
            ``adapter_names=[...]`` per call). The ``<name>.adapter.onnx`` companion
            projects prompts of ``mixed_max_adapter_len`` tokens at every covered site to
            their keys and values, so checkpoint directories load without PyTorch
            weights. Which adapter is active, and whether adapters are enabled, does not
            matter here. The metadata's ``mixed_batch`` entry describes the tables.
        mixed_max_adapter_len: the longest prompt a checkpoint directory loaded into the
            file may have (default: the longest of the model's adapters). Adapters given
            as AdaptedModels or folded arrays may be longer.
        mixed_adapter_layers: the top layers the file covers (default: the most any of
            the model's adapters adapts); adapters adapting more layers cannot be loaded.
        progress: show a tqdm bar over the export's stages. None: only on a terminal.
        weights: "fp32" (the weights as the model holds them), "int8" or "int4": every
            matmul on a base-model weight (attention and MLP projections, the output
            projection or tied embedding) becomes ONNX Runtime's ``MatMulNBits`` on blocks
            of 32 weights, and the token embedding a gather of the same blocks
            (``export/onnx/quantize.py``). Adapter tensors (prompts, gates, folded keys
            and values) stay fp32, baked in or inputs; ``adapter_as_inputs`` and
            ``mixed_batch`` work as with fp32, and their projection companion stays fp32.
            The metadata's ``weights`` entry names each weight's scheme (and, where it
            was quantized here, its error).
        gguf_file: the GGUF file the model was loaded from. With int4/int8, a weight
            whose rows equal the dequantized rows of one of its Q4_0, Q4_1 or Q8_0
            tensors bit for bit carries that tensor's own blocks (in their own width:
            a Q8_0 embedding stays 8-bit in an int4 file) instead of being quantized
            again; other weights are quantized with ONNX Runtime's block quantizer.
        accuracy_level: MatMulNBits' accuracy level for int4/int8 files: 4 (default)
            quantizes activations to int8 inside the matmul, ONNX Runtime's fast CPU
            path and what llama.cpp does; 0 keeps them fp32.

    Returns:
        The path written. The file is checked with ``onnx.checker``; batch and sequence
        axes are dynamic; its metadata (key ``adaption_fx``) describes the inputs.
    """
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"to_onnx expects an AdaptedModel, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    if not isinstance(for_generation, bool):
        raise TypeError(f"for_generation must be a bool, got {for_generation!r}")
    if not isinstance(mixed_batch, bool):
        raise TypeError(f"mixed_batch must be a bool, got {mixed_batch!r}")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {list(WEIGHT_FORMATS)}, got {weights!r}")
    if weights == "fp32" and gguf_file is not None:
        raise ValueError("gguf_file applies to weights='int4' or 'int8' only")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(
            f"accuracy_level must be one of {list(ACCURACY_LEVELS)}, got {accuracy_level!r}"
        )
    if gguf_file is not None and not Path(gguf_file).is_file():
        raise FileNotFoundError(f"gguf_file {str(gguf_file)!r} does not exist")
    settings = None
    if mixed_batch:
        if not adapter_as_inputs:
            raise ValueError(
                "mixed_batch=True needs adapter_as_inputs=True: the adapters' tables are "
                "inputs of the file"
            )
        if not fold:
            raise ValueError(
                "mixed_batch=True exports folded adapter tables (keys, values and gates); "
                "fold=False is not supported with it"
            )
        if adapter_name is not None:
            raise ValueError(
                "adapter_name picks the one adapter to export; a mixed_batch file serves "
                "every adapter (OrtModel.set_adapter_weights(..., adapter_name=...), then "
                "adapter_names=[...] per call)"
            )
        settings = mixed_settings(model, mixed_max_adapter_len, mixed_adapter_layers)
    elif mixed_max_adapter_len is not None or mixed_adapter_layers is not None:
        raise ValueError(
            "mixed_max_adapter_len and mixed_adapter_layers apply to mixed_batch=True only"
        )
    model.captured.check_placement()
    # Read from the model the caller holds, not from the decode-step twin below: the twin
    # has no source model to read them from.
    eos_token_id, pad_token_id = model.default_token_ids
    generation_config = getattr(model.source_model, "generation_config", None)
    projecting = adapter_as_inputs and fold
    stages = ExportStages(
        ["capture the decode step"] * for_generation
        + ["prepare the graph", "translate to ONNX"]
        + ["export the adapter projection"] * projecting
        + [f"quantize weights to {weights}"] * (weights != "fp32")
        + ["save", "check"],
        progress,
    )
    finished = False
    try:
        path = _write(
            model,
            path,
            stages,
            adapter_as_inputs=adapter_as_inputs,
            fold=fold,
            opset=opset,
            adapter_name=adapter_name,
            external_data=external_data,
            example_inputs=example_inputs,
            for_generation=for_generation,
            token_ids=(eos_token_id, pad_token_id),
            generation_config=(
                generation_config.to_diff_dict() if generation_config is not None else None
            ),
            mixed=settings,
            quantization=(weights, gguf_file, accuracy_level),
        )
        finished = True
    finally:
        stages.close(finished)
    return path


def _write(
    model: AdaptedModel,
    path: Path,
    stage: Callable[[str], None],
    *,
    adapter_as_inputs: bool,
    fold: bool,
    opset: int | None,
    adapter_name: str | None,
    external_data: bool | None,
    example_inputs: dict[str, torch.Tensor] | None,
    for_generation: bool,
    token_ids: tuple[Any, Any],
    generation_config: dict[str, Any] | None = None,
    mixed: tuple[int, int] | None = None,
    quantization: tuple[str, Any, int] = ("fp32", None, 4),
) -> Path:
    """``mixed``: (max_adapter_len, adapter_layers) of a mixed-batch export, else None;
    ``quantization``: (weights, gguf_file, accuracy_level)."""
    import onnx

    eos_token_id, pad_token_id = token_ids
    if for_generation:
        stage("capture the decode step")
        model = model.decoder()
    stage("prepare the graph")
    layout, names, examples = example_model_inputs(model, example_inputs)
    mixed_plan = None
    input_dims = None
    if mixed is not None:
        mixed_plan = plan_mixed_export(model, *mixed, examples)
        table = mixed_plan.graph.table_inputs
        plan = ExportPlan(
            mixed_plan.graph.graph_module,
            list(table),
            dict(zip(table, mixed_plan.examples, strict=True)),
            {},
            True,
            None,
        )
        input_dims = mixed_plan.input_dims
    else:
        plan = export_plan(model, adapter_name, adapter_as_inputs, fold)
    wrapper = FlatCall(plan.graph_module, layout, plan.baked, input_dims)
    # Only the top module's flag: .eval() would recurse into submodules shared with the
    # user's model. The ATen graph does not read training flags; the exporter checks it.
    wrapper.training = False
    adapter_examples = [plan.adapter_values[k] for k in plan.adapter_inputs]
    with torch.no_grad():
        n_out = len(wrapper(*examples, *adapter_examples))
    output_names = graph_output_names(model, n_out)
    hf = model.captured.fill_attention_mask
    dynamic = dynamic_input_shapes(names, examples, hf, decode=for_generation)
    if input_dims is None:
        dynamic += [None] * len(adapter_examples)
    else:
        # The rows share the model inputs' batch Dim (the same object); the table sizes
        # get Dims of their own.
        batch = next((spec[0] for spec in dynamic if spec and 0 in spec), torch.export.Dim.AUTO)
        dims = {
            BATCH_DIM: batch,
            ADAPTERS_DIM: torch.export.Dim(ADAPTERS_DIM),
            ADAPTER_KEYS_DIM: torch.export.Dim(ADAPTER_KEYS_DIM),
        }
        dynamic += [{axis: dims[name] for axis, name in d.items()} for d in input_dims]
    what = "mixed batch" if mixed_plan else plan.adapter["name"] if plan.adapter else "base"
    logger.info("exporting %s to %s", what, path)
    stage("translate to ONNX")
    onnx_model = onnx_model_of(
        wrapper,
        tuple(examples + adapter_examples),
        input_names=names + plan.adapter_inputs,
        output_names=output_names,
        dynamic_shapes=(tuple(dynamic),),  # forward(*inputs): one varargs argument
        opset=opset,
    )
    projection_name = None
    projection = None
    if mixed_plan is not None:
        stage("export the adapter projection")
        mixed_plan.projection.training = False
        projection = onnx_model_of(
            mixed_plan.projection,
            tuple(mixed_plan.projection_examples),
            input_names=mixed_plan.projection_inputs,
            output_names=mixed_plan.projection_outputs,
            dynamic_shapes=None,
            opset=opset,
        )
        projection_name = path.stem + PROJECTION_SUFFIX
    elif adapter_as_inputs and plan.folded:
        stage("export the adapter projection")
        proj_module, proj_outputs = adapter_projection(plan.source)
        proj_module.training = False
        projection = onnx_model_of(
            proj_module,
            tuple(plan.source_tensors),
            input_names=plan.raw_inputs,
            output_names=list(proj_outputs),
            dynamic_shapes=None,
            opset=opset,
        )
        projection_name = path.stem + PROJECTION_SUFFIX
    if input_dims is None:
        shapes = {k: list(v.shape) for k, v in plan.adapter_values.items()}
    else:  # dynamic axes by name
        shapes = {
            k: [d.get(axis, size) for axis, size in enumerate(v.shape)]
            for (k, v), d in zip(plan.adapter_values.items(), input_dims, strict=True)
        }
    metadata = {
        "format": 1,
        "model_inputs": names,
        "outputs": output_names,
        "adapter_inputs": plan.adapter_inputs,
        "adapter_shapes": shapes,
        "folded": plan.folded,
        "adapter": plan.adapter,
        "raw_adapter_inputs": plan.raw_inputs,
        "projection": projection_name,
    }
    if mixed_plan is not None:
        metadata["mixed_batch"] = mixed_metadata(model, mixed_plan, projection_name)
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
            # The source model's generation config (what generate's options left out
            # default to); a file without it runs Hugging Face's global defaults.
            "config": generation_config,
        }
    weights, gguf_file, accuracy_level = quantization
    if weights != "fp32":
        stage(f"quantize weights to {weights}")
        base = {
            name: tensor.detach().to(torch.float32).numpy()
            for name, tensor in model.captured.graph_module.state_dict().items()
            if tensor.dim() == 2 and tensor.is_floating_point()
        }
        report = quantize_weights(
            onnx_model,
            base,
            weights,
            gguf_file=None if gguf_file is None else str(gguf_file),
            accuracy_level=accuracy_level,
        )
        metadata["weights"] = report.metadata()
    onnx_model.metadata_props[METADATA_KEY] = json.dumps(metadata)

    stage("save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_onnx(onnx_model, tmp / path.name, external_data)
        if projection is not None:
            save_onnx(projection, tmp / projection_name, None)
        stage("check")
        # By path: the checker reads the file itself (and any external data beside it).
        onnx.checker.check_model(str(tmp / path.name))
        # Companions first, the main file last: a reader never sees a new .onnx without
        # the files it refers to.
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
