"""How to_onnx builds its files: the captured graph translated directly (no torch.onnx.export
re-trace, decomposition or onnxscript optimizer), torch.onnx.export as the fallback, the
weights streamed into the file, and the stage progress bar.

tests/test_onnx.py and tests/test_generate_ort.py check the files' outputs against PyTorch;
these tests check that they come from the direct path and that each piece of it is exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_mistral

import adaption_fx.export.onnx.plan as onnx_plan
import adaption_fx.export.onnx.protobuf as onnx_protobuf
import adaption_fx.export.onnx.translate as onnx_translate
from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import OrtModel, to_onnx

RTOL = 1e-4


@pytest.fixture(scope="module")
def model():
    src = tiny_mistral()
    adapted = rewrite(src, AdaptionConfig(adapter_len=4, adapter_layers=2))
    randomize_adapter(adapted, seed=21)
    return adapted


def eager_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_matches_eager(path, model, seed: int) -> None:
    ids, mask = padded_batch(3, 9, seed=seed)
    got = torch.as_tensor(OrtModel(path)(input_ids=ids, attention_mask=mask))
    keep = mask.bool()
    assert_rel_close(got[keep], eager_logits(model, ids, mask)[keep], rtol=RTOL)


@pytest.fixture
def no_torch_onnx_export(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", refuse)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"for_generation": True}, {"adapter_as_inputs": True}, {"fold": False}],
    ids=["forward", "decode-step", "adapter-inputs", "unfolded"],
)
def test_direct_translation_needs_no_torch_onnx_export(
    model, tmp_path, no_torch_onnx_export, kwargs
):
    path = to_onnx(model, tmp_path / "model.onnx", progress=False, **kwargs)
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    # No per-node provenance (the exporter's stack traces) in the file.
    assert not any(node.metadata_props for node in proto.graph.node)
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    if kwargs.get("adapter_as_inputs"):
        ort = OrtModel(path)
        ort.set_adapter_weights(model)  # through the directly translated projection
        ids, mask = padded_batch(3, 9, seed=5)
        keep = mask.bool()
        got = torch.as_tensor(ort(input_ids=ids, attention_mask=mask))
        assert_rel_close(got[keep], eager_logits(model, ids, mask)[keep], rtol=RTOL)
    elif not kwargs.get("for_generation"):
        assert_matches_eager(path, model, seed=5)


def test_fallback_to_torch_onnx_export(model, tmp_path, monkeypatch):
    """A graph the direct translation does not cover goes through torch.onnx.export."""
    calls = []
    export = torch.onnx.export

    def counted(*args, **kwargs):
        calls.append(kwargs.get("input_names"))
        return export(*args, **kwargs)

    def not_direct(*args, **kwargs):
        raise onnx_translate.NotDirect("injected")

    monkeypatch.setattr(onnx_translate, "direct_graph", not_direct)
    monkeypatch.setattr(torch.onnx, "export", counted)
    path = to_onnx(model, tmp_path / "model.onnx", progress=False)
    assert calls == [["input_ids", "attention_mask"]]
    assert_matches_eager(path, model, seed=6)


@pytest.mark.parametrize("opset", [18, None])
def test_direct_translation_matches_torch_onnx_export(model, tmp_path, monkeypatch, opset):
    """At opset 18 (no fused ops) the direct translation runs bit for bit like
    torch.onnx.export's file; at the default opset its fused Attention, RMSNormalization
    and RotaryEmbedding ops give the same logits up to rounding, at every real token."""
    direct = to_onnx(model, tmp_path / "direct.onnx", opset=opset, progress=False)
    if opset is None:
        ops = {node.op_type for node in onnx.load(direct, load_external_data=False).graph.node}
        assert {"Attention", "RMSNormalization", "RotaryEmbedding"} <= ops

    def not_direct(*args, **kwargs):
        raise onnx_translate.NotDirect("injected")

    monkeypatch.setattr(onnx_translate, "direct_graph", not_direct)
    exported = to_onnx(model, tmp_path / "exported.onnx", opset=opset, progress=False)
    ids, mask = padded_batch(3, 9, seed=5)
    got = np.asarray(OrtModel(direct)(input_ids=ids, attention_mask=mask))
    expected = np.asarray(OrtModel(exported)(input_ids=ids, attention_mask=mask))
    if opset == 18:
        np.testing.assert_array_equal(got, expected)
    else:
        keep = mask.numpy().astype(bool)
        assert_rel_close(torch.from_numpy(got[keep]), torch.from_numpy(expected[keep]), rtol=1e-5)


class _Mixed(torch.nn.Module):
    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return (x * counts).softmax(-1)


def test_type_promotion_where_the_graph_mixes_dtypes(tmp_path):
    """The cheap check finds the mixed-dtype multiply, the exporter's pass casts it, and
    ONNX Runtime computes what PyTorch does."""
    import onnxruntime

    x, counts = torch.randn(2, 5), torch.arange(10).reshape(2, 5)
    program = torch.export.export(_Mixed(), (x, counts))
    assert onnx_translate.promotion_needed(program.graph)
    same = torch.export.export(_Mixed(), (x, counts.float()))
    assert not onnx_translate.promotion_needed(same.graph)

    gm = program.module()
    wrapper = onnx_plan.FlatCall(gm, [("input", None), ("input", None)], {})
    onnx_model = onnx_translate.onnx_model_of(
        wrapper,
        (x, counts),
        input_names=["x", "counts"],
        output_names=["y"],
        dynamic_shapes=None,
        opset=None,
    )
    path = tmp_path / "mixed.onnx"
    onnx_protobuf.save_onnx(onnx_model, path, None)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy(), "counts": counts.numpy()})
    np.testing.assert_allclose(got, _Mixed()(x, counts).numpy(), rtol=1e-6)


def test_streamed_save_equals_onnx_ir_save(tmp_path):
    from onnxscript import ir
    from torch.onnx._internal.exporter import _core

    tensors = {
        "w32": torch.randn(3, 4),
        "w16": torch.randn(5).to(torch.bfloat16),
        "t_view": torch.randn(4, 3).t(),  # not contiguous
        "ids": torch.arange(6).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
    }
    graph = ir.Graph([], [], nodes=[], name="g", opset_imports={"": 18})
    outputs = []
    for name, tensor in tensors.items():
        value = ir.Value(name=name, const_value=_core.TorchTensor(tensor, name=name))
        value.shape = value.const_value.shape
        value.type = ir.TensorType(value.const_value.dtype)
        graph.register_initializer(value)
        node = ir.Node("", "Identity", [value], name=f"copy_{name}")
        node.outputs[0].name = f"out_{name}"
        node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
        graph.append(node)
        outputs.append(node.outputs[0])
    numpy_value = ir.Value(name="np", const_value=ir.tensor(np.arange(4, dtype=np.float16)))
    graph.register_initializer(numpy_value)
    graph.outputs.extend(outputs)
    model = ir.Model(graph, ir_version=10, producer_name="test")
    model.metadata_props["key"] = "value"

    assert onnx_protobuf.write_streamed(model, tmp_path / "streamed.onnx")
    ir.save(model, tmp_path / "reference.onnx")
    streamed = onnx.load(str(tmp_path / "streamed.onnx"))
    reference = onnx.load(str(tmp_path / "reference.onnx"))
    onnx.checker.check_model(streamed)
    assert [i.name for i in streamed.graph.initializer] == [*tensors, "np"]
    for a, b in zip(streamed.graph.initializer, reference.graph.initializer, strict=True):
        assert (a.name, a.data_type, list(a.dims)) == (b.name, b.data_type, list(b.dims))
        assert onnx.numpy_helper.to_array(a).tobytes() == onnx.numpy_helper.to_array(b).tobytes()
    assert streamed.graph.node == reference.graph.node
    assert streamed.metadata_props == reference.metadata_props
    # The model is left as it was.
    assert list(model.graph.initializers) == [*tensors, "np"]
    assert all(v.is_initializer() for v in model.graph.initializers.values())


def test_progress_bar_names_the_stages(model, tmp_path, capsys):
    to_onnx(model, tmp_path / "quiet.onnx", progress=False)
    assert capsys.readouterr().err == ""
    to_onnx(model, tmp_path / "auto.onnx")  # None: only on a terminal, and this is none
    assert capsys.readouterr().err == ""
    to_onnx(model, tmp_path / "shown.onnx", progress=True)
    err = capsys.readouterr().err
    for stage in ("prepare the graph", "translate to ONNX", "save", "check", "done"):
        assert stage in err, err
    assert "4/4" in err
