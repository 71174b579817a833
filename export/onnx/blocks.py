"""Block-quantized weights in ONNX Runtime's ``MatMulNBits`` layout.

A weight ``W`` of shape (N, K) (a linear layer's (out, in)) is cut along K into blocks of
:data:`BLOCK` elements; each block has a scale ``d``, an integer zero point ``zp`` and, for
GGUF's Q4_1, a minimum ``m``: ``w = (q - zp) * d (+ m)``. Two sources:

- :class:`GgufBlocks` reads a GGUF file's own blocks (Q4_0, Q4_1, Q8_0; the types whose
  block is 32 weights with one scale and one offset) and carries them over unchanged: the
  dequantized weight equals gguf-py's dequantization (what transformers loads) bit for bit.
  Q4_1's ``q * d + m`` has a non-integer zero point ``-m / d``; ``(q + m / d) * d`` is not
  ``q * d + m`` in floating point, so its minimum is kept as a separate per-block term.
- :func:`quantize_block_weight` quantizes an fp32 weight with ONNX Runtime's own block
  quantizer (asymmetric, block 32) where no GGUF block exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32
"""Weights per block: GGUF's Q4_0/Q4_1/Q8_0 block, and the block size of every file we write."""

# GGUF block type -> (bytes per block, bits per weight in our layout).
_GGUF_LAYOUTS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}


@dataclass(frozen=True)
class BlockWeight:
    """One (N, K) weight as MatMulNBits blocks.

    Attributes:
        bits: 4 or 8.
        packed: uint8 (N, K/32, 32*bits/8): for 4 bits, element 2i in the low nibble of
            byte i and element 2i+1 in the high nibble (MatMulNBits' order).
        scales: float32 (N, K/32).
        zero_points: uint8 (N, K/32), one per block (unpacked).
        minimums: float32 (N, K/32) added after scaling (GGUF Q4_1), or None.
        scheme: what the blocks are, recorded in the file's metadata.
    """

    bits: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    minimums: np.ndarray | None
    scheme: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * BLOCK

    def codes(self) -> np.ndarray:
        """The integer codes q, uint8 (N, K/32, 32)."""
        return self.packed if self.bits == 8 else unpack_nibbles(self.packed, BLOCK)

    def packed_zero_points(self) -> np.ndarray:
        """Zero points as MatMulNBits takes them: (N, ceil(K/32 * bits / 8)) uint8."""
        return self.zero_points if self.bits == 8 else pack_nibbles(self.zero_points)

    def dequantize(self) -> np.ndarray:
        """The fp32 (N, K) weight the blocks stand for, computed in the order the ONNX
        graph's gather computes it (and gguf-py computes GGUF's)."""
        q = self.codes().astype(np.float32)
        w = (q - self.zero_points[..., None].astype(np.float32)) * self.scales[..., None]
        if self.minimums is not None:
            w = w + self.minimums[..., None]
        return w.reshape(self.shape)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit codes, uint8 (..., n) -> (..., ceil(n / 2)): element 2i in the low nibble of
    byte i, element 2i+1 in its high nibble (MatMulNBits' order; an odd n pads a zero)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), dtype=q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << np.uint8(4))).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: uint8 (..., bytes) -> (..., count)."""
    pairs = np.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :count]


def gguf_block_weight(kind: str, raw: np.ndarray, rows: int) -> BlockWeight:
    """A GGUF tensor's raw blocks (uint8, ``rows`` rows) as a BlockWeight, unchanged."""
    size, bits = _GGUF_LAYOUTS[kind]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    minimums = None
    if kind == "Q8_0":
        codes = blocks[..., 2:].copy().view(np.int8)
        packed = (codes.astype(np.int16) + 128).astype(np.uint8)
        zp = np.full(d.shape, 128, dtype=np.uint8)
    else:
        start = 2 if kind == "Q4_0" else 4
        qs = blocks[..., start:]
        # GGUF: element j in the low nibble of byte j, element j + 16 in its high nibble.
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
        packed = pack_nibbles(codes)
        if kind == "Q4_0":
            zp = np.full(d.shape, 8, dtype=np.uint8)
        else:
            zp = np.zeros(d.shape, dtype=np.uint8)
            minimums = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return BlockWeight(bits, packed, d, zp, minimums, f"gguf {kind}")


def quantize_block_weight(weight: np.ndarray, bits: int) -> BlockWeight:
    """Quantize an fp32 (N, K) weight to asymmetric ``bits``-bit blocks of 32 with ONNX
    Runtime's block quantizer (the one ``MatMulNBitsQuantizer`` uses)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False, bits=bits)
    # The quantizer takes MatMul's B, (K, N).
    b = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)
    packed, scales, zp = DefaultWeightOnlyQuantizer(config).qbits_block_quant(b)
    if bits == 4:
        zp = unpack_nibbles(zp, packed.shape[1])
    scheme = f"int{bits} asymmetric, block {BLOCK} (onnxruntime)"
    return BlockWeight(bits, packed, scales.astype(np.float32), zp.astype(np.uint8), None, scheme)


def _row_digests(rows: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


class GgufBlocks:
    """The blocks of a GGUF file, found by the values they dequantize to.

    A weight is matched row by row: each row of the model's fp32 weight must equal, bit for
    bit, the dequantization of one row of one GGUF tensor. Rows may come in another order
    (llama.cpp stores attention query and key rows permuted for its RoPE, and transformers
    undoes that on load); blocks run along a row, so taking rows in the model's order is
    lossless. Matching by value needs no table of tensor names per architecture and
    proves, weight by weight, that the blocks carried are the ones the model was loaded
    from.
    """

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {str(self.path)!r} does not exist")
        try:
            reader = GGUFReader(self.path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{str(self.path)!r} is not a readable GGUF file: {exc}") from exc
        self._tensors: dict[str, tuple[str, np.ndarray]] = {}
        self._rows: dict[bytes, tuple[str, int]] = {}
        for tensor in reader.tensors:
            kind = tensor.tensor_type.name
            if kind not in _GGUF_LAYOUTS or len(tensor.shape) != 2:
                continue  # norms (F32) and block types ONNX Runtime cannot run
            self._tensors[tensor.name] = (kind, tensor.data)
            for row, digest in enumerate(_row_digests(self._dequantized(tensor.name))):
                self._rows.setdefault(digest, (tensor.name, row))

    def _dequantized(self, name: str) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        kind, raw = self._tensors[name]
        return dequantize(raw, GGMLQuantizationType[kind])

    def find(self, weight: np.ndarray) -> tuple[str, BlockWeight] | None:
        """The GGUF tensor and blocks whose rows dequantize to ``weight`` (N, K) exactly,
        or None where no one tensor holds every row."""
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        names = set()
        order = []
        for digest in _row_digests(weight):
            hit = self._rows.get(digest)
            if hit is None:
                return None
            names.add(hit[0])
            order.append(hit[1])
            if len(names) > 1:
                return None
        (name,) = names
        kind, raw = self._tensors[name]
        blocks = gguf_block_weight(kind, np.asarray(raw)[np.asarray(order)], len(order))
        if not np.array_equal(blocks.dequantize(), weight):  # a digest collision, in theory
            return None
        return name, blocks
