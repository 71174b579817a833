"""Quantized weights in an exported ONNX graph: the base model's large matmuls to ONNX
Runtime's ``MatMulNBits``, its embedding gathers to a gather of the same blocks.

Precondition: ``graph`` is ``to_onnx``'s translated graph (onnx_ir), its linear weights
initializers holding MatMul's B (K, N), either the weight's transpose or a ``Transpose`` of
an initializer (a tied output projection), and the token embedding a ``Gather`` on an
initializer. Which initializers are the base model's weights is decided by value: a weight
is quantized only where it equals one of ``base_weights`` (the source model's frozen 2-D
parameters), so adapter tensors (prompts, gates, folded keys and values, baked in or
inputs) stay in full precision whatever their shape.

Postcondition: every matched MatMul is a ``com.microsoft.MatMulNBits`` node (block 32) on
the weight's blocks, plus, for GGUF Q4_1 blocks, ``blocksum(x) @ m`` (llama.cpp's own split
of a Q4_1 dot product: exact weights with no fractional zero point); every matched Gather
dequantizes only the rows it gathers. A tied embedding and output projection share one set
of blocks. Nothing else changes; the result maps each quantized weight to its scheme.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaption_fx.export.onnx.blocks import (
    BLOCK,
    BlockWeight,
    GgufBlocks,
    quantize_block_weight,
    unpack_nibbles,
)

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "int8", "int4")
MS_DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class QuantizedWeights:
    """What :func:`quantize_weights` did: per base weight name, its scheme and error."""

    weights: str
    accuracy_level: int
    gguf_file: str | None
    schemes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "format": self.weights,
            "block_size": BLOCK,
            "accuracy_level": self.accuracy_level,
            "gguf_file": self.gguf_file,
            "schemes": self.schemes,
        }


def _digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(array.tobytes(), digest_size=16).digest() + repr(array.shape).encode()


class _Blocks:
    """Blocks per base weight, made once: a tied weight's MatMul and Gather share them,
    and so do their initializers (made only for weights that are not stacked)."""

    def __init__(self, gguf: GgufBlocks | None, report: QuantizedWeights):
        self.gguf = gguf
        self.report = report
        self._made: dict[str, BlockWeight] = {}
        self._values: dict[str, dict[str, Any]] = {}

    def values(self, name: str) -> dict[str, Any]:
        """The initializers of the blocks :meth:`get` made for ``name``."""
        if name not in self._values:
            self._values[name] = block_values(name.replace(".", "_"), self._made[name])
        return self._values[name]

    def get(self, name: str, weight: np.ndarray, bits: int, why: str | None = None) -> BlockWeight:
        """Blocks of ``weight`` (N, K) (cached); ``bits`` for a weight quantized here
        (``why``: the reason it is not the file's)."""
        if name in self._made:
            return self._made[name]
        found = self.gguf.find(weight) if self.gguf is not None else None
        if found is not None:
            tensor, blocks = found
            entry: dict[str, Any] = {"scheme": blocks.scheme, "gguf_tensor": tensor}
        else:
            if self.gguf is not None:
                logger.warning(
                    "%s: no GGUF tensor of %s dequantizes to it; quantizing it to int%d",
                    name,
                    self.gguf.path.name,
                    bits,
                )
            blocks = quantize_block_weight(weight, bits)
            error = np.abs(blocks.dequantize() - weight)
            entry = {
                "scheme": blocks.scheme,
                "max_abs_error": float(error.max()),
                "max_abs_weight": float(np.abs(weight).max()),
                "rms_error": float(np.sqrt(np.mean(np.square(error)))),
            }
            if why is not None:
                entry["why"] = why
        entry["bits"] = blocks.bits
        self.report.schemes[name] = entry
        self._made[name] = blocks
        return blocks


def _gguf_blocks(path: str) -> GgufBlocks:
    """The index of a GGUF file, kept for the next export of the same unchanged file (a
    forward and a decode-step export index it once, not twice)."""
    stat = Path(path).stat()
    return _indexed(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _indexed(path: str, mtime_ns: int, size: int) -> GgufBlocks:
    return GgufBlocks(path)


def block_values(stem: str, blocks: BlockWeight) -> dict[str, Any]:
    """The initializers of ``blocks``, named ``<stem>.<array>``."""
    import onnx_ir as ir

    arrays = {
        "packed": blocks.packed,
        "scales": blocks.scales,
        "zero_points": blocks.packed_zero_points(),
        "zero_points_unpacked": blocks.zero_points,
    }
    if blocks.minimums is not None:
        arrays["minimums"] = blocks.minimums
        # (K/32, N): blocksum(x) (.., K/32) @ this adds each block's minimum.
        arrays["minimums_t"] = np.ascontiguousarray(blocks.minimums.T)
    values = {}
    for key, array in arrays.items():
        name = f"{stem}.{key}"
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        values[key] = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
    return values


def _concatenated(parts: list[BlockWeight]) -> BlockWeight | None:
    """One BlockWeight of ``parts`` stacked along N (rows), where they are alike."""
    first = parts[0]
    if any(
        p.bits != first.bits
        or p.shape[1] != first.shape[1]
        or (p.minimums is None) != (first.minimums is None)
        for p in parts
    ):
        return None
    return BlockWeight(
        first.bits,
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points for p in parts]),
        None if first.minimums is None else np.concatenate([p.minimums for p in parts]),
        "concatenated",
    )


def quantize_weights(
    model: Any,
    base_weights: Mapping[str, np.ndarray],
    weights: str,
    *,
    gguf_file: str | None = None,
    accuracy_level: int = 4,
) -> QuantizedWeights:
    """Rewrite ``model`` (an onnx_ir Model) in place; see the module docstring.

    Args:
        model: the translated model.
        base_weights: the source model's frozen 2-D weights by name, (N, K) float32.
        weights: "int4" or "int8": the width of weights quantized here. Blocks carried from
            ``gguf_file`` keep their own width.
        gguf_file: the GGUF file the model was loaded from, or None.
        accuracy_level: MatMulNBits' ``accuracy_level`` (4: int8 activations, the fast
            CPU path and what llama.cpp does for its 4-bit dot products; 0: fp32).
    """
    import onnx_ir as ir

    if weights not in ("int4", "int8"):
        raise ValueError(f"weights must be 'int4' or 'int8' here, got {weights!r}")
    bits = 4 if weights == "int4" else 8
    gguf = _gguf_blocks(gguf_file) if gguf_file is not None else None
    report = QuantizedWeights(weights, accuracy_level, gguf.path.name if gguf is not None else None)
    blocks = _Blocks(gguf, report)
    by_value = {}
    for name, weight in base_weights.items():
        if weight.ndim == 2 and weight.shape[1] % BLOCK == 0:
            by_value.setdefault(_digest(weight), name)
    graph = model.graph
    matches = []
    for node in list(graph):
        if node.domain != "" or node.op_type not in ("MatMul", "Gather"):
            continue
        if node.op_type == "MatMul":
            weight = _matmul_weight(node.inputs[1])
        else:
            weight = _gather_weight(node)
        if weight is None:
            continue
        name = by_value.get(_digest(weight))
        if name is not None:
            matches.append((node, weight, name))
    # The token embedding and the output projection stay 8-bit in an int4 file (where
    # quantized here; GGUF blocks keep their own width, Q8_0 for the embedded model): every
    # token's logits go through them, so llama.cpp's own formats keep them wider too, and
    # on the embedded model 4 bits there cost clearly more perplexity than 8.
    wide = {
        name
        for node, _, name in matches
        if bits == 4 and (node.op_type == "Gather" or node.outputs[0].is_graph_output())
    }
    blocksums: dict[int, Any] = {}
    used: set[str] = set()

    def register(values: dict[str, Any]) -> None:
        for value in values.values():
            if value.name not in used:
                used.add(value.name)
                graph.register_initializer(value)

    def replace(node: Any, out: Any) -> None:
        old = node.outputs[0]
        out.type, out.shape = old.type, old.shape
        if old.is_graph_output():  # the file's output keeps its name (``logits``)
            name, old.name = old.name, None
            out.name = name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)

    # Matmuls that read one input (q, k and v; gate and up) run as one MatMulNBits on
    # their blocks stacked along N, then a Split: fewer, larger kernel calls, and one
    # minimum term for Q4_1 (the decode step is dominated by per-node costs).
    groups: dict[int, list[tuple[Any, np.ndarray, str]]] = {}
    for node, weight, name in matches:
        if node.op_type == "MatMul" and name not in wide:
            groups.setdefault(id(node.inputs[0]), []).append((node, weight, name))
    fused: set[str] = set()
    for index, group in enumerate(g for g in groups.values() if len(g) > 1):
        made = [blocks.get(name, weight, bits) for _, weight, name in group]
        stacked = _concatenated(made)
        if stacked is None:
            continue
        stem = f"stacked_{index}"
        values = block_values(stem, stacked)
        register(values)
        start = 0
        for (_, _, name), part in zip(group, made, strict=True):
            report.schemes[name].update(initializer=stem, rows=[start, start + part.shape[0]])
            start += part.shape[0]
            fused.add(name)
        tape = ir.tape.Tape()
        x = group[0][0].inputs[0]
        y = _matmul_nbits(tape, x, stacked, values, accuracy_level, blocksums)
        sizes = _ints(tape, [part.shape[0] for part in made])
        outs = tape.op_multi_out("Split", [y, sizes], {"axis": -1}, num_outputs=len(group))
        graph.insert_before(group[0][0], tape.nodes)
        for (node, _, _), out in zip(group, outs, strict=True):
            replace(node, out)

    for node, weight, name in matches:
        if name in fused:
            continue
        if name in wide:
            made = blocks.get(name, weight, 8, "embedding or output projection: 8 bits")
        else:
            made = blocks.get(name, weight, bits)
        values = blocks.values(name)
        register(values)
        tape = ir.tape.Tape()
        if node.op_type == "MatMul":
            out = _matmul_nbits(tape, node.inputs[0], made, values, accuracy_level, blocksums)
        else:
            out = _dequantizing_gather(tape, node.inputs[1], made, values)
        graph.insert_before(node, tape.nodes)
        replace(node, out)
    _drop_dead_nodes(graph)
    if report.schemes:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    # Initializers no node reads any more: the fp32 weights and their transposes, and
    # block arrays only a gather (or only a MatMul) would have read.
    for name, value in list(graph.initializers.items()):
        if not value.uses():
            del graph.initializers[name]
    logger.info(
        "quantized %d weights to %s (%s)",
        len(report.schemes),
        weights,
        f"blocks from {gguf.path.name}" if gguf is not None else "onnxruntime quantizer",
    )
    return report


def _drop_dead_nodes(graph: Any) -> None:
    """Remove nodes none of whose outputs is read (a Transpose left by a tied weight)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not out.uses() and not out.is_graph_output() for out in node.outputs):
                graph.remove(node, safe=True)
                changed = True


def _const(value: Any) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _matmul_weight(b: Any) -> np.ndarray | None:
    """The (N, K) weight a MatMul's B stands for, where B is constant."""
    array = _const(b)
    if array is None:
        producer = b.producer()
        if producer is None or producer.op_type != "Transpose" or producer.domain != "":
            return None
        perm = producer.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            return None
        source = _const(producer.inputs[0])
        return source if source is not None and source.ndim == 2 else None
    if array.ndim != 2 or array.dtype != np.float32:
        return None
    return array.T


def _gather_weight(node: Any) -> np.ndarray | None:
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() != 0:
        return None
    array = _const(node.inputs[0])
    if array is None or array.ndim != 2 or array.dtype != np.float32:
        return None
    return array


def _ints(tape: Any, values: list[int]) -> Any:
    import onnx_ir as ir

    return tape.op("Constant", [], {"value": ir.tensor(np.array(values, dtype=np.int64))})


def _reshape_tail(tape: Any, x: Any, drop: int, tail: list[int]) -> Any:
    """``x`` with its last ``drop`` axes replaced by ``tail`` (the leading axes may be
    dynamic); a constant shape where ``x``'s rank is known."""
    rank = len(x.shape) if x.shape is not None else None
    if rank is not None:  # 0 keeps that axis: no shape arithmetic at run time
        return tape.op("Reshape", [x, _ints(tape, [0] * (rank - drop) + tail)])
    shape = tape.op("Shape", [x])
    lead = tape.op("Slice", [shape, _ints(tape, [0]), _ints(tape, [-drop])])
    return tape.op("Reshape", [x, tape.op("Concat", [lead, _ints(tape, tail)], {"axis": 0})])


def _matmul_nbits(
    tape: Any,
    x: Any,
    blocks: BlockWeight,
    values: dict[str, Any],
    accuracy_level: int,
    blocksums: dict[int, Any],
) -> Any:
    n, k = blocks.shape
    y = tape.op(
        "MatMulNBits",
        [x, values["packed"], values["scales"], values["zero_points"]],
        {
            "K": k,
            "N": n,
            "bits": blocks.bits,
            "block_size": BLOCK,
            "accuracy_level": accuracy_level,
        },
        domain=MS_DOMAIN,
    )
    if blocks.minimums is None:
        return y
    # w = q*d + m: x @ w = MatMulNBits(q, d, zp=0) + sum over blocks of sum(x_block) * m.
    # q, k and v (and gate and up) read the same x: one block sum serves them.
    key = id(x)
    if key not in blocksums:
        grouped = _reshape_tail(tape, x, 1, [k // BLOCK, BLOCK])
        blocksums[key] = tape.op("ReduceSum", [grouped, _ints(tape, [-1])], {"keepdims": 0})
    offset = tape.op("MatMul", [blocksums[key], values["minimums_t"]])
    return tape.op("Add", [y, offset])


def _dequantizing_gather(tape: Any, ids: Any, blocks: BlockWeight, values: dict[str, Any]) -> Any:
    """Gather rows of the blocks and dequantize only those: ``(q - zp) * d (+ m)``."""
    import onnx_ir as ir

    k = blocks.shape[1]
    rows = tape.op("Gather", [values["packed"], ids], {"axis": 0})  # (.., K/32, bytes)
    if blocks.bits == 4:
        low = tape.op(
            "BitwiseAnd", [rows, tape.op("Constant", [], {"value": ir.tensor(np.uint8(15))})]
        )
        high = tape.op(
            "BitShift",
            [rows, tape.op("Constant", [], {"value": ir.tensor(np.uint8(4))})],
            {"direction": "RIGHT"},
        )
        pairs = tape.op(
            "Concat",
            [
                tape.op("Unsqueeze", [low, _ints(tape, [-1])]),
                tape.op("Unsqueeze", [high, _ints(tape, [-1])]),
            ],
            {"axis": -1},
        )
        rows = _reshape_tail(tape, pairs, 2, [BLOCK])  # (.., K/32, 16, 2) -> (.., K/32, 32)
    float_type = ir.DataType.FLOAT
    codes = tape.op("Cast", [rows], {"to": float_type})
    last = _ints(tape, [-1])
    zp = tape.op(
        "Unsqueeze",
        [
            tape.op(
                "Cast",
                [tape.op("Gather", [values["zero_points_unpacked"], ids])],
                {"to": float_type},
            ),
            last,
        ],
    )
    scale = tape.op("Unsqueeze", [tape.op("Gather", [values["scales"], ids]), last])
    w = tape.op("Mul", [tape.op("Sub", [codes, zp]), scale])
    if blocks.minimums is not None:
        w = tape.op(
            "Add", [w, tape.op("Unsqueeze", [tape.op("Gather", [values["minimums"], ids]), last])]
        )
    return _reshape_tail(tape, w, 2, [k])  # (.., K/32, 32) -> (.., K)


def dequantized_weights(path: str | Any) -> dict[str, np.ndarray]:
    """The fp32 (N, K) weights an int4/int8 file's blocks stand for, by base weight name
    (empty for an fp32 file): what the file computes with, for checks against a source.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        OnnxFileError: (a ``ValueError``) the file is not a readable ONNX file, or its
            ``adaption_fx`` metadata or its blocks are not what ``to_onnx`` writes.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    from adaption_fx.export.onnx.metadata import OnnxFileError, parse_metadata
    from adaption_fx.export.onnx.plan import METADATA_KEY

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
    try:
        # onnx refuses external data outside the file's directory (absolute paths, "..",
        # links out) and offsets or lengths past the data file's end.
        model = onnx.load(str(path))
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as exc:
        raise OnnxFileError(f"{path}: not a readable ONNX file: {exc}") from None
    if not model.HasField("graph"):  # an empty file parses as an empty model
        raise OnnxFileError(f"{path}: not a readable ONNX file: it holds no graph")
    props = {p.key: p.value for p in model.metadata_props}
    metadata = parse_metadata(props.get(METADATA_KEY), path)
    schemes = metadata.get("weights", {}).get("schemes", {})
    arrays = {i.name: i for i in model.graph.initializer}
    out = {}
    for name, entry in schemes.items():
        stem = entry.get("initializer") or name.replace(".", "_")
        where = f"{path}: the blocks of {name!r} (metadata field 'weights.schemes')"

        def read(key: str, stem: str = stem, where: str = where) -> np.ndarray | None:
            tensor = arrays.get(f"{stem}.{key}")
            if tensor is None:
                return None
            try:
                return numpy_helper.to_array(tensor)
            except (ValueError, TypeError) as exc:  # data that does not fill its shape
                raise OnnxFileError(f"{where}: initializer {stem}.{key}: {exc}") from None

        packed, scales = read("packed"), read("scales")
        if packed is None or scales is None:
            raise OnnxFileError(f"{where}: are missing")
        bits = entry["bits"]
        rows, blocks_per_row = scales.shape if scales.ndim == 2 else (-1, -1)
        if (
            scales.ndim != 2
            or packed.shape != (rows, blocks_per_row, BLOCK * bits // 8)
            or packed.dtype != np.uint8
            or not np.issubdtype(scales.dtype, np.floating)
        ):
            raise OnnxFileError(
                f"{where}: packed {packed.dtype} {packed.shape} and scales {scales.dtype} "
                f"{scales.shape} are not {bits}-bit blocks of {BLOCK} (packed uint8 (N, K/"
                f"{BLOCK}, {BLOCK * bits // 8}), scales (N, K/{BLOCK}))"
            )
        zero_points = read("zero_points_unpacked")
        if zero_points is None:
            zero_points = read("zero_points")
            if zero_points is None:
                raise OnnxFileError(f"{where}: the zero points are missing")
            if bits == 4 and zero_points.dtype == np.uint8:
                zero_points = unpack_nibbles(zero_points, blocks_per_row)
        minimums = read("minimums")
        if minimums is None and (transposed := read("minimums_t")) is not None:
            minimums = np.ascontiguousarray(transposed.T)
        for what, array in (("zero points", zero_points), ("minimums", minimums)):
            if array is not None and array.shape != scales.shape:
                raise OnnxFileError(
                    f"{where}: {what} of shape {array.shape}, not the scales' {scales.shape}"
                )
        if zero_points.dtype != np.uint8:
            raise OnnxFileError(f"{where}: zero points of dtype {zero_points.dtype}, not uint8")
        # Rows of a stacked weight: a slice of the blocks, within them.
        start, stop = entry.get("rows", [0, rows])
        if stop > rows:
            raise OnnxFileError(
                f"{where}: metadata rows [{start}, {stop}] reach past the {rows} rows it has"
            )
        chosen = slice(start, stop)
        blocks = BlockWeight(
            bits,
            packed[chosen],
            scales[chosen].astype(np.float32, copy=False),
            zero_points[chosen],
            None if minimums is None else minimums[chosen].astype(np.float32, copy=False),
            entry["scheme"],
        )
        out[name] = blocks.dequantize()
    return out
