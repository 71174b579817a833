"""What differs between the supported torch and transformers releases, in one place.

The passes work on the ATen graph, so most of a transformers release's changes never reach
them. What does reach them is how a release builds attention masks while it is being
exported, and the names of the hooks the mask-free causal capture relies on: both are
handled here, each one selected by what the installed release has, never by its version
number. The version numbers are used for one thing only: a warning when the installed
releases are outside the range the project's CI tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from packaging.version import Version
from torch.fx.experimental.symbolic_shapes import statically_known_true

logger = logging.getLogger(__name__)

# The releases CI runs the whole suite on (oldest and newest of each range). pyproject.toml
# declares the same ranges; tests/test_versions.py keeps the two in step.
TESTED_RANGES: dict[str, tuple[str, str]] = {
    "torch": ("2.13.0", "2.13"),
    "transformers": ("4.57.6", "5.23"),
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


_warned: set[tuple[str, str]] = set()


def check_versions(packages: tuple[str, ...] = ("torch", "transformers")) -> list[str]:
    """Warn (once per package and version) about installed releases outside the tested
    range; return the packages warned about."""
    untested = []
    for package in packages:
        version = installed_version(package)
        if version is None or is_tested(package, version):
            continue
        untested.append(package)
        if (package, version) in _warned:
            continue
        _warned.add((package, version))
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


__all__ = [
    "TESTED_RANGES",
    "UntestedVersionWarning",
    "causal_attention_without_mask",
    "check_versions",
    "installed_version",
    "is_tested",
    "tested_range_text",
    "vmap_free_masks",
]
