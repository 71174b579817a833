"""The fuzz harness for files from elsewhere (tests/test_fuzz_files.py, bench/fuzz.py).

Each loader gets a pristine directory (written by the library, or by PEFT), and every case
copies it, damages one file in it (hypothesis draws how), and loads the copy. A case passes
when loading

- succeeds, and what was loaded is exactly what the damaged files say (the loader's own
  oracle: the tensors the safetensors file holds, the config the JSON holds, the outputs the
  original gives), or
- raises one of the documented exceptions (``ValueError`` and its subclasses,
  ``FileNotFoundError``, ``NotADirectoryError``) whose message names the copy's directory
  or one of its files,

within ``CASE_SECONDS``, leaving the directory byte for byte as it was and the loader's
target (a model, an OrtModel) as it was when the load failed. The process's peak resident
memory may rise by at most ``MEMORY_GROWTH_BYTES`` plus ``FILE_MEMORY_FACTOR`` times the
size of the pristine files over a loader's cases (from its peak before the first case: the
models and files the cases start from do not count).

Damage comes in three kinds: bytes (truncate, flip, insert, replace, empty), JSON (a field
removed, or set to a value of another type or an absurd size, an unknown field added, the
top level replaced) and tensors (a safetensors file rewritten with a tensor renamed,
dropped, added, reshaped or of another dtype).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

DOCUMENTED = (ValueError, FileNotFoundError, NotADirectoryError)
CASE_SECONDS = 10.0
MEMORY_GROWTH_BYTES = 1 << 30
# What a loader may hold per byte of the files it reads (an ONNX Runtime session holds the
# weights, optimized copies of some, and its arena): files size allocations, never their
# fields alone.
FILE_MEMORY_FACTOR = 4
EXAMPLES_ENV = "ADAPTION_FX_FUZZ_EXAMPLES"
REPORT_ENV = "ADAPTION_FX_FUZZ_REPORT"

# Values a hostile or broken JSON file may hold where something else is expected.
NASTY_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    10**9,
    10**18,
    -(10**18),
    1.5,
    -0.0,
    1e308,
    "",
    "x",
    "float32",
    "../../etc/passwd",
    "x" * 1000,
    [],
    [0],
    [1, 2, 3],
    ["a", "b"],
    [[1, 2]],
    {},
    {"a": 1},
    [[[[[[[[[[[]]]]]]]]]]],
]


def examples(default: int) -> int:
    """How many cases a loader runs: ``$ADAPTION_FX_FUZZ_EXAMPLES`` (bench) or ``default``."""
    value = os.environ.get(EXAMPLES_ENV)
    return int(value) if value else default


# ----------------------------------------------------------------------------- damage
@dataclass(frozen=True)
class Damage:
    """One change to one file: ``kind`` is bytes / json / tensors; ``payload`` says that
    the values a file holds changed (not its structure), where a valid file results."""

    file: str
    kind: str
    how: str
    apply: Callable[[Path], None] = field(repr=False, compare=False)


def _bytes_damage(draw: Any, name: str, size: int) -> Damage:
    how = draw(st.sampled_from(["truncate", "flip", "insert", "replace", "empty"]))
    at = draw(st.integers(0, max(size - 1, 0)))
    if how == "truncate":

        def apply(path: Path) -> None:
            path.write_bytes(path.read_bytes()[:at])

    elif how == "flip":
        flips = draw(
            st.lists(
                st.tuples(st.integers(0, max(size - 1, 0)), st.integers(1, 255)),
                min_size=1,
                max_size=8,
            )
        )

        def apply(path: Path) -> None:
            data = bytearray(path.read_bytes())
            for position, mask in flips:
                data[position % len(data)] ^= mask
            path.write_bytes(bytes(data))

    elif how == "insert":
        extra = draw(st.binary(min_size=1, max_size=64))

        def apply(path: Path) -> None:
            data = path.read_bytes()
            path.write_bytes(data[:at] + extra + data[at:])

    elif how == "replace":
        junk = draw(st.binary(min_size=1, max_size=256))

        def apply(path: Path) -> None:
            path.write_bytes(junk)

    else:

        def apply(path: Path) -> None:
            path.write_bytes(b"")

    return Damage(name, "bytes", f"{how}@{at}", apply)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (keys and list indices), the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):  # a few entries of long lists
            found += _paths(item, (*prefix, index))
    return found


def _json_damage(draw: Any, name: str, original: Any) -> Damage:
    paths = _paths(original)
    target = draw(st.sampled_from(paths))
    how = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
    value = draw(st.sampled_from(NASTY_VALUES))

    def edit(data: Any) -> Any:
        if not target:
            return value if how == "set" else data
        parent = data
        for key in target[:-1]:
            parent = parent[key]
        last = target[-1]
        if how == "delete":
            del parent[last]
        elif how == "add" and isinstance(parent, dict):
            parent["unknown_field"] = value
        else:
            parent[last] = value
        return data

    def apply(path: Path) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(edit(data)), encoding="utf-8")

    where = ".".join(map(str, target)) or "<root>"
    return Damage(name, "json", f"{how} {where} = {value!r}"[:80], apply)


def _onnx_metadata(path: Path) -> tuple[Any, Any]:
    """An ONNX file's proto and its ``adaption_fx`` metadata entry."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    (entry,) = [p for p in proto.metadata_props if p.key == "adaption_fx"]
    return proto, entry


def _onnx_metadata_damage(draw: Any, name: str, original: Any) -> Damage:
    """JSON damage to the ``adaption_fx`` metadata inside an ONNX file."""
    inner = _json_damage(draw, name, original)

    def apply(path: Path) -> None:
        import onnx

        proto, entry = _onnx_metadata(path)
        scratch = path.with_name(f".{path.name}.metadata.json")
        scratch.write_text(entry.value, encoding="utf-8")
        inner.apply(scratch)
        entry.value = scratch.read_text(encoding="utf-8")
        scratch.unlink()
        onnx.save(proto, str(path))

    return Damage(name, "onnx-metadata", inner.how, apply)


def _tensor_damage(draw: Any, name: str, header: dict[str, tuple[tuple[int, ...], str]]) -> Damage:
    keys = sorted(header)
    key = draw(st.sampled_from(keys))
    how = draw(st.sampled_from(["rename", "drop", "add", "reshape", "dtype", "scale"]))
    dtype = draw(
        st.sampled_from(
            [torch.int32, torch.float16, torch.bfloat16, torch.bool, torch.float64, torch.uint8]
        )
    )
    grow = draw(st.integers(1, 3))

    def apply(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        tensor = tensors[key]
        if how == "rename":
            tensors[key + ".renamed"] = tensors.pop(key)
        elif how == "drop":
            del tensors[key]
        elif how == "add":
            tensors[key + ".extra"] = torch.zeros(2, 3)
        elif how == "reshape":
            tensors[key] = (
                torch.zeros(*tensor.shape[:-1], tensor.shape[-1] + grow)
                if tensor.dim()
                else torch.zeros(grow)
            )
        elif how == "dtype":
            tensors[key] = tensor.to(dtype)
        else:  # the values change, the structure does not: a valid file of other values
            tensors[key] = tensor * 2 if tensor.is_floating_point() else tensor
        save_file(tensors, str(path), metadata=metadata)

    return Damage(
        name, "tensors", f"{how} {key}" + (f" -> {dtype}" if how == "dtype" else ""), apply
    )


def damage_strategy(
    directory: Path, files: dict[str, tuple[str, ...]]
) -> st.SearchStrategy[Damage]:
    """Damage to one of ``files`` (name -> the kinds that apply to it, among bytes / json /
    tensors) of the pristine ``directory``."""
    cache: dict[str, Any] = {}

    def facts(name: str, kind: str) -> Any:
        if (name, kind) not in cache:
            path = directory / name
            if kind == "json":
                cache[name, kind] = json.loads(path.read_text(encoding="utf-8"))
            elif kind == "onnx-metadata":
                cache[name, kind] = json.loads(_onnx_metadata(path)[1].value)
            elif kind == "tensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    cache[name, kind] = {
                        k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                        for k in f.keys()
                    }
            else:
                cache[name, kind] = path.stat().st_size
        return cache[name, kind]

    @st.composite
    def draw_damage(draw: Any) -> Damage:
        name = draw(st.sampled_from(sorted(files)))
        kind = draw(st.sampled_from(files[name]))
        if kind == "json":
            return _json_damage(draw, name, facts(name, kind))
        if kind == "onnx-metadata":
            return _onnx_metadata_damage(draw, name, facts(name, kind))
        if kind == "tensors":
            return _tensor_damage(draw, name, facts(name, kind))
        return _bytes_damage(draw, name, facts(name, kind))

    return draw_damage()


# ----------------------------------------------------------------------------- cases
def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by relative path, with its SHA-256 (digests, not
    bytes: a real model's file is hundreds of MB)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
            found[str(path.relative_to(directory))] = digest.hexdigest()
    return found


def total_bytes(directory: Path) -> int:
    """The size of every file under ``directory``."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@dataclass
class LoaderReport:
    """What the cases of one loader came to."""

    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    slowest_s: float = 0.0


REPORTS: dict[str, LoaderReport] = {}
_BASELINES: dict[str, int] = {}  # a loader's peak resident memory before its first case


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_growth_bytes(loader: str | None = None) -> int:
    """How far the peak resident memory rose over ``loader``'s cases (the most over any
    loader's where None): the models and files the cases start from are not counted."""
    if loader is not None:
        return peak_rss_bytes() - _BASELINES.get(loader, peak_rss_bytes())
    return max((peak_rss_bytes() - b for b in _BASELINES.values()), default=0)


def run_case(
    loader: str,
    pristine: Path,
    damage: Damage,
    load: Callable[[Path], Any],
    verify: Callable[[Any, Path, Damage], None],
    unchanged: Callable[[], None] = lambda: None,
    may_write: tuple[str, ...] = (),
) -> str:
    """Copy ``pristine``, apply ``damage``, load the copy and check the outcome (see the
    module docstring); returns the outcome and records it under ``loader``."""
    _BASELINES.setdefault(loader, peak_rss_bytes())
    with tempfile.TemporaryDirectory(
        prefix=f"fuzz-{re.sub(r'[^a-z0-9]+', '-', loader.lower())}-"
    ) as tmp:
        directory = Path(tmp) / pristine.name
        shutil.copytree(pristine, directory)
        damage.apply(directory / damage.file)
        before = snapshot(directory)
        start = time.perf_counter()
        try:
            result = load(directory)
        except DOCUMENTED as exc:
            elapsed = time.perf_counter() - start
            message = str(exc)
            named = [str(directory), *(p.name for p in directory.rglob("*") if p.is_file())]
            assert any(name in message for name in named), (damage, message)
            unchanged()
            outcome = f"refused ({type(exc).__name__})"
        else:
            elapsed = time.perf_counter() - start
            verify(result, directory, damage)
            outcome = (
                "loaded (same as the original)"
                if _same_bytes(pristine, before)
                else "loaded (what the files say)"
            )
        after = snapshot(directory)
        if outcome.startswith("loaded"):  # a load may write what it documents (metrics)
            after = {k: v for k, v in after.items() if k not in may_write}
            before = {k: v for k, v in before.items() if k not in may_write}
        assert after == before, f"{damage}: the loader changed the directory"
    assert elapsed < CASE_SECONDS, f"{damage}: {elapsed:.1f} s"
    bound = MEMORY_GROWTH_BYTES + FILE_MEMORY_FACTOR * total_bytes(pristine)
    assert peak_rss_growth_bytes(loader) < bound, damage
    report = REPORTS.setdefault(loader, LoaderReport())
    report.cases += 1
    report.outcomes[outcome] += 1
    report.kinds[damage.kind] += 1
    report.slowest_s = max(report.slowest_s, elapsed)
    return outcome


_PRISTINE: dict[Path, dict[str, str]] = {}


def _same_bytes(pristine: Path, damaged: dict[str, str]) -> bool:
    if pristine not in _PRISTINE:  # pristine directories never change
        _PRISTINE[pristine] = snapshot(pristine)
    return _PRISTINE[pristine] == damaged


def summary_lines() -> list[str]:
    """One line per loader: how many cases ran and what they came to."""
    return [
        f"fuzz {name}: {report.cases} cases, "
        + ", ".join(f"{n} {outcome}" for outcome, n in sorted(report.outcomes.items()))
        for name, report in sorted(REPORTS.items())
    ]


def write_report(path: Path) -> None:
    """The per-loader counts as JSON (bench/fuzz.py renders them)."""
    data = {
        name: {
            "cases": report.cases,
            "outcomes": dict(sorted(report.outcomes.items())),
            "damage": dict(sorted(report.kinds.items())),
            "slowest_s": round(report.slowest_s, 3),
            "peak_rss_growth_mib": round(peak_rss_growth_bytes(name) / 2**20, 1),
        }
        for name, report in sorted(REPORTS.items())
    }
    data = {"loaders": data, "peak_rss_growth_mib": round(peak_rss_growth_bytes() / 2**20, 1)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
