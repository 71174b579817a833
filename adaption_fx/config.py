"""The adapter configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adaption_fx.version import __version__

if TYPE_CHECKING:
    from adaption_fx.passes.insert import AdapterStructure

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

    @property
    def structure(self) -> AdapterStructure:
        """What the graph pass needs of this configuration (``adapter_layers`` picks the
        sites before the pass runs)."""
        # Imported here: the command line reads this module for its --help, without torch.
        from adaption_fx.passes.insert import AdapterStructure

        return AdapterStructure(
            adapter_len=self.adapter_len, gate=self.gate, gate_activation=self.gate_activation
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable)."""
        return asdict(self)

    def to_peft_dict(
        self,
        *,
        target_modules: str | None = None,
        task_type: str | None = "CAUSAL_LM",
        base_model_name_or_path: str | None = None,
    ) -> dict[str, Any]:
        """adapter_config.json content: PEFT's AdaptionPromptConfig fields, and ours only
        where PEFT cannot express the adapter.

        An adapter PEFT can run (scalar gate, identity activation) gets exactly PEFT's
        fields, so that ``PeftModel.from_pretrained`` loads it without a word; our own
        fields go to a file of ours beside it (:meth:`extras_dict`). One it cannot run
        (``per_head`` gate, ``tanh``) keeps ``gate`` and ``gate_activation`` here too, so
        that PEFT says it does not know them instead of loading a different adapter.
        PEFT fills ``target_modules`` from the model type when it is None.
        """
        fields_ = {
            "peft_type": "ADAPTION_PROMPT",
            "adapter_len": self.adapter_len,
            "adapter_layers": self.adapter_layers,
            "target_modules": target_modules,
            "task_type": task_type,
            "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "auto_mapping": None,
        }
        if not self.peft_expressible:
            fields_.update(self.extras_dict())
        return fields_

    @property
    def peft_expressible(self) -> bool:
        """Whether PEFT's AdaptionPromptModel runs this adapter as we do (a scalar gate,
        no activation)."""
        return self.gate == "scalar" and self.gate_activation == "identity"

    def extras_dict(self) -> dict[str, Any]:
        """Our fields, for ``adaption_fx.json`` beside adapter_config.json (PEFT does not
        read that file): the gate variant and the version that wrote it. A record only:
        adapter_config.json alone says what the adapter is."""
        return {
            "gate": self.gate,
            "gate_activation": self.gate_activation,
            "adaption_fx_version": __version__,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], where: str = "config") -> AdaptionConfig:
        """Build a config from adapter_config.json content (ours or PEFT's).

        PEFT's files carry no gate fields: they mean a scalar, identity gate.
        """
        if data.get("peft_type", "ADAPTION_PROMPT") != "ADAPTION_PROMPT":
            raise ValueError(
                f"{where}: peft_type {data.get('peft_type')!r} is not 'ADAPTION_PROMPT'"
            )
        missing = [k for k in ("adapter_len", "adapter_layers") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AdaptionConfig:
        """Read ``directory/adapter_config.json`` (written by us or by PEFT)."""
        from adaption_fx.checkpoint import CONFIG_NAME, CheckpointError, read_config_dict

        data = read_config_dict(directory)
        try:
            return cls.from_peft_dict(data, where=str(Path(directory) / CONFIG_NAME))
        except (TypeError, ValueError) as exc:  # a bad file is a checkpoint problem
            raise CheckpointError(str(exc)) from exc

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``directory/adapter_config.json`` and ``directory/adaption_fx.json``
        atomically (each a temporary file, then a rename)."""
        from adaption_fx.checkpoint import write_adapter_config

        write_adapter_config(directory, self.to_peft_dict(), self.extras_dict())
