"""Writing an ONNX model to disk: streamed protobuf for large models, external data above
ONNX's 2 GB limit, atomically (temporary file, then rename)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx

from adaption_fx.export.onnx.translate import wraps_torch_tensor

logger = logging.getLogger(__name__)


# Bytes of weights above which torch.onnx writes external data (ONNXProgram.save's rule).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


def save_onnx(model: Any, path: Path, external_data: bool | None) -> None:
    from onnxscript import ir

    if external_data is None:
        size = sum(
            v.const_value.nbytes
            for v in model.graph.initializers.values()
            if v.const_value is not None
        )
        external_data = size > EXTERNAL_DATA_THRESHOLD
    if external_data:
        ir.save(model, path, external_data=path.name + ".data")
    elif not write_streamed(model, path):
        ir.save(model, path)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Protobuf keys (field number << 3 | 2, length-delimited): ModelProto.graph,
# GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = b"\x3a", b"\x2a", b"\x4a"


def write_streamed(model: Any, path: Path) -> bool:
    """Write ``model`` as one .onnx file, its weights copied from their tensors straight
    into the file; False (nothing written) where a weight is not plain numbers.

    ``onnx_ir.save`` builds the whole ModelProto in memory (each weight copied into it) and
    serialises that (copied again): most of the save time for a 500 MB model. Here the
    model is serialised without its initializers, and the graph message is written as that
    graph's fields followed by one ``initializer`` entry per weight: a TensorProto header
    (name, type, dims) and its ``raw_data``. Field order is free in protobuf, so this is
    the same message, and what ``onnx.load`` reads back equals the model.
    """
    import onnx
    from onnxscript import ir

    graph = model.graph
    values = list(graph.initializers.values())
    if sys.byteorder != "little" or any(
        v.const_value is None or v.const_value.dtype == ir.DataType.STRING for v in values
    ):
        return False
    graph.initializers.clear()
    try:
        proto = ir.to_proto(model)
    finally:
        for value in values:
            graph.initializers.add(value)
    graph_fields = proto.graph.SerializeToString()
    proto.ClearField("graph")

    def data(tensor: Any) -> Any:
        if wraps_torch_tensor(tensor):  # its memory as bytes, copied if strided
            raw = tensor.raw.detach().cpu().contiguous()
            return raw.reshape(-1).view(torch.uint8).numpy() if raw.numel() else b""
        return tensor.tobytes()

    entries = []  # (value, header, raw_data if already made, raw_data size)
    for value in values:
        tensor = value.const_value
        if wraps_torch_tensor(tensor):
            made, size = None, tensor.raw.numel() * tensor.raw.element_size()
        else:
            made = data(tensor)
            size = len(made)
        header = onnx.TensorProto(
            name=value.name, data_type=tensor.dtype.value, dims=[int(d) for d in tensor.shape]
        ).SerializeToString()
        entries.append((value, header + _TENSOR_RAW_DATA + _varint(size), made, size))
    lengths = [len(header) + size for _, header, _, size in entries]
    graph_size = len(graph_fields) + sum(
        len(_GRAPH_INITIALIZER) + len(_varint(length)) + length for length in lengths
    )
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
        handle.write(_MODEL_GRAPH + _varint(graph_size))
        handle.write(graph_fields)
        for (value, header, made, size), length in zip(entries, lengths, strict=True):
            raw_data = data(value.const_value) if made is None else made
            if len(memoryview(raw_data).cast("B")) != size:
                raise RuntimeError(f"{value.name}: {size} bytes expected")
            handle.write(_GRAPH_INITIALIZER + _varint(length))
            handle.write(header)
            handle.write(raw_data)
    return True
