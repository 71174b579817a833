"""Adapter checkpoints in PEFT's layout: adapter_config.json + adapter_model.safetensors.

A second layout is read too: a plain ``transformers.Trainer`` saves ``model.state_dict()``
as ``model.safetensors`` and nothing else of the model; an AdaptedModel's state dict holds
adapter_config.json's content as its ``_extra_state`` entry (UTF-8 JSON in a uint8 tensor),
so that file alone says what the adapter is.

Files are written into a temporary directory beside the target and renamed into place,
so an interrupted save leaves either the previous checkpoint or the new one, never a mix.
Everything read is checked (method, sizes, keys, shapes, finiteness) before a model is
touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import torch

from adaption_fx.files import read_json
from adaption_fx.passes.insert import PROMPT_SUFFIX

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
# Our fields (version, gate variant) beside PEFT's file, where PEFT does not read them. A
# record, never read back: adapter_config.json alone says what the adapter is (no gate
# fields: PEFT's scalar identity gate; any other gate keeps its fields there).
EXTRAS_NAME = "adaption_fx.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# transformers' SAFE_WEIGHTS_NAME: what a plain Trainer writes for a model that is not a
# PreTrainedModel or PeftModel (``model.state_dict()``, keys as they are).
TRAINER_WEIGHTS_NAME = "model.safetensors"
# nn.Module's key for get_extra_state() at the root of a state dict.
EXTRA_STATE_KEY = "_extra_state"
PEFT_KEY_PREFIX = "base_model.model."
PEFT_TYPE = "ADAPTION_PROMPT"
DEFAULT_ADAPTER = "default"

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """An adapter checkpoint is missing, unreadable, or does not fit the model."""


def adapter_directory(directory: PathLike, adapter_name: str) -> Path:
    """Where ``adapter_name`` lives under ``directory`` in PEFT's layout.

    "default" sits at the root; any other adapter in a subfolder named after it. A
    non-default adapter saved on its own may also sit at the root: that is used when the
    subfolder does not exist.
    """
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"adapter checkpoint directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"adapter checkpoint {str(root)!r} is not a directory")
    if adapter_name != DEFAULT_ADAPTER and (root / adapter_name / CONFIG_NAME).is_file():
        return root / adapter_name
    return root


def _subfolders_with_adapters(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob(f"*/{CONFIG_NAME}"))


def read_config_dict(directory: PathLike) -> dict[str, Any]:
    """The adapter config of a checkpoint directory, checked to be LLaMA-Adapter: its
    adapter_config.json or, in a plain Trainer's output, the config inside
    ``model.safetensors``."""
    root = Path(directory)
    path = root / CONFIG_NAME
    if (trainer_file := _trainer_weights(root)) is not None:
        return _config_of_trainer_weights(trainer_file)
    if not path.is_file():
        hint = ""
        if root.is_dir() and (subs := _subfolders_with_adapters(root)):
            hint = f"; it has adapter subfolders {subs}: pass one of them or its adapter_name"
        elif (root / "pytorch_model.bin").is_file():
            hint = (
                "; its pytorch_model.bin (a pickle, Trainer's save_safetensors=False) is not "
                "read: save with safetensors"
            )
        if not root.exists():
            raise FileNotFoundError(f"adapter checkpoint directory {str(root)!r} does not exist")
        raise FileNotFoundError(
            f"no {CONFIG_NAME} or {TRAINER_WEIGHTS_NAME} in {str(root)!r}{hint}"
        )
    data = read_json(path, what=CONFIG_NAME, error=CheckpointError)
    return _checked_config(data, str(path))


def _checked_config(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise CheckpointError(
            f"{where} is a config for peft_type {peft_type!r}; adaption-fx loads "
            f"{PEFT_TYPE!r} (LLaMA-Adapter) checkpoints only"
        )
    return data


def _trainer_weights(root: Path) -> Path | None:
    # The Trainer layout is read only where PEFT's adapter_config.json is absent.
    path = root / TRAINER_WEIGHTS_NAME
    return path if not (root / CONFIG_NAME).is_file() and path.is_file() else None


def config_file(directory: PathLike) -> Path:
    """The file an adapter directory's config is read from: adapter_config.json, or a
    plain Trainer's model.safetensors where that is absent (for messages naming it)."""
    root = Path(directory)
    return _trainer_weights(root) or root / CONFIG_NAME


def _weights_file(root: Path) -> Path:
    # PEFT's adapter_model.safetensors, or a plain Trainer's model.safetensors.
    path = _trainer_weights(root) or root / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(root)!r}")
    return path


def split_config_entry(
    state: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], Any]:
    """A state dict's tensors apart from its config entry (``_extra_state``), and that
    entry (None where there is none)."""
    tensors = {k: v for k, v in state.items() if k != EXTRA_STATE_KEY}
    return tensors, state.get(EXTRA_STATE_KEY)


def config_tensor(config: Mapping[str, Any]) -> torch.Tensor:
    """adapter_config.json's content as a state dict entry: UTF-8 JSON in a uint8 tensor
    (a safetensors file holds tensors only)."""
    text = json.dumps(dict(config), sort_keys=True)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def config_from_tensor(value: Any, where: str) -> dict[str, Any]:
    """The config dict a :func:`config_tensor` holds, checked to be LLaMA-Adapter's."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise CheckpointError(
            f"{where}: {EXTRA_STATE_KEY} must be a 1-D uint8 tensor of adapter config JSON, "
            f"got {_describe(value)}"
        )
    try:
        data = json.loads(bytes(value.cpu().tolist()).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{where}: {EXTRA_STATE_KEY} is not adapter config JSON: {exc}"
        ) from exc
    return _checked_config(data, f"{where} ({EXTRA_STATE_KEY})")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor"
    return type(value).__name__


def _config_of_trainer_weights(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if EXTRA_STATE_KEY not in f.keys():
                raise CheckpointError(
                    f"{path} has no {EXTRA_STATE_KEY} entry, so it says nothing of the "
                    "adapter's config (it was not saved from an AdaptedModel's state_dict()), "
                    f"and there is no {CONFIG_NAME} beside it"
                )
            value = f.get_tensor(EXTRA_STATE_KEY)
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from exc
    return config_from_tensor(value, str(path))


def read_adapter_state(
    directory: PathLike,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    config: str = "the adapter config",
) -> tuple[dict[str, torch.Tensor], str]:
    """An adapter's tensors with our keys (``model.layers.3.self_attn.adaption_prompt``),
    and the file they came from: PEFT's adapter_model.safetensors where the directory has
    adapter_config.json, else a plain Trainer's model.safetensors (its config entry left
    out; :func:`read_config_dict` reads it).

    ``expected``: the shape of every tensor the adapter must have, by our key. Where given,
    the file's header (names, shapes, dtypes) is checked against it before any tensor is
    read, so a file or config that disagrees costs nothing to refuse; ``config`` describes
    the config fields the shapes follow from, for the messages."""
    path = _weights_file(Path(directory))
    prefix = PEFT_KEY_PREFIX if path.name == WEIGHTS_NAME else ""  # the Trainer's: our keys
    if expected is not None:
        header = tensor_header(path)
        if not prefix:  # the Trainer's file holds the config too
            header.pop(EXTRA_STATE_KEY, None)
        ours = {k.removeprefix(prefix): v for k, v in header.items()}
        check_header(ours, expected, str(path), config)
    if not prefix:
        tensors, _ = split_config_entry(_load_safetensors(path))
        return tensors, str(path)
    return from_peft_keys(_load_safetensors(path), str(path)), str(path)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def check_sizes_against_tensors(directory: PathLike, adapter_len: int, adapter_layers: int) -> None:
    """The config's sizes against the prompts in the adapter file's header, before any
    model is at hand: ``adapter_layers`` prompts, each of ``adapter_len`` tokens. A config
    that asks for more than its file holds is refused (CheckpointError naming the field)
    without reading a tensor."""
    path = _weights_file(Path(directory))
    config = config_file(directory)
    prompts = {
        key: shape
        for key, (shape, _) in tensor_header(path).items()
        if key.rsplit(".", 1)[-1] == PROMPT_SUFFIX
    }
    if len(prompts) != adapter_layers:
        raise CheckpointError(
            f"{config}: field 'adapter_layers' is {adapter_layers}, but {path.name} holds "
            f"{len(prompts)} adapted layers' prompts"
        )
    for key, shape in prompts.items():
        if len(shape) != 3 or shape[1] != adapter_len:
            raise CheckpointError(
                f"{config}: field 'adapter_len' is {adapter_len}, but {path.name}'s {key} has "
                f"shape {shape} (one batch row, adapter_len tokens, the hidden size)"
            )


def tensor_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The name, shape and dtype (safetensors' names: "F32", ...) of every tensor in a
    safetensors file, from its header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = {}
            for key in f.keys():
                tensor = f.get_slice(key)
                header[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
            return header
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def check_header(
    header: Mapping[str, tuple[tuple[int, ...], str]],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    config: str,
) -> None:
    """A safetensors header against the tensors a config implies: the same names, each
    of the expected shape and a floating-point dtype; else CheckpointError naming the file,
    the tensor and the config."""
    missing = [k for k in expected if k not in header]
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensors do not match the model's adapted layers for {config}: "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for key, shape in expected.items():
        found, dtype = header[key]
        if found != tuple(shape):
            raise CheckpointError(
                f"{where}: {key} has shape {found} but this model needs {tuple(shape)} ({config})"
            )
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: {key} has non-float dtype {dtype}")


def write_adapter_config(
    directory: PathLike, peft_fields: Mapping[str, Any], extras: Mapping[str, Any]
) -> None:
    """Write a checkpoint's adapter_config.json (PEFT's) and adaption_fx.json (ours, a
    record of the version that wrote it)."""
    write_json_atomic(Path(directory) / CONFIG_NAME, peft_fields)
    write_json_atomic(Path(directory) / EXTRAS_NAME, extras)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file in the same directory and a rename."""

    def dump(f: TextIO) -> None:
        json.dump(dict(data), f, indent=2, sort_keys=True)
        f.write("\n")

    _write_atomic(Path(path), dump)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a
    rename, so a reader sees the old file or the new one, never a part."""
    _write_atomic(Path(path), lambda f: f.write(text))


def _write_atomic(path: Path, write: Callable[[TextIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def write_tensors(directory: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors to ``directory/adapter_model.safetensors`` (PEFT's metadata)."""
    from safetensors.torch import save_file

    path = directory / WEIGHTS_NAME
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"format": "pt"},
    )
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files private (0600)


def _looks_like_checkpoint(root: Path) -> bool:
    return (root / CONFIG_NAME).is_file() or bool(_subfolders_with_adapters(root))


@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` as a whole on success.

    On an exception the temporary directory is removed and ``target`` is left as it was.
    An existing non-empty ``target`` that holds no adapter checkpoint is refused rather
    than replaced, so a mistyped path cannot wipe unrelated files.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"{str(target)!r} exists and is not a directory")
        if any(target.iterdir()) and not _looks_like_checkpoint(target):
            raise FileExistsError(
                f"{str(target)!r} is a non-empty directory without an adapter checkpoint; "
                "refusing to replace it: choose an empty or new directory"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if target.exists():
            # Two renames: between them the old checkpoint sits at ``backup`` and the new
            # one at ``tmp``, both complete, so a crash here loses neither.
            backup = tmp.with_name(f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            os.rename(target, backup)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_peft_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys (``model.layers.3.self_attn.adaption_prompt``) to PEFT's."""
    return {PEFT_KEY_PREFIX + k: v for k, v in state.items()}


def from_peft_keys(state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """PEFT's keys to ours; a key without PEFT's prefix is an error naming it."""
    foreign = sorted(k for k in state if not k.startswith(PEFT_KEY_PREFIX))
    if foreign:
        raise CheckpointError(
            f"{where}: unexpected tensor keys {foreign[:5]} (expected keys starting with "
            f"{PEFT_KEY_PREFIX!r})"
        )
    return {k[len(PEFT_KEY_PREFIX) :]: v for k, v in state.items()}
