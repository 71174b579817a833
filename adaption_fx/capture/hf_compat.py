"""What differs between the supported torch and transformers releases, in one place.

The passes work on the ATen graph, so most of a transformers release's changes never reach
them. What does reach them is how a release builds attention masks while it is being
exported, the names of the hooks the mask-free causal capture relies on, and how a causal
LM's forward takes and returns its key/value cache (``past_key_values`` up to 5.23,
``cache`` from 5.24): all are handled here, each one selected by what the installed release
has, never by its version number. The version numbers are used for one thing only: a
warning when the installed releases are outside the range the project's CI tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import logging
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from packaging.version import Version
from torch.fx.experimental.symbolic_shapes import statically_known_true

logger = logging.getLogger(__name__)

# The releases CI runs the whole suite on (oldest and newest of each range). pyproject.toml
# declares the same ranges; tests/test_versions.py keeps the two in step.
TESTED_RANGES: dict[str, tuple[str, str]] = {
    "torch": ("2.13.0", "2.14"),
    "transformers": ("4.57.6", "5.24"),
}


class UntestedVersionWarning(UserWarning):
    """An installed torch or transformers release is outside the tested range."""


def _upper_bound(newest_line: str) -> Version:
    # "5.23" -> 5.24: every patch release of the newest tested minor line is in range.
    major, minor = (int(p) for p in newest_line.split(".")[:2])
    return Version(f"{major}.{minor + 1}")


def tested_range_text(package: str) -> str:
    """The tested range of ``package`` as pip writes it, e.g. ``>=4.57.6,<5.24``."""
    low, newest_line = TESTED_RANGES[package]
    return f">={low},<{_upper_bound(newest_line)}"


def is_tested(package: str, version: str) -> bool:
    """True when ``version`` of ``package`` lies in the range CI tests."""
    low, newest_line = TESTED_RANGES[package]
    v = Version(Version(version).base_version)  # 2.13.0+cpu -> 2.13.0
    return Version(low) <= v < _upper_bound(newest_line)


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# Internal (tests reset it): the (package, version) pairs already warned about in this process.
warned_versions: set[tuple[str, str]] = set()


def check_versions(packages: tuple[str, ...] = ("torch", "transformers")) -> list[str]:
    """Warn (once per package and version) about installed releases outside the tested
    range; return the packages warned about."""
    untested = []
    for package in packages:
        version = installed_version(package)
        if version is None or is_tested(package, version):
            continue
        untested.append(package)
        if (package, version) in warned_versions:
            continue
        warned_versions.add((package, version))
        warnings.warn(
            f"adaption_fx is tested with {package}{tested_range_text(package)}, but "
            f"{package} {version} is installed: captures may be refused or differ. "
            "Run the suite against it with `./dev.sh test-matrix <transformers versions>`.",
            UntestedVersionWarning,
            stacklevel=3,
        )
    return untested


# ---------------------------------------------------------------------------- masks


def _broadcast_for_bhqkv(mask_function: Callable, bh_indices: bool = True) -> Callable:
    """The mask ``torch.vmap`` over (batch, head, q, kv) indices would build, by broadcasting.

    transformers' mask functions are index arithmetic and lookups (causal, sliding window,
    chunked, padding, packed sequences), so evaluating them once on broadcast index grids
    gives every element the value the four nested vmaps give it; transformers 5 builds its
    own masks this way. The result is plain ATen ops instead of functorch calls.
    """

    def build(batch_idx: Any, head_idx: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        if bh_indices:
            shape = (batch_idx.shape[0], head_idx.shape[0], q_idx.shape[0], kv_idx.shape[0])
            mask = mask_function(
                batch_idx[:, None, None, None],
                head_idx[None, :, None, None],
                q_idx[None, None, :, None],
                kv_idx[None, None, None, :],
            )
        else:
            shape = (q_idx.shape[0], kv_idx.shape[0])
            mask = mask_function(None, None, q_idx[:, None], kv_idx[None, :])
        return mask.expand(shape)

    return build


@contextlib.contextmanager
def vmap_free_masks() -> Iterator[bool]:
    """While exporting, let transformers build attention masks without ``torch.vmap``.

    Releases before 5.0 build every SDPA and eager mask with ``torch.vmap`` inside
    ``TransformGetItemToIndex``; non-strict export keeps both as functorch calls and a
    ``flat_apply`` higher-order op, which torch.compile cannot trace and the passes do not
    read. Yields whether anything was replaced (releases without the vmap helper build
    their masks by broadcasting already).
    """
    masking_utils = sys.modules.get("transformers.masking_utils")
    if masking_utils is None or not callable(getattr(masking_utils, "_vmap_for_bhqkv", None)):
        yield False
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(masking_utils, "_vmap_for_bhqkv", _broadcast_for_bhqkv)
        )
        if hasattr(masking_utils, "TransformGetItemToIndex"):
            # Only needed by vmap (it turns tensor indexing into a higher-order op); plain
            # advanced indexing is what broadcasting needs.
            stack.enter_context(
                mock.patch.object(masking_utils, "TransformGetItemToIndex", contextlib.nullcontext)
            )
        yield True


# ------------------------------------------------------------ mask-free causal capture

# The query length is q_length in transformers 5 and query_length in 4.57.
_Q_LENGTH_NAMES = ("q_length", "query_length")


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _same_size(a: Any, b: Any) -> bool:
    # Symbolic sizes are equal only if provably so: asking would add a guard to the export.
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # not sizes at all
        return False


@contextlib.contextmanager
def causal_attention_without_mask() -> Iterator[bool]:
    """Let Hugging Face skip the causal mask tensor while exporting, as it does eagerly.

    Eagerly, HF passes SDPA ``is_causal=True`` and no mask when no token is padded; under
    torch.export it cannot look at the mask's values, so it always materialises the
    [batch, 1, seq, seq] mask, which SDPA then reads in every layer (about 20% of a forward
    at seq 2048). With no ``attention_mask`` input and no ``position_ids`` input, the mask
    is known to be causal without looking at values, which is what these two replacements
    tell HF. The replacements read their arguments by name from the installed release's own
    signature (the releases order them differently). Yields False, changing nothing, when
    the release lacks the hooks or names their arguments otherwise.
    """
    masking_utils = sys.modules.get("transformers.masking_utils")
    if masking_utils is None:
        try:
            from transformers import masking_utils
        except ImportError:
            yield False
            return
    ignore = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    packed = getattr(masking_utils, "find_packed_sequence_indices", None)
    if not (callable(ignore) and callable(packed)):
        yield False
        return
    signature = inspect.signature(ignore)
    names = set(signature.parameters)
    q_name = next((n for n in _Q_LENGTH_NAMES if n in names), None)
    if q_name is None or not {"padding_mask", "kv_length", "kv_offset"} <= names:
        logger.info("no mask-free causal capture: unknown _ignore_causal_mask_sdpa%s", signature)
        yield False
        return

    def ignore_causal_mask(*args: Any, **kwargs: Any) -> bool:
        # Only full causal attention over the input itself: a sliding window, padding or a
        # cache offset needs the mask.
        a = _named_arguments(signature, args, kwargs)
        q_offset = a.get("q_offset", 0)
        return (
            a["padding_mask"] is None
            and a.get("local_attention_size") is None
            and isinstance(q_offset, int)
            and q_offset == 0
            and isinstance(a["kv_offset"], int)
            and a["kv_offset"] == 0
            and _same_size(a[q_name], a["kv_length"])
        )

    def no_packed_sequences(position_ids: Any) -> None:
        # Positions come from arange (position_ids is not a captured input): one sequence
        # per row.
        return None

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa", ignore_causal_mask)
        )
        stack.enter_context(
            mock.patch.object(masking_utils, "find_packed_sequence_indices", no_packed_sequences)
        )
        yield True


# ------------------------------------------------------------ the key/value cache call

# What releases have named the causal LM forward's key/value cache parameter, newest first:
# ``cache`` from transformers 5.24, ``past_key_values`` before. A parameter annotated with
# transformers' ``Cache`` is taken whatever its name, so the next rename is followed too.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


class MissingArgumentError(TypeError):
    """The installed transformers release's forward lacks an argument adaption_fx needs."""


def _names_cache_class(annotation: Any, cache_class: type | None) -> bool:
    """True when ``annotation`` is transformers' ``Cache`` (or a subclass), alone or inside
    ``Optional``/``Union``/``|``; string annotations (postponed evaluation) are read as text."""
    if annotation is inspect.Parameter.empty or annotation is None:
        return False
    if isinstance(annotation, str):
        return re.search(r"\b\w*Cache\b", annotation) is not None
    if isinstance(annotation, type):
        return cache_class is not None and issubclass(annotation, cache_class)
    return any(_names_cache_class(a, cache_class) for a in typing.get_args(annotation))


def _transformers_cache_class() -> type | None:
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return None
    return Cache


def cache_argument(forward: Callable) -> str | None:
    """The name under which ``forward`` takes the model's key/value cache, or None.

    A parameter annotated with transformers' ``Cache`` wins (the releases annotate it);
    among several, or with no annotation, the known names (:data:`CACHE_ARGUMENT_NAMES`)
    decide, newest first.
    """
    params = inspect.signature(forward).parameters
    cache_class = _transformers_cache_class()
    typed = [
        name
        for name, p in params.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and _names_cache_class(p.annotation, cache_class)
    ]
    for name in CACHE_ARGUMENT_NAMES:
        if name in typed or (not typed and name in params):
            return name
    return typed[0] if len(typed) == 1 else None


def _missing_argument(owner: str, what: str, needed_for: str) -> MissingArgumentError:
    version = installed_version("transformers") or "(not installed)"
    return MissingArgumentError(
        f"{owner}.forward takes no {what} in the installed transformers {version}; "
        f"{needed_for} needs it (adaption_fx is tested with "
        f"transformers{tested_range_text('transformers')})"
    )


@dataclass(frozen=True)
class CacheCall:
    """How the installed release's causal LM forward takes and returns its key/value cache.

    Attributes:
        argument: the forward parameter (and output field) holding the cache.
        use_cache: whether forward takes ``use_cache``.
        logits_to_keep: whether forward takes ``logits_to_keep`` (else every position's
            logits are computed and the last is sliced).
    """

    argument: str
    use_cache: bool
    logits_to_keep: bool

    def step_kwargs(self, cache: Any, *, last_logits_only: bool = False) -> dict[str, Any]:
        """The keyword arguments that pass ``cache`` and ask for it back."""
        kwargs: dict[str, Any] = {self.argument: cache}
        if self.use_cache:
            kwargs["use_cache"] = True
        if last_logits_only and self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return kwargs

    def returned_cache(self, output: Any) -> Any:
        """The cache in a forward's output: the field named as the argument, else the one
        output value that is a transformers ``Cache``; None when there is none."""
        value = getattr(output, self.argument, None)
        if value is not None:
            return value
        cache_class = _transformers_cache_class()
        values = output.values() if hasattr(output, "values") else ()
        found = [v for v in values if cache_class is not None and isinstance(v, cache_class)]
        return found[0] if len(found) == 1 else None


def cache_call(model: Any, needed_for: str = "generation") -> CacheCall:
    """Read :class:`CacheCall` off ``model``'s forward (its class's, so an instance
    override during capture does not hide it).

    Raises:
        MissingArgumentError: the forward lacks ``input_ids``, ``attention_mask``,
            ``position_ids`` or a key/value cache argument; the message names the argument
            and the installed transformers release.
    """
    forward = type(model).forward if isinstance(model, torch.nn.Module) else model
    owner = type(model).__name__ if isinstance(model, torch.nn.Module) else forward.__qualname__
    params = inspect.signature(forward).parameters
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name not in params:
            raise _missing_argument(owner, f"{name!r} argument", needed_for)
    argument = cache_argument(forward)
    if argument is None:
        raise _missing_argument(
            owner,
            "key/value cache argument (a parameter typed transformers.Cache or named "
            + " or ".join(repr(n) for n in CACHE_ARGUMENT_NAMES)
            + ")",
            needed_for,
        )
    return CacheCall(
        argument=argument,
        use_cache="use_cache" in params,
        logits_to_keep="logits_to_keep" in params,
    )


def without_cache(forward: Callable) -> dict[str, Any]:
    """The keyword arguments that make ``forward`` return no key/value cache: a captured
    full-sequence graph returns logits only (``use_cache=False`` where it is taken)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(forward).parameters else {}


def dynamic_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A transformers ``DynamicCache`` holding ``pairs`` (per layer, key and value)."""
    from transformers import DynamicCache

    if "ddp_cache_data" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(ddp_cache_data=pairs)
    cache = DynamicCache()
    for layer, (key, value) in enumerate(pairs):
        cache.update(key, value, layer)
    return cache


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (key, value) tensors a returned cache holds: a ``Cache`` with
    ``layers`` (transformers >= 4.56) or a legacy tuple of tuples.

    Raises:
        TypeError: any other kind of cache.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v, *_ in cache]
    raise TypeError(f"the model returned a {type(cache).__name__} cache; expected a Cache")


__all__ = [
    "CACHE_ARGUMENT_NAMES",
    "TESTED_RANGES",
    "CacheCall",
    "MissingArgumentError",
    "UntestedVersionWarning",
    "cache_argument",
    "cache_call",
    "cache_tensors",
    "causal_attention_without_mask",
    "check_versions",
    "dynamic_cache",
    "installed_version",
    "is_tested",
    "tested_range_text",
    "vmap_free_masks",
    "without_cache",
]
