"""adaption-fx: LLaMA-Adapter (adaption prompts) as a torch.export graph pass.

>>> from adaption_fx import AdaptionConfig, rewrite
>>> model = rewrite(hf_model, AdaptionConfig(adapter_len=10, adapter_layers=2))  # doctest: +SKIP

The package is laid out by concern; each subpackage's docstring lists its modules:

- the core: :mod:`adaption_fx.config`, :mod:`adaption_fx.rewrite`, :mod:`adaption_fx.checkpoint`,
  :mod:`adaption_fx.files` (reading files from elsewhere: checked, bounded, never code);
- :mod:`adaption_fx.passes`: graph passes (they depend on nothing else in the library);
- :mod:`adaption_fx.capture`: torch.export capture, repeated layers, the decode step, the
  graph cache, release differences;
- :mod:`adaption_fx.model`: :class:`AdaptedModel` and what it is made of;
- :mod:`adaption_fx.generation`: the decode loop and text generation;
- :mod:`adaption_fx.training`: the fine-tuning loop, data, Trainer, DDP, FSDP2;
- :mod:`adaption_fx.export`: torch.compile, ONNX export, ONNX Runtime;
- :mod:`adaption_fx.app`: the ``adaption-fx`` command line and the demo (built on the above).

The public names below load on first use (PEP 562), so ``import adaption_fx.passes`` does not
load the library.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from adaption_fx.version import __version__

# Public name -> module that defines it.
_PUBLIC = {
    "BASE_ADAPTER": "adaption_fx.model.mixed",
    "AdaptedModel": "adaption_fx.model.adapted",
    "AdapterTrainer": "adaption_fx.training.trainer",
    "AdaptionConfig": "adaption_fx.config",
    "AttentionNotFoundError": "adaption_fx.passes.errors",
    "CaptureError": "adaption_fx.capture.captured",
    "CheckpointError": "adaption_fx.checkpoint",
    "UnsupportedGraphError": "adaption_fx.passes.errors",
    "generate_text": "adaption_fx.generation.text",
    "rewrite": "adaption_fx.rewrite",
}

__all__ = [
    "BASE_ADAPTER",
    "AdaptedModel",
    "AdapterTrainer",
    "AdaptionConfig",
    "AttentionNotFoundError",
    "CaptureError",
    "CheckpointError",
    "UnsupportedGraphError",
    "__version__",
    "generate_text",
    "rewrite",
]
if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below loads them
    from adaption_fx.capture.captured import CaptureError
    from adaption_fx.checkpoint import CheckpointError
    from adaption_fx.config import AdaptionConfig
    from adaption_fx.generation.text import generate_text
    from adaption_fx.model.adapted import AdaptedModel
    from adaption_fx.model.mixed import BASE_ADAPTER
    from adaption_fx.passes.errors import AttentionNotFoundError, UnsupportedGraphError
    from adaption_fx.rewrite import rewrite
    from adaption_fx.training.trainer import AdapterTrainer


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'adaption_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """The package module, whose public functions keep their names when a submodule of
    the same name is imported. ``rewrite`` is both a function and the module
    ``adaption_fx.rewrite`` that defines it; the import system binds a submodule to its
    name on the package once it is loaded (``import adaption_fx.rewrite``, or any module
    doing ``from adaption_fx.rewrite import rewrite``), after which ``from adaption_fx
    import rewrite`` would hand out the module. The module stays importable by its path."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
