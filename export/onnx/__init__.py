"""ONNX export for ONNX Runtime: ``to_onnx`` (:mod:`~adaption_fx.export.onnx.exporter`).

- :mod:`~adaption_fx.export.onnx.exporter`: ``to_onnx``, the entry point;
- :mod:`~adaption_fx.export.onnx.plan`: what a file holds (graph, inputs, outputs, metadata);
- :mod:`~adaption_fx.export.onnx.metadata`: reading a file's metadata back, every field
  checked against its bounds and the graph (``OnnxFileError``);
- :mod:`~adaption_fx.export.onnx.translate`: FX to ONNX (all private ``torch.onnx`` use);
- :mod:`~adaption_fx.export.onnx.quantize`: int4/int8 weights (``MatMulNBits``), and
  ``dequantized_weights`` to read them back;
- :mod:`~adaption_fx.export.onnx.blocks`: block-quantized weights, from a GGUF file's own
  blocks or ONNX Runtime's quantizer;
- :mod:`~adaption_fx.export.onnx.protobuf`: writing the file;
- :mod:`~adaption_fx.export.onnx.progress`: the progress bar.
"""

from adaption_fx.export.onnx.exporter import to_onnx
from adaption_fx.export.onnx.quantize import dequantized_weights

__all__ = ["dequantized_weights", "to_onnx"]
