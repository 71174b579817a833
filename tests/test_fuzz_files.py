"""Fuzzing every loader of files from elsewhere (see tests/fuzz_harness.py for what a case
checks): adapter directories (ours, PEFT's, a plain Trainer's model.safetensors) loaded into
an AdaptedModel and into a mixed-batch OrtModel, ONNX files with their metadata and
companion, graph-cache entries, fine-tuning checkpoints (resume), run.json and data files.

Hypothesis draws the damage; cases per loader are fixed here (``$ADAPTION_FX_FUZZ_EXAMPLES``
overrides them: bench/fuzz.py runs more and writes the per-loader counts into
bench/results/fuzz.md, which the docs' reliability page includes). ``derandomize``: CI runs
the same cases every time; the bench draws new ones.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fuzz_harness import (
    REPORT_ENV,
    damage_strategy,
    examples,
    run_case,
    write_report,
)
from helpers import (
    assert_state_unchanged,
    one_thread,  # noqa: F401 (autouse: one ONNX Runtime and torch thread)
    padded_batch,
    randomize_adapter,
    snapshot_state,
    tiny_llama,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaption_fx import AdaptionConfig, rewrite

RANDOM = os.environ.get("ADAPTION_FX_FUZZ_RANDOM") == "1"


def fuzz_settings(default: int):
    return settings(
        max_examples=examples(default),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module: the per-loader counts as JSON (bench/fuzz.py); conftest.py prints
    them at the end of pytest's output."""
    yield
    target = os.environ.get(REPORT_ENV)
    if target:
        write_report(Path(target))


# ----------------------------------------------------------------------------- fixtures
CONFIG = AdaptionConfig(adapter_len=3, adapter_layers=2)


MODEL_ENV = "ADAPTION_FX_FUZZ_MODEL"  # "embedded": the adapter and ONNX loaders on SmolLM2


@pytest.fixture(scope="module")
def base():
    """The base model of the adapter and ONNX loaders: a tiny Llama, or (bench/fuzz.py)
    the embedded SmolLM2-135M-Instruct."""
    if os.environ.get(MODEL_ENV) == "embedded":
        from adaption_fx.app.pretrained import load_pretrained

        return load_pretrained(None).model
    return tiny_llama()


@pytest.fixture(scope="module")
def source(base):
    model = rewrite(base, CONFIG)
    randomize_adapter(model, seed=5)
    return model


@pytest.fixture(scope="module")
def target(base):
    """The model every adapter case loads into (its "default" adapter must survive)."""
    model = rewrite(base, AdaptionConfig(adapter_len=2, adapter_layers=1))
    randomize_adapter(model, seed=9)
    return model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, source):
    """Pristine directories, one per kind of adapter file."""
    root = tmp_path_factory.mktemp("fuzz-pristine")
    ours = root / "ours"
    source.save_adapter(ours)
    trainer = root / "trainer"
    trainer.mkdir()
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()},
        str(trainer / "model.safetensors"),
    )
    return {"ours": ours, "trainer": trainer}


@pytest.fixture(scope="module")
def peft_pristine(tmp_path_factory, base):
    import copy

    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaption_" in name:
                param.copy_(torch.randn(param.shape) * 0.5)
    directory = tmp_path_factory.mktemp("fuzz-peft") / "peft"
    model.save_pretrained(directory)
    return directory


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors as the file holds them, with our keys (the oracle)."""
    from safetensors.torch import load_file

    peft_file = directory / "adapter_model.safetensors"
    if (directory / "adapter_config.json").is_file():
        return {
            k.removeprefix("base_model.model."): v for k, v in load_file(str(peft_file)).items()
        }
    return {
        k: v
        for k, v in load_file(str(directory / "model.safetensors")).items()
        if k != "_extra_state"
    }


def _file_config(directory: Path) -> AdaptionConfig:
    path = directory / "adapter_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
    else:
        from safetensors.torch import load_file

        entry = load_file(str(directory / "model.safetensors"))["_extra_state"]
        data = json.loads(bytes(entry.tolist()).decode())
    return AdaptionConfig.from_peft_dict(data)


def _adapter_case(
    target, directory_kind: dict[str, tuple[str, ...]], pristine_dir: Path, data
) -> None:
    snap = snapshot_state(target)

    def load(directory: Path):
        target.load_adapter(directory, "fuzzed")
        return directory

    def verify(directory: Path, _: Path, damage) -> None:
        # Loaded: the adapter is exactly what the files say.
        assert target.adapters["fuzzed"] == _file_config(directory), damage
        loaded = target.adapter_state_dict("fuzzed")
        held = _file_tensors(directory)
        assert loaded.keys() == held.keys(), damage
        for key, value in held.items():
            assert torch.equal(loaded[key], value.to(loaded[key].dtype)), (damage, key)
        target.delete_adapter("fuzzed")

    damage = data.draw(damage_strategy(pristine_dir, directory_kind))
    run_case(
        f"adapter directory ({pristine_dir.name})",
        pristine_dir,
        damage,
        load,
        verify,
        lambda: assert_state_unchanged(target, snap),
    )


ADAPTER_FILES = {
    "adapter_config.json": ("json", "json", "bytes"),
    "adapter_model.safetensors": ("tensors", "tensors", "bytes"),
}


@fuzz_settings(150)
@given(data=st.data())
def test_fuzz_adapter_directory(target, pristine, data):
    _adapter_case(target, ADAPTER_FILES, pristine["ours"], data)


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_peft_adapter_directory(target, peft_pristine, data):
    _adapter_case(target, ADAPTER_FILES, peft_pristine, data)


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_trainer_model_safetensors(target, pristine, data):
    _adapter_case(target, {"model.safetensors": ("tensors", "bytes")}, pristine["trainer"], data)


# ----------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    from adaption_fx.export import to_onnx

    path = to_onnx(
        source,
        tmp_path_factory.mktemp("fuzz-onnx") / "export" / "mixed.onnx",
        adapter_as_inputs=True,
        mixed_batch=True,
        for_generation=True,
    )
    return path


@pytest.fixture(scope="module")
def ort_model(exported):
    from adaption_fx.export import OrtModel

    return OrtModel(exported, intra_op_num_threads=1)


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_adapter_directory_into_onnx_runtime(ort_model, source, target, pristine, data):
    names = ort_model.adapter_names

    def load(directory: Path):
        ort_model.set_adapter_weights(directory, adapter_name="fuzzed")
        return directory

    def verify(directory: Path, _: Path, damage) -> None:
        # Loaded: it runs what the AdaptedModel loads from the same files.
        target.load_adapter(directory, "fuzzed")
        try:
            ids = torch.tensor([[5, 6, 7]])
            expected = target.generate(
                ids, max_new_tokens=2, do_sample=False, adapter_names=["fuzzed"], eos_token_id=None
            )
            got = ort_model.generate(
                ids, max_new_tokens=2, do_sample=False, adapter_names=["fuzzed"], eos_token_id=None
            )
            assert torch.equal(torch.as_tensor(got), expected), damage
        finally:
            target.delete_adapter("fuzzed")
            ort_model.delete_adapter_weights("fuzzed")

    damage = data.draw(damage_strategy(pristine["ours"], ADAPTER_FILES))
    run_case(
        "adapter directory into OrtModel",
        pristine["ours"],
        damage,
        load,
        verify,
        lambda: assert_names(ort_model, names),
    )


def assert_names(ort_model, names) -> None:
    assert ort_model.adapter_names == names


@pytest.fixture(scope="module")
def onnx_reference(exported, pristine):
    from adaption_fx.export import OrtModel

    return _run_onnx(OrtModel(exported, intra_op_num_threads=1), pristine["ours"])


def _run_onnx(ort, adapter: Path) -> torch.Tensor:
    ort.set_adapter_weights(adapter, adapter_name="a")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    return torch.as_tensor(
        ort.generate(
            ids,
            max_new_tokens=2,
            do_sample=False,
            adapter_names=["a", "__base__"],
            eos_token_id=None,
        )
    )


@fuzz_settings(80)
@given(data=st.data())
def test_fuzz_onnx_file(exported, pristine, onnx_reference, data):
    from adaption_fx.export import OrtModel

    def load(directory: Path):
        # Opening, registering an adapter (the projection companion) and generating.
        return _run_onnx(
            OrtModel(directory / exported.name, intra_op_num_threads=1), pristine["ours"]
        )

    def verify(tokens: torch.Tensor, _: Path, damage) -> None:
        if damage.kind == "onnx-metadata":  # the graph is the original's: so are its tokens
            assert torch.equal(tokens, onnx_reference), damage
        else:  # ONNX has no checksum: changed weights are a valid file of other weights
            assert tokens.shape == onnx_reference.shape, damage

    files = {
        exported.name: ("onnx-metadata", "onnx-metadata", "bytes"),
        "mixed.adapter.onnx": ("bytes",),
    }
    damage = data.draw(damage_strategy(exported.parent, files))
    run_case("ONNX file, metadata and companion", exported.parent, damage, load, verify)


# ----------------------------------------------------------------------------- graph cache
@pytest.fixture(scope="module")
def cache_pristine(tmp_path_factory):
    """A directory holding one graph-cache entry (the masked capture of a tiny Llama), the
    key it was stored under, the model and the program's outputs."""
    from adaption_fx.capture.graph_cache import ENV_DIRECTORY, read_entry_file

    root = tmp_path_factory.mktemp("fuzz-cache")
    model = tiny_llama()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_DIRECTORY, str(root / "cache"))
        patch.delenv("ADAPTION_FX_CACHE", raising=False)
        rewrite(model, None)
    (entry,) = (root / "cache" / "graphs").glob("masked-*.graph")
    directory = root / "entry"
    directory.mkdir()
    (directory / "masked.graph").write_bytes(entry.read_bytes())
    (directory / "masked.graph").chmod(0o600)
    key = _stored_key(entry)
    blobs, _ = read_entry_file(directory / "masked.graph", key)
    return directory, key, model, _program_outputs(blobs, model)


def _stored_key(path: Path) -> dict:
    import struct

    from adaption_fx.capture.graph_cache import MAGIC

    data = path.read_bytes()
    start = len(MAGIC) + 8
    (length,) = struct.unpack("<Q", data[len(MAGIC) : start])
    return json.loads(data[start : start + length])["key"]


def _program_outputs(blobs, model) -> torch.Tensor:
    from adaption_fx.capture.graph_cache import deserialize_program

    program = deserialize_program(blobs, model)
    ids, mask = padded_batch()
    return program.module()(input_ids=ids, attention_mask=mask, use_cache=False)


@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_graph_cache_entry(cache_pristine, data):
    from adaption_fx.capture.graph_cache import CacheEntryError, read_entry_file

    directory, key, model, expected = cache_pristine

    def load(copy: Path):
        # What cached_export does with an entry (an error there: the entry is removed and
        # the capture rebuilt, with a warning naming the file).
        path = copy / "masked.graph"
        try:
            blobs, _ = read_entry_file(path, key)
            return _program_outputs(blobs, model)
        except CacheEntryError as exc:
            raise CacheEntryError(f"graph cache entry {path} is unusable: {exc}") from exc

    def verify(outputs, _: Path, damage) -> None:
        # The checksum covers the payload: a damaged entry that loads is the original.
        flat_out = torch.utils._pytree.tree_leaves(outputs)
        flat_expected = torch.utils._pytree.tree_leaves(expected)
        assert all(torch.equal(a, b) for a, b in zip(flat_out, flat_expected, strict=True)), damage

    damage = data.draw(damage_strategy(directory, {"masked.graph": ("bytes",)}))
    run_case("graph cache entry", directory, damage, load, verify)


# ----------------------------------------------------------------------------- fine-tuning
RESUME_ARGUMENTS = dict(lr=0.05, max_steps=2, batch_size=2, save_every=1)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A model, its data and a run stopped after step 1 (checkpoint-1 and run.json), in the
    new format and, beside it, as an earlier version wrote it (training_state.pt)."""
    from tokenizers_for_tests import make_tokenizer

    from adaption_fx.training.data import Example, encode_dataset
    from adaption_fx.training.loop import Finetune, TrainingArguments

    model = rewrite(
        tiny_llama(
            vocab_size=117, num_hidden_layers=2, pad_token_id=0, eos_token_id=1, bos_token_id=2
        ),
        None,
    )
    records = [("Say hi", "hi"), ("Say hello", "hello there"), ("Add", "3"), ("sum", "it is 7")]
    data = encode_dataset([Example.from_alpaca(i, o) for i, o in records], make_tokenizer(), 512)
    root = tmp_path_factory.mktemp("fuzz-run")
    model.add_adapter("run", CONFIG, generator=torch.Generator().manual_seed(0))
    model.set_adapter("run")
    out = root / "full"
    Finetune(model, data, None, out, TrainingArguments(**RESUME_ARGUMENTS), 0, progress=False).run()
    run = root / "run"
    run.mkdir()
    shutil.copytree(out / "checkpoint-1", run / "checkpoint-1")
    shutil.copy(out / "run.json", run / "run.json")
    legacy = root / "legacy"
    shutil.copytree(run, legacy)
    _to_legacy(legacy / "checkpoint-1")
    return model, data, run, legacy


def _to_legacy(checkpoint: Path) -> None:
    """The new training-state files as one training_state.pt, as earlier versions wrote."""
    from safetensors.torch import load_file

    meta = json.loads((checkpoint / "training_state.json").read_text())
    tensors = load_file(str(checkpoint / "training_state.safetensors"))
    state = {
        int(i): {k: tensors[name] for k, name in entries.items()}
        for i, entries in meta["optimizer"]["state"].items()
    }
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()}
        for g in meta["optimizer"]["param_groups"]
    ]
    rng = meta["python_rng"]
    torch.save(
        {
            "optimizer": {"state": state, "param_groups": groups},
            "scheduler": meta["scheduler"],
            "torch_rng": tensors[meta["torch_rng"]],
            "python_rng": (rng[0], tuple(rng[1]), rng[2]),
        },
        checkpoint / "training_state.pt",
    )
    (checkpoint / "training_state.json").unlink()
    (checkpoint / "training_state.safetensors").unlink()


def _resume_case(training, pristine: Path, files, data, loader: str) -> None:
    import random

    from adaption_fx.training.loop import Finetune, TrainingArguments, active_parameters

    model, dataset, _, _ = training

    def load(directory: Path):
        name = f"fuzz{next(_NAMES)}"
        model.add_adapter(name, CONFIG, generator=torch.Generator().manual_seed(1))
        model.set_adapter(name)
        run = Finetune(
            model,
            dataset,
            None,
            directory,
            TrainingArguments(**RESUME_ARGUMENTS),
            0,
            progress=False,
        )
        snap = [p.detach().clone() for p in active_parameters(model)]
        rngs = torch.get_rng_state(), random.getstate()
        try:
            run.resume()
        except BaseException:
            assert all(
                torch.equal(a, b) for a, b in zip(active_parameters(model), snap, strict=True)
            )
            assert not run.optimizer.state and run.step == 0
            assert torch.equal(torch.get_rng_state(), rngs[0]) and random.getstate() == rngs[1]
            model.delete_adapter(name)
            raise
        return run, name

    def verify(result, directory: Path, damage) -> None:
        from safetensors.torch import load_file

        run, name = result
        try:
            # Resumed: the step, the adapter and the optimizer state are what the files say.
            checkpoint = directory / "checkpoint-1"
            assert run.step == json.loads((checkpoint / "trainer_state.json").read_text())["step"]
            held = {
                k.removeprefix("base_model.model."): v
                for k, v in load_file(str(checkpoint / "adapter_model.safetensors")).items()
            }
            loaded = model.adapter_state_dict(name)
            assert all(torch.equal(loaded[k], v) for k, v in held.items()), damage
            if (checkpoint / "training_state.safetensors").is_file():
                tensors = load_file(str(checkpoint / "training_state.safetensors"))
                state = run.optimizer.state_dict()["state"]
                for key, tensor in tensors.items():
                    if key.startswith("optimizer."):
                        _, index, field = key.split(".")
                        assert torch.equal(state[int(index)][field], tensor), (damage, key)
        finally:
            model.delete_adapter(name)

    damage = data.draw(damage_strategy(pristine, files))
    run_case(loader, pristine, damage, load, verify, may_write=("metrics.jsonl",))


_NAMES = itertools.count()
CHECKPOINT_FILES = {
    "checkpoint-1/training_state.safetensors": ("tensors", "tensors", "bytes"),
    "checkpoint-1/training_state.json": ("json", "json", "bytes"),
    "checkpoint-1/trainer_state.json": ("json",),
    "checkpoint-1/data_order.json": ("json", "bytes"),
    "checkpoint-1/adapter_config.json": ("json",),
    "checkpoint-1/adapter_model.safetensors": ("tensors",),
}


@fuzz_settings(100)
@given(data=st.data())
def test_fuzz_checkpoint_resume(training, data):
    _resume_case(training, training[2], CHECKPOINT_FILES, data, "fine-tuning checkpoint (resume)")


@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_earlier_checkpoint_resume(training, data):
    files = {"checkpoint-1/training_state.pt": ("bytes",)}
    _resume_case(training, training[3], files, data, "earlier training_state.pt (resume)")


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_run_json(training, data):
    from adaption_fx.app.cli import finetune_defaults, read_run_options

    run = training[2]
    known = {*finetune_defaults(), "data"}

    def load(directory: Path):
        return read_run_options(directory / "run.json", known)

    def verify(options, directory: Path, damage) -> None:
        stored = json.loads((directory / "run.json").read_text()).get("cli", {})
        assert options == {k: v for k, v in stored.items() if k in known}, damage

    damage = data.draw(damage_strategy(run, {"run.json": ("json", "json", "bytes")}))
    run_case("run.json (--resume)", run, damage, load, verify)


# ----------------------------------------------------------------------------- data files
@pytest.fixture(scope="module")
def data_pristine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-data") / "data"
    directory.mkdir()
    records = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {
            "messages": [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi there"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief"},
                {"role": "user", "content": "Sum 1 2"},
                {"role": "assistant", "content": "3"},
            ]
        },
    ]
    (directory / "train.json").write_text(json.dumps(records, indent=1))
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


@fuzz_settings(120)
@given(data=st.data())
def test_fuzz_data_files(data_pristine, data):
    from adaption_fx.training.data import read_records

    name = data.draw(st.sampled_from(["train.json", "train.jsonl"]))

    def load(directory: Path):
        return read_records(directory / name)

    def verify(examples, directory: Path, damage) -> None:
        # Read: the examples are the file's records (parsed here independently).
        text = (directory / name).read_text(encoding="utf-8-sig")
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert len(examples) == len(records), damage
        for example, record in zip(examples, records, strict=True):
            if "messages" in record:
                assert [m.content for m in example.messages] == [
                    m["content"] for m in record["messages"]
                ]
            else:
                fields = example.alpaca
                assert (fields.instruction, fields.input, fields.output) == (
                    record["instruction"],
                    record.get("input") or "",
                    record["output"],
                )

    kinds = ("json", "json", "bytes") if name.endswith(".json") else ("bytes",)
    damage = data.draw(damage_strategy(data_pristine, {name: kinds}))
    run_case("data file (JSON / JSON Lines)", data_pristine, damage, load, verify)
