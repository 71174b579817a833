"""Opset 23's fused ops in exported files: grouped-query Attention, RMSNormalization and
RotaryEmbedding (export/onnx/fuse.py and the passes it runs)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from helpers import (
    assert_rel_close,
    padded_batch,
    randomize_adapter,
    step_logits,
    tiny_mistral,
)

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import OrtModel, to_onnx
from adaption_fx.passes.cleanup import DropNoopNodes, ShareSizeReads
from adaption_fx.passes.rms_norm import FuseRmsNorm
from adaption_fx.passes.rotary import ROTARY_EMBEDDING, FuseRotaryEmbedding

aten = torch.ops.aten
LAYERS, ADAPTED = 4, 2


@pytest.fixture(scope="module")
def model():
    adapted = rewrite(tiny_mistral(), AdaptionConfig(adapter_len=3, adapter_layers=ADAPTED))
    randomize_adapter(adapted, seed=3)
    return adapted


@pytest.fixture(scope="module")
def decode_files(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusions")
    return {
        opset: to_onnx(model, out / f"decode{opset}.onnx", for_generation=True, opset=opset)
        for opset in (18, None)
    }


def _ops(path) -> collections.Counter:
    graph = onnx.load(path, load_external_data=False).graph
    return collections.Counter(node.op_type for node in graph.node)


def test_decode_file_runs_fused_ops(decode_files):
    fused, plain = _ops(decode_files[None]), _ops(decode_files[18])
    # One Attention per layer and per adapter branch; one rotation per query and key; two
    # norms per layer and the final one.
    assert fused["Attention"] == LAYERS + ADAPTED
    assert fused["RotaryEmbedding"] == 2 * LAYERS
    assert fused["RMSNormalization"] == 2 * LAYERS + 1
    for written_out in ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Neg", "Softmax"):
        assert fused[written_out] == 0, written_out
    # No repeat_kv copy of the cache: each layer's key and value expansions are gone.
    assert plain["Expand"] - fused["Expand"] >= 2 * LAYERS
    assert plain["Attention"] == 0 and plain["Softmax"] > 0
    assert sum(fused.values()) < 0.6 * sum(plain.values())


def test_fused_decode_file_generates_like_the_plain_one(model, decode_files):
    ids, mask = padded_batch(2, 8, seed=4)  # row 1 left-padded
    fused, plain = OrtModel(decode_files[None]), OrtModel(decode_files[18])
    kwargs = dict(max_new_tokens=6, eos_token_id=None)
    got = fused.generate(ids.numpy(), mask.numpy(), **kwargs)
    expected = plain.generate(ids.numpy(), mask.numpy(), **kwargs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # Every step's logits.
    new = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(5))
    got = step_logits(fused.decode_session(), ids, mask, new)
    expected = step_logits(plain.decode_session(), ids, mask, new)
    for a, b in zip(got, expected, strict=True):
        assert_rel_close(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)), 1e-5)


# ------------------------------------------------------------------------ the passes
class _RmsNorm(torch.nn.Module):
    """Hugging Face's LlamaRMSNorm, optionally in half precision (casts to fp32 and back)."""

    def __init__(self, casts: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.casts = casts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        if self.casts:
            hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + 1e-6)
        return self.weight * hidden.to(dtype)


def _export(module: torch.nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    """The module's ATen graph with a dynamic batch, export's no-op casts and checks dropped
    (as the ONNX translation drops them)."""
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in args)
    gm = torch.export.export(module, args, dynamic_shapes=shapes).module()
    DropNoopNodes().transform(gm.graph)
    return gm


def test_fuse_rms_norm_rewrites_the_written_out_norm():
    module = _RmsNorm(casts=False)
    x = torch.randn(3, 5, 16)
    gm = _export(module, x)
    assert FuseRmsNorm().transform(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.rms_norm.default in targets
    assert aten.rsqrt.default not in targets and aten.pow.Tensor_Scalar not in targets
    assert_rel_close(gm(x), module(x), rtol=1e-6)


def test_fuse_rms_norm_leaves_a_norm_computed_in_another_precision():
    module = _RmsNorm(casts=True).to(torch.bfloat16)
    gm = _export(module, torch.randn(3, 5, 16, dtype=torch.bfloat16))
    assert FuseRmsNorm().transform(gm.graph) == 0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Rotary(torch.nn.Module):
    """Hugging Face's apply_rotary_pos_emb with tables built as its rotary embedding
    builds them (``duplicated``) or arbitrary tables."""

    def __init__(self, duplicated: bool):
        super().__init__()
        self.duplicated = duplicated

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        emb = torch.cat((freqs, freqs), dim=-1) if self.duplicated else freqs
        cos, sin = emb.cos() * 1.0, emb.sin() * 1.0
        return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def test_fuse_rotary_embedding_rewrites_huggingface_rotations():
    module = _Rotary(duplicated=True)
    x, freqs = torch.randn(2, 3, 5, 8), torch.randn(2, 5, 4)
    gm = _export(module, x, freqs)
    assert FuseRotaryEmbedding().transform(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ROTARY_EMBEDDING in targets and aten.neg.default not in targets
    assert_rel_close(gm(x, freqs), module(x, freqs), rtol=1e-6)


def test_fuse_rotary_embedding_leaves_tables_whose_halves_may_differ():
    module = _Rotary(duplicated=False)
    gm = _export(module, torch.randn(2, 3, 5, 8), torch.randn(2, 5, 8))
    assert FuseRotaryEmbedding().transform(gm.graph) == 0


class _TwoReads(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = (x * 2).expand(x.shape[0], -1)
        b = (y + 1).reshape(y.shape[0], -1)
        return a.sum(-1) + b.sum(-1)


def test_share_size_reads_reads_each_symbol_once():
    module = _TwoReads()
    x, y = torch.randn(4, 3), torch.randn(4, 6)
    gm = _export(module, x, y)
    reads = [n for n in gm.graph.nodes if n.target == aten.sym_size.int]
    ShareSizeReads().transform(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    after = [n for n in gm.graph.nodes if n.target == aten.sym_size.int]
    assert len(after) <= 1 <= len(reads)
    torch.testing.assert_close(gm(x, y), module(x, y), rtol=0, atol=0)
