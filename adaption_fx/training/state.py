"""A fine-tuning checkpoint's optimizer, scheduler and RNG state, on disk and back.

``training_state.safetensors`` holds every tensor (each parameter's AdamW state,
``optimizer.<index>.<name>``, and the torch CPU RNG state, ``rng.torch``);
``training_state.json`` the rest (the parameter groups, the scheduler's state dict,
Python's ``random`` state, which tensor is which). Neither can run code when read, unlike
the pickle (``training_state.pt``) earlier versions wrote: that one is read with torch's
restricted unpickler (tensors and plain data only). Whatever the format, everything is
checked against the run's own optimizer and scheduler before anything is applied
(:func:`read_training_state`); a file that does not fit raises :class:`TrainingError`
naming the file and the field.
"""

from __future__ import annotations

import math
import pickle
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaption_fx.files import (
    SMALL_JSON_BYTES,
    check_type,
    field,
    parse_json,
    read_json,
)

STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
LEGACY_STATE_FILE = "training_state.pt"
STATE_FORMAT = "adaption-fx training state"
STATE_VERSION = 1


class TrainingError(ValueError):
    """A training run cannot start or resume as asked."""


# What the schedule fixes in an AdamW parameter group (a checkpoint that differs is another
# run's); "lr" is what the scheduler set last, and is taken from the checkpoint.
FIXED_GROUP_FIELDS = ("initial_lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
# A Mersenne Twister state: 624 words and the position in them (random.getstate()[1]).
PYTHON_RNG_WORDS = 625
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
}
# The dtypes AdamW keeps a parameter's step count in (float64 under a float64 default).
_STEP_DTYPES = (torch.float32, torch.float64)
_TORCH_RNG_TENSOR = "rng.torch"


@dataclass
class TrainingState:
    """A checkpoint's optimizer, scheduler and RNG state, checked against this run's
    optimizer and scheduler and ready to load (:func:`read_training_state`)."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    python_rng: tuple[Any, ...]


@dataclass
class _StateParts:
    """What a training-state file holds, before it is checked: ``state`` maps a
    parameter's index to its tensors; ``where`` names the file of the plain values and
    ``tensors_where`` that of the tensors."""

    param_groups: Any
    state: dict[int, dict[str, Any]]
    scheduler: Any
    torch_rng: Any
    python_rng: Any
    where: str
    tensors_where: str


def training_state_files(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (for ``training_state.safetensors``) and the JSON document (for
    ``training_state.json``) of the optimizer's, the scheduler's and the RNGs' state.

    The tensors: each parameter's AdamW state (``optimizer.<index>.exp_avg`` and so on)
    and the torch CPU RNG state (``rng.torch``). The JSON: ``format`` and ``version``, the
    optimizer's ``param_groups``, its ``state`` as the tensor names of each parameter
    index, the scheduler's state dict, Python's ``random`` state as lists and
    ``torch_rng``, the name of that tensor.
    """
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, str]] = {}
    for index, entry in saved["state"].items():
        layout[str(index)] = {}
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{key} is not a tensor: {value!r}")
            name = f"optimizer.{index}.{key}"
            tensors[name] = value.detach().to("cpu").contiguous()
            layout[str(index)][key] = name
    tensors[_TORCH_RNG_TENSOR] = torch.get_rng_state()
    version, words, gauss = random.getstate()
    document = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "optimizer": {
            "param_groups": [_plain(group) for group in saved["param_groups"]],
            "state": layout,
        },
        "scheduler": _plain(scheduler.state_dict()),
        "torch_rng": _TORCH_RNG_TENSOR,
        "python_rng": [version, list(words), gauss],
    }
    return tensors, document


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (what JSON gives back), for writing and comparing."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def same_value(a: Any, b: Any) -> bool:
    """Equal as JSON values (a tuple equals the list; True does not equal 1)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def shown(value: Any) -> str:
    """A value for an error message, cut to a line."""
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) < 50 else None
    if text is None:
        return f"a {type(value).__name__} of {len(value)} items"
    return text if len(text) <= 60 else text[:57] + "..."


def _field(
    data: Mapping[str, Any], key: str, expect: Any, where: str, at: str = "", **bounds: Any
) -> Any:
    """``data[key]`` checked by :func:`field`, named in errors by its dotted path ``at``."""
    name = f"{at}.{key}" if at else key
    return field(
        {name: data[key]} if key in data else {}, name, expect, where, error=TrainingError, **bounds
    )


def _parameters(optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, dict]]:
    """Each parameter of the optimizer by the index its state dict gives it, with its group."""
    found: dict[int, tuple[torch.Tensor, dict]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            found[len(found)] = (param, group)
    return found


def _state_keys(group: Mapping[str, Any]) -> set[str]:
    """The state AdamW keeps for each parameter of ``group``."""
    keys = {"step", "exp_avg", "exp_avg_sq"}
    return keys | {"max_exp_avg_sq"} if group.get("amsgrad") else keys


def _check_layout(
    keys: Mapping[int, set[str]], optimizer: torch.optim.Optimizer, step: int, where: str
) -> None:
    """The parameters a checkpoint holds state for, and their state's names, against the
    optimizer: AdamW has state for every parameter after the first step, none before."""
    params = _parameters(optimizer)
    for index, found in keys.items():
        if index not in params:
            raise TrainingError(
                f"{where}: field 'optimizer.state' holds parameter {index}, but this run's "
                f"optimizer has {len(params)} parameters (0 to {len(params) - 1})"
            )
        expected = _state_keys(params[index][1])
        if found != expected:
            raise TrainingError(
                f"{where}: field 'optimizer.state.{index}' holds "
                f"{sorted(map(shown, found))[:8]}, but AdamW keeps {sorted(expected)} for each "
                "parameter"
            )
    wanted = len(params) if step > 0 else 0
    if len(keys) != wanted:
        raise TrainingError(
            f"{where}: field 'optimizer.state' holds the state of {len(keys)} parameters, but "
            f"after {step} step(s) AdamW has the state of {wanted} (this run's optimizer has "
            f"{len(params)} parameters)"
        )


def _expected_tensors(
    layout: Mapping[int, Mapping[str, str]], rng_name: str, optimizer: torch.optim.Optimizer
) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
    """Each tensor a ``training_state.safetensors`` must hold: its shape and dtypes."""
    params = _parameters(optimizer)
    expected = {rng_name: (tuple(torch.get_rng_state().shape), (torch.uint8,))}
    for index, names in layout.items():
        param = params[index][0]
        for key, name in names.items():
            if key == "step":
                expected[name] = ((), _STEP_DTYPES)
            else:
                expected[name] = (tuple(param.shape), (param.dtype,))
    return expected


def _check_tensors_header(
    path: Path, expected: Mapping[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]
) -> None:
    """A safetensors file's header against the tensors it must hold, before any tensor
    is read: the file's size, the names, shapes and dtypes (safetensors itself checks the
    byte ranges as it reads)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TrainingError(
            f"{path} is missing, but {STATE_JSON_FILE} beside it is there: the checkpoint "
            "is incomplete"
        ) from None
    data_bytes = sum(
        math.prod(shape) * max(dtype.itemsize for dtype in dtypes)
        for shape, dtypes in expected.values()
    )
    if size > 8 + SMALL_JSON_BYTES + data_bytes:
        raise TrainingError(
            f"{path} is {size} bytes, more than the training state of this run's optimizer "
            f"can be ({data_bytes} bytes of tensors and a header)"
        )
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise TrainingError(f"{path} is not a safetensors file: it is {size} bytes long")
        length = int.from_bytes(prefix, "little")
        if length > min(SMALL_JSON_BYTES, size - 8):
            raise TrainingError(
                f"{path} is not a safetensors file (or is truncated): its header would be "
                f"{length} bytes, in a file of {size}"
            )
        header = parse_json(
            handle.read(length), where=f"{path}: the safetensors header", error=TrainingError
        )
    header.pop("__metadata__", None)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise TrainingError(
            f"{path}: the tensors do not match {STATE_JSON_FILE}'s layout and this run's "
            f"optimizer: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for name, (shape, dtypes) in expected.items():
        entry = check_type(header[name], dict, f"{path}: tensor {name!r}", error=TrainingError)
        dtype = _field(entry, "dtype", str, f"{path}: tensor {name!r}")
        found = _field(entry, "shape", list, f"{path}: tensor {name!r}")
        names = [_SAFETENSORS_DTYPES.get(d, str(d)) for d in dtypes]
        if not same_value(found, list(shape)) or dtype not in names:
            raise TrainingError(
                f"{path}: tensor {name!r} is {dtype} of shape {shown(found)}, but this run "
                f"needs {' or '.join(names)} of shape {list(shape)}"
            )


def _read_state_files(directory: Path, optimizer: torch.optim.Optimizer, step: int) -> _StateParts:
    """``training_state.json`` and ``training_state.safetensors``, the layout and header
    checked before a tensor is read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / STATE_JSON_FILE
    tensors_path = directory / STATE_TENSORS_FILE
    where = str(path)
    try:
        data = read_json(path, what="training state", error=TrainingError)
    except FileNotFoundError:
        raise TrainingError(
            f"{path} is missing, but {STATE_TENSORS_FILE} beside it is there: the checkpoint "
            "is incomplete"
        ) from None
    kind = _field(data, "format", str, where)
    if kind != STATE_FORMAT:
        raise TrainingError(f"{where}: field 'format' is {shown(kind)}, not {STATE_FORMAT!r}")
    version = _field(data, "version", int, where, minimum=1)
    if version > STATE_VERSION:
        raise TrainingError(
            f"{where}: field 'version' is {version}: written by a newer adaption-fx (this one "
            f"reads version {STATE_VERSION}); resume with that version"
        )
    optimizer_data = _field(data, "optimizer", dict, where)
    raw_layout = _field(optimizer_data, "state", dict, where, "optimizer")
    layout: dict[int, dict[str, str]] = {}
    for key, entry in raw_layout.items():
        if not (key.isascii() and key.isdigit() and len(key) < 10):
            raise TrainingError(
                f"{where}: field 'optimizer.state' has key {shown(key)}, not a parameter index"
            )
        names = check_type(
            entry, dict, f"{where}: field 'optimizer.state.{key}'", error=TrainingError
        )
        for state_key in names:
            _field(names, state_key, str, where, f"optimizer.state.{key}")
        layout[int(key)] = dict(names)
    rng_name = _field(data, "torch_rng", str, where)
    all_names = [rng_name, *(name for names in layout.values() for name in names.values())]
    if len(set(all_names)) != len(all_names):
        raise TrainingError(f"{where}: fields 'optimizer.state' and 'torch_rng' repeat a name")
    _check_layout({i: set(names) for i, names in layout.items()}, optimizer, step, where)
    _check_tensors_header(tensors_path, _expected_tensors(layout, rng_name, optimizer))
    try:
        tensors = load_file(str(tensors_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TrainingError(
            f"{tensors_path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    return _StateParts(
        param_groups=_field(optimizer_data, "param_groups", list, where, "optimizer"),
        state={i: {k: tensors[name] for k, name in names.items()} for i, names in layout.items()},
        scheduler=_field(data, "scheduler", dict, where),
        torch_rng=tensors[rng_name],
        python_rng=_field(data, "python_rng", list, where),
        where=where,
        tensors_where=str(tensors_path),
    )


def _read_legacy_state(path: Path, optimizer: torch.optim.Optimizer, step: int) -> _StateParts:
    """An earlier version's ``training_state.pt``, through torch's restricted unpickler
    (tensors and plain data only: a pickle asking for anything else is refused unrun)."""
    where = str(path)
    params = _parameters(optimizer)
    moments = sum(
        p.numel() * p.element_size() * (len(_state_keys(g)) - 1) for p, g in params.values()
    )
    bound = 2 * moments + (16 << 20)  # the tensors, the pickle and the zip's padding
    size = path.stat().st_size
    if size > bound:
        raise TrainingError(
            f"{where} is {size} bytes, more than the training state of this run's optimizer "
            f"can be ({bound}); it was not loaded"
        )
    try:
        with warnings.catch_warnings():
            # torch warns of pickle protocols it did not write; the refusal below says more.
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        asked = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" (it asks for {asked.group(1)})" if asked else ""
        raise TrainingError(
            f"{where} holds objects a checkpoint written by adaption-fx never holds{what}, or "
            "is damaged: torch's restricted loader refused it, and it was not loaded"
        ) from None
    except Exception as exc:  # a damaged pickle fails anywhere in torch's unpickler
        # (KeyError, IndexError, RuntimeError, EOFError...): all mean "not readable".
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problem = f"{type(exc).__name__}: {problem}"[:200]
        raise TrainingError(
            f"{where} is not a readable training state (truncated or corrupt?): {problem}; "
            "it was not loaded"
        ) from None
    saved = check_type(saved, dict, where, error=TrainingError)
    optimizer_data = _field(saved, "optimizer", dict, where)
    raw_state = _field(optimizer_data, "state", dict, where, "optimizer")
    state: dict[int, dict[str, Any]] = {}
    for index, entry in raw_state.items():
        if isinstance(index, bool) or not isinstance(index, int):
            raise TrainingError(
                f"{where}: field 'optimizer.state' has key {shown(index)}, not a parameter index"
            )
        entry = check_type(
            entry, dict, f"{where}: field 'optimizer.state.{index}'", error=TrainingError
        )
        state[index] = dict(entry)
    _check_layout({i: set(entry) for i, entry in state.items()}, optimizer, step, where)
    return _StateParts(
        param_groups=_field(optimizer_data, "param_groups", list, where, "optimizer"),
        state=state,
        scheduler=_field(saved, "scheduler", dict, where),
        torch_rng=_field(saved, "torch_rng", torch.Tensor, where),
        python_rng=_field(saved, "python_rng", (list, tuple), where),
        where=where,
        tensors_where=where,
    )


def _checked_param_groups(parts: _StateParts, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The checkpoint's parameter groups: this optimizer's, with the checkpoint's ``lr``,
    once the parameters and what the schedule fixes agree."""
    where = parts.where
    mine = optimizer.state_dict()["param_groups"]
    if len(parts.param_groups) != len(mine):
        raise TrainingError(
            f"{where}: field 'optimizer.param_groups' holds {len(parts.param_groups)} groups, "
            f"but this run's optimizer has {len(mine)}"
        )
    groups = []
    for number, (saved, group) in enumerate(zip(parts.param_groups, mine, strict=True)):
        at = f"optimizer.param_groups[{number}]"
        saved = check_type(saved, dict, f"{where}: field {at!r}", error=TrainingError)
        params = _field(saved, "params", list, where, at)
        if not same_value(params, group["params"]):
            raise TrainingError(
                f"{where}: field '{at}.params' is {shown(params)}, but this run's optimizer "
                f"has {group['params']}"
            )
        for key in FIXED_GROUP_FIELDS:
            value = _field(saved, key, (bool, int, float, list, tuple, type(None)), where, at)
            if not same_value(value, group[key]):
                raise TrainingError(
                    f"{where}: field '{at}.{key}' is {shown(value)}, but this run's is "
                    f"{shown(_plain(group[key]))}"
                )
        lr = _field(saved, "lr", float, where, at)
        if lr < 0:
            raise TrainingError(f"{where}: field '{at}.lr' is {lr}, less than 0")
        # Only lr changes as a run goes on; every other entry is this run's own.
        groups.append({**group, "lr": lr})
    return groups


def _checked_optimizer_state(
    parts: _StateParts, optimizer: torch.optim.Optimizer, step: int
) -> dict[int, dict[str, torch.Tensor]]:
    """Each parameter's AdamW state: the parameter's shape and dtype, finite, steps counted
    up to the checkpoint's."""
    params = _parameters(optimizer)
    where = parts.tensors_where
    checked: dict[int, dict[str, torch.Tensor]] = {}
    for index, entry in parts.state.items():
        param = params[index][0]
        checked[index] = {}
        for key, value in entry.items():
            name = f"optimizer.state.{index}.{key}"
            tensor = check_type(value, torch.Tensor, f"{where}: {name}", error=TrainingError)
            if key == "step":
                shape, dtypes = (), _STEP_DTYPES
            else:
                shape, dtypes = tuple(param.shape), (param.dtype,)
            if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
                raise TrainingError(
                    f"{where}: {name} is {tensor.dtype} of shape {tuple(tensor.shape)}, but "
                    f"parameter {index} needs {' or '.join(map(str, dtypes))} of shape {shape}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise TrainingError(f"{where}: {name} holds NaN or infinite values")
            if key == "step":
                count = float(tensor)
                if count != int(count) or not 0 <= count <= step:
                    raise TrainingError(
                        f"{where}: {name} is {count}, not a step count from 0 to the "
                        f"checkpoint's {step}"
                    )
            elif key != "exp_avg" and bool((tensor < 0).any()):
                raise TrainingError(f"{where}: {name} holds negative values (squares cannot be)")
            checked[index][key] = tensor
    return checked


def _checked_scheduler(
    parts: _StateParts, scheduler: torch.optim.lr_scheduler.LRScheduler, step: int
) -> dict[str, Any]:
    """The scheduler's state: this scheduler's entries, each replaced by the checkpoint's
    after a type check (``load_state_dict`` sets them all as attributes: nothing else)."""
    where = parts.where
    template = scheduler.state_dict()
    saved = parts.scheduler
    groups = len(template["base_lrs"])
    last_epoch = _field(saved, "last_epoch", int, where, "scheduler", minimum=0)
    if last_epoch != step:
        raise TrainingError(
            f"{where}: field 'scheduler.last_epoch' is {last_epoch}, but the checkpoint is of "
            f"step {step} (the scheduler steps once per optimizer step)"
        )
    checked: dict[str, Any] = {"last_epoch": last_epoch}
    for key in ("base_lrs", "_last_lr"):
        values = _field(saved, key, list, where, "scheduler")
        if len(values) != groups:
            raise TrainingError(
                f"{where}: field 'scheduler.{key}' has {len(values)} entries, but this run has "
                f"{groups} parameter group(s)"
            )
        for number, value in enumerate(values):
            check_type(
                value, float, f"{where}: field 'scheduler.{key}[{number}]'", error=TrainingError
            )
        checked[key] = list(values)
    if not same_value(checked["base_lrs"], template["base_lrs"]):
        raise TrainingError(
            f"{where}: field 'scheduler.base_lrs' is {shown(checked['base_lrs'])}, but this "
            f"run's is {template['base_lrs']}"
        )
    lambdas = _field(saved, "lr_lambdas", list, where, "scheduler")
    # A dict here would be loaded into the schedule function's attributes: ours has none.
    if len(lambdas) != groups or any(item is not None for item in lambdas):
        raise TrainingError(
            f"{where}: field 'scheduler.lr_lambdas' is {shown(lambdas)}, but this run's is "
            f"{[None] * groups} (its schedule function keeps no state)"
        )
    checked["lr_lambdas"] = list(lambdas)
    checked["_step_count"] = _field(saved, "_step_count", int, where, "scheduler", minimum=1)
    # The other entries (flags of this torch version) must have the type this scheduler's
    # have; one missing keeps this scheduler's value, one this torch lacks is not loaded.
    scalars = (bool, int, float, str, type(None))
    for key, value in template.items():
        if key in checked or key not in saved:
            continue
        if isinstance(value, list):
            items = _field(saved, key, list, where, "scheduler")
            for number, item in enumerate(items):
                check_type(
                    item,
                    scalars,
                    f"{where}: field 'scheduler.{key}[{number}]'",
                    error=TrainingError,
                )
            checked[key] = list(items)
        elif isinstance(value, scalars):
            checked[key] = _field(saved, key, type(value), where, "scheduler")
        else:
            raise TrainingError(f"{where}: field 'scheduler.{key}' cannot be loaded from a file")
    return {**template, **checked}


def _checked_python_rng(value: Any, where: str) -> tuple[Any, ...]:
    """``random.getstate()``'s tuple from its list form: (3, 625 words, None or a float)."""
    if len(value) != 3:
        raise TrainingError(
            f"{where}: field 'python_rng' has {len(value)} entries, not 3 (version, state, "
            "gauss_next)"
        )
    version, words, gauss = value
    if version != random.getstate()[0] or isinstance(version, bool):
        raise TrainingError(
            f"{where}: field 'python_rng[0]' is {shown(version)}, not the version "
            f"{random.getstate()[0]} of Python's random state"
        )
    check_type(words, (list, tuple), f"{where}: field 'python_rng[1]'", error=TrainingError)
    if len(words) != PYTHON_RNG_WORDS:
        raise TrainingError(
            f"{where}: field 'python_rng[1]' has {len(words)} entries, not {PYTHON_RNG_WORDS}"
        )
    for number, word in enumerate(words):
        check_type(word, int, f"{where}: field 'python_rng[1][{number}]'", error=TrainingError)
        if not 0 <= word < 2**32:
            raise TrainingError(
                f"{where}: field 'python_rng[1][{number}]' is {word}, not in [0, 2**32)"
            )
    if words[-1] > PYTHON_RNG_WORDS - 1:
        raise TrainingError(
            f"{where}: field 'python_rng[1][{PYTHON_RNG_WORDS - 1}]' (the position) is "
            f"{words[-1]}, more than {PYTHON_RNG_WORDS - 1}"
        )
    check_type(gauss, (float, type(None)), f"{where}: field 'python_rng[2]'", error=TrainingError)
    return (version, tuple(words), gauss)


def read_training_state(
    directory: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> TrainingState:
    """The training state of the checkpoint ``directory`` (of optimizer step ``step``),
    checked against ``optimizer`` and ``scheduler`` (built for this run, not changed).

    Reads ``training_state.json`` + ``training_state.safetensors``, or an earlier version's
    ``training_state.pt`` through torch's restricted unpickler. Anything that does not fit
    the optimizer (parameter count, shapes, dtypes, the fixed hyperparameters), a scheduler
    field of the wrong type or step, or RNG states of the wrong form raise TrainingError
    naming the file and the field.
    """
    if (directory / STATE_JSON_FILE).exists() or (directory / STATE_TENSORS_FILE).exists():
        parts = _read_state_files(directory, optimizer, step)
    elif (directory / LEGACY_STATE_FILE).exists():
        parts = _read_legacy_state(directory / LEGACY_STATE_FILE, optimizer, step)
    else:
        raise TrainingError(
            f"{directory} holds no {STATE_JSON_FILE} and {STATE_TENSORS_FILE} (nor an earlier "
            f"version's {LEGACY_STATE_FILE}): the checkpoint is incomplete"
        )
    groups = _checked_param_groups(parts, optimizer)
    state = _checked_optimizer_state(parts, optimizer, step)
    scheduler_state = _checked_scheduler(parts, scheduler, step)
    rng = check_type(
        parts.torch_rng, torch.Tensor, f"{parts.tensors_where}: torch_rng", error=TrainingError
    )
    reference = torch.get_rng_state()
    if rng.dtype != torch.uint8 or rng.shape != reference.shape:
        raise TrainingError(
            f"{parts.tensors_where}: the torch RNG state is {rng.dtype} of shape "
            f"{tuple(rng.shape)}, not uint8 of shape {tuple(reference.shape)}"
        )
    python_rng = check_type(
        parts.python_rng, (list, tuple), f"{parts.where}: field 'python_rng'", error=TrainingError
    )
    return TrainingState(
        optimizer={"state": state, "param_groups": groups},
        scheduler=scheduler_state,
        torch_rng=rng,
        python_rng=_checked_python_rng(python_rng, parts.where),
    )
