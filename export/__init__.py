"""Serving the rewritten graph: torch.compile, ONNX export, and an ONNX Runtime runner."""

from adaption_fx.export.compile import CompiledModel, compile
from adaption_fx.export.onnx import dequantized_weights, to_onnx
from adaption_fx.export.onnx.metadata import OnnxFileError
from adaption_fx.export.ort import OrtModel

__all__ = [
    "CompiledModel",
    "OnnxFileError",
    "OrtModel",
    "compile",
    "dequantized_weights",
    "to_onnx",
]
