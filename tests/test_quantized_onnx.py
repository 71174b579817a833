"""to_onnx(weights="int4" | "int8"): MatMulNBits files against an independent reference.

The reference is PyTorch eager on the same model with its base weights replaced by the
weights the file's blocks dequantize to (read back with ``dequantized_weights``): with
``accuracy_level=0`` ONNX Runtime computes in fp32, so the file must match that model to
fp32 tolerance. A GGUF source is built here with gguf-py (Q4_0, Q4_1, Q8_0 and an F32
tensor, rows permuted as llama.cpp stores query and key rows), so the carried blocks are
checked bit for bit without the embedded model; the embedded model's own file is checked
in test_embedded_model.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_rel_close, padded_batch, randomize_adapter, tiny_llama

from adaption_fx import BASE_ADAPTER, AdaptionConfig, rewrite
from adaption_fx.export import OrtModel, to_onnx
from adaption_fx.export.onnx.quantize import dequantized_weights

RTOL = 1e-4
CONFIG = AdaptionConfig(adapter_len=4, adapter_layers=2)


def _reference(seed: int, tied: bool, weights: dict[str, np.ndarray], adapter: dict):
    """A fresh tiny Llama with ``weights`` in place of its own, adapted like the original."""
    model = tiny_llama(seed, tie_word_embeddings=tied)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(torch.from_numpy(value))
    adapted = rewrite(model, CONFIG)
    adapted.load_state_dict(adapter)
    return adapted


def _metadata(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props["adaption_fx"])


def _base_weight_names(model) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.dim() == 2}
    if model.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


@pytest.mark.parametrize(("weights", "tied"), [("int4", True), ("int4", False), ("int8", False)])
def test_quantized_forward_matches_eager_on_dequantized_weights(tmp_path, weights, tied):
    source = tiny_llama(0, tie_word_embeddings=tied)
    adapted = rewrite(source, CONFIG)
    adapter = randomize_adapter(adapted)
    fp32 = to_onnx(adapted, tmp_path / "fp32.onnx")
    path = to_onnx(
        adapted,
        tmp_path / f"{weights}.onnx",
        adapter_as_inputs=True,
        weights=weights,
        accuracy_level=0,
    )
    file = onnx.load(str(path))
    # One MatMulNBits per input: q, k and v stacked, o, gate and up stacked, down; per
    # layer (4), plus the output projection.
    assert [n.op_type for n in file.graph.node].count("MatMulNBits") == 4 * 4 + 1
    assert fp32.stat().st_size > path.stat().st_size
    # Every base weight is quantized, and no fp32 copy of one is left in the file.
    dequantized = dequantized_weights(path)
    assert set(dequantized) == _base_weight_names(source)
    shapes = {tuple(p.shape) for p in source.parameters() if p.dim() == 2}
    floats = [i for i in file.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not [i.name for i in floats if tuple(i.dims) in shapes | {s[::-1] for s in shapes}]
    meta = _metadata(path)["weights"]
    bits = 4 if weights == "int4" else 8
    # The embedding and the output projection stay 8-bit in an int4 file.
    wide = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, entry in meta["schemes"].items():
        width = 8 if name in wide else bits
        assert entry["bits"] == width, name
        assert entry["scheme"] == f"int{width} asymmetric, block 32 (onnxruntime)"
        assert ("why" in entry) == (width != bits)
        assert 0 < entry["max_abs_error"] <= entry["max_abs_weight"] / (2**width - 1)
        assert entry["rms_error"] > 0, name
    assert meta["accuracy_level"] == 0 and meta["block_size"] == 32
    stacked = [meta["schemes"][f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert [e["rows"] for e in stacked] == [[0, 64], [64, 128], [128, 192]]
    assert len({e["initializer"] for e in stacked}) == 1

    ids, mask = padded_batch()
    real = mask.bool()
    reference = _reference(0, tied, dequantized, adapter)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        original = adapted(input_ids=ids, attention_mask=mask).logits
    ort = OrtModel(path)
    # The adapter's keys and values projected by the reference (dequantized) weights.
    ort.set_adapter_weights(reference)
    got = torch.from_numpy(ort(input_ids=ids.numpy(), attention_mask=mask.numpy()))
    assert_rel_close(got[real], expected[real], RTOL)
    assert not torch.allclose(got[real], original[real], atol=1e-5)  # it is quantized

    # A baked file projects the adapter's keys and values at export, with the weights the
    # model holds (the trained adapter's own keys), as adapter inputs from that model do.
    baked = to_onnx(adapted, tmp_path / "baked.onnx", weights=weights, accuracy_level=0)
    ort.set_adapter_weights(adapted)
    from_inputs = ort(input_ids=ids.numpy(), attention_mask=mask.numpy())
    from_baked = OrtModel(baked)(input_ids=ids.numpy(), attention_mask=mask.numpy())
    assert_rel_close(torch.from_numpy(from_baked)[real], torch.from_numpy(from_inputs)[real], 1e-5)


def test_int4_generation_with_adapter_inputs_and_mixed_batch(tmp_path):
    source = tiny_llama(1, tie_word_embeddings=True)
    adapted = rewrite(source, CONFIG)
    first = randomize_adapter(adapted, seed=1)
    adapted.add_adapter("other", CONFIG)
    adapted.set_adapter("other")
    other = randomize_adapter(adapted, seed=2)
    adapted.set_adapter("default")
    path = to_onnx(
        adapted,
        tmp_path / "mixed.onnx",
        for_generation=True,
        adapter_as_inputs=True,
        mixed_batch=True,
        weights="int4",
        accuracy_level=0,
    )
    dequantized = dequantized_weights(path)
    ort = OrtModel(path)
    references = {}
    for name, state in (("default", first), ("other", other)):
        references[name] = _reference(1, True, dequantized, state)
        ort.set_adapter_weights(references[name], adapter_name=name)
    ids, mask = padded_batch(batch=3, seq=6)
    mask[2] = 1  # generation takes left padding only (rows 0 and 1)
    names = ["default", "other", BASE_ADAPTER]
    got = torch.as_tensor(
        ort.generate(ids, mask, max_new_tokens=5, eos_token_id=None, adapter_names=names)
    )
    for row, name in enumerate(names):
        reference = references.get(name, references["default"])
        row_ids, row_mask = ids[row : row + 1], mask[row : row + 1]
        if name == BASE_ADAPTER:
            with reference.disable_adapter():
                want = reference.generate(row_ids, row_mask, max_new_tokens=5, eos_token_id=None)
        else:
            want = reference.generate(row_ids, row_mask, max_new_tokens=5, eos_token_id=None)
        assert torch.equal(got[row : row + 1, -5:], want[:, -5:]), name


# ------------------------------------------------------------------- a GGUF source
def _gguf_source(tmp_path, model):
    """Write some of ``model``'s weights as GGUF blocks, and give the model exactly the
    weights those blocks dequantize to (as transformers would load them); return the file
    and which tensor holds which weight."""
    import gguf
    from gguf.quants import dequantize, quantize

    kinds = {
        "model.layers.0.self_attn.q_proj.weight": ("Q4_1", True),
        "model.layers.1.self_attn.k_proj.weight": ("Q4_0", True),
        "model.layers.2.mlp.down_proj.weight": ("Q8_0", False),
        # A 4-bit embedding: the gather unpacks nibbles in the graph (and, tied, the
        # output projection adds the minimum term).
        "model.embed_tokens.weight": ("Q4_1", False),
        "model.layers.3.mlp.up_proj.weight": ("F32", False),
    }
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    for i, (name, (kind, permute)) in enumerate(kinds.items()):
        weight = params[name].detach().numpy()
        # The file stores rows in another order (llama.cpp's RoPE order for q and k).
        order = rng.permutation(weight.shape[0]) if permute else np.arange(weight.shape[0])
        stored = weight[order]
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(f"t{i}", stored)
            loaded = stored
        else:
            blocks = quantize(stored, qtype)
            writer.add_tensor(f"t{i}", blocks, raw_dtype=qtype)
            loaded = dequantize(blocks, qtype)
        with torch.no_grad():
            params[name][torch.from_numpy(order)] = torch.from_numpy(loaded)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "tiny.gguf", kinds


def test_gguf_blocks_are_carried_over_exactly(tmp_path):
    source = tiny_llama(2, tie_word_embeddings=True)
    gguf_file, kinds = _gguf_source(tmp_path, source)
    adapted = rewrite(source, CONFIG)
    adapter = randomize_adapter(adapted)
    path = to_onnx(
        adapted,
        tmp_path / "int4.onnx",
        adapter_as_inputs=True,
        weights="int4",
        gguf_file=gguf_file,
        accuracy_level=0,
    )
    schemes = _metadata(path)["weights"]["schemes"]
    dequantized = dequantized_weights(path)
    params = dict(source.named_parameters())
    for name, (kind, _) in kinds.items():
        if kind == "F32":  # not a block type: quantized here
            assert schemes[name]["scheme"].startswith("int4 asymmetric")
            continue
        assert schemes[name]["scheme"] == f"gguf {kind}"
        assert schemes[name]["bits"] == (8 if kind == "Q8_0" else 4)
        # The weights the file computes with are the GGUF's, bit for bit.
        assert torch.equal(torch.from_numpy(dequantized[name]), params[name].detach()), name
    others = set(schemes) - set(kinds)
    assert others and all(schemes[n]["scheme"].startswith("int4 asymmetric") for n in others)

    ids, mask = padded_batch()
    reference = _reference(2, True, dequantized, adapter)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    ort = OrtModel(path)
    ort.set_adapter_weights(reference)
    got = torch.from_numpy(ort(input_ids=ids.numpy(), attention_mask=mask.numpy()))
    assert_rel_close(got[mask.bool()], expected[mask.bool()], RTOL)


def test_quantized_export_refuses_bad_options(tmp_path):
    adapted = rewrite(tiny_llama(0), CONFIG)
    with pytest.raises(ValueError, match="weights must be one of"):
        to_onnx(adapted, tmp_path / "a.onnx", weights="int3")
    with pytest.raises(ValueError, match="gguf_file applies to"):
        to_onnx(adapted, tmp_path / "a.onnx", gguf_file=tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(adapted, tmp_path / "a.onnx", weights="int4", gguf_file=tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="accuracy_level"):
        to_onnx(adapted, tmp_path / "a.onnx", weights="int4", accuracy_level=7)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        to_onnx(adapted, tmp_path / "a.onnx", weights="int4", gguf_file=tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("*.onnx"))
