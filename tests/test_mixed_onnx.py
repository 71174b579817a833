"""Mixed-adapter batches in ONNX: to_onnx(..., mixed_batch=True) and OrtModel's adapter table.

Oracle: the PyTorch AdaptedModel run on one row alone with that row's adapter active (or
disabled, for "__base__"): every row of a mixed batch in ONNX Runtime must give those
logits (RTOL, at real-token positions) and generate those tokens.

One tiny grouped-query Mistral (4 layers, 8 query heads, 2 key/value heads) carries three
adapters of different structures (ADAPTERS: prompt lengths, adapted layers, gate kinds and
activations all differ), with random non-zero tensors. Every to_onnx call costs seconds, so
the files are module-scoped fixtures: the forward file, the decode-step file, a file
covering all four layers with longer prompts, and a plain (not mixed) file for the errors.
Tests that change which adapter is active, or add one, put the model back.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from helpers import (  # noqa: F401 (one_thread: a module-scoped autouse fixture)
    assert_rel_close,
    one_thread,
    randomize_adapter,
    step_logits,
    tiny_llama,
    tiny_mistral,
)

import adaption_fx.export.onnx.translate as onnx_translate
from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import OrtModel, to_onnx
from adaption_fx.generation.loop import TorchSession
from adaption_fx.model.mixed import BASE_ADAPTER
from adaption_fx.passes.fold import compute_folded

RTOL = 1e-4
ORT_OPTIONS = dict(intra_op_num_threads=1)
MODEL_INPUTS = ["input_ids", "attention_mask"]
# "default" is the adapter rewrite() adds; the others are added after it.
ADAPTERS = {
    "default": AdaptionConfig(adapter_len=3, adapter_layers=2),
    "wide": AdaptionConfig(
        adapter_len=5, adapter_layers=3, gate="per_head", gate_activation="tanh"
    ),
    "short": AdaptionConfig(adapter_len=2, adapter_layers=1, gate_activation="tanh"),
}
# Added after the exports (the files must take it without a new export): per-head identity.
LATE = AdaptionConfig(adapter_len=4, adapter_layers=2, gate="per_head")
LONGEST, WIDEST = 5, 3
# A batch mixing every adapter and the base model, the same adapter on several rows.
NAMES = ["wide", BASE_ADAPTER, "default", "short", "wide", "default"]


# ----------------------------------------------------------------------------- helpers
def batch(rows: int, seq: int, seed: int, left_only: bool = False):
    """input_ids and an attention_mask: left padding on rows 1 and 4, right padding on row
    3 (left padding there too where ``left_only``, as generation needs); no padding in
    sequences of fewer than 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    if seq < 4:
        return ids, mask
    for row, pad in ((1, 2), (4, 3)):
        if row < rows:
            mask[row, :pad] = 0
    if rows > 3:
        if left_only:
            mask[3, :1] = 0
        else:
            mask[3, -2:] = 0
    return ids, mask


def alone(model, name: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` with adapter ``name`` active (adapters disabled for the base)."""
    active = model.active_adapter
    try:
        with torch.no_grad():
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    return model(input_ids=ids, attention_mask=mask).logits
            model.set_adapter(name)
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        model.set_adapter(active)


def assert_rows_alone(model, out, ids, mask, names) -> None:
    """Each row of ``out`` is its adapter's logits for that row alone, at real tokens."""
    out = torch.as_tensor(np.asarray(out))
    assert out.shape[:2] == ids.shape
    for row, name in enumerate(names):
        keep = mask[row].bool()
        expected = alone(model, name, ids[row : row + 1], mask[row : row + 1])[0]
        assert torch.isfinite(out[row][keep]).all()
        assert_rel_close(out[row][keep], expected[keep], rtol=RTOL)


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return ((a - b).abs().max() / b.abs().max()).item()


def metadata(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["adaption_fx"])


def with_adapters(path, source, names=tuple(ADAPTERS)) -> OrtModel:
    """An OrtModel of ``path`` holding ``names`` from ``source`` (the AdaptedModel, or the
    checkpoint directory of all adapters)."""
    ort = OrtModel(path, **ORT_OPTIONS)
    for name in names:
        ort.set_adapter_weights(source, adapter_name=name)
    assert ort.adapter_names == list(names)
    return ort


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    """The Mistral with ADAPTERS, randomized; "default" active."""
    names = iter(ADAPTERS.items())
    first, config = next(names)
    model = rewrite(tiny_mistral(), config)
    randomize_adapter(model, seed=1)
    for seed, (name, config) in enumerate(names, start=2):
        model.add_adapter(name, config)
        model.set_adapter(name)
        randomize_adapter(model, seed=seed)
    model.set_adapter(first)
    return model


@pytest.fixture(scope="module")
def ckpt_dir(model, tmp_path_factory):
    """Every adapter saved by save_adapter: "default" at the root, the others in subfolders."""
    directory = tmp_path_factory.mktemp("mixed_ckpt") / "adapters"
    model.save_adapter(directory)
    return directory


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mixed_onnx")


@pytest.fixture(scope="module")
def forward_path(model, out_dir):
    return to_onnx(model, out_dir / "mixed.onnx", adapter_as_inputs=True, mixed_batch=True)


@pytest.fixture(scope="module")
def generation_path(model, out_dir):
    return to_onnx(
        model,
        out_dir / "mixed_generate.onnx",
        adapter_as_inputs=True,
        mixed_batch=True,
        for_generation=True,
    )


@pytest.fixture(scope="module")
def plain_path(model, out_dir):
    """A file exported without mixed_batch (the active adapter baked in)."""
    return to_onnx(model, out_dir / "plain.onnx")


@pytest.fixture
def late(model, tmp_path):
    """Adapter "late" (LATE) added to the model after the exports and saved on its own;
    yields its checkpoint directory and deletes it from the model after the test."""
    model.add_adapter("late", LATE)
    active = model.active_adapter
    try:
        model.set_adapter("late")
        randomize_adapter(model, seed=9)
        model.set_adapter(active)
        model.save_adapter(tmp_path / "late", "late")
        yield tmp_path / "late"
    finally:
        model.set_adapter(active)
        model.delete_adapter("late")


# ----------------------------------------------------------------------------- 1. the file
def test_mixed_file_inputs_and_metadata(model, forward_path):
    onnx.checker.check_model(str(forward_path))
    companion = forward_path.with_name("mixed.adapter.onnx")
    assert companion.is_file()
    meta = metadata(forward_path)
    mixed = meta["mixed_batch"]
    table = mixed["table_inputs"]
    covered = [s.module_path for s in model.sites[-WIDEST:]]
    assert [s["module_path"] for s in mixed["sites"]] == covered
    assert mixed["all_sites"] == [s.module_path for s in model.sites]
    assert mixed["sites"][0] == {
        "module_path": covered[0],
        "num_heads": 8,
        "num_kv_heads": 2,
        "head_dim": 8,
        "value_head_dim": 8,
        "hidden_size": 64,
    }
    assert mixed["max_adapter_len"] == LONGEST and mixed["adapter_layers"] == WIDEST
    assert mixed["dtype"] == "float32"
    assert mixed["projection"] == companion.name == meta["projection"]
    assert table[:2] == ["adapter_rows", "adapter_key_mask"]
    assert table[2:5] == [f"{covered[0]}.adaption_{s}" for s in ("key", "value", "gate_act")]
    assert len(table) == 2 + 3 * WIDEST
    assert meta["adapter_inputs"] == table

    proto = onnx.load(str(forward_path))
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    }
    assert list(dims) == MODEL_INPUTS + table
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["adapter_rows"] == ["batch"]  # the model inputs' batch
    assert dims["adapter_key_mask"] == ["adapters", "adapter_keys"]
    assert dims[table[2]] == ["adapters", 2, "adapter_keys", 8]
    assert dims[table[4]] == ["adapters", 8]
    # The companion: prompts of the longest adapter's length at every covered site in,
    # their keys and values out (gates are applied by OrtModel).
    projection = onnx.load(str(companion)).graph
    assert [i.name for i in projection.input] == [f"{p}.adaption_prompt" for p in covered]
    assert [d.dim_value for d in projection.input[0].type.tensor_type.shape.dim] == [1, 5, 64]
    assert [o.name for o in projection.output] == [
        f"{p}.adaption_{s}" for p in covered for s in ("key", "value")
    ]

    ort = OrtModel(forward_path, **ORT_OPTIONS)
    assert ort.mixed_batch and ort.adapter_names == []
    assert ort.model_input_names == MODEL_INPUTS
    assert ort.adapter_input_names == table


# ----------------------------------------------------------------------------- 2. forward
@pytest.mark.parametrize("source", ["model", "directory"])
def test_rows_match_each_adapter_alone(model, forward_path, ckpt_dir, source):
    ort = with_adapters(forward_path, model if source == "model" else ckpt_dir)
    for seed, (names, seq) in enumerate([(NAMES, 9), (["short", "wide", "default"], 1)]):
        ids, mask = batch(len(names), seq, seed=seed)
        out = ort(input_ids=ids, attention_mask=mask, adapter_names=names)
        assert_rows_alone(model, out, ids, mask, names)
    # The adapters are really there: rows of different adapters differ.
    ids, mask = batch(2, 7, seed=5, left_only=True)
    one = ort(input_ids=ids, attention_mask=mask, adapter_names=["wide", "short"])
    two = ort(input_ids=ids, attention_mask=mask, adapter_names=["short", "wide"])
    assert rel_diff(one, two) > 1e-2


def test_directory_gives_the_model_logits(model, forward_path, ckpt_dir):
    ids, mask = batch(6, 8, seed=11)
    from_model = with_adapters(forward_path, model)
    from_directory = with_adapters(forward_path, ckpt_dir)
    a = from_model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    b = from_directory(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    keep = mask.bool()
    assert_rel_close(torch.as_tensor(b)[keep], torch.as_tensor(a)[keep], rtol=1e-5)
    # The tables themselves: keys and values as the model folds them.
    for name in from_model.adapter_input_names[1:]:
        np.testing.assert_allclose(
            from_directory._table_feed[name], from_model._table_feed[name], atol=1e-5
        )


def test_base_rows_without_any_adapter(model, forward_path):
    ort = OrtModel(forward_path, **ORT_OPTIONS)
    ids, mask = batch(3, 6, seed=12)
    out = ort(input_ids=ids, attention_mask=mask, adapter_names=[BASE_ADAPTER] * 3)
    assert_rows_alone(model, out, ids, mask, [BASE_ADAPTER] * 3)
    outputs = ort.run(input_ids=ids, attention_mask=mask, adapter_names=[BASE_ADAPTER] * 3)
    np.testing.assert_array_equal(outputs["logits"], out)


def test_plain_trainer_file(model, forward_path, tmp_path):
    """A plain Trainer's model.safetensors (``state_dict()``, the config as its
    ``_extra_state``) sets a table entry like the adapter itself."""
    from safetensors.torch import save_file

    active = model.active_adapter
    model.set_adapter("wide")
    try:
        save_file(
            model.state_dict(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"}
        )
    finally:
        model.set_adapter(active)
    ort = with_adapters(forward_path, model, ["default"])
    ort.set_adapter_weights(tmp_path, adapter_name="from_trainer")
    ort.set_adapter_weights(model, adapter_name="wide")
    ids, mask = batch(3, 7, seed=14)
    out = ort(input_ids=ids, attention_mask=mask, adapter_names=["from_trainer", "default", "wide"])
    out = torch.as_tensor(np.asarray(out))
    for row in (0, 2):
        assert_rows_alone(
            model, out[row : row + 1], ids[row : row + 1], mask[row : row + 1], ["wide"]
        )


def test_peft_checkpoint_directory(model, forward_path, tmp_path):
    peft = pytest.importorskip("peft")
    source = tiny_mistral()  # the same seeded weights as the model's source
    config = peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(source), config).eval()
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name.endswith(("adaption_prompt", "adaption_gate")):
                scale = 0.5 if name.endswith("adaption_gate") else 1.0
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    peft_model.save_pretrained(tmp_path)

    ort = with_adapters(forward_path, model, ["wide"])
    ort.set_adapter_weights(tmp_path, adapter_name="peft")
    ids, mask = batch(3, 7, seed=13)
    out = torch.as_tensor(
        ort(input_ids=ids, attention_mask=mask, adapter_names=["peft", "wide", "peft"])
    )
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    for row in (0, 2):
        keep = mask[row].bool()
        assert_rel_close(out[row][keep], expected[row][keep], rtol=RTOL)
    assert_rows_alone(model, out[1:2], ids[1:2], mask[1:2], ["wide"])


# ----------------------------------------------------------------------------- 3. add/delete
def test_add_replace_and_delete_without_export(model, forward_path, late):
    ort = with_adapters(forward_path, model)
    # An adapter the file never saw (another length, per-head identity gate), from its
    # checkpoint directory.
    ort.set_adapter_weights(late, adapter_name="late")
    assert ort.adapter_names == [*ADAPTERS, "late"]
    names = ["late", "wide", BASE_ADAPTER, "late", "short"]
    ids, mask = batch(5, 8, seed=20)
    assert_rows_alone(
        model, ort(input_ids=ids, attention_mask=mask, adapter_names=names), ids, mask, names
    )

    # Delete the longest adapter: the table shrinks, the other rows stay their adapters'.
    ort.delete_adapter_weights("wide")
    assert ort.adapter_names == ["default", "short", "late"]
    with pytest.raises(ValueError, match=r"no adapter named \['wide'\]"):
        ort(input_ids=ids, attention_mask=mask, adapter_names=names)
    names = ["late", "default", BASE_ADAPTER, "late", "short"]
    assert_rows_alone(
        model, ort(input_ids=ids, attention_mask=mask, adapter_names=names), ids, mask, names
    )

    # Add adapters from the model: "wide" (a name the model has: that adapter) and "copy"
    # (a name it lacks: its active adapter). Then replace "late" by folded arrays: "wide"'s,
    # then the same with zero gates (the base model).
    ort.set_adapter_weights(model, adapter_name="wide")
    ort.set_adapter_weights(model, adapter_name="copy")
    names = ["late", "wide", "copy"]
    ids, mask = batch(3, 6, seed=21)
    out = ort(input_ids=ids, attention_mask=mask, adapter_names=names)
    assert_rows_alone(model, out, ids, mask, ["late", "wide", "default"])
    folded = compute_folded(model.adaption_graph("wide"), model.adapter_tensors("wide"))
    arrays = {k: v.numpy() for k, v in folded.items()}
    ort.set_adapter_weights(arrays, adapter_name="late")
    out = ort(input_ids=ids, attention_mask=mask, adapter_names=names)
    assert_rows_alone(model, out, ids, mask, ["wide", "wide", "default"])
    zero = {k: np.zeros_like(v) if k.endswith("gate_act") else v for k, v in arrays.items()}
    ort.set_adapter_weights(zero, adapter_name="late")
    out = ort(input_ids=ids, attention_mask=mask, adapter_names=names)
    assert_rows_alone(model, out, ids, mask, [BASE_ADAPTER, "wide", "default"])
    zero[next(iter(zero))][:] = 1  # the table holds a copy
    np.testing.assert_array_equal(ort(input_ids=ids, attention_mask=mask, adapter_names=names), out)
    assert ort.adapter_names == ["default", "short", "late", "wide", "copy"]


def test_wider_file_takes_longer_adapters_of_more_layers(model, out_dir, tmp_path, monkeypatch):
    """mixed_max_adapter_len and mixed_adapter_layers size a file beyond the model's
    adapters: an adapter of every layer and a longer prompt loads from its directory. The
    file and its companion are translated directly (torch.onnx.export is never called)."""

    def exporter(*args, **kwargs):
        raise AssertionError("torch.onnx.export called: the direct translation did not apply")

    monkeypatch.setattr(torch.onnx, "export", exporter)
    path = to_onnx(
        model,
        out_dir / "wider.onnx",
        adapter_as_inputs=True,
        mixed_batch=True,
        mixed_max_adapter_len=7,
        mixed_adapter_layers=4,
    )
    mixed = metadata(path)["mixed_batch"]
    assert mixed["max_adapter_len"] == 7 and mixed["adapter_layers"] == 4
    assert len(mixed["sites"]) == 4
    model.add_adapter("all", AdaptionConfig(adapter_len=7, adapter_layers=4, gate="per_head"))
    try:
        model.set_adapter("all")
        randomize_adapter(model, seed=30)
        model.set_adapter("default")
        model.save_adapter(tmp_path / "ckpt", "all")
        ort = with_adapters(path, tmp_path / "ckpt", ["all"])
        ort.set_adapter_weights(model, adapter_name="short")
        names = ["all", "short", BASE_ADAPTER, "all"]
        ids, mask = batch(4, 7, seed=31)
        out = ort(input_ids=ids, attention_mask=mask, adapter_names=names)
        assert_rows_alone(model, out, ids, mask, names)
    finally:
        model.set_adapter("default")
        model.delete_adapter("all")


def test_export_through_torch_onnx_export(model, tmp_path, monkeypatch):
    """Where the direct translation does not apply, torch.onnx.export writes the same
    inputs, with the same dynamic axes."""

    def not_direct(*args, **kwargs):
        raise onnx_translate.NotDirect("injected")

    monkeypatch.setattr(onnx_translate, "direct_graph", not_direct)
    path = to_onnx(model, tmp_path / "exported.onnx", adapter_as_inputs=True, mixed_batch=True)
    ort = with_adapters(path, model)
    shapes = {i.name: i.shape for i in ort.session.get_inputs()}
    assert shapes["adapter_rows"] == ["batch"]
    assert shapes["adapter_key_mask"] == ["adapters", "adapter_keys"]
    ids, mask = batch(6, 9, seed=40)
    out = ort(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    assert_rows_alone(model, out, ids, mask, NAMES)


def test_llama_without_grouped_query_heads(tmp_path):
    """As many key/value heads as query heads (no head sharing in the graph)."""
    llama = rewrite(tiny_llama(), AdaptionConfig(adapter_len=2, adapter_layers=1))
    randomize_adapter(llama, seed=41)
    llama.add_adapter("other", AdaptionConfig(adapter_len=4, adapter_layers=2, gate="per_head"))
    llama.set_adapter("other")
    randomize_adapter(llama, seed=42)
    llama.set_adapter("default")
    path = to_onnx(llama, tmp_path / "llama.onnx", adapter_as_inputs=True, mixed_batch=True)
    llama.save_adapter(tmp_path / "ckpt")
    ort = with_adapters(path, tmp_path / "ckpt", ["other", "default"])
    names = ["default", "other", BASE_ADAPTER, "other", "default"]
    ids, mask = batch(5, 8, seed=43)
    out = ort(input_ids=ids, attention_mask=mask, adapter_names=names)
    assert_rows_alone(llama, out, ids, mask, names)


# ----------------------------------------------------------------------------- 4. generation
def test_generation_rows_match_each_adapter_alone(model, generation_path, ckpt_dir):
    ort = with_adapters(generation_path, ckpt_dir)
    assert metadata(generation_path)["mixed_batch"]["adapter_layers"] == WIDEST
    ids, mask = batch(6, 7, seed=50, left_only=True)
    new = 6
    tokens = ort.generate(ids, mask, adapter_names=NAMES, max_new_tokens=new, eos_token_id=None)
    assert tokens.shape == (6, 7 + new)
    active = model.active_adapter
    try:
        for row, name in enumerate(NAMES):
            one = (ids[row : row + 1], mask[row : row + 1])
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    expected = model.generate(*one, max_new_tokens=new, eos_token_id=None)
            else:
                model.set_adapter(name)
                expected = model.generate(*one, max_new_tokens=new, eos_token_id=None)
            assert tokens[row].tolist() == expected[0].tolist(), name
    finally:
        model.set_adapter(active)
    # numpy prompts: the same tokens.
    again = ort.generate(
        ids.numpy(), mask.numpy(), adapter_names=NAMES, max_new_tokens=new, eos_token_id=None
    )
    assert torch.equal(again, tokens)
    # Every step's logits, row by row, against PyTorch's decode step with the row alone.
    steps = step_logits(ort.decode_session(NAMES), ids, mask, tokens[:, 7:])
    try:
        for row, name in enumerate(NAMES):
            one = (ids[row : row + 1], mask[row : row + 1], tokens[row : row + 1, 7:])
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    expected = step_logits(TorchSession(model.decoder()), *one)
            else:
                model.set_adapter(name)
                expected = step_logits(TorchSession(model.decoder()), *one)
            for got, want in zip(steps, expected, strict=True):
                assert_rel_close(got[row], want[0], rtol=RTOL)
    finally:
        model.set_adapter(active)


# ----------------------------------------------------------------------------- 5. errors
def test_call_errors(model, forward_path, plain_path):
    ort = with_adapters(forward_path, model)
    ids, mask = batch(3, 5, seed=60)
    names = ["wide", BASE_ADAPTER, "short"]
    before = ort(input_ids=ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(TypeError, match=r"mixed_batch=True: pass adapter_names"):
        ort(input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match=r"mixed_batch=True: pass adapter_names"):
        ort.run(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]") as info:
        ort(input_ids=ids, attention_mask=mask, adapter_names=["wide", "nope", "short"])
    assert "'__base__'" in str(info.value)
    with pytest.raises(ValueError, match="2 names but the batch has 3 rows"):
        ort(input_ids=ids, attention_mask=mask, adapter_names=["wide", "short"])
    with pytest.raises(TypeError, match="list of adapter names"):
        ort(input_ids=ids, attention_mask=mask, adapter_names="wide")
    np.testing.assert_array_equal(
        ort(input_ids=ids, attention_mask=mask, adapter_names=names), before
    )

    plain = OrtModel(plain_path, **ORT_OPTIONS)
    assert not plain.mixed_batch and plain.adapter_names == []
    with pytest.raises(ValueError, match="exported without mixed_batch=True"):
        plain(input_ids=ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(ValueError, match="exported without mixed_batch=True"):
        plain.delete_adapter_weights("wide")
    with pytest.raises(ValueError, match="adapter_name is for files exported with mixed_batch"):
        plain.set_adapter_weights(model, adapter_name="wide")
    plain(input_ids=ids, attention_mask=mask)  # unchanged otherwise


def test_adapter_table_errors_leave_it_unchanged(model, forward_path, ckpt_dir, tmp_path):
    ort = with_adapters(forward_path, model, ["default", "wide"])
    ids, mask = batch(3, 5, seed=61)
    names = ["wide", BASE_ADAPTER, "default"]
    before = ort(input_ids=ids, attention_mask=mask, adapter_names=names)

    with pytest.raises(TypeError, match="pass adapter_name="):
        ort.set_adapter_weights(model)
    with pytest.raises(ValueError, match="'__base__' names the base model"):
        ort.set_adapter_weights(model, adapter_name=BASE_ADAPTER)
    with pytest.raises(TypeError, match="non-empty str"):
        ort.set_adapter_weights(model, adapter_name="")
    with pytest.raises(TypeError, match="an adapter directory, an AdaptedModel or a mapping"):
        ort.set_adapter_weights(42, adapter_name="x")
    with pytest.raises(ValueError, match=r"no adapter named 'short'; adapters are"):
        ort.delete_adapter_weights("short")
    with pytest.raises(ValueError, match="cannot be deleted"):
        ort.delete_adapter_weights(BASE_ADAPTER)

    # Folded arrays: a missing tensor, an unknown one, a shape that does not fit.
    model.set_adapter("wide")
    folded = {
        k: v.numpy()
        for k, v in compute_folded(model.adaption_graph(), model.adapter_tensors()).items()
    }
    model.set_adapter("default")
    key = next(k for k in folded if k.endswith("adaption_value"))
    with pytest.raises(ValueError, match="missing") as info:
        ort.set_adapter_weights({k: v for k, v in folded.items() if k != key}, adapter_name="x")
    assert key in str(info.value)
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.self_attn"):
        ort.set_adapter_weights(
            {**folded, "model.layers.0.self_attn.adaption_key": folded[key]}, adapter_name="x"
        )
    wrong = dict(folded)
    wrong[key] = np.zeros((1, 2, 5, 7), np.float32)
    with pytest.raises(ValueError, match="expected"):
        ort.set_adapter_weights(wrong, adapter_name="wide")

    # Adapters the file cannot hold: a longer prompt than its projection's, from a
    # directory; a layer it does not cover, from a directory and from a model.
    for config, name in (
        (AdaptionConfig(adapter_len=LONGEST + 2, adapter_layers=2), "long"),
        (AdaptionConfig(adapter_len=2, adapter_layers=4), "deep"),
    ):
        model.add_adapter(name, config)
        model.save_adapter(tmp_path / name, name)
    try:
        with pytest.raises(ValueError, match=r"adapter_len=7 is longer than the 5 prompt"):
            ort.set_adapter_weights(tmp_path / "long", adapter_name="long")
        outside = r"adapter_layers=4 adapts \['model.layers.0.self_attn'\], outside the 3"
        with pytest.raises(ValueError, match=outside):
            ort.set_adapter_weights(tmp_path / "deep", adapter_name="deep")
        with pytest.raises(ValueError, match=outside):
            ort.set_adapter_weights(model, adapter_name="deep")
        # From the model, a longer prompt is fine: it needs no projection.
        ort.set_adapter_weights(model, adapter_name="long")
        ort.delete_adapter_weights("long")
    finally:
        model.delete_adapter("long")
        model.delete_adapter("deep")

    assert ort.adapter_names == ["default", "wide"]
    np.testing.assert_array_equal(
        ort(input_ids=ids, attention_mask=mask, adapter_names=names), before
    )


def test_generate_errors(model, generation_path):
    ort = with_adapters(generation_path, model, ["short"])
    ids, mask = batch(2, 4, seed=62, left_only=True)
    with pytest.raises(TypeError, match="mixed_batch=True: pass adapter_names"):
        ort.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(TypeError, match="mixed_batch=True: pass adapter_names"):
        ort.decode_session()
    with pytest.raises(ValueError, match="3 names but the batch has 2 rows"):
        ort.generate(ids, mask, adapter_names=["short"] * 3, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"no adapter named \['wide'\]"):
        ort.generate(ids, mask, adapter_names=["short", "wide"], max_new_tokens=2)
    session = ort.decode_session(["short", BASE_ADAPTER])
    with pytest.raises(ValueError, match="adapter_names name 2 rows; the batch has 3"):
        session.reset(3)
    out = ort.generate(ids, mask, adapter_names=["short", BASE_ADAPTER], max_new_tokens=2)
    assert out.shape == (2, 6)


def test_to_onnx_mixed_argument_errors(model, tmp_path):
    target = tmp_path / "m.onnx"
    with pytest.raises(TypeError, match="mixed_batch must be a bool"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_batch=1)
    with pytest.raises(ValueError, match="needs adapter_as_inputs=True"):
        to_onnx(model, target, mixed_batch=True)
    with pytest.raises(ValueError, match="fold=False is not supported"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_batch=True, fold=False)
    with pytest.raises(ValueError, match="a mixed_batch file serves every adapter"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_batch=True, adapter_name="wide")
    with pytest.raises(ValueError, match=r"mixed_max_adapter_len=4 is shorter than adapter 'wide'"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_batch=True, mixed_max_adapter_len=4)
    with pytest.raises(ValueError, match="covers fewer layers than adapter 'wide'"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_batch=True, mixed_adapter_layers=2)
    with pytest.raises(ValueError, match="only 4 attention sites"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_batch=True, mixed_adapter_layers=5)
    with pytest.raises(TypeError, match="mixed_max_adapter_len must be an int"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_batch=True, mixed_max_adapter_len=2.0)
    with pytest.raises(ValueError, match="apply to mixed_batch=True only"):
        to_onnx(model, target, adapter_as_inputs=True, mixed_max_adapter_len=5)
    assert list(tmp_path.iterdir()) == []
