"""The persistent graph cache (adaption_fx.capture.graph_cache): a second capture reads the graph
back and binds the model's own weights; stale and corrupt entries are rebuilt, never used;
the cache can be turned off and follows XDG_CACHE_HOME."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import padded_batch, randomize_adapter, tiny_llama

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.capture.graph_cache import (
    ENV_DIRECTORY,
    ENV_SWITCH,
    cache_directory,
    cache_key,
    clear_cache,
)
from adaption_fx.passes.graph_copy import shares_weights


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIRECTORY, str(tmp_path / "cache"))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    return tmp_path / "cache" / "graphs"


def _entries(cache_dir):
    return sorted(p.name.split("-")[0] for p in cache_dir.glob("*.graph"))


def _stored_key(path):
    """The key stored in an entry's header (magic, header length, JSON header)."""
    import json
    import struct

    from adaption_fx.capture.graph_cache import MAGIC

    data = path.read_bytes()
    start = len(MAGIC) + 8
    (length,) = struct.unpack("<Q", data[len(MAGIC) : start])
    return json.loads(data[start : start + length])["key"]


def _logged(caplog, text):
    return [r for r in caplog.records if text in r.getMessage()]


def test_second_rewrite_reads_every_capture_from_the_cache(cache_dir, caplog):
    first = rewrite(tiny_llama(), AdaptionConfig(adapter_len=3, adapter_layers=2))
    first.decoder()
    assert _entries(cache_dir) == ["causal", "decode", "masked"]
    model = tiny_llama(seed=5)  # same architecture, other weights
    with caplog.at_level(logging.INFO, logger="adaption_fx.capture.graph_cache"):
        again = rewrite(model, AdaptionConfig(adapter_len=3, adapter_layers=2))
        again.decoder()
    assert len(_logged(caplog, "loaded the")) == 3
    assert shares_weights(again.base_graph_module, model)
    assert shares_weights(again.decoder().base_graph_module, model)
    # The rotary tables are non-persistent buffers: the model's own objects, not the file's.
    buffers = dict(again.base_graph_module.named_buffers())
    assert buffers and all(b is model.get_buffer(n) for n, b in buffers.items())
    randomize_adapter(again)
    ids, mask = padded_batch()
    with caplog.at_level(logging.INFO):
        fresh = rewrite(model, AdaptionConfig(adapter_len=3, adapter_layers=2), cache=False)
    fresh.load_state_dict(again.state_dict())
    assert torch.equal(
        again(input_ids=ids, attention_mask=mask).logits,
        fresh(input_ids=ids, attention_mask=mask).logits,
    )
    assert torch.equal(again(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert torch.equal(
        again.generate(ids[:1], max_new_tokens=4), fresh.generate(ids[:1], max_new_tokens=4)
    )


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_entry_is_rebuilt_not_used(cache_dir, caplog, damage):
    rewrite(tiny_llama(), None)
    path = next(cache_dir.glob("masked-*.graph"))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a graph at all")
    path.write_bytes(bytes(data))
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="adaption_fx.capture.graph_cache"):
        adapted = rewrite(model, None)
    assert _logged(caplog, "is unusable")
    ids, mask = padded_batch()
    assert torch.equal(adapted(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adaption_fx.capture.graph_cache"):
        rewrite(model, None)  # the rebuilt entry is whole again
    assert not _logged(caplog, "is unusable") and _logged(caplog, "loaded the masked")


def test_a_stale_entry_is_rebuilt_not_used(cache_dir, caplog):
    rewrite(tiny_llama(), None)
    own = next(cache_dir.glob("masked-*.graph"))
    clear_cache()
    rewrite(tiny_llama(hidden_size=32, intermediate_size=48), None)
    other = next(cache_dir.glob("masked-*.graph"))
    own.write_bytes(other.read_bytes())  # another model's graph under this model's name
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="adaption_fx.capture.graph_cache"):
        adapted = rewrite(model, None)
    assert _logged(caplog, "stale")
    ids, mask = padded_batch()
    assert torch.equal(adapted(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits)


def test_the_key_follows_what_changes_the_graph():
    model = tiny_llama()
    args = ((), {"input_ids": torch.ones(2, 8, dtype=torch.long)}, None, "masked")
    key = cache_key(model, *args)
    assert cache_key(tiny_llama(seed=3), *args) == key  # weights do not change the graph
    assert cache_key(tiny_llama(rope_theta=500.0), *args) != key
    assert cache_key(tiny_llama().to(torch.float64), *args) != key
    assert cache_key(model, (), args[1], None, "causal") != key
    tied = tiny_llama(tie_word_embeddings=True)
    assert cache_key(tied, *args) != cache_key(tiny_llama(tie_word_embeddings=False), *args)
    model.config._attn_implementation = "eager"
    assert cache_key(model, *args) != key


def test_the_key_follows_methods_patched_at_run_time(monkeypatch):
    from transformers.models.llama import modeling_llama

    args = ((), {"input_ids": torch.ones(2, 8, dtype=torch.long)}, None, "masked")
    key = cache_key(tiny_llama(), *args)
    original = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: original(self, x))
    assert cache_key(tiny_llama(), *args) != key  # the class's method
    monkeypatch.undo()
    model = tiny_llama()
    assert cache_key(model, *args) == key
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: original(mlp, x) * 2  # one instance's forward
    assert cache_key(model, *args) != key


def test_a_grown_capture_is_checked_once_per_entry(cache_dir, monkeypatch):
    import adaption_fx.capture.export_model as capture_module

    checks = []
    original = capture_module.eager_outputs

    def counting(model, feed):
        checks.append(type(model).__name__)
        return original(model, feed)

    monkeypatch.setattr(capture_module, "eager_outputs", counting)
    cfg = AdaptionConfig(adapter_len=3, adapter_layers=2)
    rewrite(tiny_llama(), cfg)
    assert len(checks) == 2  # the masked and the causal capture, each grown and checked
    stamps = sorted(p.name.split("-")[0] for p in cache_dir.glob("*.grown.ok"))
    assert stamps == ["causal", "masked"]
    checks.clear()
    ids, mask = padded_batch()
    model = tiny_llama(seed=4)
    again = rewrite(model, cfg)
    assert checks == []  # read back from entries whose grown graphs passed
    torch.testing.assert_close(
        again(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits
    )
    # A verdict is tied to its entry's checksum: a rebuilt or different entry is checked.
    stamp = next(cache_dir.glob("masked-*.grown.ok"))
    stamp.write_text("0" * 64)
    rewrite(tiny_llama(), cfg)
    assert len(checks) == 1
    assert stamp.read_text() != "0" * 64  # passed again, recorded again
    clear_cache()
    assert not list(cache_dir.glob("*.ok"))


def test_reading_a_program_back_parses_each_size_once_with_the_same_result(cache_dir):
    from unittest import mock

    import sympy

    import adaption_fx.capture.graph_cache as graph_cache

    model = tiny_llama()
    rewrite(model, None)
    path = next(cache_dir.glob("masked-*.graph"))
    blobs, _ = graph_cache.read_entry_file(path, _stored_key(path))
    from adaption_fx.capture.repeated import find_repeated_layers, first_layer_only

    with first_layer_only(model, find_repeated_layers(model)):
        fast = graph_cache.deserialize_program(blobs, model)
        with mock.patch.object(graph_cache, "ParseOnce", lambda: sympy):
            plain = graph_cache.deserialize_program(blobs, model)

    def described(program):
        nodes = [
            (n.name, str(n.target), str(getattr(n.meta.get("val"), "shape", n.meta.get("val"))))
            for n in program.graph.nodes
        ]
        return nodes, str(program.range_constraints)

    assert any("s" in shape for _, _, shape in described(fast)[0])  # symbolic sizes
    assert described(fast) == described(plain)


def test_cache_off_by_argument_and_by_environment(cache_dir, monkeypatch):
    rewrite(tiny_llama(), None, cache=False)
    assert not cache_dir.exists()
    monkeypatch.setenv(ENV_SWITCH, "0")
    rewrite(tiny_llama(), None)
    assert not cache_dir.exists()
    with pytest.raises(TypeError, match="cache must be a bool"):
        rewrite(tiny_llama(), None, cache="yes")


def test_location_follows_xdg_and_clear_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DIRECTORY, raising=False)
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "xdg" / "adaption-fx" / "graphs"
    rewrite(tiny_llama(), None)
    assert len(list(cache_directory().glob("*.graph"))) == 2
    assert clear_cache() == 2
    assert not list(cache_directory().glob("*.graph"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_directory() == tmp_path / "home" / ".cache" / "adaption-fx" / "graphs"


def test_an_unwritable_cache_does_not_fail_the_capture(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv(ENV_DIRECTORY, str(blocker))
    model = tiny_llama()
    adapted = rewrite(model, None)
    ids, mask = padded_batch()
    assert torch.equal(adapted(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits)


# ----------------------------------------------------------------------------- trust
def _replant(path, schema_blob):
    """Rewrite an entry with ``schema_blob`` as its pickled program, header and checksum
    recomputed (as anyone who can write the file can)."""
    import hashlib
    import json
    import struct

    from adaption_fx.capture.graph_cache import MAGIC

    data = path.read_bytes()
    start = len(MAGIC) + 8
    (length,) = struct.unpack("<Q", data[len(MAGIC) : start])
    header = json.loads(data[start : start + length])
    payload = data[start + length :]
    rest = payload[header["sizes"][0] :]
    payload = schema_blob + rest
    header["sizes"][0] = len(schema_blob)
    header["sha256"] = hashlib.sha256(payload).hexdigest()
    text = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(text)) + text + payload)


class _Planted:
    """A pickle that, loaded by pickle.loads, creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_pickle_in_an_entry_does_not_run(cache_dir, tmp_path, caplog):
    import pickle

    rewrite(tiny_llama(), None)
    path = next(cache_dir.glob("masked-*.graph"))
    marker = tmp_path / "planted-pickle-ran"
    blob = pickle.dumps(_Planted(marker))
    pickle.loads(blob)  # the gadget works where pickle.loads reads it
    assert marker.exists()
    marker.unlink()
    _replant(path, blob)
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="adaption_fx.capture.graph_cache"):
        adapted = rewrite(model, None)
    assert not marker.exists()
    assert _logged(caplog, "export schema only")
    ids, mask = padded_batch()
    assert torch.equal(adapted(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits)


def test_a_world_writable_cache_is_neither_read_nor_written(tmp_path, monkeypatch, caplog):
    import adaption_fx.files

    root = tmp_path / "shared-scratch"
    root.mkdir()
    monkeypatch.setenv(ENV_DIRECTORY, str(root))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    rewrite(tiny_llama(), None)  # entries written while the directory is private
    entries = {p: p.stat().st_mtime_ns for p in (root / "graphs").glob("*.graph")}
    assert len(entries) == 2
    root.chmod(0o777)
    monkeypatch.setattr(adaption_fx.files, "_WARNED", set())
    with caplog.at_level(logging.INFO, logger="adaption_fx"):
        rewrite(tiny_llama(), None)
        rewrite(tiny_llama(), None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per directory and process
    assert str(root) in warnings[0].getMessage()
    assert "writable by others" in warnings[0].getMessage()
    assert not _logged(caplog, "loaded the") and not _logged(caplog, "cached the")
    assert {p: p.stat().st_mtime_ns for p in (root / "graphs").glob("*.graph")} == entries


def test_a_fresh_cache_is_private(tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.setenv(ENV_DIRECTORY, str(tmp_path / "new" / "cache"))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    old = os.umask(0o002)  # a umask that would leave directories group-writable
    try:
        rewrite(tiny_llama(), None)
    finally:
        os.umask(old)
    graphs = tmp_path / "new" / "cache" / "graphs"
    for path in (graphs.parent, graphs, *graphs.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


@pytest.mark.parametrize("how", ["group-writable", "another owner", "symlink"])
def test_an_entry_file_someone_else_could_write_is_not_read(cache_dir, caplog, how):
    import os
    import shutil

    rewrite(tiny_llama(), None)
    path = next(cache_dir.glob("masked-*.graph"))
    if how == "group-writable":
        path.chmod(0o620)
    elif how == "another owner":
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(path, 4242, 4242)
    else:
        target = path.with_name("elsewhere")
        shutil.move(path, target)
        path.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="adaption_fx.capture.graph_cache"):
        rewrite(tiny_llama(), None)
    (record,) = _logged(caplog, "is unusable")
    assert "the entry file" in record.getMessage()
