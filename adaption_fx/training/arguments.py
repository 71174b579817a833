"""How to train: one frozen dataclass, validated on construction (no torch import, so that
the command line can build its options from it without loading torch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from adaption_fx.checks import check_int


@dataclass(frozen=True, kw_only=True)
class TrainingArguments:
    """How to train. ``max_steps`` (when set) wins over ``epochs``, as in HF's Trainer.

    Args:
        epochs: passes over the training data.
        max_steps: optimizer steps to take, winning over epochs (the data is repeated,
            reshuffled, as needed).
        batch_size: examples per forward pass.
        grad_accum: forward passes per optimizer step; the loss of a step is the mean
            over all its response tokens, so accumulation equals one larger batch.
        lr: peak learning rate (the LLaMA-Adapter paper used 9e-3 at batch 64).
        warmup_steps: linear warm-up from 0 to ``lr``, then cosine decay to 0 at the last
            step. None: 10% of the steps (at least 1).
        weight_decay: AdamW's decoupled weight decay (the paper: 0.02).
        eval_every: validation every N steps (and at the end); None: only at the end.
        save_every: a checkpoint every N steps (and at the end); None: only at the end.
        seed: data order (and any sampling in training).
        compile: run the graphs through ``torch.compile``.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 9e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.02
    eval_every: int | None = None
    save_every: int | None = None
    seed: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            check_int(name, getattr(self, name), 1)
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number > 0 (>= 0 for weight decay)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingArguments:
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})
