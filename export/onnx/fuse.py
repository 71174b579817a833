"""What ONNX opset 23 has one op for, written as that op before translation.

A decode step translated op by op runs about 3,000 small ONNX nodes per token on the
embedded model; once the weights are 4-bit, their fixed cost (not the matmuls) is most of a
step. Opset 23 has single ops for three of the patterns every Hugging Face decoder repeats
in each layer, and ONNX Runtime runs them as single kernels:

- ``Attention``: SDPA over ``repeat_kv`` copies of the key/value heads becomes grouped-query
  SDPA (``passes.fast_attention.NativeGqa``), which torchlib translates into one
  ``Attention`` reading the cache's own heads (no copy of the cache per layer and step);
- ``RMSNormalization``: the written-out RMS norm (``passes.rms_norm.FuseRmsNorm``);
- ``RotaryEmbedding``: ``x * cos + rotate_half(x) * sin``
  (``passes.rotary.FuseRotaryEmbedding``).

Each pass rewrites only the exact form it knows and leaves anything else as it was, so a
model family with another form still exports (with more nodes). ONNX Runtime's CPU
``Attention`` does not broadcast a mask over the query length, so masks that do (the
mixed-batch adapter's key mask) are expanded to it first; and every read of a size symbol
(each layer reads the batch size for its adapter's expansion) becomes one read, so the
layers share what is computed from it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx
from torch._guards import detect_fake_mode

from adaption_fx.passes.cleanup import ShareSizeReads
from adaption_fx.passes.fast_attention import NativeGqa, sdpa_arguments
from adaption_fx.passes.rms_norm import FuseRmsNorm
from adaption_fx.passes.rotary import FuseRotaryEmbedding

logger = logging.getLogger(__name__)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
# The first opset with Attention, RMSNormalization and RotaryEmbedding (ONNX Runtime >= 1.23
# runs all three on CPU).
FUSED_OPSET = 23


def _expand_mask_queries(graph: torch.fx.Graph) -> int:
    """Give every SDPA mask that broadcasts over the query length (size 1 there, more
    queries than 1) that length. Returns how many masks were expanded."""
    changed = 0
    for node in [n for n in graph.nodes if n.target == SDPA]:
        named = sdpa_arguments(node)
        mask, query = named["attn_mask"], named["query"]
        if not isinstance(mask, torch.fx.Node):
            continue
        mask_val, query_val = mask.meta["val"], query.meta["val"]
        length = query_val.shape[-2]
        broadcasts = mask_val.dim() >= 2 and type(mask_val.shape[-2]) is int
        if not broadcasts or mask_val.shape[-2] != 1 or (type(length) is int and length == 1):
            continue
        with graph.inserting_before(node):
            size = graph.call_function(aten.sym_size.int, (query, query_val.dim() - 2))
            sizes = [-1] * mask_val.dim()
            sizes[-2] = size
            expanded = graph.call_function(aten.expand.default, (mask, sizes))
        size.meta["val"] = length
        with detect_fake_mode([query_val]) or contextlib.nullcontext():
            expanded.meta["val"] = mask_val.expand(*mask_val.shape[:-2], length, -1)
        node.replace_input_with(mask, expanded)
        changed += 1
    return changed


def fuse_for_onnx(graph: torch.fx.Graph) -> None:
    """Rewrite ``graph`` (a copy about to be translated at opset >= 23; nodes carry
    ``meta["val"]``) in place into the forms above."""
    gqa = NativeGqa().transform(graph)
    norms = FuseRmsNorm().transform(graph)
    rotations = FuseRotaryEmbedding().transform(graph)
    masks = _expand_mask_queries(graph)
    ShareSizeReads().transform(graph)
    graph.eliminate_dead_code()
    logger.debug(
        "fused %d grouped-query attention call(s), %d RMS norm(s), %d rotary embedding(s); "
        "%d mask(s) expanded over queries",
        gqa,
        norms,
        rotations,
        masks,
    )
