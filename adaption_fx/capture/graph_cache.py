"""A persistent cache of torch.export captures, so a second process skips the tracing.

An entry holds one ExportedProgram *without its weights* (torch.export's serialiser with
``serialize_state_dict=False``); on a hit the program is rebuilt around the model's own
parameters and buffers, so nothing of the model is copied or read from disk. An entry is
keyed by everything that can change the traced graph:

- what is captured (the masked forward, the mask-free causal forward, the decode step);
- the versions of Python, torch, transformers and of this package's source;
- the model's class, the source files of every module class it holds and the code of their
  methods (so a method patched at run time counts), its Hugging Face config (attention
  implementation included) and its forward's signature;
- the names, shapes, dtypes and devices of its parameters and buffers, and which are tied
  (not whether they require gradients: ``rewrite`` freezes them, and the graph is the same);
- the example inputs' structure, shapes, dtypes and the dynamic-shape specification.

The key is stored in the entry and compared in full, and the entry carries a SHA-256 of
its payload: a stale, truncated or corrupt entry is reported, removed and rebuilt, never
used. Entries are written to a temporary file and renamed into place.

A caller that checks what it builds from an entry (the graph grown from a one-layer capture
is run against the model once) records the verdict beside the entry
(:meth:`CacheEntry.mark_verified`), tied to the entry's checksum; a later hit on the same
entry reads it (:meth:`CacheEntry.verified`) instead of checking again. A rebuilt entry
has a new checksum, so no verdict carries over to it.

Location: ``$ADAPTION_FX_CACHE_DIR``, else ``$XDG_CACHE_HOME/adaption-fx``, else
``~/.cache/adaption-fx`` (graphs under ``graphs/``). ``ADAPTION_FX_CACHE=0`` in the
environment, or ``rewrite(..., cache=False)``, turns it off.

Trust: reading a program back is as powerful as running code (torch's deserialiser parses
symbolic sizes with sympy, which evaluates them), and a checksum only proves that whoever
wrote an entry computed it. So entries are read from and written to a directory only
when it and the cache root are owned by the current user and writable by no one else,
and only entry files with the same owner and modes (:func:`adaption_fx.files
.private_cache_directory`); elsewhere (a shared scratch disk, mode 0777) one warning names
the directory and captures run without the cache. Directories the cache creates are
private (0700), entries 0600. On top of that the pickled part of an entry is read by an
unpickler that builds torch's export-schema classes and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import logging
import marshal
import os
import pickle
import platform
import struct
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import sympy
import torch

from adaption_fx.files import cache_root, private_cache_directory, untrusted_reason

logger = logging.getLogger(__name__)

ENV_SWITCH = "ADAPTION_FX_CACHE"
ENV_DIRECTORY = "ADAPTION_FX_CACHE_DIR"
_SUBDIRECTORY = "graphs"
_WHAT = "graph cache"
FORMAT = 2
MAGIC = b"ADAPTION-FX GRAPH\n"
_SUFFIX = ".graph"


def cache_enabled(requested: bool = True) -> bool:
    """Whether captures are cached: ``requested`` and not turned off by ``ADAPTION_FX_CACHE``
    (0, false, no or off)."""
    if not isinstance(requested, bool):
        raise TypeError(f"cache must be a bool, got {requested!r}")
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    return requested and value not in ("0", "false", "no", "off")


def cache_directory() -> Path:
    """Where entries live (see the module docstring); not created until an entry is written."""
    return cache_root() / _SUBDIRECTORY


def clear_cache() -> int:
    """Remove every cached graph; returns how many entries were removed."""
    directory = cache_directory()
    removed = 0
    for path in directory.glob(f"*{_SUFFIX}") if directory.is_dir() else []:
        _remove(path)
        removed += 1
    return removed


# ----------------------------------------------------------------------------- the key
@functools.cache
def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def _class_source(cls: type) -> str:
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # built in
        return "builtin"
    return _file_digest(path) if path else "unknown"


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        versions["transformers"] = transformers.__version__
    versions["adaption_fx"] = _package_digest()
    return versions


def _function_digest(function: Any) -> str:
    code = getattr(function, "__code__", None)
    if code is None:
        return repr(function)
    try:
        return hashlib.sha256(marshal.dumps(code)).hexdigest()[:16]
    except ValueError:  # a code object marshal cannot write
        return f"{function.__module__}.{function.__qualname__}"


def _class_code(cls: type) -> dict[str, str]:
    """Digests of the functions a module class and its base classes define (up to
    ``nn.Module``): a method patched at run time (``LlamaDecoderLayer.forward = ...``)
    changes them where the source files do not."""
    functions: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass is torch.nn.Module or klass is object:
            break
        for name, value in vars(klass).items():
            value = getattr(value, "__func__", value)  # staticmethod / classmethod
            if callable(value) and hasattr(value, "__code__"):
                functions.setdefault(name, _function_digest(value))
    return functions


def _config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    values = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version")
    }
    values["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.loads(json.dumps(values, sort_keys=True, default=repr))


def _tensors(model: torch.nn.Module) -> list[Any]:
    first_name: dict[int, str] = {}
    entries = []
    named = [*model.named_parameters(remove_duplicate=False)]
    named += [*model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        tied = first_name.setdefault(id(tensor), name)
        entries.append(
            [name, list(tensor.shape), str(tensor.dtype), str(tensor.device)]
            + ([tied] if tied != name else [])
        )
    return entries


def _inputs(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype), str(value.device)]
    if isinstance(value, dict):
        return {str(k): _inputs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_inputs(v) for v in value]]
    return repr(value)


def cache_key(
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: Any, what: str
) -> dict[str, Any]:
    """The key of a capture of ``model`` (see the module docstring), as JSON-able data."""
    classes = {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}
    sources = {}
    code: dict[str, Any] = {}
    for path, module in model.named_modules():
        name = f"{type(module).__module__}.{type(module).__qualname__}"
        sources.setdefault(name, _class_source(type(module)))
        if name not in code:
            code[name] = _class_code(type(module))
        if "forward" in vars(module):  # this instance runs other code than its class
            code[f"{name} at {path or '<root>'}"] = _function_digest(vars(module)["forward"])
    return {
        "format": FORMAT,
        "what": what,
        "versions": _versions(),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sources": {name: sources[name] for name in sorted(classes)},
        "code": code,
        "config": _config(model),
        "signature": str(inspect.signature(model.forward)),
        "tensors": _tensors(model),
        "inputs": _inputs([list(args), kwargs]),
        "dynamic": repr(dynamic),
        "grad": torch.is_grad_enabled(),
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]


# ----------------------------------------------------------------------------- entries
class CacheEntryError(ValueError):
    """A cache entry that must not be used (stale, truncated or corrupt)."""


@dataclass(frozen=True)
class CacheEntry:
    """The cache entry a program was loaded from or stored in, and its payload checksum."""

    path: Path
    sha256: str

    def _stamp(self, check: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{check}.ok")

    def verified(self, check: str) -> bool:
        """Whether ``check`` passed on what was built from this very entry before (a
        verdict file someone else could have written counts as none)."""
        stamp = self._stamp(check)
        if untrusted_reason(stamp) is not None:
            return False
        try:
            return stamp.read_bytes()[:64] == self.sha256.encode()
        except OSError:
            return False

    def mark_verified(self, check: str) -> None:
        """Record that ``check`` passed on what was built from this entry (atomically;
        a cache that cannot be written only logs)."""
        try:
            _write_atomically(self._stamp(check), self.sha256.encode())
        except OSError as exc:
            logger.info("could not record the %s check of %s: %s", check, self.path, exc)


# The entry each loaded or stored program belongs to (programs are not ours to annotate).
_ENTRIES: weakref.WeakKeyDictionary[Any, CacheEntry] = weakref.WeakKeyDictionary()


def cache_entry(program: Any) -> CacheEntry | None:
    """The cache entry ``program`` (a :func:`cached_export` result) was loaded from or
    stored in; None for one the cache did not hold."""
    return _ENTRIES.get(program)


def _remove(path: Path) -> None:
    """Remove an entry and the verdicts recorded beside it."""
    path.unlink(missing_ok=True)
    for stamp in path.parent.glob(f"{path.name}.*.ok"):
        stamp.unlink(missing_ok=True)


def _write(path: Path, key: dict[str, Any], blobs: list[bytes]) -> str:
    """Write an entry; returns its payload checksum."""
    payload = b"".join(blobs)
    sha256 = hashlib.sha256(payload).hexdigest()
    header = json.dumps({"key": key, "sizes": [len(b) for b in blobs], "sha256": sha256}).encode()
    _write_atomically(path, MAGIC + struct.pack("<Q", len(header)) + header + payload)
    return sha256


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file renamed into place: a reader never
    sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry_file(path: Path, key: dict[str, Any]) -> tuple[list[bytes], str]:
    """An entry's parts and its payload checksum; CacheEntryError if it must not be used
    (including an entry file that someone other than this user could have written)."""
    reason = untrusted_reason(path)
    if reason is not None:
        raise CacheEntryError(f"the entry file {reason}")
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise CacheEntryError("not a graph cache entry")
    start = len(MAGIC) + 8
    (header_len,) = struct.unpack("<Q", data[len(MAGIC) : start])
    try:
        header = json.loads(data[start : start + header_len])
    except ValueError as exc:
        raise CacheEntryError(f"unreadable header: {exc}") from exc
    if header.get("key") != key:
        raise CacheEntryError("its key differs from the model's (a stale entry)")
    payload = data[start + header_len :]
    sizes = header.get("sizes") or []
    if sum(sizes) != len(payload):
        raise CacheEntryError(f"payload of {len(payload)} bytes, header says {sum(sizes)}")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CacheEntryError("payload checksum mismatch")
    blobs, offset = [], 0
    for size in sizes:
        blobs.append(payload[offset : offset + size])
        offset += size
    return blobs, header["sha256"]


def _serialize(program: torch.export.ExportedProgram) -> list[bytes]:
    from torch._export.serde import serialize as serde

    artifact = serde.serialize(program, serialize_state_dict=False)
    # The program as torch's schema objects, pickled: reading them back is ten times
    # faster than parsing the JSON torch writes. The entry is as trusted as the cache
    # directory (the user's own), like torch's compile caches.
    schema = serde._bytes_to_dataclass(serde.ExportedProgram, artifact.exported_program)
    return [pickle.dumps(schema, protocol=5), artifact.constants, artifact.example_inputs]


def deserialize_program(blobs: list[bytes], model: torch.nn.Module) -> torch.export.ExportedProgram:
    from torch._export.serde import serialize as serde

    if len(blobs) != 3:
        raise CacheEntryError(f"{len(blobs)} parts, expected 3")
    schema_bytes, constants_bytes, examples_bytes = blobs
    try:
        schema = SchemaUnpickler(io.BytesIO(schema_bytes)).load()
    except Exception as exc:  # a damaged pickle fails in many ways: all are unusable
        raise CacheEntryError(f"unreadable program: {type(exc).__name__}: {exc}") from exc
    if not isinstance(schema, serde.ExportedProgram):
        raise CacheEntryError(f"holds a {type(schema).__name__}, not a program")
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    names = []  # what the program takes from the state dict: parameters, persistent buffers
    for spec in schema.graph_module.signature.input_specs:
        if spec.type == "parameter":
            names.append(spec.parameter.parameter_name)
        elif spec.type == "buffer" and spec.buffer.persistent:
            names.append(spec.buffer.buffer_name)
    missing = [n for n in names if n not in own]
    if missing:
        raise CacheEntryError(f"the model has no tensors {missing[:3]}")
    state = {n: own[n] for n in names}
    constants = serde.deserialize_torch_artifact(constants_bytes)
    # Non-persistent buffers are constants to torch.export: bind the model's own.
    constants = {
        k: own.get(k, v) if isinstance(v, torch.Tensor) else v for k, v in constants.items()
    }
    with _LOCK, mock.patch.object(serde, "sympy", ParseOnce()):
        return serde.ExportedProgramDeserializer().deserialize(
            schema, state, constants, examples_bytes
        )


class SchemaUnpickler(pickle.Unpickler):
    """Reads the pickled program schema: torch's export-schema classes (dataclasses,
    enums, unions and their tags) and plain data, never any other callable, so a planted
    pickle cannot name ``os.system`` (it fails with UnpicklingError)."""

    _MODULES = ("torch._export.serde.schema",)

    def find_class(self, module: str, name: str) -> Any:
        from torch._export.serde import schema
        from torch._export.serde.union import _UnionTag

        if module == "torch._export.serde.union" and name == "_UnionTag":
            return _UnionTag
        if module in self._MODULES and not name.startswith("_"):
            value = getattr(schema, name, None)
            if isinstance(value, type) and value.__module__ == module:
                return value
        raise pickle.UnpicklingError(
            f"a graph cache entry may hold torch's export schema only, not {module}.{name}"
        )


class ParseOnce:
    """The ``sympy`` module as torch's deserialiser sees it, parsing each symbolic-size
    string once per program.

    The deserialiser parses the string of every symbolic size of every node with
    ``sympy.sympify`` (a tokenizer and ``eval`` per call): about 40% of reading a program
    back, for a few dozen distinct strings. Within one program the names in a string
    always resolve to the same symbols (the deserialiser only ever adds names, taken from
    what it parsed), so the expression parsed first is the one every later parse of the
    same string returns.
    """

    def __init__(self) -> None:
        self._parsed: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(sympy, name)

    def sympify(self, value: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(value, str) or args:
            return sympy.sympify(value, *args, **kwargs)
        if value not in self._parsed:
            self._parsed[value] = sympy.sympify(value, **kwargs)
        return self._parsed[value]


_LOCK = threading.Lock()  # the module patch above is process-wide


def cached_export(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    dynamic: Any,
    what: str,
    export: Callable[[], torch.export.ExportedProgram],
) -> torch.export.ExportedProgram:
    """``export()``'s result, read from the cache when an entry for this capture exists,
    else computed and stored. Cache problems are logged and never fail the capture."""
    try:
        key = cache_key(model, args, kwargs, dynamic, what)
    except Exception as exc:  # a model the key cannot describe is captured uncached
        logger.info("not caching the %s capture: %s", what, exc)
        return export()
    name = f"{what}-{_digest(key)}{_SUFFIX}"
    directory = private_cache_directory(_SUBDIRECTORY, _WHAT, create=False)
    path = None if directory is None else directory / name
    if path is not None and path.exists():
        try:
            blobs, sha256 = read_entry_file(path, key)
            program = deserialize_program(blobs, model)
            _ENTRIES[program] = CacheEntry(path, sha256)
            logger.info("loaded the %s capture of %s from %s", what, type(model).__name__, path)
            return program
        except Exception as exc:  # any failure: the entry is not used, and is rebuilt
            logger.warning("graph cache entry %s is unusable (%s); rebuilding it", path, exc)
            _remove(path)
    program = export()
    directory = private_cache_directory(_SUBDIRECTORY, _WHAT, create=True)
    if directory is None:  # not ours alone (warned), or cannot be created (logged)
        return program
    path = directory / name
    try:
        _remove(path)  # verdicts recorded on an earlier entry at this path
        _ENTRIES[program] = CacheEntry(path, _write(path, key, _serialize(program)))
        logger.info("cached the %s capture of %s in %s", what, type(model).__name__, path)
    except Exception as exc:  # e.g. a read-only home, or a graph torch cannot serialise
        logger.info("could not cache the %s capture: %s", what, exc)
    return program


__all__ = [
    "ENV_DIRECTORY",
    "ENV_SWITCH",
    "CacheEntry",
    "CacheEntryError",
    "cache_directory",
    "cache_enabled",
    "cache_entry",
    "cache_key",
    "cached_export",
    "clear_cache",
]
