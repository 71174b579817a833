"""Token generation over a decode-step graph: one loop for PyTorch and ONNX Runtime.

A *session* runs the decode step and keeps the key/value cache between calls (PyTorch
tensors here, ONNX Runtime values in ``adaption_fx.export.ort``); this module owns what is
common: argument checks, position ids for left-padded batches, greedy and sampled token
choice, and per-row stopping at eos. It also reads the eos and pad ids a model's own
``generate`` defaults to (:func:`generation_defaults`), so that ours stop where Hugging
Face's do.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from adaption_fx.model import AdaptedModel

logger = logging.getLogger(__name__)

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


def _default_ids(where: str, name: str, value: Any) -> Any:
    """``value`` (a default read from a model) if it is a valid ``name``, else None.

    A default the caller did not pass must not make ``generate`` fail: configs in the wild
    hold values our checks reject (``pad_token_id=-1`` in early Llama conversions).
    """
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    try:
        _token_ids(name, value)
        valid = name == "eos_token_id" or not isinstance(value, list)  # one pad id
    except (TypeError, ValueError):
        valid = False
    if not valid:
        logger.warning("ignoring %s.%s = %r: not a valid token id", where, name, value)
        return None
    return value


def generation_defaults(module: Any) -> tuple[EosTokenIds, int | None]:
    """The ``(eos_token_id, pad_token_id)`` a model's ``generate`` uses when a call names
    neither, read as Hugging Face's ``generate`` reads them.

    Each comes from ``module.generation_config`` (every Hugging Face model that can
    generate has one, filled from its config and ``generation_config.json``). Where that
    object lacks the attribute, or the module has no generation config, it comes from
    ``module.config``. A None held by the generation config is kept: Hugging Face's
    ``generate`` does not fall back to the config then, and setting
    ``generation_config.eos_token_id = None`` is how its users turn eos stopping off.

    Args:
        module: the source model (``AdaptedModel`` keeps it for generation), or None.

    Returns:
        ``eos_token_id`` (an int, a list of ints or None) and ``pad_token_id`` (an int or
        None); values that are not valid token ids are logged and read as None. A pad id
        of None leaves ``generate``'s own fallback: the first eos id, else 0.
    """
    sources = [(where, getattr(module, where, None)) for where in ("generation_config", "config")]
    found: list[Any] = []
    for name in ("eos_token_id", "pad_token_id"):
        value = None
        for where, holder in sources:
            if holder is not None and hasattr(holder, name):
                value = _default_ids(where, name, getattr(holder, name))
                break
        found.append(value)
    return found[0], found[1]


class DecodeSession(Protocol):
    """Runs decode steps, holding the cache between them."""

    def reset(self, batch: int) -> None:
        """Forget the cache: the next step is a prefill (past length 0)."""

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run new tokens (batch, n) against the cache; return the last token's logits
        (batch, vocab) and extend the cache with the new tokens' keys and values."""


class TorchSession:
    """A decode session on an AdaptedModel's decode-step twin (``AdaptedModel.decoder()``).

    It runs the twin's graph for the current adapter state with the adapter folded (see
    ``AdaptedModel.inference_graph``): the prompt projections run once per session, not
    in every step.
    """

    def __init__(self, decoder: AdaptedModel, runner: Any = None):
        self.decoder = decoder
        decoder.captured.check_placement()
        self.graph_module, self.adapter_values = decoder.inference_graph()
        # How the graph runs (see AdaptedModel.run_graphs): eagerly, or compiled.
        self.run = (runner or (lambda gm: gm))(self.graph_module)
        self.layout = decoder.cache_layout
        self.past: list[torch.Tensor] = []
        self.device = decoder.base_graph_module.get_parameter(
            decoder.sites[0].key_projection.weight
        ).device

    def reset(self, batch: int) -> None:
        self.past = self.layout.empty(batch, self.device)

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        feed = dict(zip(self.layout.past_inputs, self.past, strict=True))
        feed.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        captured = self.decoder.captured
        flat = captured.bind((), feed)
        out = captured.unflatten(self.run(*flat, *self.adapter_values))
        self.past = [out[name] for name in self.layout.present_outputs]
        return out["logits"][:, -1, :]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _token_ids(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {value!r}")
    return list(items)


def check_prompt(
    input_ids: Any, attention_mask: Any, max_new_tokens: int, max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch of left-padded prompts; return (input_ids, attention_mask) as long."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"the prompt is empty: input_ids has shape {tuple(input_ids.shape)}")
    if bool((input_ids < 0).any()):
        raise ValueError("input_ids holds negative token ids")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
            f"{tuple(input_ids.shape)}; they must match"
        )
    mask = attention_mask.to(torch.long)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((mask.sum(-1) == 0).any()):
        rows = torch.nonzero(mask.sum(-1) == 0).flatten().tolist()
        raise ValueError(f"rows {rows} of attention_mask are all padding: nothing to continue")
    # Left padding only: once a row's tokens start, none is masked.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask has padding after a token (right padding); pad prompts on the "
            "left for generation"
        )
    if max_length is not None and seq + max_new_tokens > max_length:
        raise ValueError(
            f"prompt length {seq} + max_new_tokens {max_new_tokens} exceeds the maximum "
            f"length {max_length} the decode step was captured for"
        )
    return input_ids.to(torch.long), mask


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, -math.inf)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # As Hugging Face's TopPLogitsWarper: drop the least likely tokens whose cumulative
    # probability stays within 1 - top_p, always keeping the most likely one.
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def choose_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row from its logits (batch, vocab)."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = _filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(do_sample: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any) -> None:
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    # Greedy decoding ignores temperature (as in HF, where temperature=0 is a common way of
    # asking for greedy); sampling needs a positive one.
    if do_sample and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be a number, got {top_p!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None:
        _check_int("seed", seed, 0)


@torch.no_grad()
def generate(
    session: DecodeSession,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: EosTokenIds | ModelDefault = MODEL_DEFAULT,
    pad_token_id: int | ModelDefault | None = MODEL_DEFAULT,
    seed: int | None = None,
    use_cache: bool = True,
    max_length: int | None = None,
    defaults: tuple[EosTokenIds, int | None] = (None, None),
) -> torch.Tensor:
    """Generate with ``session``; see ``AdaptedModel.generate`` for the arguments.

    ``defaults`` is the model's ``(eos_token_id, pad_token_id)`` (see
    :func:`generation_defaults`), taken by whichever of the two is left at
    :data:`MODEL_DEFAULT`; an explicit None is kept.
    """
    if eos_token_id is MODEL_DEFAULT:
        eos_token_id = defaults[0]
    if pad_token_id is MODEL_DEFAULT:
        pad_token_id = defaults[1]
    _check_int("max_new_tokens", max_new_tokens, 0)
    check_sampling(do_sample, temperature, top_k, top_p, seed)
    eos = _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    else:
        _check_int("pad_token_id", pad_token_id, 0)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    ids, mask = check_prompt(input_ids, attention_mask, max_new_tokens, max_length)
    if max_new_tokens == 0:
        return ids.clone()

    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    batch = ids.shape[0]
    eos_ids = torch.tensor(eos, dtype=torch.long, device=ids.device)
    # Left padding: a token's position counts only the real tokens before it.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    session.reset(batch)
    logits = session.step(ids, mask, positions)
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    new_tokens: list[torch.Tensor] = []
    for index in range(max_new_tokens):
        token = choose_tokens(
            logits,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        new_tokens.append(token)
        if eos:
            finished |= torch.isin(token, eos_ids)
        if index == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        next_position = positions[:, -1:] + 1
        positions = torch.cat([positions, next_position], dim=-1)
        if use_cache:
            logits = session.step(token[:, None], mask, next_position)
        else:
            session.reset(batch)
            sequence = torch.cat([ids, torch.stack(new_tokens, dim=1)], dim=-1)
            logits = session.step(sequence, mask, positions)
    return torch.cat([ids, torch.stack(new_tokens, dim=1)], dim=-1)
