"""The value types of the generation options, shared by every ``generate`` (PyTorch, compiled,
ONNX Runtime) without depending on the decode loop."""

from __future__ import annotations

import enum

EosTokenIds = int | list[int] | None


class ModelDefault(enum.Enum):
    """The type of :data:`MODEL_DEFAULT` (an enum member, so that type checkers can tell it
    from the ids)."""

    MODEL_DEFAULT = "MODEL_DEFAULT"

    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


MODEL_DEFAULT = ModelDefault.MODEL_DEFAULT
"""What ``eos_token_id`` and ``pad_token_id`` default to in the ``generate`` methods: the
model's own default (see :func:`generation_defaults`). It differs from None, which a caller
passes to mean "no eos" (or, for the pad id, "the first eos id, else 0")."""
