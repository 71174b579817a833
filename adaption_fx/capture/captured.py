"""A captured model: one flat ATen graph plus what is needed to call it like the original."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from adaption_fx.capture.graph_cache import CacheEntry


class CaptureError(RuntimeError):
    """torch.export could not capture the model."""


@dataclass
class CapturedModel:
    """A model as one flat ATen graph plus what is needed to call it like the original.

    Attributes:
        graph_module: the base graph; takes the flat inputs positionally. Its weights are
            the source's own tensor objects.
        in_spec / out_spec: pytree specs of (args, kwargs) and of the output; None for a
            graph captured without them (the flat inputs and outputs are used as they are).
        defaults: keyword inputs captured as constants (e.g. ``use_cache=False``), filled in
            when the caller leaves them out.
        fill_attention_mask: the model is a Hugging Face causal LM, so a missing
            ``attention_mask`` means "attend to every token".
        loss_function: the source's Hugging Face loss (``labels=`` support), if any.
        source_name: class name of what was captured, for messages.
        causal: for Hugging Face causal LMs, a second capture of the same model without
            ``attention_mask``, whose attention calls SDPA with ``is_causal=True`` and no mask
            tensor (see :func:`capture_causal`). Used when every token is attended to, where
            it computes the same function without building and reading a mask.
        cache: whether captures made later for this model (the decode step) may use the
            persistent graph cache.
        cache_entry: the graph-cache entry (:class:`adaption_fx.capture.graph_cache.CacheEntry`)
            this capture was read from or stored in; None when the cache was not used.
    """

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec | None
    out_spec: pytree.TreeSpec | None
    defaults: dict[str, Any] = field(default_factory=dict)
    fill_attention_mask: bool = False
    loss_function: Any = None
    source_name: str = "model"
    examples: dict[str, torch.Tensor] = field(default_factory=dict)
    task_type: str | None = None
    name_or_path: str | None = None
    reference_weight: torch.Tensor | None = None
    placement: tuple[torch.device, torch.dtype] | None = None
    causal: CapturedModel | None = None
    validate: Callable[[dict[str, Any]], None] | None = None
    cache: bool = False
    cache_entry: CacheEntry | None = None

    def check_placement(self) -> None:
        """Raise if the weights moved or were cast since capture.

        torch.export specialises the graph to the dtype and device it saw (it asserts them
        inside the graph), so a model cast after capture would otherwise fail deep in torch.
        """
        ref = self.reference_weight
        if ref is None or (ref.device, ref.dtype) == self.placement:
            return
        device, dtype = self.placement
        raise RuntimeError(
            f"{self.source_name} was captured with {dtype} weights on {device}, but they are "
            f"now {ref.dtype} on {ref.device}; the captured graph is specialised to its dtype "
            "and device: move or cast the source model first, then call rewrite()"
        )

    @property
    def positional_count(self) -> int:
        if self.in_spec is None:
            return 0
        return self.in_spec.child(0).num_children

    @property
    def keyword_names(self) -> list[str]:
        if self.in_spec is None:
            return []
        return list(self.in_spec.child(1).context)

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        """Flatten a call's arguments into the graph's flat inputs, checking them first."""
        if self.in_spec is None:
            if kwargs:
                raise TypeError(
                    f"this graph takes positional inputs only, got keywords {sorted(kwargs)}"
                )
            return list(args)
        return self.flatten(*self.bind_named(args, kwargs))

    def bind_named(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Check a call's arguments; return the positional inputs and the named ones."""
        n_pos = self.positional_count
        names = self.keyword_names
        pos = list(args[:n_pos])
        extra = list(args[n_pos:])
        if len(extra) > len(names):
            raise TypeError(
                f"{self.source_name} was captured with {n_pos + len(names)} inputs "
                f"({', '.join(names)}); got {len(args)} positional arguments"
            )
        given = dict(zip(names, extra, strict=False))
        dup = sorted(set(given) & set(kwargs))
        if dup:
            raise TypeError(f"got multiple values for {dup}")
        given.update(kwargs)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(
                f"{self.source_name} was captured with inputs {names}; unexpected {unknown}"
            )
        if (
            self.fill_attention_mask
            and "attention_mask" in names
            and given.get("attention_mask") is None
            and isinstance(given.get("input_ids"), torch.Tensor)
        ):
            given["attention_mask"] = torch.ones_like(given["input_ids"])
        for name, value in self.defaults.items():
            if name not in given:
                given[name] = value
            elif given[name] != value:
                raise ValueError(
                    f"{name}={given[name]!r} differs from the captured constant {value!r}; "
                    "the graph was captured with that value"
                )
        missing = [n for n in names if n not in given]
        if missing:
            raise TypeError(f"missing inputs {missing} (captured with {names})")
        for name in names:
            self._check_tensor(name, given[name])
        named = {n: given[n] for n in names}
        if self.validate is not None:
            self.validate(named)
        return tuple(pos), named

    def flatten(self, pos: tuple, named: dict[str, Any]) -> list[Any]:
        """The flat graph inputs for checked arguments (see :meth:`bind_named`)."""
        flat, spec = pytree.tree_flatten((tuple(pos), {n: named[n] for n in self.keyword_names}))
        if spec != self.in_spec:
            raise TypeError(
                f"inputs do not match the captured structure:\n  captured {self.in_spec}\n  "
                f"got      {spec}"
            )
        return flat

    def causal_inputs(self, pos: tuple, named: dict[str, Any]) -> list[Any] | None:
        """Flat inputs of the :attr:`causal` graph for these arguments, or None when it does
        not compute the same function for them (a padded ``attention_mask``)."""
        causal = self.causal
        if causal is None:
            return None
        mask, ids = named.get("attention_mask"), named.get("input_ids")
        if not (isinstance(mask, torch.Tensor) and isinstance(ids, torch.Tensor)):
            return None
        if mask.shape != ids.shape or ids.shape[-1] < 1 or not bool(mask.all()):
            return None
        rest = {k: v for k, v in named.items() if k != "attention_mask"}
        return causal.flatten(pos, rest)

    def _check_tensor(self, name: str, value: Any) -> None:
        example = self.examples.get(name)
        if example is None:
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != example.dim():
            raise ValueError(
                f"{name} must be {example.dim()}-d like the capture example, got shape "
                f"{tuple(value.shape)}"
            )
        if value.dtype.is_floating_point != example.dtype.is_floating_point:
            raise TypeError(f"{name} must have a dtype like {example.dtype}, got {value.dtype}")

    def unflatten(self, outputs: Any) -> Any:
        if self.out_spec is None:
            return outputs
        return pytree.tree_unflatten(list(outputs), self.out_spec)
