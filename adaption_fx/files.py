"""Reading files someone else may have written: bounded, checked, never code.

Adapters, run directories and caches are shared: a file may come from anyone. Every
loader in the library reads through these helpers, so a damaged or hostile file gives a
``ValueError`` naming the file and the field (never a parser's bare message, never an
allocation the file asks for), and a cache directory others can write is not used.

- :func:`read_json`: a JSON file read only up to a size bound, its top level checked.
- :func:`field`: one field of a JSON object, type-checked, with the file in the message.
- :func:`untrusted_reason`: why a directory or file must not be trusted to hold what only
  this user wrote (owned by someone else, writable by group or others), or None.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Our JSON files (adapter configs, run.json, trainer state, metadata) are a few KiB; a
# data order lists every planned step (a few MiB for long runs).
SMALL_JSON_BYTES = 1 << 20
CACHE_DIRECTORY_ENV = "ADAPTION_FX_CACHE_DIR"
LARGE_JSON_BYTES = 256 << 20


def read_json(
    path: str | os.PathLike,
    *,
    what: str = "file",
    max_bytes: int = SMALL_JSON_BYTES,
    expect: type = dict,
    error: type[ValueError] = ValueError,
) -> Any:
    """The JSON value in ``path``, of type ``expect`` (a dict by default).

    The file's size is checked before it is read; anything that is not UTF-8 JSON of the
    expected type (or uses NaN / Infinity, which JSON does not have) raises ``error`` naming
    the file. A missing file raises FileNotFoundError.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {str(path)!r}") from None
    if not path.is_file():
        raise error(f"{path}: the {what} is not a regular file")
    if size > max_bytes:
        raise error(
            f"{path}: the {what} is {size} bytes, more than the {max_bytes} such a file can be"
        )
    with path.open("rb") as f:  # the bound holds for a file that grew since stat
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: the {what} is more than the {max_bytes} bytes such a file can be")
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: the {what} is not valid JSON: {exc}") from None
    return check_type(value, expect, f"{path}", error=error)


def parse_json(
    text: str | bytes,
    *,
    where: str,
    expect: type = dict,
    error: type[ValueError] = ValueError,
) -> Any:
    """:func:`read_json` for text already in memory (metadata inside another file)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{where} is not valid JSON: {exc}") from None
    return check_type(value, expect, where, error=error)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def check_type(value: Any, expect: type | tuple[type, ...], where: str, *, error=ValueError) -> Any:
    """``value`` if it is an ``expect`` (an int is not a bool, a float is finite), else
    ``error`` naming ``where``."""
    kinds = expect if isinstance(expect, tuple) else (expect,)
    ok = False
    for kind in kinds:
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        elif kind is type(None):
            ok = value is None
        else:
            ok = isinstance(value, kind)
        if ok:
            return value
    names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise error(f"{where} must be {names}, got {type(value).__name__} {shown}")


def field(
    data: Mapping[str, Any],
    name: str,
    expect: type | tuple[type, ...],
    where: str,
    *,
    default: Any = ...,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[ValueError] = ValueError,
) -> Any:
    """``data[name]`` checked to be an ``expect`` (and, for ints, within bounds); a missing
    field is an error unless a ``default`` is given."""
    if name not in data:
        if default is ...:
            raise error(f"{where}: field {name!r} is missing")
        return default
    value = check_type(data[name], expect, f"{where}: field {name!r}", error=error)
    if isinstance(value, int) and not isinstance(value, bool):
        if minimum is not None and value < minimum:
            raise error(f"{where}: field {name!r} is {value}, less than {minimum}")
        if maximum is not None and value > maximum:
            raise error(f"{where}: field {name!r} is {value}, more than {maximum}")
    return value


def untrusted_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` (a directory or file that exists) must not be trusted to hold only what
    this user wrote, or None where it may be: it must be owned by the current user and
    writable by no one else (no group or other write bit), and not be a symbolic link.

    Platforms without POSIX owners (Windows) trust what the OS lets the user read."""
    if not hasattr(os, "getuid"):
        return None
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if info.st_uid != os.getuid():
        return f"is owned by user id {info.st_uid}, not by this user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if info.st_mode & stat.S_IWOTH else "its group"
        return f"is writable by {who} (mode {stat.filemode(info.st_mode)})"
    return None


def cache_root() -> Path:
    """The directory every adaption-fx cache lives under: ``$ADAPTION_FX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/adaption-fx``, else ``~/.cache/adaption-fx`` (not created here)."""
    explicit = os.environ.get(CACHE_DIRECTORY_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "adaption-fx"


def private_cache_directory(name: str, what: str, *, create: bool) -> Path | None:
    """``cache_root() / name`` where it may be trusted, else None (after one warning).

    The cache root and the directory must each be owned by this user and writable by no
    one else (:func:`untrusted_reason`): an entry there was then written by this user, so
    reading it back is as safe as the code that wrote it. ``create``: make missing
    directories, private (mode 0700); without it a missing directory is None, silently
    (nothing to read). A directory that cannot be created is logged and None."""
    root = cache_root()
    directory = root / name
    for path in (root, directory):
        if not path.exists():
            if not create:
                return None
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                logger.info("cannot create the %s at %s: %s", what, path, exc)
                return None
        reason = untrusted_reason(path)
        if reason is not None:
            warn_untrusted_once(path, reason, what)
            return None
    return directory


_WARNED: set[str] = set()


def warn_untrusted_once(directory: str | os.PathLike, reason: str, what: str) -> None:
    """Log one warning per directory and process that ``what`` is not used there."""
    key = str(directory)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(
        "not using the %s at %s: it %s, so anyone could have written its entries; "
        "working without it (make it yours and private: chmod go-w, or point "
        "ADAPTION_FX_CACHE_DIR at a directory only you can write)",
        what,
        directory,
        reason,
    )


__all__ = [
    "CACHE_DIRECTORY_ENV",
    "LARGE_JSON_BYTES",
    "SMALL_JSON_BYTES",
    "cache_root",
    "check_type",
    "field",
    "parse_json",
    "private_cache_directory",
    "read_json",
    "untrusted_reason",
    "warn_untrusted_once",
]
