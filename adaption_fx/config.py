"""The adapter configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

GateKind = Literal["scalar", "per_head"]
GateActivation = Literal["identity", "tanh"]

GATE_KINDS: tuple[str, ...] = ("scalar", "per_head")
GATE_ACTIVATIONS: tuple[str, ...] = ("identity", "tanh")


def _check_positive_int(name: str, value: Any) -> None:
    # bool is an int subclass; AdaptionConfig(adapter_len=True) is a bug, not a length of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


@dataclass(frozen=True, kw_only=True)
class AdaptionConfig:
    """How to adapt a model with LLaMA-Adapter prompts.

    Args:
        adapter_len: number of learnable prompt tokens per adapted layer.
        adapter_layers: how many attention layers to adapt, counted from the last one in
            execution order (the paper's "top L").
        gate: ``"scalar"`` for one gate per layer (PEFT) or ``"per_head"`` for one gate per
            query head (the official code, LitGPT).
        gate_activation: ``"identity"`` (PEFT, LitGPT) or ``"tanh"`` (the official code),
            applied to the gate before it scales the adapter attention.
    """

    adapter_len: int
    adapter_layers: int
    gate: GateKind = "scalar"
    gate_activation: GateActivation = "identity"

    def __post_init__(self) -> None:
        _check_positive_int("adapter_len", self.adapter_len)
        _check_positive_int("adapter_layers", self.adapter_layers)
        if self.gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {GATE_KINDS}, got {self.gate!r}")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(
                f"gate_activation must be one of {GATE_ACTIVATIONS}, got {self.gate_activation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable)."""
        return asdict(self)
