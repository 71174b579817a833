"""Command-line options built from a configuration dataclass (LitGPT-style): one option per
field, its help read from the class docstring's ``Args:`` section and its default from the
field, so that neither is written twice."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from the Google-style ``Args:`` section of ``cls``'s
    docstring, on one line."""
    docs: dict[str, str] = {}
    current = None
    in_args = False
    for line in (inspect.getdoc(cls) or "").splitlines():
        stripped = line.strip()
        if not in_args:
            in_args = stripped == "Args:"
            continue
        if line and not line.startswith(" "):  # the next section
            break
        match = re.match(r"^ {4}(\w+)(?: \(.*?\))?: (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and stripped:
            docs[current] += " " + stripped
    return docs


def _plain(text: str) -> str:
    """Docstring markup read as plain text: ````"scalar"```` -> scalar, ``None: ...`` (the
    field left unset) -> "if not given: ..."."""
    text = re.sub(r'``"?([^`"]+)"?``', r"\1", text)
    return text.replace("None: ", "if not given: ")


def default_text(value: Any) -> str:
    """How a default reads in ``--help``."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_dataclass_options(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    types: Mapping[str, Callable[[str], Any]] | None = None,
    only: typing.Collection[str] | None = None,
) -> list[str]:
    """Add ``--field-name`` for the fields of the dataclass ``cls`` (those in ``only``, if
    given); returns the field names added.

    The help is the field's docstring entry plus its default; a ``bool`` field is a flag, a
    ``Literal`` one takes its choices, and ``types`` gives a field's argument parser
    (validation with argparse's messages); other fields parse as their annotated type.
    """
    types = dict(types or {})
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    added = []
    for field in dataclasses.fields(cls):
        if not field.init or (only is not None and field.name not in only):
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        doc = _plain(docs.get(field.name, "")).rstrip(".")
        default = field.default
        unshown = default is dataclasses.MISSING or default is None or default is False
        shown = "" if unshown else default_text(default)
        help_text = (f"{doc} (default: {shown})" if shown else doc).replace("%", "%%")
        if hint is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), help=help_text)
        else:
            kind = types.get(field.name) or _plain_type(hint)
            parser.add_argument(flag, type=kind, help=help_text)
        added.append(field.name)
    return added


def _plain_type(hint: Any) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base not in (int, float, str):
        raise TypeError(f"no command-line type for {hint!r}")
    return base
