"""What the server's scheduler runs a model through: one engine per backend.

An engine runs two kinds of call for the scheduler (:mod:`adaption_fx.serving.scheduler`):

- :meth:`Engine.prefill`: one request's prompt alone, with its adapter, from an empty
  cache: the last token's logits and that row's key/value cache;
- :meth:`Engine.decode`: one new token for every running row against the running batch's
  cache, each row with its own adapter (the mixed-batch graph).

The running batch's cache changes shape only when rows join or leave; the scheduler then
hands the engine the whole cache (:meth:`Engine.set_batch`, torch tensors, rows left-padded
to one length) and reads it back (:meth:`Engine.batch_cache`). Between such changes each
step's present outputs stay in the engine as the next step's past inputs (for ONNX Runtime,
``OrtValue``s bound as they are: no copy per step).

Engines do not lock: the scheduler calls them from its one thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from adaption_fx.model.mixed import BASE_ADAPTER

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """What the scheduler needs from a backend (see the module docstring)."""

    #: "onnxruntime" or "eager".
    name: str
    #: the longest prompt + generated length one row may reach.
    max_length: int

    @property
    def adapter_names(self) -> list[str]:
        """The loaded adapters (the base model, ``"__base__"``, is not listed)."""

    @property
    def generation_config(self) -> Any:
        """The model's ``transformers.GenerationConfig`` (or None)."""

    @property
    def default_token_ids(self) -> tuple[Any, int | None]:
        """The model's ``(eos_token_id, pad_token_id)`` defaults."""

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT-format adapter directory under ``name`` (checked before it is used)."""

    def unload_adapter(self, name: str) -> None:
        """Forget the adapter ``name``."""

    def prefill(self, input_ids: torch.Tensor, adapter: str) -> tuple[torch.Tensor, list]:
        """Run one prompt (1, n) alone from an empty cache: logits (1, vocab), its cache."""

    def set_batch(self, cache: list[torch.Tensor], adapters: Sequence[str]) -> None:
        """Make ``cache`` (one (rows, heads, length, dim) tensor per past input) and the
        rows' adapters the running batch."""

    def batch_cache(self) -> list[torch.Tensor]:
        """The running batch's cache, as :meth:`set_batch` takes it."""

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """One step of the running batch: logits (rows, vocab); the cache grows by one."""


class OrtEngine:
    """An engine over a mixed-batch generation export in ONNX Runtime
    (``to_onnx(model, path, for_generation=True, adapter_as_inputs=True,
    mixed_batch=True)``); adapters live in the :class:`~adaption_fx.export.OrtModel`'s
    table, and the running batch is an :class:`~adaption_fx.export.ort.OrtDecodeSession`
    (IO binding: each step's present outputs bound as the next step's past inputs).

    Args:
        model: the ``OrtModel`` of such a file.
    """

    name = "onnxruntime"

    def __init__(self, model: Any):
        import onnxruntime as ort

        generation = model.metadata.get("generation")
        if generation is None or not model.mixed_batch:
            raise ValueError(
                f"{model.path.name} is not a mixed-batch generation export; serve needs "
                "to_onnx(model, path, for_generation=True, adapter_as_inputs=True, "
                "mixed_batch=True)"
            )
        self._ort = ort
        self.model = model
        self.max_length: int = generation["max_length"]
        self._session: Any = None
        self._adapters: list[str] = []
        self._table_changed = False

    # ------------------------------------------------------------------ model facts
    @property
    def adapter_names(self) -> list[str]:
        return self.model.adapter_names

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    @property
    def default_token_ids(self) -> tuple[Any, int | None]:
        return self.model.default_token_ids

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: Path) -> None:
        self.model.set_adapter_weights(path, adapter_name=name)
        self._table_changed = True

    def unload_adapter(self, name: str) -> None:
        self.model.delete_adapter_weights(name)
        self._table_changed = True

    # ------------------------------------------------------------------ steps
    def prefill(self, input_ids: torch.Tensor, adapter: str) -> tuple[torch.Tensor, list]:
        # One row from an empty cache: a decode session of its own, one step.
        session = self.model.decode_session([adapter])
        session.reset(1)
        n = input_ids.shape[1]
        logits = session.step(input_ids, torch.ones_like(input_ids), torch.arange(n)[None, :])
        return logits, [torch.from_numpy(value.numpy()) for value in session.past]

    def set_batch(self, cache: list[torch.Tensor], adapters: Sequence[str]) -> None:
        self._adapters = list(adapters)
        self._session = self.model.decode_session(self._adapters)
        device = self._session.device
        self._session.past = [
            self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(c.numpy()), device)
            for c in cache
        ]
        self._table_changed = False

    def batch_cache(self) -> list[torch.Tensor]:
        return [torch.from_numpy(value.numpy()) for value in self._session.past]

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if self._table_changed:  # an adapter was loaded or unloaded: the rows moved
            past = self._session.past
            self._session = self.model.decode_session(self._adapters)
            self._session.past = past
            self._table_changed = False
        return self._session.step(input_ids, attention_mask, position_ids)


class EagerEngine:
    """An engine over an ``AdaptedModel`` in PyTorch eager mode: its decode-step twin's
    mixed-batch graph (``AdaptedModel.decoder()``), run by the library's
    :class:`~adaption_fx.generation.loop.TorchSession`.

    Args:
        model: the AdaptedModel; adapters are added to it by name.
        max_length: the decode step's longest prompt + generated length.
    """

    name = "eager"

    def __init__(self, model: Any, max_length: int | None = None):
        self.model = model
        self._decoder = model.decoder(max_length)
        self.max_length: int = self._decoder.max_length
        self._session: Any = None
        self._adapters: list[str] = []
        self._table_changed = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.model.adapters)

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    @property
    def default_token_ids(self) -> tuple[Any, int | None]:
        return self.model.default_token_ids

    def load_adapter(self, name: str, path: Path) -> None:
        self.model.load_adapter(os.fspath(path), adapter_name=name)
        self._table_changed = True

    def unload_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)
        self._table_changed = True

    def _new_session(self, adapters: Sequence[str]) -> Any:
        from adaption_fx.generation.loop import TorchSession

        return TorchSession(self._decoder, adapter_names=list(adapters))

    def prefill(self, input_ids: torch.Tensor, adapter: str) -> tuple[torch.Tensor, list]:
        session = self._new_session([adapter])
        session.reset(1)
        n = input_ids.shape[1]
        positions = torch.arange(n)[None, :]
        with torch.no_grad():
            logits = session.step(input_ids, torch.ones_like(input_ids), positions)
        return logits, list(session.past)

    def set_batch(self, cache: list[torch.Tensor], adapters: Sequence[str]) -> None:
        self._adapters = list(adapters)
        self._session = self._new_session(self._adapters)
        self._session.past = list(cache)
        self._session.batch = len(self._adapters)
        self._table_changed = False

    def batch_cache(self) -> list[torch.Tensor]:
        return list(self._session.past)

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if self._table_changed:  # the adapter table changed: a session over the new one
            self.set_batch(self.batch_cache(), self._adapters)
        with torch.no_grad():
            return self._session.step(input_ids, attention_mask, position_ids)


__all__ = ["BASE_ADAPTER", "EagerEngine", "Engine", "OrtEngine"]
