"""Checkpoints that are missing, malformed or do not fit: a clear error, nothing half-loaded.

Every failing load asserts the exception type and a message fragment naming the problem, and
that the model is exactly as before (adapters, active adapter, enabled flag, graph module
identity, every parameter object and value). Saves are atomic: an interrupted save leaves the
previous checkpoint byte-identical and no temporary entries beside it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_state_unchanged,
    padded_batch,
    randomize_adapter,
    snapshot_state,
    tiny_llama,
)
from safetensors.torch import load_file, save_file

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.checkpoint import CheckpointError

# The package re-exports the function ``rewrite``, which hides the submodule of that name.
rewrite_module = importlib.import_module("adaption_fx.rewrite")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
EXTRAS = "adaption_fx.json"
CFG = AdaptionConfig(adapter_len=3, adapter_layers=2)
PER_HEAD = AdaptionConfig(adapter_len=3, adapter_layers=2, gate="per_head", gate_activation="tanh")
PREFIX = "base_model.model."
PROMPT3 = "model.layers.3.self_attn.adaption_prompt"
GATE3 = "model.layers.3.self_attn.adaption_gate"
GATE2 = "model.layers.2.self_attn.adaption_gate"


# --------------------------------------------------------------------------- helpers
def _tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> bytes (files) or None (directories), for the whole tree."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _hidden(parent: Path) -> list[str]:
    """Entries a temporary file or directory would leave beside a checkpoint."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _edit_config(folder: Path, remove: tuple[str, ...] = (), **changes) -> None:
    path = folder / CONFIG
    data = json.loads(path.read_text())
    for key in remove:
        del data[key]
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _fresh(seed: int = 11):
    model = rewrite(tiny_llama(), CFG)
    randomize_adapter(model, seed=seed)
    return model


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adapted():
    """Read-only: "default" (scalar gates) and "other" (per-head tanh gates), both random."""
    model = rewrite(tiny_llama(), CFG)
    randomize_adapter(model, seed=5)
    model.add_adapter("other", PER_HEAD)
    model.set_adapter("other")
    randomize_adapter(model, seed=6)
    model.set_adapter("default")
    return model


@pytest.fixture(scope="module")
def saved(adapted, tmp_path_factory):
    """adapted's checkpoint: "default" at the root, "other" in other/."""
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    adapted.save_adapter(directory)
    return directory


@pytest.fixture
def ckpt_dir(saved, tmp_path):
    """A private copy of ``saved`` that a test may damage."""
    return _copy(saved, tmp_path)


@pytest.fixture(scope="module")
def narrow_saved(tmp_path_factory):
    """A checkpoint from a model with hidden size 32 (same adapter_len and layers)."""
    model = rewrite(tiny_llama(hidden_size=32, intermediate_size=48), CFG)
    randomize_adapter(model, seed=7)
    directory = tmp_path_factory.mktemp("narrow") / "ckpt"
    model.save_adapter(directory)
    return directory


@pytest.fixture(scope="module")
def deep_saved(tmp_path_factory):
    """A checkpoint adapting all 6 layers of a 6-layer model."""
    model = rewrite(
        tiny_llama(num_hidden_layers=6), AdaptionConfig(adapter_len=3, adapter_layers=6)
    )
    randomize_adapter(model, seed=8)
    directory = tmp_path_factory.mktemp("deep") / "ckpt"
    model.save_adapter(directory)
    return directory


# --------------------------------------------------------------------------- sanity
def test_saved_checkpoint_loads_back_exactly(adapted, saved):
    """Positive control: the fixtures' checkpoint is good, so failures below are the damage."""
    model = _fresh()
    model.load_adapter(saved)  # replaces "default"
    model.load_adapter(saved, "other")
    assert model.adapters == adapted.adapters
    for name in ("default", "other"):
        expected = adapted.adapter_state_dict(name)
        got = model.adapter_state_dict(name)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits,
            adapted(input_ids=ids, attention_mask=mask).logits,
        )
    assert AdaptionConfig.from_pretrained(saved) == CFG
    assert AdaptionConfig.from_pretrained(saved / "other") == PER_HEAD


# --------------------------------------------------------------------------- missing files
def test_missing_directory(adapted, tmp_path):
    snap = snapshot_state(adapted)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapted.load_adapter(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapted.load_adapter(tmp_path / "nope", "other")
    assert_state_unchanged(adapted, snap)


def test_path_is_a_file(adapted, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    snap = snapshot_state(adapted)
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        adapted.load_adapter(path)
    assert_state_unchanged(adapted, snap)


def test_directory_without_config(adapted, tmp_path):
    (tmp_path / "empty").mkdir()
    snap = snapshot_state(adapted)
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG} or model.safetensors in") as info:
        adapted.load_adapter(tmp_path / "empty")
    assert "subfolders" not in str(info.value)
    assert_state_unchanged(adapted, snap)


def test_directory_with_only_adapter_subfolders_hints_at_them(adapted, tmp_path):
    directory = tmp_path / "only_other"
    adapted.save_adapter(directory, adapter_name="other")
    assert sorted(p.name for p in directory.iterdir()) == ["other"]
    snap = snapshot_state(adapted)
    with pytest.raises(FileNotFoundError, match=r"adapter subfolders \['other'\]"):
        adapted.load_adapter(directory)
    with pytest.raises(FileNotFoundError, match=r"adapter subfolders \['other'\]"):
        AdaptionConfig.from_pretrained(directory)
    assert_state_unchanged(adapted, snap)


def test_missing_weights_file(adapted, ckpt_dir):
    (ckpt_dir / WEIGHTS).unlink()
    snap = snapshot_state(adapted)
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS} in"):
        adapted.load_adapter(ckpt_dir)
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS} in"):
        adapted.load_adapter(ckpt_dir, "fresh")
    assert_state_unchanged(adapted, snap)


# --------------------------------------------------------------------------- bad config
@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"{not json", "is not valid JSON"),
        (b"", "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
        (b"[1, 2]", "must be an object, got list"),
    ],
    ids=["broken", "empty", "not-utf8", "list"],
)
def test_invalid_json(adapted, ckpt_dir, content, pattern):
    (ckpt_dir / CONFIG).write_bytes(content)
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match=pattern):
        adapted.load_adapter(ckpt_dir)
    with pytest.raises(CheckpointError, match=pattern):
        AdaptionConfig.from_pretrained(ckpt_dir)
    assert_state_unchanged(adapted, snap)


def test_config_for_another_method(adapted, ckpt_dir):
    _edit_config(ckpt_dir, peft_type="LORA", r=8)
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match=r"peft_type 'LORA'.*'ADAPTION_PROMPT'"):
        adapted.load_adapter(ckpt_dir)
    with pytest.raises(CheckpointError, match="peft_type 'LORA'"):
        AdaptionConfig.from_pretrained(ckpt_dir)
    assert_state_unchanged(adapted, snap)


@pytest.mark.parametrize(
    "changes, remove, pattern",
    [
        ({"adapter_len": 0}, (), "adapter_len must be a positive int, got 0"),
        ({"adapter_layers": -1}, (), "adapter_layers must be a positive int"),
        ({}, ("adapter_layers",), r"missing \['adapter_layers'\]"),
        ({"adapter_len": "3"}, (), "adapter_len must be an int, got str"),
        ({"gate": "vector"}, (), "gate must be one of"),
    ],
    ids=["len-0", "layers-negative", "no-layers", "len-str", "bad-gate"],
)
def test_config_with_bad_fields_is_a_checkpoint_error(adapted, ckpt_dir, changes, remove, pattern):
    """A bad adapter_config.json is a content problem: CheckpointError naming the file."""
    _edit_config(ckpt_dir, remove=remove, **changes)
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match=pattern) as info:
        adapted.load_adapter(ckpt_dir)
    assert CONFIG in str(info.value)
    assert_state_unchanged(adapted, snap)


# --------------------------------------------------------------------------- shapes
def test_tensor_adapter_len_differs_from_config(adapted, ckpt_dir):
    _edit_config(ckpt_dir, adapter_len=5)
    snap = snapshot_state(adapted)
    with pytest.raises(
        CheckpointError, match=r"has shape \(1, 3, 64\) but this model needs \(1, 5, 64\)"
    ) as info:
        adapted.load_adapter(ckpt_dir)
    assert "adapter_len=5" in str(info.value)
    assert_state_unchanged(adapted, snap)


@pytest.mark.parametrize("name", ["default", "fresh"])
def test_hidden_size_mismatch(adapted, narrow_saved, name):
    snap = snapshot_state(adapted)
    with pytest.raises(
        CheckpointError, match=r"adaption_prompt has shape \(1, 3, 32\) but this model needs "
    ):
        adapted.load_adapter(narrow_saved, name)
    assert_state_unchanged(adapted, snap)


def test_more_adapter_layers_than_the_model_has(adapted, deep_saved):
    snap = snapshot_state(adapted)
    with pytest.raises(
        CheckpointError, match="does not fit: field 'adapter_layers' is 6, but the model has only 4"
    ):
        adapted.load_adapter(deep_saved, "deep")
    assert_state_unchanged(adapted, snap)


def test_tensors_of_other_layers(adapted, deep_saved, tmp_path):
    """adapter_layers=2 in the config but tensors for all six layers of a deeper model."""
    directory = _copy(deep_saved, tmp_path)
    _edit_config(directory, adapter_layers=2)
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match="do not match the model's adapted layers") as info:
        adapted.load_adapter(directory)
    assert "unexpected ['model.layers.0.self_attn.adaption_gate'" in str(info.value)
    assert_state_unchanged(adapted, snap)


def test_per_head_gates_under_a_scalar_config(adapted, ckpt_dir):
    other = ckpt_dir / "other"
    # PEFT's files (no gate fields, none of ours beside them): scalar, identity.
    _edit_config(other, remove=("gate", "gate_activation"))
    (other / "adaption_fx.json").unlink()
    assert AdaptionConfig.from_pretrained(other).gate == "scalar"
    snap = snapshot_state(adapted)
    with pytest.raises(
        CheckpointError, match=r"adaption_gate has shape \(1, 4, 1, 1\) but this model needs \(1,\)"
    ) as info:
        adapted.load_adapter(ckpt_dir, "other")
    assert "gate='scalar'" in str(info.value)
    assert_state_unchanged(adapted, snap)


# --------------------------------------------------------------------------- keys
def _drop_gate2(t):
    del t[PREFIX + GATE2]


def _add_layer0(t):
    t[PREFIX + "model.layers.0.self_attn.adaption_prompt"] = torch.zeros(1, 3, 64)


def _strip_prefix(t):
    t[PROMPT3] = t.pop(PREFIX + PROMPT3)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (_drop_gate2, re.escape(f"missing ['{GATE2}'], unexpected []")),
        (
            _add_layer0,
            re.escape("missing [], unexpected ['model.layers.0.self_attn.adaption_prompt']"),
        ),
        (
            _strip_prefix,
            re.escape(f"unexpected tensor keys ['{PROMPT3}'] (expected keys starting with "),
        ),
    ],
    ids=["missing", "extra", "no-prefix"],
)
@pytest.mark.parametrize("name", ["default", "fresh"])
def test_tensor_keys_must_match(adapted, ckpt_dir, edit, pattern, name):
    _edit_tensors(ckpt_dir, edit)
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match=pattern):
        adapted.load_adapter(ckpt_dir, name)
    assert_state_unchanged(adapted, snap)


def test_non_float_tensor(adapted, ckpt_dir):
    _edit_tensors(ckpt_dir, lambda t: t.update({PREFIX + GATE3: torch.ones(1, dtype=torch.int32)}))
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match=r"non-float dtype I32"):
        adapted.load_adapter(ckpt_dir)
    assert_state_unchanged(adapted, snap)


# --------------------------------------------------------------------------- corrupt files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        lambda p: p.write_bytes(b"this is not a safetensors file\n" * 20),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes((10**12).to_bytes(8, "little") + b"{}"),
    ],
    ids=["truncated", "garbage", "empty", "huge-header"],
)
def test_corrupt_weights_file(adapted, ckpt_dir, damage):
    damage(ckpt_dir / WEIGHTS)
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match="is not a readable safetensors file") as info:
        adapted.load_adapter(ckpt_dir)
    assert WEIGHTS in str(info.value)
    assert_state_unchanged(adapted, snap)


# --------------------------------------------------------------------------- non-finite
def _nan_prompt_inf_gate(t):
    t[PREFIX + PROMPT3][0, 1, 2] = float("nan")
    t[PREFIX + GATE3][0] = float("inf")


def _nan_only(t):
    t[PREFIX + PROMPT3][0, 0, 0] = float("nan")


def _inf_only(t):
    t[PREFIX + GATE2][0] = float("-inf")


@pytest.mark.parametrize("edit", [_nan_only, _inf_only, _nan_prompt_inf_gate])
@pytest.mark.parametrize("name", ["default", "other", "fresh"])
def test_non_finite_values_are_refused_by_default(adapted, ckpt_dir, edit, name):
    _edit_tensors(ckpt_dir, edit)
    if name == "other":  # load the scalar checkpoint at the root over the per-head adapter
        shutil.rmtree(ckpt_dir / "other")
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match="holds NaN or infinite values") as info:
        adapted.load_adapter(ckpt_dir, name)
    assert "allow_non_finite=True" in str(info.value)
    assert_state_unchanged(adapted, snap)


def test_non_finite_values_load_with_allow_non_finite(ckpt_dir):
    _edit_tensors(ckpt_dir, _nan_prompt_inf_gate)
    model = _fresh()
    model.load_adapter(ckpt_dir, "nan", allow_non_finite=True)
    assert "nan" in model.adapters
    assert model.active_adapter == "default"  # adding does not activate (as in PEFT)
    state = model.adapter_state_dict("nan")
    assert torch.isnan(state[PROMPT3][0, 1, 2])
    assert int(torch.isnan(state[PROMPT3]).sum()) == 1
    assert torch.isposinf(state[GATE3][0])
    model.set_adapter("nan")
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.isfinite(logits).all()  # the model really runs with them


# --------------------------------------------------------------------------- replacing
def test_replacing_keeps_activity_and_a_failed_replace_keeps_old_tensors(adapted, saved, tmp_path):
    model = _fresh(seed=21)
    model.add_adapter("b", CFG)
    model.set_adapter("b")
    randomize_adapter(model, seed=22)
    model.set_adapter("default")

    # A failed replace of the active adapter leaves its old tensors (objects and values).
    bad = _copy(saved, tmp_path, "bad")
    _edit_tensors(bad, _nan_only)
    snap = snapshot_state(model)
    with pytest.raises(CheckpointError, match="holds NaN"):
        model.load_adapter(bad, "default")
    with pytest.raises(CheckpointError, match="holds NaN"):
        model.load_adapter(bad, "b")
    assert_state_unchanged(model, snap)

    # Replacing the active adapter with one of another structure: still active, new tensors.
    model.load_adapter(saved / "other", "default")
    assert model.active_adapter == "default"
    assert model.adapters["default"] == PER_HEAD
    expected = adapted.adapter_state_dict("other")
    got = model.adapter_state_dict("default")
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # And back: it computes exactly what the saving model computes.
    model.load_adapter(saved, "default")
    assert model.active_adapter == "default"
    assert list(model.adapters) == ["default", "b"]
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits,
            adapted(input_ids=ids, attention_mask=mask).logits,
        )

    # Replacing an inactive adapter leaves it inactive; replacing an active one keeps it.
    model.load_adapter(saved, "b")
    assert model.active_adapter == "default"
    model.set_adapter("b")
    model.load_adapter(saved, "b")  # "b" has no subfolder: the root ("default") is used
    assert model.active_adapter == "b"
    assert model.adapters["b"] == CFG
    expected = adapted.adapter_state_dict("default")
    got = model.adapter_state_dict("b")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_load_adapter_while_disabled_keeps_it_disabled(adapted, saved):
    model = _fresh(seed=31)
    model.disable_adapter_layers()
    base = model.graph_module
    model.load_adapter(saved, "other")
    model.load_adapter(saved, "default")
    assert not model.adapters_enabled
    assert model.graph_module is base


# --------------------------------------------------------------------------- rewrite(dir)
def _bad_dirs(tmp_path: Path, saved: Path) -> dict[str, tuple[Path, type, str]]:
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    lora = _copy(saved, tmp_path, "lora")
    _edit_config(lora, peft_type="LORA")
    broken = _copy(saved, tmp_path, "broken")
    (broken / CONFIG).write_text("{")
    zero = _copy(saved, tmp_path, "zero")
    _edit_config(zero, adapter_len=0)
    # A plain Trainer's layout: model.safetensors, our keys, the config as _extra_state.
    tensors = {k[len(PREFIX) :]: v for k, v in load_file(str(saved / WEIGHTS)).items()}
    (no_entry := tmp_path / "no-entry").mkdir()
    save_file(tensors, str(no_entry / "model.safetensors"))
    (bad_entry := tmp_path / "bad-entry").mkdir()
    garbage = {**tensors, "_extra_state": torch.zeros(8, dtype=torch.uint8)}
    save_file(garbage, str(bad_entry / "model.safetensors"))
    (pickled := tmp_path / "pickled").mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    return {
        "missing": (missing, FileNotFoundError, "does not exist"),
        "empty": (empty, FileNotFoundError, f"no {CONFIG}"),
        "lora": (lora, CheckpointError, "peft_type 'LORA'"),
        "broken": (broken, CheckpointError, "not valid JSON"),
        "len-0": (zero, CheckpointError, "adapter_len must be a positive int"),
        "trainer-no-entry": (no_entry, CheckpointError, "has no _extra_state entry"),
        "trainer-bad-entry": (bad_entry, CheckpointError, "_extra_state is not adapter config"),
        "pickle": (pickled, FileNotFoundError, r"pytorch_model.bin \(a pickle"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "lora",
        "broken",
        "len-0",
        "trainer-no-entry",
        "trainer-bad-entry",
        "pickle",
    ],
)
def test_rewrite_with_a_bad_config_directory_fails_before_capture(
    saved, tmp_path, monkeypatch, case
):
    directory, exc, pattern = _bad_dirs(tmp_path, saved)[case]

    def no_capture(*args, **kwargs):
        raise AssertionError("capture ran although the checkpoint directory is bad")

    monkeypatch.setattr(rewrite_module, "capture", no_capture)
    source = tiny_llama()
    before = {k: v.detach().clone() for k, v in source.state_dict().items()}
    with pytest.raises(exc, match=pattern):
        rewrite(source, directory)
    assert all(p.requires_grad for p in source.parameters())
    after = source.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("case", ["nan", "narrow"])
def test_rewrite_with_bad_tensors_leaves_the_source_trainable(saved, narrow_saved, tmp_path, case):
    if case == "nan":
        directory = _copy(saved, tmp_path)
        _edit_tensors(directory, _nan_only)
        pattern = "holds NaN or infinite values"
    else:
        directory = narrow_saved
        pattern = r"has shape \(1, 3, 32\)"
    source = tiny_llama()
    with pytest.raises(CheckpointError, match=pattern):
        rewrite(source, directory)
    assert all(p.requires_grad for p in source.parameters())


def test_rewrite_from_a_directory_works(adapted, saved):
    """Positive control for the two tests above."""
    source = tiny_llama()
    model = rewrite(source, saved, adapter_name="other")
    assert model.adapters == {"other": PER_HEAD}
    assert not any(p.requires_grad for p in source.parameters())
    expected = adapted.adapter_state_dict("other")
    got = model.adapter_state_dict("other")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------- saving
def test_saved_layout_is_exact(adapted, tmp_path):
    target = tmp_path / "out"
    adapted.save_adapter(target)
    assert sorted(_tree(target)) == [
        CONFIG,
        WEIGHTS,
        EXTRAS,
        "other",
        f"other/{CONFIG}",
        f"other/{WEIGHTS}",
        f"other/{EXTRAS}",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    root = json.loads((target / CONFIG).read_text())
    assert root["peft_type"] == "ADAPTION_PROMPT"
    assert (root["adapter_len"], root["adapter_layers"]) == (3, 2)
    assert "gate" not in root  # PEFT's own fields only: PEFT runs a scalar gate as is
    assert json.loads((target / EXTRAS).read_text())["gate"] == "scalar"
    assert root["target_modules"] == "self_attn"
    assert json.loads((target / "other" / CONFIG).read_text())["gate"] == "per_head"
    keys = set(load_file(str(target / WEIGHTS)))
    assert keys == {PREFIX + k for k in adapted.adapter_state_dict("default")}
    assert len(keys) == 4


def test_saved_files_have_ordinary_permissions(adapted, tmp_path):
    """Temporary files and directories are private; the final checkpoint must not be."""
    target = tmp_path / "out"
    adapted.save_adapter(target)
    mask = os.umask(0)
    os.umask(mask)
    for path in [target, target / "other"]:
        assert path.stat().st_mode & 0o777 == 0o777 & ~mask, path
    for path in [target / CONFIG, target / WEIGHTS, target / "other" / CONFIG]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_save_a_single_non_default_adapter(adapted, tmp_path):
    target = tmp_path / "out"
    adapted.save_adapter(target, adapter_name="other")
    assert sorted(_tree(target)) == [
        "other",
        f"other/{CONFIG}",
        f"other/{WEIGHTS}",
        f"other/{EXTRAS}",
    ]


def test_save_into_an_existing_empty_directory(adapted, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    adapted.save_adapter(target, adapter_name="default")
    assert sorted(_tree(target)) == [CONFIG, WEIGHTS, EXTRAS]
    assert _hidden(tmp_path) == []


def test_saving_over_a_checkpoint_replaces_it_as_a_whole(tmp_path):
    model = _fresh(seed=41)
    model.add_adapter("old", AdaptionConfig(adapter_len=2, adapter_layers=1))
    target = tmp_path / "out"
    model.save_adapter(target)
    assert (target / "old" / WEIGHTS).is_file()
    (target / "stray.txt").write_text("left over")
    (target / "other_dir").mkdir()

    model.delete_adapter("old")
    randomize_adapter(model, seed=42)
    model.save_adapter(target)
    assert sorted(_tree(target)) == [CONFIG, WEIGHTS, EXTRAS]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    got = {k[len(PREFIX) :]: v for k, v in load_file(str(target / WEIGHTS)).items()}
    expected = model.adapter_state_dict("default")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # No adapters left: a clear error, and the last checkpoint stays as it was.
    before = _tree(target)
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="there are no adapters to save"):
        model.save_adapter(target)
    with pytest.raises(ValueError, match="there are no adapters to save"):
        model.save_adapter(tmp_path / "new")
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_unknown_adapter_name(adapted, tmp_path):
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; adapters are \['default'"):
        adapted.save_adapter(tmp_path / "out", adapter_name="nope")
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_non_empty_directory_without_a_checkpoint(adapted, tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    (target / "sub").mkdir()
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(target)
    with pytest.raises(FileExistsError, match="non-empty directory without an adapter checkpoint"):
        adapted.save_adapter(target)
    assert _tree(target) == before
    assert _hidden(tmp_path) == []


def test_save_into_a_path_that_is_a_file(adapted, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        adapted.save_adapter(target)
    assert target.read_text() == "keep me"
    assert _hidden(tmp_path) == []


def _partial_write_tensors(directory, tensors):
    (Path(directory) / WEIGHTS).write_bytes(b"\x10\x00\x00\x00partial")
    raise OSError("disk full (simulated)")


def _partial_json_dump(obj, f, **kwargs):
    f.write('{"peft_type": "ADAPT')
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize(
    "patch",
    [
        ("adaption_fx.checkpoint.write_tensors", _partial_write_tensors),
        (
            "safetensors.torch.save_file",
            lambda tensors, path, metadata=None: _partial_write_tensors(Path(path).parent, tensors),
        ),
        ("json.dump", _partial_json_dump),
    ],
    ids=["write_tensors", "save_file", "json.dump"],
)
@pytest.mark.parametrize("existing", [True, False], ids=["over-checkpoint", "new-directory"])
def test_interrupted_save_leaves_the_previous_state(
    adapted, saved, tmp_path, monkeypatch, patch, existing
):
    target = tmp_path / "ckpt"
    if existing:
        shutil.copytree(saved, target)
        before = _tree(target)
    monkeypatch.setattr(*patch)
    with pytest.raises(OSError, match="disk full"):
        adapted.save_adapter(target)
    monkeypatch.undo()
    if existing:
        assert _tree(target) == before
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_failure_between_the_two_renames_restores_the_previous_checkpoint(
    adapted, saved, tmp_path, monkeypatch
):
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    before = _tree(target)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        # Moving the new checkpoint (the ".ckpt.tmp-*" sibling) into place fails; moving
        # the backup of the old one back is let through.
        if Path(dst) == target and Path(src).name.startswith(".ckpt.tmp-"):
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        adapted.save_adapter(target, adapter_name="default")
    monkeypatch.undo()
    assert len(calls) == 3, calls  # target -> backup, tmp -> target (fails), backup -> target
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_interrupted_config_save_pretrained(tmp_path, monkeypatch):
    CFG.save_pretrained(tmp_path)
    before = (tmp_path / CONFIG).read_bytes()
    assert AdaptionConfig.from_pretrained(tmp_path) == CFG
    monkeypatch.setattr(json, "dump", _partial_json_dump)
    with pytest.raises(OSError, match="disk full"):
        PER_HEAD.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / CONFIG).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, EXTRAS]
    PER_HEAD.save_pretrained(tmp_path)  # and a later save goes through
    assert AdaptionConfig.from_pretrained(tmp_path) == PER_HEAD
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, EXTRAS]


# --------------------------------------------------------------------------- absurd sizes
@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (
            {"adapter_len": 10**9},
            r"field 'adapter_len' is 1000000000, but .*has shape \(1, 3, 64\)",
        ),
        ({"adapter_layers": 10**6}, r"field 'adapter_layers' is 1000000, but .* holds 2"),
    ],
    ids=["adapter_len", "adapter_layers"],
)
def test_absurd_sizes_are_refused_before_the_capture(ckpt_dir, changes, pattern):
    # Checked against the file's header before anything is captured or allocated (a
    # 10**9-token prompt would be 256 GB here).
    _edit_config(ckpt_dir, **changes)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern) as info:
        rewrite(model, ckpt_dir)
    assert str(ckpt_dir / CONFIG) in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (
            {"adapter_len": 10**9},
            r"has shape \(1, 3, 64\) but this model needs \(1, 1000000000, 64\)",
        ),
        ({"adapter_layers": 10**6}, "field 'adapter_layers' is 1000000, but the model has only 4"),
    ],
    ids=["adapter_len", "adapter_layers"],
)
def test_absurd_sizes_are_refused_by_load_adapter(adapted, ckpt_dir, changes, pattern):
    _edit_config(ckpt_dir, **changes)
    snap = snapshot_state(adapted)
    with pytest.raises(CheckpointError, match=pattern):
        adapted.load_adapter(ckpt_dir, "absurd")
    assert_state_unchanged(adapted, snap)


def test_an_oversized_config_file_is_refused_unread(ckpt_dir):
    (ckpt_dir / CONFIG).write_text(
        '{"peft_type": "ADAPTION_PROMPT", "pad": "' + "x" * (2 << 20) + '"}'
    )
    with pytest.raises(CheckpointError, match=r"adapter_config.json is \d+ bytes, more than"):
        AdaptionConfig.from_pretrained(ckpt_dir)
