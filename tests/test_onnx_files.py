"""Opening ONNX files from elsewhere: OrtModel, its decode sessions and dequantized_weights.

A file may come from anyone: a damaged or hostile one must give an ``OnnxFileError`` (a
``ValueError``) naming the file and what is wrong (the metadata field, or ONNX Runtime's
reason), at once and before anything it sizes is allocated; it must never make us read a
file outside its directory. A missing file stays a FileNotFoundError.

Two exports, made once (module-scoped): a tiny Llama as a mixed-batch decode-step file
(metadata of every kind: mixed_batch, generation, an adapter projection companion), and
the same model with int8 weights (the ``weights`` metadata ``dequantized_weights`` reads).
Every other file is a copy with its metadata or bytes changed, made with the onnx package.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import one_thread, randomize_adapter, tiny_llama  # noqa: F401 (one_thread: autouse)
from onnx import TensorProto, helper

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.export import OnnxFileError, OrtModel, dequantized_weights, to_onnx

ORT_OPTIONS = dict(intra_op_num_threads=1)
COMPANION = "mixed.adapter.onnx"
# A refused file is refused at once: no export, no allocation the file asks for.
QUICK_S = 5.0


# ----------------------------------------------------------------------------- helpers
def read_metadata(path: Path) -> dict[str, Any]:
    proto = onnx.load(str(path), load_external_data=False)
    return json.loads({p.key: p.value for p in proto.metadata_props}["adaption_fx"])


def with_metadata(
    source: Path, directory: Path, edit: Callable[[dict], Any] | str, name: str | None = None
) -> Path:
    """A copy of ``source`` in ``directory`` (its companion beside it) whose metadata is
    ``edit`` applied to a copy of the source's, or the text ``edit``."""
    proto = onnx.load(str(source), load_external_data=False)
    (entry,) = [p for p in proto.metadata_props if p.key == "adaption_fx"]
    if isinstance(edit, str):
        entry.value = edit
    else:
        metadata = json.loads(entry.value)
        edit(metadata)
        entry.value = json.dumps(metadata)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or source.name)
    onnx.save(proto, str(path))
    if (source.parent / COMPANION).is_file():
        shutil.copy(source.parent / COMPANION, directory / COMPANION)
    return path


def assert_names(exc: pytest.ExceptionInfo, path: Path, *parts: str) -> None:
    """The error is an OnnxFileError (a ValueError) naming ``path`` and each of ``parts``."""
    assert isinstance(exc.value, OnnxFileError)
    assert isinstance(exc.value, ValueError)
    message = str(exc.value)
    assert str(path) in message, message
    for part in parts:
        assert part in message, (part, message)


def setter(dotted: str, value: Any) -> Callable[[dict], None]:
    """An edit setting the metadata field at ``dotted`` ("a.b[0].c") to ``value``."""

    def edit(metadata: dict) -> None:
        keys: list[Any] = []
        for part in dotted.split("."):
            name, *indices = part.replace("]", "").split("[")
            keys.append(name)
            keys.extend(int(i) for i in indices)
        target = metadata
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def tiny_onnx(path: Path, initializer: TensorProto) -> Path:
    """A one-Add ONNX file (y = x + w) holding ``initializer`` as w."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [initializer],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def external(location: str) -> TensorProto:
    """A float (4,) initializer w whose data is in the external file ``location``."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    model = rewrite(tiny_llama(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    randomize_adapter(model, seed=5)
    return model


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_files")


@pytest.fixture(scope="module")
def ckpt_dir(model, out_dir):
    directory = out_dir / "adapter"
    model.save_adapter(directory)
    return directory


@pytest.fixture(scope="module")
def mixed_path(model, out_dir):
    """The mixed-batch decode-step file, with its projection companion beside it."""
    path = to_onnx(
        model,
        out_dir / "export" / "mixed.onnx",
        adapter_as_inputs=True,
        mixed_batch=True,
        for_generation=True,
    )
    assert (path.parent / COMPANION).is_file()
    return path


@pytest.fixture(scope="module")
def int8_path(model, out_dir):
    return to_onnx(model, out_dir / "int8" / "int8.onnx", weights="int8")


def generate(ort: OrtModel) -> torch.Tensor:
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    return ort.generate(
        ids, max_new_tokens=3, do_sample=False, adapter_names=["a", "__base__"], eos_token_id=None
    )


# ----------------------------------------------------------------------------- valid files
def test_valid_file_and_its_copy_load_and_run(mixed_path, ckpt_dir, tmp_path):
    ort = OrtModel(mixed_path, **ORT_OPTIONS)
    ort.set_adapter_weights(ckpt_dir, adapter_name="a")
    expected = generate(ort)
    assert expected.shape == (2, 6)
    # A copy with its metadata rewritten unchanged (what every other test edits) is as good.
    same = OrtModel(with_metadata(mixed_path, tmp_path, lambda m: None), **ORT_OPTIONS)
    same.set_adapter_weights(ckpt_dir, adapter_name="a")
    assert torch.equal(generate(same), expected)


def test_valid_int8_file_dequantizes(int8_path):
    weights = dequantized_weights(int8_path)
    assert weights and all(w.dtype == np.float32 and w.ndim == 2 for w in weights.values())


# ----------------------------------------------------------------------------- metadata
def test_metadata_not_json(mixed_path, tmp_path):
    path = with_metadata(mixed_path, tmp_path, "{not json")
    with pytest.raises(OnnxFileError) as exc:
        OrtModel(path, **ORT_OPTIONS)
    assert_names(exc, path, "metadata", "not valid JSON")
    with pytest.raises(OnnxFileError) as exc:
        dequantized_weights(path)
    assert_names(exc, path, "metadata", "not valid JSON")


def test_metadata_not_an_object(mixed_path, tmp_path):
    path = with_metadata(mixed_path, tmp_path, "[1, 2]")
    with pytest.raises(OnnxFileError) as exc:
        OrtModel(path, **ORT_OPTIONS)
    assert_names(exc, path, "metadata", "must be an object")


def test_metadata_too_long(mixed_path, tmp_path):
    path = with_metadata(mixed_path, tmp_path, setter("padding", "x" * (2 << 20)))
    with pytest.raises(OnnxFileError) as exc:
        OrtModel(path, **ORT_OPTIONS)
    assert_names(exc, path, "metadata", "more than")


BAD_FIELDS = {
    # field: (the edit, what the message names beside the file)
    "format": (setter("format", 2), "format"),
    "folded type": (setter("folded", "yes"), "folded"),
    "adapter_inputs type": (setter("adapter_inputs", "adapter_rows"), "adapter_inputs"),
    "adapter_inputs entry": (setter("adapter_inputs[0]", 3), "adapter_inputs[0]"),
    "adapter_inputs unknown": (
        lambda m: m["adapter_inputs"].append("nowhere"),
        "adapter_inputs",
    ),
    "adapter_inputs repeated": (
        lambda m: m["adapter_inputs"].append(m["adapter_inputs"][0]),
        "adapter_inputs",
    ),
    "max_adapter_len huge": (setter("mixed_batch.max_adapter_len", 10**9), "max_adapter_len"),
    "max_adapter_len zero": (setter("mixed_batch.max_adapter_len", 0), "max_adapter_len"),
    "max_adapter_len float": (setter("mixed_batch.max_adapter_len", 3.0), "max_adapter_len"),
    "hidden_size string": (setter("mixed_batch.sites[0].hidden_size", "64"), "hidden_size"),
    "hidden_size huge": (setter("mixed_batch.sites[0].hidden_size", 10**12), "hidden_size"),
    "num_kv_heads huge": (setter("mixed_batch.sites[1].num_kv_heads", 10**6), "num_kv_heads"),
    "head_dim not the graph's": (setter("mixed_batch.sites[0].head_dim", 32), "head_dim"),
    "num_heads not the graph's": (setter("mixed_batch.sites[0].num_heads", 8), "num_heads"),
    "kv heads x dim too wide": (
        lambda m: m["mixed_batch"]["sites"][0].update(num_kv_heads=1 << 10, head_dim=1 << 10),
        "mixed_batch.sites[0]",
    ),
    "site not an object": (setter("mixed_batch.sites[0]", [1]), "mixed_batch.sites[0]"),
    "site missing a field": (
        lambda m: m["mixed_batch"]["sites"][0].pop("module_path"),
        "module_path",
    ),
    "sites empty": (setter("mixed_batch.sites", []), "mixed_batch.sites"),
    "all_sites lacks a site": (
        lambda m: m["mixed_batch"]["all_sites"].pop(),
        "mixed_batch.all_sites",
    ),
    "all_sites too many": (setter("mixed_batch.all_sites", ["x"] * 70_000), "all_sites"),
    "adapter_layers beyond all_sites": (setter("mixed_batch.adapter_layers", 99), "adapter_layers"),
    "table dtype": (setter("mixed_batch.dtype", "__class__"), "dtype"),
    "table dtype not the graph's": (setter("mixed_batch.dtype", "float16"), "mixed_batch.dtype"),
    "rows_input": (setter("mixed_batch.rows_input", "input_ids"), "table_inputs"),
    "key_mask_input": (setter("mixed_batch.key_mask_input", "input_ids"), "key_mask_input"),
    "projection_inputs": (
        setter("mixed_batch.projection_inputs", ["input_ids"]),
        "projection_inputs",
    ),
    "mixed_batch type": (setter("mixed_batch", "yes"), "mixed_batch"),
    "max_length huge": (setter("generation.max_length", 10**12), "max_length"),
    "max_length bool": (setter("generation.max_length", True), "max_length"),
    "cache_shapes not a pair": (setter("generation.cache_shapes[0]", [4]), "cache_shapes[0]"),
    "cache_shapes not ints": (setter("generation.cache_shapes[2]", ["4", 16]), "cache_shapes[2]"),
    "cache_shapes huge": (setter("generation.cache_shapes[0]", [10**9, 10**9]), "cache_shapes[0]"),
    "cache_shapes not the graph's": (
        setter("generation.cache_shapes[3]", [4, 17]),
        "cache_shapes[3]",
    ),
    "cache_shapes count": (lambda m: m["generation"]["cache_shapes"].pop(), "cache_shapes"),
    "cache_dtype": (setter("generation.cache_dtype", "int8"), "cache_dtype"),
    "cache_dtype not the graph's": (setter("generation.cache_dtype", "float16"), "cache_dtype"),
    "past_inputs unknown": (setter("generation.past_inputs[0]", "past_99_key"), "past_inputs"),
    "present_outputs count": (
        lambda m: m["generation"]["present_outputs"].pop(),
        "present_outputs",
    ),
    "present_outputs unknown": (
        setter("generation.present_outputs[1]", "elsewhere"),
        "present_outputs",
    ),
    "eos negative": (setter("generation.eos_token_id", -1), "eos_token_id"),
    "eos strings": (setter("generation.eos_token_id", ["2"]), "eos_token_id"),
    "pad type": (setter("generation.pad_token_id", 1.5), "pad_token_id"),
    "generation config type": (setter("generation.config", [1]), "config"),
    "weights schemes type": (setter("weights", {"schemes": []}), "schemes"),
}


@pytest.mark.parametrize("edit, named", BAD_FIELDS.values(), ids=list(BAD_FIELDS))
def test_bad_metadata_field(mixed_path, tmp_path, edit, named):
    path = with_metadata(mixed_path, tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(OnnxFileError) as exc:
        OrtModel(path, **ORT_OPTIONS)
    assert time.perf_counter() - start < QUICK_S
    assert_names(exc, path, "metadata", named)


@pytest.mark.parametrize(
    "name",
    [
        "../x.onnx",
        "../../etc/passwd",
        "/etc/passwd",
        "sub/mixed.adapter.onnx",
        "..\\x.onnx",
        "..",
        "",
    ],
)
@pytest.mark.parametrize("where", ["projection", "mixed_batch.projection"])
def test_projection_must_be_a_bare_name(mixed_path, tmp_path, name, where):
    path = with_metadata(mixed_path, tmp_path, setter(where, name))
    with pytest.raises(OnnxFileError) as exc:
        OrtModel(path, **ORT_OPTIONS)
    assert_names(exc, path, where, "bare name")


def test_missing_projection_is_file_not_found(mixed_path, ckpt_dir, tmp_path):
    path = with_metadata(mixed_path, tmp_path, lambda m: None)
    (tmp_path / COMPANION).unlink()
    ort = OrtModel(path, **ORT_OPTIONS)  # loads: only a checkpoint directory needs it
    with pytest.raises(FileNotFoundError, match=COMPANION):
        ort.set_adapter_weights(ckpt_dir, adapter_name="a")


def test_damaged_projection_names_the_companion(mixed_path, ckpt_dir, tmp_path):
    path = with_metadata(mixed_path, tmp_path, lambda m: None)
    companion = tmp_path / COMPANION
    companion.write_bytes(companion.read_bytes()[:100])
    ort = OrtModel(path, **ORT_OPTIONS)
    with pytest.raises(OnnxFileError) as exc:
        ort.set_adapter_weights(ckpt_dir, adapter_name="a")
    assert_names(exc, companion, "adapter projection", "mixed.onnx")
    assert ort.adapter_names == []


def test_projection_length_must_be_the_metadata_one(mixed_path, ckpt_dir, tmp_path):
    """A max_adapter_len the graph does not state, but the projection does: refused when
    the projection opens, before the zero-padded prompts are allocated."""
    path = with_metadata(mixed_path, tmp_path, setter("mixed_batch.max_adapter_len", 4096))
    ort = OrtModel(path, **ORT_OPTIONS)
    with pytest.raises(OnnxFileError) as exc:
        ort.set_adapter_weights(ckpt_dir, adapter_name="a")
    assert_names(exc, tmp_path / COMPANION, "max_adapter_len", "mixed.onnx")


# ----------------------------------------------------------------------------- the bytes
def damaged(source: Path, directory: Path, change: Callable[[bytes], bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / source.name
    path.write_bytes(change(source.read_bytes()))
    shutil.copy(source.parent / COMPANION, directory / COMPANION)
    return path


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "flipped bytes": lambda data: bytes(b ^ 0xFF for b in data[:64]) + data[64:],
    "not onnx": lambda data: b"this is a text file, not an ONNX model\n",
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("change", DAMAGE.values(), ids=list(DAMAGE))
def test_damaged_file_names_the_file(mixed_path, tmp_path, change):
    path = damaged(mixed_path, tmp_path, change)
    with pytest.raises(OnnxFileError) as exc:
        OrtModel(path, **ORT_OPTIONS)
    assert_names(exc, path, "ONNX Runtime cannot load")
    assert "onnxruntime_src" not in str(exc.value)  # the reason, not ORT's source paths
    with pytest.raises(OnnxFileError) as exc:
        dequantized_weights(path)
    assert_names(exc, path, "not a readable ONNX file")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        OrtModel(tmp_path / "nowhere.onnx")
    with pytest.raises(FileNotFoundError):
        dequantized_weights(tmp_path / "nowhere.onnx")


@pytest.mark.parametrize(
    "location",
    ["../outside.bin", "../../../../../../../../etc/passwd", "/etc/passwd", "link.bin", "gone.bin"],
)
def test_external_data_outside_the_directory_is_refused(tmp_path, location):
    """ONNX Runtime and onnx refuse external data outside the file's directory (absolute,
    "..", a link out) and missing data; the refusal names the file."""
    np.ones(4, np.float32).tofile(tmp_path / "outside.bin")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "link.bin").symlink_to(tmp_path / "outside.bin")
    path = tiny_onnx(tmp_path / "model" / "m.onnx", external(location))
    with pytest.raises(OnnxFileError) as exc:
        OrtModel(path, **ORT_OPTIONS)
    assert_names(exc, path, "ONNX Runtime cannot load")
    with pytest.raises(OnnxFileError) as exc:
        dequantized_weights(path)
    assert_names(exc, path, "not a readable ONNX file")


def test_external_data_beside_the_file_loads(tmp_path):
    np.full(4, 2, np.float32).tofile(tmp_path / "w.bin")
    ort = OrtModel(tiny_onnx(tmp_path / "m.onnx", external("w.bin")), **ORT_OPTIONS)
    assert ort(x=np.ones(4, np.float32)).tolist() == [3.0] * 4
    assert ort.metadata == {}  # a file without our metadata runs as a plain graph


# ----------------------------------------------------------------------------- int8 blocks
def scheme_edit(change: Callable[[dict], Any]) -> Callable[[dict], None]:
    """An edit applying ``change`` to the first weight's scheme entry."""

    def edit(metadata: dict) -> None:
        change(next(iter(metadata["weights"]["schemes"].values())))

    return edit


BAD_SCHEMES = {
    "bits": (scheme_edit(lambda e: e.update(bits=5)), "bits"),
    "bits type": (scheme_edit(lambda e: e.update(bits="8")), "bits"),
    "rows past the end": (scheme_edit(lambda e: e.update(rows=[0, 10**9])), "rows"),
    "rows reversed": (scheme_edit(lambda e: e.update(rows=[4, 2])), "rows"),
    "blocks missing": (scheme_edit(lambda e: e.update(initializer="nowhere")), "missing"),
    "4 bits read as 8": (scheme_edit(lambda e: e.update(bits=4)), "4-bit blocks"),
    "format": (lambda m: m["weights"].update(format="int3"), "format"),
}


@pytest.mark.parametrize("edit, named", BAD_SCHEMES.values(), ids=list(BAD_SCHEMES))
def test_bad_weight_schemes(int8_path, tmp_path, edit, named):
    path = with_metadata(int8_path, tmp_path, edit)
    with pytest.raises(OnnxFileError) as exc:
        dequantized_weights(path)
    assert_names(exc, path, named)


def test_metadata_is_not_changed_by_reading(mixed_path):
    """OrtModel.metadata is the file's metadata as written (checks change nothing)."""
    ort = OrtModel(mixed_path, **ORT_OPTIONS)
    assert ort.metadata == read_metadata(mixed_path)
    assert copy.deepcopy(ort.metadata) == ort.metadata
