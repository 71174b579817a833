"""Reading an exported file's ``adaption_fx`` metadata: parsed, type-checked, bounded.

``to_onnx`` writes a JSON object into the file's ``metadata_props`` (see
:mod:`~adaption_fx.export.onnx.exporter` and :func:`~adaption_fx.export.onnx.plan.mixed_metadata`);
``OrtModel``, ``OrtDecodeSession`` and ``dequantized_weights`` act on it. A file may come
from anyone, so nothing in it is trusted:

- :func:`parse_metadata`: the JSON (size-bounded) and every field those readers use, by
  type and within bounds; a companion file name must be a bare name (no directory).
- :func:`check_against_graph`: the names the metadata gives (adapter, table, cache inputs
  and outputs) are the graph's, and every number that sizes something we allocate (heads,
  head sizes) is the one the graph's inputs state.
- :func:`check_projection`: the same for the adapter projection companion, and a bound on
  the prompts a checkpoint is zero-padded into before anything is allocated.

Every failure is an :class:`OnnxFileError` (a ``ValueError``) naming the file and the field.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adaption_fx.export.onnx.plan import METADATA_KEY
from adaption_fx.files import SMALL_JSON_BYTES, check_type, field, parse_json
from adaption_fx.passes.fold import folded_keys
from adaption_fx.passes.insert import prompt_key
from adaption_fx.passes.mixed_batch import KEY_MASK_INPUT

FORMAT = 1
"""The metadata format this version writes and reads."""

# Bounds on what a file may ask for. Real models stay far below them (hidden sizes of a
# few thousand, a few dozen heads of 64-256, prompts of tens of tokens); they make a
# hostile number fail at once instead of sizing an allocation.
MAX_NAMES = 1 << 16  # entries of a list of names (inputs, sites)
MAX_WIDTH = 1 << 18  # heads, head sizes, hidden size, and heads x head size
MAX_ADAPTER_LEN = 1 << 16
MAX_LENGTH = 1 << 24  # a decode step's max_length (tokens)
MAX_TOKEN_ID = (1 << 31) - 1
MAX_EOS_IDS = 1 << 10
# The zero-padded prompts a checkpoint directory is projected from may take the larger of
# this and the projection file's own size: that file holds each site's key and value
# weights (hidden_size x heads x head size), as large as the prompts for sane lengths.
PROMPT_BYTES_FLOOR = 256 << 20

# Element types a cache or adapter table may have (bfloat16 files load, and are refused
# where numpy would have to feed them, with that reason).
DTYPES = ("float32", "float16", "float64", "bfloat16")
_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "float64": "tensor(double)",
    "bfloat16": "tensor(bfloat16)",
}
WEIGHT_FORMATS = ("fp32", "int8", "int4")
# Generation's inputs and output, bound by name in every decode step.
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
STEP_OUTPUT = "logits"

_BAD_NAME = re.compile(r"[/\\\x00]")


class OnnxFileError(ValueError):
    """An ONNX file (or a companion file beside it) that is damaged, or not what
    ``adaption_fx.export.to_onnx`` writes; the message names the file and what is wrong
    (the metadata field, or ONNX Runtime's own reason)."""


class GraphValue(Protocol):
    """An input or output as the graph declares it (``onnxruntime.NodeArg`` is one)."""

    @property
    def type(self) -> str: ...  # ONNX Runtime's "tensor(float)"

    @property
    def shape(self) -> Sequence[int | str | None]: ...


@dataclass(frozen=True)
class TableSite:
    """An adapted site as a mixed-batch file's metadata describes it: what
    ``build_adapter_table`` and the checkpoint checks read of an ``AttentionSite``."""

    module_path: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    hidden_size: int

    @classmethod
    def from_metadata(cls, entry: Mapping[str, Any]) -> TableSite:
        """A site of :func:`parse_metadata`'s checked ``mixed_batch.sites``."""
        return cls(
            module_path=entry["module_path"],
            num_heads=entry["num_heads"],
            num_kv_heads=entry["num_kv_heads"],
            head_dim=entry["head_dim"],
            value_head_dim=entry["value_head_dim"],
            hidden_size=entry["hidden_size"],
        )

    @property
    def folded_names(self) -> tuple[str, str, str]:
        """The folded key, value and activated gate inputs (``fold.folded_keys``)."""
        return folded_keys(self)  # type: ignore[arg-type]  # reads module_path only

    @property
    def prompt_name(self) -> str:
        """The prompt's checkpoint key and projection input (``insert.prompt_key``)."""
        return prompt_key(self)  # type: ignore[arg-type]  # reads module_path only


# ----------------------------------------------------------------------------- parsing
class _Fields:
    """Field checks for one file, every message naming the file and the field's path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, name: str, message: str) -> OnnxFileError:
        return OnnxFileError(f"{self.path}: metadata field {name!r} {message}")

    def get(
        self,
        data: Mapping[str, Any],
        section: str,
        name: str,
        expect: type | tuple[type, ...],
        *,
        default: Any = ...,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        where = f"{self.path}: metadata" + (f" {section!r}" if section else "")
        return field(
            data,
            name,
            expect,
            where,
            default=default,
            minimum=minimum,
            maximum=maximum,
            error=OnnxFileError,
        )

    def names(
        self, data: Mapping[str, Any], section: str, name: str, *, default: Any = ...
    ) -> list[str]:
        """A list of distinct strings (input, output or site names)."""
        value = self.get(data, section, name, list, default=default)
        dotted = f"{section}.{name}" if section else name
        if value is default:
            return value
        if len(value) > MAX_NAMES:
            raise self.fail(dotted, f"lists {len(value)} names, more than {MAX_NAMES}")
        for i, item in enumerate(value):
            check_type(
                item, str, f"{self.path}: metadata field '{dotted}[{i}]'", error=OnnxFileError
            )
        if len(set(value)) != len(value):
            repeated = sorted(n for n, count in Counter(value).items() if count > 1)
            raise self.fail(dotted, f"names {repeated} more than once")
        return value

    def companion(self, data: Mapping[str, Any], section: str, name: str) -> str | None:
        """A companion file's name: a bare name of a file beside the model, or None."""
        value = self.get(data, section, name, (str, type(None)), default=None)
        dotted = f"{section}.{name}" if section else name
        if value is None:
            return None
        if (
            not value
            or value in (".", "..")
            or _BAD_NAME.search(value)
            or Path(value).is_absolute()
            or Path(value).name != value
            or len(value) > 255
        ):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise self.fail(
                dotted, f"must be the bare name of a file beside {self.path.name}, got {shown}"
            )
        return value


def parse_metadata(text: str | None, path: str | Path) -> dict[str, Any]:
    """The checked ``adaption_fx`` metadata of the file at ``path`` ({} where it has none).

    ``text``: the metadata as the file holds it. Every field ``OrtModel``,
    ``OrtDecodeSession`` and ``dequantized_weights`` read is checked here, by type and
    within the bounds above; fields they do not read are left as they are.

    Raises:
        OnnxFileError: the metadata is not a JSON object, or a field is not what
            ``to_onnx`` writes.
    """
    path = Path(path)
    if text is None:
        return {}
    if len(text) > SMALL_JSON_BYTES:
        raise OnnxFileError(
            f"{path}: its {METADATA_KEY!r} metadata is {len(text)} characters, more than the "
            f"{SMALL_JSON_BYTES} such metadata can be"
        )
    where = f"{path}: its {METADATA_KEY!r} metadata"
    metadata = parse_json(text, where=where, error=OnnxFileError)
    f = _Fields(path)
    fmt = f.get(metadata, "", "format", int, default=FORMAT)
    if fmt != FORMAT:
        raise f.fail("format", f"is {fmt}; this version of adaption-fx reads format {FORMAT}")
    f.names(metadata, "", "model_inputs", default=[])
    f.names(metadata, "", "outputs", default=[])
    f.names(metadata, "", "adapter_inputs", default=[])
    f.names(metadata, "", "raw_adapter_inputs", default=[])
    f.get(metadata, "", "adapter_shapes", dict, default={})
    f.get(metadata, "", "folded", bool, default=False)
    f.companion(metadata, "", "projection")
    adapter = f.get(metadata, "", "adapter", (dict, type(None)), default=None)
    if adapter is not None:
        f.get(
            adapter, "adapter", "adapter_len", int, default=None, minimum=1, maximum=MAX_ADAPTER_LEN
        )
        f.get(adapter, "adapter", "adapter_layers", int, default=None, minimum=1, maximum=MAX_NAMES)
        for name in ("gate", "gate_activation", "name"):
            f.get(adapter, "adapter", name, str, default=None)
    # Sections to_onnx writes only when they apply, and then as objects (null is refused).
    mixed = f.get(metadata, "", "mixed_batch", dict, default=None)
    if mixed is not None:
        _parse_mixed(f, mixed)
    generation = f.get(metadata, "", "generation", dict, default=None)
    if generation is not None:
        _parse_generation(f, generation)
    weights = f.get(metadata, "", "weights", dict, default=None)
    if weights is not None:
        _parse_weights(f, weights)
    return metadata


def _parse_mixed(f: _Fields, mixed: dict[str, Any]) -> None:
    section = "mixed_batch"
    sites = f.get(mixed, section, "sites", list)
    if not sites or len(sites) > MAX_NAMES:
        raise f.fail(f"{section}.sites", f"lists {len(sites)} sites; 1 to {MAX_NAMES} expected")
    for i, entry in enumerate(sites):
        where = f"{section}.sites[{i}]"
        check_type(entry, dict, f"{f.path}: metadata field {where!r}", error=OnnxFileError)
        f.get(entry, where, "module_path", str)
        for name in ("num_heads", "num_kv_heads", "head_dim", "value_head_dim", "hidden_size"):
            f.get(entry, where, name, int, minimum=1, maximum=MAX_WIDTH)
        widest = max(entry["head_dim"], entry["value_head_dim"])
        if entry["num_kv_heads"] * widest > MAX_WIDTH:
            raise f.fail(
                where,
                f"has {entry['num_kv_heads']} key/value heads of {widest}, more than "
                f"{MAX_WIDTH} values per token",
            )
    paths = [entry["module_path"] for entry in sites]
    if len(set(paths)) != len(paths):
        raise f.fail(f"{section}.sites", f"names a module_path more than once: {paths}")
    all_sites = f.names(mixed, section, "all_sites")
    outside = [p for p in paths if p not in all_sites]
    if outside:
        raise f.fail(f"{section}.all_sites", f"lacks the adapted sites {outside}")
    f.get(mixed, section, "adapter_layers", int, minimum=1, maximum=len(all_sites))
    f.get(mixed, section, "max_adapter_len", int, minimum=1, maximum=MAX_ADAPTER_LEN)
    dtype = f.get(mixed, section, "dtype", str)
    if dtype not in DTYPES:
        raise f.fail(f"{section}.dtype", f"is {dtype!r}, not one of {list(DTYPES)}")
    f.names(mixed, section, "table_inputs")
    f.get(mixed, section, "rows_input", str)
    key_mask = f.get(mixed, section, "key_mask_input", str, default=KEY_MASK_INPUT)
    if key_mask != KEY_MASK_INPUT:
        raise f.fail(f"{section}.key_mask_input", f"is {key_mask!r}, not {KEY_MASK_INPUT!r}")
    f.companion(mixed, section, "projection")
    prompts = f.names(mixed, section, "projection_inputs")
    expected = [TableSite.from_metadata(entry).prompt_name for entry in sites]
    if sorted(prompts) != sorted(expected):
        raise f.fail(
            f"{section}.projection_inputs",
            f"is {prompts}; the sites' prompts are {expected}",
        )
    f.names(mixed, section, "projection_outputs", default=[])
    f.get(mixed, section, "adapters", dict, default={})


def _parse_generation(f: _Fields, generation: dict[str, Any]) -> None:
    section = "generation"
    f.get(generation, section, "max_length", int, minimum=1, maximum=MAX_LENGTH)
    past = f.names(generation, section, "past_inputs")
    present = f.names(generation, section, "present_outputs")
    if len(present) != len(past):
        raise f.fail(
            f"{section}.present_outputs",
            f"lists {len(present)} names for {len(past)} past_inputs",
        )
    shapes = f.get(generation, section, "cache_shapes", list)
    if len(shapes) != len(past):
        raise f.fail(
            f"{section}.cache_shapes", f"lists {len(shapes)} shapes for {len(past)} past_inputs"
        )
    for i, shape in enumerate(shapes):
        where = f"{section}.cache_shapes[{i}]"
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
        ):
            shown = repr(shape) if len(repr(shape)) <= 60 else repr(shape)[:57] + "..."
            raise f.fail(where, f"must be a [heads, dim] pair of integers, got {shown}")
        heads, dim = shape
        if not (1 <= heads <= MAX_WIDTH and 1 <= dim <= MAX_WIDTH and heads * dim <= MAX_WIDTH):
            raise f.fail(
                where,
                f"is [{heads}, {dim}]: heads and dim must be at least 1, with at most "
                f"{MAX_WIDTH} values per token",
            )
    dtype = f.get(generation, section, "cache_dtype", str)
    if dtype not in DTYPES:
        raise f.fail(f"{section}.cache_dtype", f"is {dtype!r}, not one of {list(DTYPES)}")
    eos = f.get(generation, section, "eos_token_id", (int, list, type(None)), default=None)
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if len(ids) > MAX_EOS_IDS:
        raise f.fail(f"{section}.eos_token_id", f"lists {len(ids)} ids, more than {MAX_EOS_IDS}")
    for value in ids:
        if not (isinstance(value, int) and not isinstance(value, bool)) or not (
            0 <= value <= MAX_TOKEN_ID
        ):
            shown = repr(eos) if len(repr(eos)) <= 60 else repr(eos)[:57] + "..."
            raise f.fail(
                f"{section}.eos_token_id",
                f"must be a token id (an integer from 0), a list of them or null, got {shown}",
            )
    f.get(
        generation,
        section,
        "pad_token_id",
        (int, type(None)),
        default=None,
        minimum=0,
        maximum=MAX_TOKEN_ID,
    )
    f.get(generation, section, "config", (dict, type(None)), default=None)


def _parse_weights(f: _Fields, weights: dict[str, Any]) -> None:
    section = "weights"
    fmt = f.get(weights, section, "format", str, default="fp32")
    if fmt not in WEIGHT_FORMATS:
        raise f.fail(f"{section}.format", f"is {fmt!r}, not one of {list(WEIGHT_FORMATS)}")
    f.get(weights, section, "block_size", int, default=None, minimum=1, maximum=MAX_WIDTH)
    f.get(weights, section, "accuracy_level", int, default=None, minimum=0, maximum=16)
    f.get(weights, section, "gguf_file", (str, type(None)), default=None)
    schemes = f.get(weights, section, "schemes", dict, default={})
    if len(schemes) > MAX_NAMES:
        raise f.fail(f"{section}.schemes", f"lists {len(schemes)} weights, more than {MAX_NAMES}")
    for name, entry in schemes.items():
        where = f"{section}.schemes.{name}"
        check_type(entry, dict, f"{f.path}: metadata field {where!r}", error=OnnxFileError)
        f.get(entry, where, "scheme", str)
        bits = f.get(entry, where, "bits", int)
        if bits not in (4, 8):
            raise f.fail(f"{where}.bits", f"is {bits}, not 4 or 8")
        f.get(entry, where, "initializer", str, default=None)
        rows = f.get(entry, where, "rows", list, default=None)
        if rows is not None and (
            len(rows) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rows)
            or rows[0] > rows[1]
        ):
            raise f.fail(
                f"{where}.rows", f"must be [start, stop] with 0 <= start <= stop, got {rows!r}"
            )


# ----------------------------------------------------------------------------- the graph
def _static(shape: Sequence[int | str | None], axis: int) -> int | None:
    size = shape[axis] if axis < len(shape) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def _axes_match(
    f: _Fields,
    where: str,
    name: str,
    value: GraphValue,
    rank: int,
    expected: Mapping[int, tuple[str, int]],
) -> None:
    """``value`` (graph input ``name``) is ``rank``-d with, on each axis of ``expected``,
    the size the metadata gives (where the graph states a size)."""
    shape = list(value.shape)
    if len(shape) != rank:
        raise f.fail(where, f"describes {name!r} as {rank}-d, but the graph's is {shape}")
    for axis, (what, size) in expected.items():
        stated = _static(shape, axis)
        if stated is not None and stated != size:
            raise f.fail(
                where,
                f"gives {what}={size}, but the graph's {name!r} has {stated} on axis {axis} "
                f"(shape {shape})",
            )


def check_against_graph(
    metadata: Mapping[str, Any],
    path: str | Path,
    inputs: Mapping[str, GraphValue],
    outputs: Mapping[str, GraphValue],
) -> None:
    """The names ``metadata`` (from :func:`parse_metadata`) gives are the graph's inputs
    and outputs, and the sizes it gives agree with the graph's stated input shapes.

    Raises:
        OnnxFileError: naming the file and the field.
    """
    f = _Fields(Path(path))

    def present(name: str, names: Sequence[str], among: Mapping[str, Any], what: str) -> None:
        missing = [n for n in names if n not in among]
        if missing:
            shown = sorted(among)
            shown_text = f"{shown[:20]}{' ...' if len(shown) > 20 else ''}"
            raise f.fail(name, f"names {what} {missing[:10]} the graph lacks (it has {shown_text})")

    adapter = metadata.get("adapter_inputs", [])
    present("adapter_inputs", adapter, inputs, "inputs")
    mixed = metadata.get("mixed_batch")
    if mixed is not None:
        sites = [TableSite.from_metadata(entry) for entry in mixed["sites"]]
        rows = mixed["rows_input"]
        table = {rows, KEY_MASK_INPUT, *(n for s in sites for n in s.folded_names)}
        for name, listed in (
            ("mixed_batch.table_inputs", mixed["table_inputs"]),
            ("adapter_inputs", adapter),
        ):
            if set(listed) != table:
                raise f.fail(
                    name,
                    f"is {sorted(listed)[:20]}; the sites' table inputs are {sorted(table)[:20]}",
                )
        present("mixed_batch.table_inputs", sorted(table), inputs, "inputs")
        if len(inputs[rows].shape) != 1 or inputs[rows].type != "tensor(int64)":
            raise f.fail(
                "mixed_batch.rows_input",
                f"names {rows!r}, but the graph's is {inputs[rows].type} of shape "
                f"{list(inputs[rows].shape)}, not a 1-d int64 input",
            )
        want_type = _ORT_TYPES[mixed["dtype"]]
        for i, site in enumerate(sites):
            where = f"mixed_batch.sites[{i}]"
            key, value, gate = site.folded_names
            for name, dim in (
                (key, ("head_dim", site.head_dim)),
                (value, ("value_head_dim", site.value_head_dim)),
            ):
                kv = ("num_kv_heads", site.num_kv_heads)
                _axes_match(f, where, name, inputs[name], 4, {1: kv, 3: dim})
            _axes_match(f, where, gate, inputs[gate], 2, {1: ("num_heads", site.num_heads)})
            for name in (key, value, gate):
                if inputs[name].type != want_type:
                    raise f.fail(
                        "mixed_batch.dtype",
                        f"is {mixed['dtype']!r}, but the graph's {name!r} is {inputs[name].type}",
                    )
    generation = metadata.get("generation")
    if generation is not None:
        past, present_names = generation["past_inputs"], generation["present_outputs"]
        present("generation.past_inputs", past, inputs, "inputs")
        present("generation.present_outputs", present_names, outputs, "outputs")
        present("generation", list(STEP_INPUTS), inputs, "step inputs")
        present("generation", [STEP_OUTPUT], outputs, "step outputs")
        overlap = sorted(set(past) & set(adapter))
        if overlap:
            raise f.fail("generation.past_inputs", f"names adapter inputs {overlap}")
        want_type = _ORT_TYPES[generation["cache_dtype"]]
        for i, (name, (heads, dim)) in enumerate(
            zip(past, generation["cache_shapes"], strict=True)
        ):
            where = f"generation.cache_shapes[{i}]"
            _axes_match(f, where, name, inputs[name], 4, {1: ("heads", heads), 3: ("dim", dim)})
            if inputs[name].type != want_type:
                raise f.fail(
                    "generation.cache_dtype",
                    f"is {generation['cache_dtype']!r}, but the graph's {name!r} is "
                    f"{inputs[name].type}",
                )


def check_projection(
    metadata: Mapping[str, Any],
    path: str | Path,
    companion: str | Path,
    inputs: Mapping[str, GraphValue],
    outputs: Mapping[str, GraphValue],
) -> None:
    """The adapter projection ``companion`` of the file at ``path`` takes what
    ``metadata`` says it does and gives the folded tensors the file's adapter takes.

    For a mixed-batch file: each site's prompt input is (1, max_adapter_len, hidden_size)
    where the companion states its shape, and all the zero-padded prompts together take at
    most the larger of the companion's size and :data:`PROMPT_BYTES_FLOOR`: checked here,
    before a checkpoint's prompts are allocated.

    Raises:
        OnnxFileError: naming the companion, the file and the field.
    """
    path, companion = Path(path), Path(companion)
    f = _Fields(path)
    mixed = metadata.get("mixed_batch")

    def fail(field_name: str, message: str) -> OnnxFileError:
        return OnnxFileError(
            f"{companion}: the adapter projection of {path.name} does not match its metadata "
            f"field {field_name!r}: {message}"
        )

    if mixed is None:
        fed = metadata.get("raw_adapter_inputs", [])
        unknown = [n for n in inputs if n not in fed]
        if unknown:
            raise fail("raw_adapter_inputs", f"it takes inputs {unknown[:10]} not listed there")
        return
    sites = [TableSite.from_metadata(entry) for entry in mixed["sites"]]
    fed = {s.prompt_name: s for s in sites}
    unknown = [n for n in inputs if n not in fed]
    if unknown:
        raise fail("mixed_batch.projection_inputs", f"it takes inputs {unknown[:10]} not listed")
    longest = mixed["max_adapter_len"]
    for name, value in inputs.items():
        site = fed[name]
        shape = list(value.shape)
        expected = [1, longest, site.hidden_size]
        if len(shape) != 3 or any(
            _static(shape, axis) not in (None, size) for axis, size in enumerate(expected)
        ):
            raise fail(
                "mixed_batch.max_adapter_len",
                f"input {name!r} has shape {shape}; the metadata gives {expected} "
                "(1, max_adapter_len, hidden_size)",
            )
    wanted = [n for s in sites for n in s.folded_names[:2]]
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise fail("mixed_batch.sites", f"it lacks outputs {missing[:10]}")
    prompt_bytes = sum(4 * longest * s.hidden_size for s in sites)
    try:
        allowed = max(companion.stat().st_size, PROMPT_BYTES_FLOOR)
    except OSError:
        allowed = PROMPT_BYTES_FLOOR
    if prompt_bytes > allowed:
        raise f.fail(
            "mixed_batch.max_adapter_len",
            f"is {longest}: the zero-padded prompts of its {len(sites)} sites would take "
            f"{prompt_bytes} bytes, more than the {allowed} its projection file allows",
        )


__all__ = [
    "DTYPES",
    "FORMAT",
    "GraphValue",
    "OnnxFileError",
    "TableSite",
    "check_against_graph",
    "check_projection",
    "parse_metadata",
]
