"""adaption_fx.export.to_onnx and OrtModel: ONNX Runtime against PyTorch eager.

Every ``to_onnx`` call costs about 7 s, so each exported file is a module-scoped fixture
built once and shared (six exports in all). One tiny grouped-query Mistral is captured once;
its "default" and "other" adapters share a structure (ADAPTER_LEN prompts in the top
ADAPTER_LAYERS layers) and hold different random, non-zero tensors. Tests that depend on
which adapter is active set it themselves.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_mistral

import adaption_fx.export.onnx.exporter as onnx_exporter
from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import OrtModel, to_onnx
from adaption_fx.export.ort import select_providers

ADAPTER_LEN, ADAPTER_LAYERS = 4, 2
RTOL = 1e-4
MODEL_INPUTS = ["input_ids", "attention_mask"]
# (batch, seq) shapes other than the export example (batch 2, seq 8): padded where batch > 1.
SHAPES = [(3, 7), (1, 1), (1, 13), (4, 21)]


# ----------------------------------------------------------------------------- helpers
def assert_close_at_tokens(actual, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """ORT logits match the reference at real-token positions (mask == 1), within RTOL.

    Positions a left-padding mask hides from every key are excluded: softmax over no key at
    all gives arbitrary values there, and PyTorch's SDPA and ONNX Runtime pick different
    ones. Those logits mean nothing, so only real-token positions are compared.
    """
    actual = torch.as_tensor(np.asarray(actual))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    keep = mask.bool()
    assert torch.isfinite(actual[keep]).all()
    assert_rel_close(actual[keep], expected[keep], rtol=RTOL)


def rel_diff_at_tokens(a, b, mask: torch.Tensor) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    keep = mask.bool()
    return ((a[keep] - b[keep]).abs().max() / b[keep].abs().max()).item()


def eager(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def metadata(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["adaption_fx"])


def weight_matmuls_on_inputs(path, names: list[str]) -> list[list[str]]:
    """MatMul/Gemm nodes that multiply one of the graph inputs ``names`` by a stored weight
    (an initializer): a projection of that input inside the graph."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [
        list(node.input)
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm")
        and any(i in names for i in node.input)
        and any(i in initializers for i in node.input)
    ]


def matmul_count(path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type in ("MatMul", "Gemm") for node in graph.node)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models():
    """(source HF Mistral, AdaptedModel with random adapters "default" and "other")."""
    src = tiny_mistral()
    model = rewrite(src, AdaptionConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS))
    randomize_adapter(model, seed=11)
    model.add_adapter(
        "other", AdaptionConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS)
    )
    model.set_adapter("other")
    randomize_adapter(model, seed=12)
    model.set_adapter("default")
    return src, model


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def baked_path(models, out_dir):
    _, model = models
    model.set_adapter("default")
    return to_onnx(model, out_dir / "baked.onnx")


@pytest.fixture(scope="module")
def inputs_path(models, out_dir):
    _, model = models
    model.set_adapter("default")
    return to_onnx(model, out_dir / "inputs.onnx", adapter_as_inputs=True)


@pytest.fixture(scope="module")
def raw_inputs_path(models, out_dir):
    _, model = models
    model.set_adapter("default")
    return to_onnx(model, out_dir / "raw.onnx", adapter_as_inputs=True, fold=False)


@pytest.fixture(scope="module")
def base_path(models, out_dir):
    _, model = models
    model.set_adapter("default")
    with model.disable_adapter():
        path = to_onnx(model, out_dir / "base.onnx")
    assert model.adapters_enabled
    return path


@pytest.fixture(scope="module")
def checkpoint_dir(models, tmp_path_factory):
    """Both adapters saved by save_adapter: "default" at the root, "other" in a subfolder."""
    _, model = models
    directory = tmp_path_factory.mktemp("ckpt") / "adapters"
    model.save_adapter(directory)
    assert (directory / "adapter_config.json").is_file()
    assert (directory / "other" / "adapter_config.json").is_file()
    return directory


# ----------------------------------------------------------------------------- 1. baked
def test_baked_folded_export_matches_eager(models, baked_path):
    src, model = models
    model.set_adapter("default")
    onnx.checker.check_model(str(baked_path))
    proto = onnx.load(str(baked_path))
    assert [i.name for i in proto.graph.input] == MODEL_INPUTS
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert all(dims[0]) and dims[0] == dims[1], dims  # symbolic batch and seq, shared
    assert not [i.name for i in proto.graph.initializer if "adaption_prompt" in i.name]

    meta = metadata(baked_path)
    assert meta["folded"] is True
    assert meta["adapter_inputs"] == []
    assert meta["adapter"]["name"] == "default"
    assert meta["adapter"]["adapter_len"] == ADAPTER_LEN

    ort = OrtModel(baked_path)
    assert ort.adapter_input_names == []
    assert ort.model_input_names == MODEL_INPUTS
    assert ort.output_names == ["logits"]
    for i, (batch, seq) in enumerate(SHAPES):
        ids, mask = padded_batch(batch, seq, seed=i)
        expected = eager(model, ids, mask)
        # numpy in for some shapes, torch tensors for the others
        feed = (ids.numpy(), mask.numpy()) if i % 2 else (ids, mask)
        out = ort(input_ids=feed[0], attention_mask=feed[1])
        assert isinstance(out, np.ndarray)
        assert_close_at_tokens(out, expected, mask)
        # The adapter is in there: the base model gives clearly different logits.
        assert rel_diff_at_tokens(out, eager(src, ids, mask), mask) > 1e-2


# ----------------------------------------------------------------------------- 2. swap
def test_adapter_as_inputs_file_is_folded(inputs_path, raw_inputs_path):
    companion = inputs_path.with_name("inputs.adapter.onnx")
    assert companion.is_file()
    onnx.checker.check_model(str(inputs_path))
    meta = metadata(inputs_path)
    assert meta["folded"] is True
    assert meta["projection"] == companion.name
    ort = OrtModel(inputs_path)
    assert ort.adapter_input_names
    assert all(
        n.endswith(("adaption_key", "adaption_value", "adaption_gate_act"))
        for n in ort.adapter_input_names
    ), ort.adapter_input_names
    assert list(ort.inputs) == MODEL_INPUTS + ort.adapter_input_names
    # No prompt projection left: no adapter input meets a weight in a MatMul/Gemm, while
    # the unfolded file projects each prompt (the check sees it there).
    assert weight_matmuls_on_inputs(inputs_path, ort.adapter_input_names) == []
    raw_names = OrtModel(raw_inputs_path).adapter_input_names
    assert weight_matmuls_on_inputs(raw_inputs_path, raw_names)
    assert matmul_count(inputs_path) < matmul_count(raw_inputs_path)


def test_one_file_serves_two_adapters(models, inputs_path, checkpoint_dir):
    _, model = models
    ort = OrtModel(inputs_path)
    ids, mask = padded_batch(3, 7, seed=5)
    outputs = {}
    try:
        for name, folder in (("default", checkpoint_dir), ("other", checkpoint_dir / "other")):
            model.set_adapter(name)
            expected = eager(model, ids, mask)
            ort.set_adapter_weights(model)
            from_model = ort(input_ids=ids, attention_mask=mask)
            assert_close_at_tokens(from_model, expected, mask)
            ort.set_adapter_weights(folder)
            from_dir = ort(input_ids=ids, attention_mask=mask)
            assert_close_at_tokens(from_dir, expected, mask)
            # other shapes than the export example, with the same adapter feed
            ids2, mask2 = padded_batch(4, 21, seed=6)
            assert_close_at_tokens(
                ort(input_ids=ids2, attention_mask=mask2), eager(model, ids2, mask2), mask2
            )
            outputs[name] = from_dir
    finally:
        model.set_adapter("default")
    assert rel_diff_at_tokens(outputs["default"], outputs["other"], mask) > 1e-2


def test_mapping_of_folded_arrays(models, inputs_path):
    """Zero activated gates switch the adapter off: the base model's logits."""
    src, _ = models
    ort = OrtModel(inputs_path)
    shapes = metadata(inputs_path)["adapter_shapes"]
    rng = np.random.default_rng(0)
    mapping = {
        name: np.zeros(shape, np.float32)
        if name.endswith("gate_act")
        else rng.standard_normal(shape).astype(np.float32)
        for name, shape in shapes.items()
    }
    ort.set_adapter_weights(mapping)
    ids, mask = padded_batch(3, 7, seed=7)
    assert_close_at_tokens(ort(input_ids=ids, attention_mask=mask), eager(src, ids, mask), mask)


def test_peft_checkpoint_directory(models, inputs_path, tmp_path):
    peft = pytest.importorskip("peft")
    src, _ = models
    config = peft.AdaptionPromptConfig(
        adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(copy.deepcopy(src), config).eval()
    g = torch.Generator().manual_seed(21)
    params = {
        n: p
        for n, p in peft_model.named_parameters()
        if n.rsplit(".", 1)[-1] in ("adaption_prompt", "adaption_gate")
    }
    assert len(params) == 2 * ADAPTER_LAYERS
    with torch.no_grad():
        for name, param in params.items():
            scale = 0.5 if name.endswith("adaption_gate") else 1.0
            param.copy_(torch.randn(param.shape, generator=g) * scale)
    peft_model.save_pretrained(tmp_path)

    ort = OrtModel(inputs_path)
    ort.set_adapter_weights(tmp_path)
    for i, (batch, seq) in enumerate([(3, 7), (1, 13)]):
        ids, mask = padded_batch(batch, seq, seed=30 + i)
        expected = eager(peft_model, ids, mask)
        out = ort(input_ids=ids, attention_mask=mask)
        assert_close_at_tokens(out, expected, mask)
        assert rel_diff_at_tokens(out, eager(src, ids, mask), mask) > 1e-2


# ----------------------------------------------------------------------------- 3. disabled
def test_disabled_adapter_exports_base_model(models, base_path):
    src, model = models
    meta = metadata(base_path)
    assert meta["adapter"] is None
    assert meta["adapter_inputs"] == []
    ort = OrtModel(base_path)
    assert ort.adapter_input_names == []
    model.set_adapter("default")
    for i, (batch, seq) in enumerate(SHAPES):
        ids, mask = padded_batch(batch, seq, seed=40 + i)
        out = ort(input_ids=ids, attention_mask=mask)
        assert_close_at_tokens(out, eager(src, ids, mask), mask)
        if seq > 1:
            assert rel_diff_at_tokens(out, eager(model, ids, mask), mask) > 1e-2


# ----------------------------------------------------------------------------- 4. fold=False
def test_unfolded_adapter_inputs(models, raw_inputs_path, checkpoint_dir):
    _, model = models
    meta = metadata(raw_inputs_path)
    assert meta["folded"] is False
    assert meta["projection"] is None
    assert not raw_inputs_path.with_name("raw.adapter.onnx").exists()
    ort = OrtModel(raw_inputs_path)
    assert ort.adapter_input_names == meta["raw_adapter_inputs"]
    assert all(n.endswith(("adaption_prompt", "adaption_gate")) for n in ort.adapter_input_names), (
        ort.adapter_input_names
    )
    ids, mask = padded_batch(4, 21, seed=50)
    outputs = {}
    try:
        for name, folder in (("other", checkpoint_dir / "other"), ("default", checkpoint_dir)):
            model.set_adapter(name)
            expected = eager(model, ids, mask)
            ort.set_adapter_weights(folder)
            outputs[name] = ort(input_ids=ids, attention_mask=mask)
            assert_close_at_tokens(outputs[name], expected, mask)
            ort.set_adapter_weights(model)
            assert_close_at_tokens(ort(input_ids=ids, attention_mask=mask), expected, mask)
    finally:
        model.set_adapter("default")
    assert rel_diff_at_tokens(outputs["default"], outputs["other"], mask) > 1e-2


# ----------------------------------------------------------------------------- 5. external
def test_external_data(models, tmp_path_factory):
    _, model = models
    model.set_adapter("default")
    directory = tmp_path_factory.mktemp("external")
    path = to_onnx(model, directory / "ext.onnx", external_data=True)
    assert path == directory / "ext.onnx"
    data = directory / "ext.onnx.data"
    assert sorted(p.name for p in directory.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert data.stat().st_size > path.stat().st_size  # the weights live in the data file
    onnx.checker.check_model(str(path))

    ids, mask = padded_batch(3, 7, seed=60)
    expected = eager(model, ids, mask)
    assert_close_at_tokens(OrtModel(path)(input_ids=ids, attention_mask=mask), expected, mask)
    # The data file is referenced by a relative name: the pair still loads once moved.
    moved = tmp_path_factory.mktemp("moved")
    shutil.move(str(path), moved / "ext.onnx")
    shutil.move(str(data), moved / "ext.onnx.data")
    ort = OrtModel(moved / "ext.onnx")
    assert_close_at_tokens(ort(input_ids=ids, attention_mask=mask), expected, mask)


# ----------------------------------------------------------------------------- 6. errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        OrtModel(tmp_path / "nope.onnx")


def test_bad_call_inputs(baked_path):
    ort = OrtModel(baked_path)
    ids, mask = padded_batch(3, 7)
    with pytest.raises(TypeError, match="missing") as info:
        ort(input_ids=ids)
    assert "input_ids" in str(info.value) and "'attention_mask'" in str(info.value)
    with pytest.raises(TypeError, match=r"unexpected \['position_ids'\]"):
        ort(input_ids=ids, attention_mask=mask, position_ids=ids)
    with pytest.raises(TypeError, match="int64"):
        ort(input_ids=ids.to(torch.int32), attention_mask=mask)
    with pytest.raises(ValueError, match="input_ids must be 2-d"):
        ort(input_ids=ids[0], attention_mask=mask[0])
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        ort(input_ids=ids.tolist(), attention_mask=mask)
    # The session is still fine after the refusals.
    assert ort(input_ids=ids, attention_mask=mask).shape == (3, 7, 96)


def test_adapter_inputs_need_weights_first(inputs_path):
    ort = OrtModel(inputs_path)
    ids, mask = padded_batch(3, 7)
    with pytest.raises(RuntimeError, match="set_adapter_weights"):
        ort(input_ids=ids, attention_mask=mask)


def test_set_adapter_weights_from_a_plain_trainer_file(models, inputs_path, tmp_path):
    """A plain Trainer's model.safetensors (``state_dict()``: tensors and config) works
    as an adapter directory."""
    from safetensors.torch import save_file

    _, model = models
    model.set_adapter("default")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ort = OrtModel(inputs_path)
    ort.set_adapter_weights(tmp_path)
    ids, mask = padded_batch(3, 7, seed=71)
    assert_close_at_tokens(ort(input_ids=ids, attention_mask=mask), eager(model, ids, mask), mask)


def test_set_adapter_weights_on_baked_file(models, baked_path, checkpoint_dir):
    _, model = models
    ort = OrtModel(baked_path)
    with pytest.raises(ValueError, match="adapter_as_inputs"):
        ort.set_adapter_weights(model)
    with pytest.raises(ValueError, match="adapter_as_inputs"):
        ort.set_adapter_weights(checkpoint_dir)


def test_failed_set_adapter_weights_keeps_previous(models, inputs_path, tmp_path):
    _, model = models
    model.set_adapter("default")
    ort = OrtModel(inputs_path)
    ids, mask = padded_batch(3, 7, seed=70)
    ort.set_adapter_weights(model)
    before = ort(input_ids=ids, attention_mask=mask)
    assert_close_at_tokens(before, eager(model, ids, mask), mask)

    shapes = metadata(inputs_path)["adapter_shapes"]
    good = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    key = next(n for n in shapes if n.endswith("adaption_key"))
    wrong_shape = dict(good)
    wrong_shape[key] = np.zeros([*shapes[key][:-2], shapes[key][-2] + 1, shapes[key][-1]])
    wrong_shape[key] = wrong_shape[key].astype(np.float32)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ort.set_adapter_weights(wrong_shape)
    missing = {n: v for n, v in good.items() if n != key}
    with pytest.raises(ValueError, match="missing") as info:
        ort.set_adapter_weights(missing)
    assert key in str(info.value)
    with pytest.raises(TypeError):
        ort.set_adapter_weights(42)

    # A checkpoint and an adapter of another structure (one more prompt token).
    model.add_adapter(
        "longer", AdaptionConfig(adapter_len=ADAPTER_LEN + 1, adapter_layers=ADAPTER_LAYERS)
    )
    try:
        model.save_adapter(tmp_path / "longer", "longer")
        with pytest.raises(ValueError, match="adapter_len"):
            ort.set_adapter_weights(tmp_path / "longer" / "longer")
        model.set_adapter("longer")
        with pytest.raises(ValueError, match="adapter_len"):
            ort.set_adapter_weights(model)
    finally:
        model.set_adapter("default")
        model.delete_adapter("longer")

    after = ort(input_ids=ids, attention_mask=mask)
    np.testing.assert_array_equal(after, before)


def test_to_onnx_argument_errors(models, tmp_path):
    src, model = models
    with pytest.raises(ValueError, match=r"\.onnx"):
        to_onnx(model, tmp_path / "model.pt")
    with pytest.raises(TypeError, match="AdaptedModel"):
        to_onnx(src, tmp_path / "model.onnx")
    with model.disable_adapter(), pytest.raises(ValueError, match="adapters are disabled"):
        to_onnx(model, tmp_path / "model.onnx", adapter_as_inputs=True)
    assert model.adapters_enabled
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 7. providers
def test_select_providers(baked_path, capfd):
    import onnxruntime

    cuda = (
        "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        and torch.cuda.is_available()
    )
    expected = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    )
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_providers(None) == expected
        ort = OrtModel(baked_path, providers=None)
    assert ort.providers == expected
    assert ort.session.get_providers() == expected
    assert [str(w.message) for w in caught] == []
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured

    with pytest.raises(ValueError, match="NoSuchProvider") as info:
        select_providers(["NoSuchProvider"])
    assert "CPUExecutionProvider" in str(info.value)
    assert select_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- 8. atomicity
def test_failed_export_before_writing_leaves_nothing(models, tmp_path, monkeypatch):
    _, model = models

    def boom(*args, **kwargs):
        raise RuntimeError("injected export failure")

    monkeypatch.setattr(onnx_exporter, "onnx_model_of", boom)
    with pytest.raises(RuntimeError, match="injected export failure"):
        to_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_after_writing_keeps_existing_file(models, tmp_path, monkeypatch):
    """The export is written into a temporary directory, then the check fails: the old
    file stays as it was and no temporary directory or companion file is left."""
    _, model = models
    model.set_adapter("default")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous contents")
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        # the new file exists (in the temporary directory) when it is checked
        assert onnx.load(str(args[0])).graph.input
        raise onnx.checker.ValidationError("injected check failure")

    monkeypatch.setattr(onnx.checker, "check_model", boom)
    with pytest.raises(onnx.checker.ValidationError, match="injected check failure"):
        to_onnx(model, path, external_data=True)
    assert len(calls) == 1
    assert path.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
