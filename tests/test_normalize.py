"""The normalisation pass: every captured graph is plain ATen whatever built it.

These tests build the constructs themselves (torch.vmap, no_grad and disabled autocast in
forward), so they check the pass on every transformers release, including those that no
longer produce the constructs; the Hugging Face captures are checked as well.
"""

from __future__ import annotations

import pytest
import torch
from helpers import padded_batch, tiny_llama, tiny_mistral
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

from adaption_fx.capture.export_model import capture
from adaption_fx.capture.hf_compat import vmap_free_masks
from adaption_fx.passes.errors import UnsupportedGraphError
from adaption_fx.passes.infra import run_passes
from adaption_fx.passes.normalize import (
    InlineWrappedRegions,
    LowerVmapRegions,
    check_normalized,
    leftover_nodes,
)


class VmapMask(torch.nn.Module):
    """Builds a (batch, q, kv) mask with nested torch.vmap, as transformers 4.57 does."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s = keep.shape

        def allowed(batch_idx, q_idx, kv_idx):
            return (kv_idx <= q_idx) & keep[batch_idx, kv_idx].bool()

        per_kv = torch.vmap(allowed, (None, None, 0))
        per_q = torch.vmap(per_kv, (None, 0, None))
        fn = torch.vmap(per_q, (0, None, None))
        # As transformers 4.57: tensor indexing under vmap needs this mode, which export
        # records as a flat_apply higher-order op.
        with TransformGetItemToIndex():
            mask = fn(torch.arange(b), torch.arange(s), torch.arange(s))
        scores = self.proj(x) @ x.transpose(1, 2)
        return scores.masked_fill(~mask, -1e4).softmax(-1) @ x


class NoGradAutocast(torch.nn.Module):
    """A no_grad region with a disabled autocast region nested inside (HF rotary, 4.57)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pos = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.freq
            with torch.autocast("cpu", enabled=False):
                table = pos.cos() + pos.sin()
        return self.proj(x) * table


def _export_module(module, *args):
    dims = [{0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for _ in args]
    return torch.export.export(module, args, dynamic_shapes=dims, strict=False).module()


def _vmap_inputs(b=3, s=5):
    torch.manual_seed(0)
    keep = torch.ones(b, s, dtype=torch.long)
    keep[0, :2] = 0
    return torch.randn(b, s, 8), keep


def test_vmap_region_is_lowered_to_aten_and_computes_the_same():
    module = VmapMask().eval()
    x, keep = _vmap_inputs()
    gm = _export_module(module, x, keep)
    assert leftover_nodes(gm), "export should have kept the vmap calls"
    assert run_passes(gm, [LowerVmapRegions()]).modified
    assert leftover_nodes(gm) == []
    check_normalized(gm)
    assert all(
        isinstance(n.target, torch._ops.OpOverload) or n.target.__module__ == "_operator"
        for n in gm.graph.nodes
        if n.op == "call_function"
    )
    for b, s in ((3, 5), (2, 9), (5, 3)):
        x, keep = _vmap_inputs(b, s)
        assert torch.equal(gm(x, keep), module(x, keep))


def test_capture_of_a_vmap_model_is_plain_aten_and_equal():
    module = VmapMask().eval()
    x, keep = _vmap_inputs()
    captured = capture(module, (x, keep))
    assert leftover_nodes(captured.graph_module) == []
    x2, keep2 = _vmap_inputs(4, 7)
    assert torch.equal(captured.graph_module(x2, keep2)[0], module(x2, keep2))


def test_capture_leaves_a_users_graph_module_as_it_was():
    module = VmapMask().eval()
    x, keep = _vmap_inputs()
    gm = _export_module(module, x, keep)
    before = [(n.name, n.target) for n in gm.graph.nodes]
    capture(gm)
    assert [(n.name, n.target) for n in gm.graph.nodes] == before


def test_no_grad_and_disabled_autocast_regions_are_inlined():
    module = NoGradAutocast().eval()
    x = torch.randn(2, 6, 8)
    gm = _export_module(module, x)
    hops = [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]
    assert hops, "export should have kept the no_grad region as a higher-order op"
    assert run_passes(gm, [InlineWrappedRegions()]).modified
    assert leftover_nodes(gm) == []
    assert not any(n.op == "get_attr" and n.target.startswith("submod") for n in gm.graph.nodes)
    x = torch.randn(3, 4, 8, requires_grad=True)
    out, ref = gm(x), module(x)
    assert torch.equal(out, ref)
    # Same gradients: nothing flows through the region's outputs, as under no_grad.
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(g, g_ref)


def test_check_normalized_names_what_is_left():
    module = VmapMask().eval()
    x, keep = _vmap_inputs()
    gm = _export_module(module, x, keep)
    with pytest.raises(UnsupportedGraphError, match=r"not plain ATen.*_vmap_increment_nesting"):
        check_normalized(gm, "VmapMask")


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral], ids=["llama", "mistral"])
def test_hugging_face_captures_are_plain_aten(build):
    model = build()
    captured = capture(model)
    for gm in (captured.graph_module, captured.causal and captured.causal.graph_module):
        if gm is None:
            continue
        assert leftover_nodes(gm) == []
        assert not [n for n in gm.graph.nodes if n.op == "get_attr" and "submod" in n.target]


def test_users_own_export_of_a_hugging_face_model_is_normalised():
    # Whatever the installed transformers builds its masks with, a plain torch.export of
    # the model (no adaption_fx patches) captures to plain ATen and computes the same.
    model = tiny_llama()
    ids, mask = padded_batch()
    b, s = torch.export.Dim("b"), torch.export.Dim("s")
    ep = torch.export.export(
        model,
        (),
        {"input_ids": ids, "attention_mask": mask, "use_cache": False},
        dynamic_shapes={
            "input_ids": {0: b, 1: s},
            "attention_mask": {0: b, 1: s},
            "use_cache": None,
        },
        strict=False,
    )
    captured = capture(ep)
    assert leftover_nodes(captured.graph_module) == []
    ids2, mask2 = padded_batch(batch=3, seq=10)
    flat = captured.bind((), {"input_ids": ids2, "attention_mask": mask2})
    out = captured.unflatten(captured.graph_module(*flat))
    assert torch.equal(out.logits, model(input_ids=ids2, attention_mask=mask2).logits)


def test_vmap_free_masks_is_a_no_op_where_transformers_has_no_vmap_helper():
    import transformers.masking_utils as masking_utils

    had = callable(getattr(masking_utils, "_vmap_for_bhqkv", None))
    before = {k: getattr(masking_utils, k, None) for k in ("_vmap_for_bhqkv",)}
    with vmap_free_masks() as replaced:
        assert replaced is had
    assert {k: getattr(masking_utils, k, None) for k in before} == before
