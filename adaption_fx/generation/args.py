"""The generation options, defined once: Hugging Face's names, defaults and precedence.

Every ``generate`` (:meth:`AdaptedModel.generate <adaption_fx.model.adapted.AdaptedModel.generate>`,
``CompiledModel.generate``, ``OrtModel.generate``, ``generate_text``) takes
``generation_config=`` and keyword arguments and turns them into one
:class:`GenerationArgs` with :func:`resolve_generation`, as Hugging Face's ``generate``
does: a keyword argument wins over ``generation_config``, which wins over the model's own
``generation_config``, which wins over Hugging Face's global defaults (``max_length=20``,
``top_k=50``, ...). The logits processors, stopping criteria and streamers are
transformers' own classes; the decode loop (``adaption_fx.generation.loop``) runs them, and
keeps a fast path for plain greedy and sampling (temperature, top-k, top-p) that needs none.

Options we do not run (beam search, contrastive search, assisted decoding, ...) are refused
with a ValueError naming them, never ignored.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adaption_fx.checks import check_int
from adaption_fx.generation.options import MODEL_DEFAULT

# Hugging Face's global defaults for the options we run (transformers 5 leaves them unset in
# GenerationConfig() and fills them in generate; 4.x has them as the attribute defaults).
HF_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
    "remove_invalid_values": False,
    "renormalize_logits": False,
}

# Options that select a decoding strategy or output we do not run, with the value(s) that
# mean "off". A resolved config holding anything else is refused.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "penalty_alpha": (None,),
    "constraints": (None,),
    "force_words_ids": (None,),
    "guidance_scale": (None, 1.0),
    "prompt_lookup_num_tokens": (None,),
    "dola_layers": (None,),
    "watermarking_config": (None,),
    "token_healing": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "top_h": (None,),
    "low_memory": (None, False),
}

# Keyword arguments of Hugging Face's generate that are not GenerationConfig fields.
CALL_ONLY = ("logits_processor", "stopping_criteria", "streamer", "tokenizer", "seed")
UNSUPPORTED_CALL = {
    "assistant_model": "assisted decoding",
    "prefix_allowed_tokens_fn": "prefix-constrained decoding",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "custom_generate": "custom decoding loops",
    "synced_gpus": "synced GPUs",
}


# Not taken from the model's generation config here: the transformers version, and the
# eos and pad ids, which the caller reads with ``generation_defaults`` (from the generation
# config, else the model config; invalid ids in the wild are dropped there).
_OWN_DEFAULTS = ("transformers_version", "eos_token_id", "pad_token_id")


def _check_generation_config(generation_config: Any) -> None:
    from transformers import GenerationConfig

    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(
            "generation_config must be a transformers.GenerationConfig, got "
            f"{type(generation_config).__name__}"
        )


def _merged_config(model_config: Any, generation_config: Any, options: dict[str, Any]) -> Any:
    """The generation config one call runs: ``options`` over ``generation_config`` over
    ``model_config`` (the model's own) over Hugging Face's defaults.

    A field counts as left unset when it holds what a fresh ``GenerationConfig()`` holds
    (None in transformers 5, the default value in 4.x), as Hugging Face decides it.

    Raises:
        TypeError: an option is not a generation option.
    """
    from transformers import GenerationConfig

    fresh = GenerationConfig()
    config = (
        copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    )
    if model_config is not None:
        for key, value in model_config.to_dict().items():
            if key.startswith("_") or key in _OWN_DEFAULTS or not hasattr(config, key):
                continue
            if _off(getattr(config, key), getattr(fresh, key, None)):
                setattr(config, key, copy.deepcopy(value))
    for key, value in HF_DEFAULTS.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    unknown = sorted(key for key in options if not hasattr(config, key))
    if unknown:
        raise TypeError(
            f"generate() got unexpected keyword argument(s) {unknown}: not generation "
            "options (see transformers.GenerationConfig)"
        )
    for key, value in options.items():
        setattr(config, key, value)
    return config


@dataclass
class GenerationArgs:
    """The options of one ``generate`` call, resolved (see :func:`resolve_generation`).

    Attributes:
        config: the merged ``transformers.GenerationConfig``.
        eos_token_ids: the ids that end a row (empty: no eos stopping).
        pad_token_id: what fills a row after it ended.
        seed: seeds the sampling generator (None: torch's global generator, as Hugging Face
            samples).
        logits_processor: the caller's processors, run after the ones the config asks for.
        stopping_criteria: the caller's criteria, run with the ones the config asks for.
        streamer: receives the prompt, then each step's tokens, then ``end()``.
        tokenizer: for ``stop_strings``.
    """

    config: Any
    eos_token_ids: list[int]
    pad_token_id: int
    seed: int | None = None
    logits_processor: list[Any] = field(default_factory=list)
    stopping_criteria: list[Any] = field(default_factory=list)
    streamer: Any = None
    tokenizer: Any = None

    # ------------------------------------------------------------------ what to produce
    def max_new_tokens(self, prompt_length: int) -> int:
        """``max_new_tokens``, else ``max_length`` less the prompt (at least one token, as
        Hugging Face generates one when the prompt already fills ``max_length``)."""
        if self.config.max_new_tokens is not None:
            return self.config.max_new_tokens
        return max(1, self.config.max_length - prompt_length)

    @property
    def do_sample(self) -> bool:
        return bool(self.config.do_sample)

    @property
    def num_return_sequences(self) -> int:
        return self.config.num_return_sequences

    @property
    def returns_dict(self) -> bool:
        return bool(self.config.return_dict_in_generate)

    def fast_path(self, processors: Sequence[Any], criteria: Sequence[Any]) -> bool:
        """Whether the loop's fast path can run this call in place of ``processors`` and
        ``criteria`` (this call's, from :meth:`logits_processors` and :meth:`stopping`):
        the only processors are the sampling warpers it applies itself (temperature,
        top-k, top-p, see :attr:`sampling`), none of them the caller's; no stopping
        criterion but eos and length; no streamer; no scores kept."""
        from transformers.generation import logits_process as lp

        fast = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper)
        return (
            not self.logits_processor
            and not criteria
            and self.streamer is None
            and not self.returns_dict
            and all(type(p) in fast for p in processors)
        )

    @property
    def sampling(self) -> tuple[float, int | None, float | None]:
        """(temperature, top_k, top_p) for the fast path's sampler (None: not applied)."""
        c = self.config
        top_k = c.top_k if c.top_k else None
        top_p = c.top_p if c.top_p is not None and c.top_p < 1.0 else None
        return float(c.temperature), top_k, top_p

    # ------------------------------------------------------------------ transformers' parts
    def logits_processors(self, attention_mask: torch.Tensor) -> Any:
        """transformers' processors and warpers for this call, in Hugging Face's order (the
        caller's processors after the config's, the sampling warpers last), for left-padded
        prompts with ``attention_mask``."""
        from transformers.generation import logits_process as lp

        c, eos = self.config, self.eos_token_ids
        prompt_length, device = attention_mask.shape[1], attention_mask.device
        out = lp.LogitsProcessorList()
        if c.sequence_bias:
            out.append(lp.SequenceBiasLogitsProcessor(sequence_bias=c.sequence_bias))
        if c.repetition_penalty != 1.0:
            out.append(_repetition_penalty(float(c.repetition_penalty), attention_mask))
        if c.no_repeat_ngram_size:
            out.append(lp.NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
        if c.bad_words_ids:
            out.append(lp.NoBadWordsLogitsProcessor(c.bad_words_ids, eos or None))
        if c.min_length and eos:
            out.append(lp.MinLengthLogitsProcessor(c.min_length, eos, device=device))
        if c.min_new_tokens and eos:
            out.append(
                lp.MinNewTokensLengthLogitsProcessor(
                    prompt_length, c.min_new_tokens, eos, device=device
                )
            )
        if c.remove_invalid_values:
            out.append(lp.InfNanRemoveLogitsProcessor())
        if c.suppress_tokens:
            out.append(lp.SuppressTokensLogitsProcessor(c.suppress_tokens, device=device))
        if c.begin_suppress_tokens:
            out.append(
                lp.SuppressTokensAtBeginLogitsProcessor(
                    c.begin_suppress_tokens, prompt_length, device=device
                )
            )
        out.extend(self.logits_processor)
        if c.do_sample:
            if c.temperature != 1.0:
                out.append(lp.TemperatureLogitsWarper(c.temperature))
            if c.top_k:
                out.append(lp.TopKLogitsWarper(c.top_k))
            if c.top_p is not None and c.top_p < 1.0:
                out.append(lp.TopPLogitsWarper(c.top_p))
            if c.min_p is not None:
                out.append(lp.MinPLogitsWarper(c.min_p))
            if not _off(c.typical_p, 1.0):
                out.append(lp.TypicalLogitsWarper(c.typical_p))
            if not _off(c.epsilon_cutoff, 0.0):
                out.append(lp.EpsilonLogitsWarper(c.epsilon_cutoff))
            if not _off(c.eta_cutoff, 0.0):
                out.append(lp.EtaLogitsWarper(c.eta_cutoff, device=device))
        if c.renormalize_logits:
            out.append(lp.LogitNormalization())
        return out

    def stopping(self) -> Any:
        """transformers' stopping criteria for what ends a row besides eos and length."""
        from transformers.generation import stopping_criteria as sc

        out = sc.StoppingCriteriaList()
        if self.config.max_time is not None:
            out.append(sc.MaxTimeCriteria(self.config.max_time, time.time()))
        if self.config.stop_strings:
            out.append(sc.StopStringCriteria(self.tokenizer, self.config.stop_strings))
        out.extend(self.stopping_criteria)
        return out


def _repetition_penalty(penalty: float, attention_mask: torch.Tensor) -> Any:
    """The repetition penalty as the installed transformers' generate builds it: releases
    whose processor takes per-row prompt offsets leave each row's left padding out of the
    penalty (transformers 5); older ones (4.x) penalise the pad tokens too."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    padding = (attention_mask != 0).int().argmax(dim=1)
    try:
        return RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding)
    except (TypeError, ValueError):  # offsets must be one int there
        return RepetitionPenaltyLogitsProcessor(penalty)


def _off(value: Any, off: Any) -> bool:
    return value is None or value == off


def token_ids(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {value!r}")
    return list(items)


def check_config(config: Any) -> None:
    """Refuse what the loop does not run and values Hugging Face would refuse, naming them."""
    for name, off in UNSUPPORTED.items():
        value = getattr(config, name, None)
        if not any(value is o or value == o for o in off):
            raise ValueError(
                f"{name}={value!r} is not supported by adaption-fx's generate (greedy and "
                "sampling only; no beam search, contrastive or assisted decoding)"
            )
    if not isinstance(config.do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {config.do_sample!r}")
    if not isinstance(config.use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {config.use_cache!r}")
    if config.max_new_tokens is not None:
        check_int("max_new_tokens", config.max_new_tokens, 0)
    check_int("max_length", config.max_length, 1)
    check_int("num_return_sequences", config.num_return_sequences, 1)
    if config.num_return_sequences > 1 and not config.do_sample:
        raise ValueError(
            "greedy decoding without beam search does not support num_return_sequences "
            f"different than 1 (got {config.num_return_sequences}); pass do_sample=True"
        )
    if config.do_sample:
        # Greedy ignores temperature (temperature=0 is a common way to ask for greedy).
        if isinstance(config.temperature, bool) or not isinstance(config.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {config.temperature!r}")
        if not (math.isfinite(config.temperature) and config.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {config.temperature}")
        if config.top_k is not None:
            check_int("top_k", config.top_k, 0)
        if config.top_p is not None:
            if isinstance(config.top_p, bool) or not isinstance(config.top_p, (int, float)):
                raise TypeError(f"top_p must be a number, got {config.top_p!r}")
            if not 0 < config.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    penalty = config.repetition_penalty
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise TypeError(f"repetition_penalty must be a number, got {penalty!r}")
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty}")
    check_int("no_repeat_ngram_size", config.no_repeat_ngram_size, 0)
    if config.min_new_tokens is not None:
        check_int("min_new_tokens", config.min_new_tokens, 0)
    check_int("min_length", config.min_length, 0)


def resolve_generation(
    model_config: Any,
    defaults: tuple[Any, int | None],
    generation_config: Any = None,
    **options: Any,
) -> GenerationArgs:
    """The :class:`GenerationArgs` of one call.

    Args:
        model_config: the model's own ``generation_config`` (None: Hugging Face's defaults).
        defaults: the model's ``(eos_token_id, pad_token_id)`` (``generation_defaults``),
            used where the merged config names neither.
        generation_config: the caller's ``transformers.GenerationConfig``, or None.
        **options: Hugging Face's keyword arguments (GenerationConfig fields, plus
            ``logits_processor``, ``stopping_criteria``, ``streamer`` and ``tokenizer``),
            and ``seed`` (ours: reproducible sampling without touching torch's global
            generator). ``eos_token_id`` / ``pad_token_id`` equal to ``MODEL_DEFAULT`` are
            left to the configs.

    Raises:
        TypeError / ValueError: an unknown option, a bad value, or a decoding strategy we
            do not run (named).
    """
    _check_generation_config(generation_config)
    for name, what in UNSUPPORTED_CALL.items():
        value = options.pop(name, None)
        if value not in (None, False):
            raise ValueError(f"{name}= ({what}) is not supported by adaption-fx's generate")
    call = {name: options.pop(name) for name in CALL_ONLY if name in options}
    for name in ("eos_token_id", "pad_token_id"):
        if options.get(name, None) is MODEL_DEFAULT:
            del options[name]
    # The eos and pad ids: the call's, else the caller's config's, else the model's (an
    # explicit None in the call is kept: eos_token_id=None turns eos stopping off).
    ids = {}
    for index, name in enumerate(("eos_token_id", "pad_token_id")):
        if name in options:
            ids[name] = options[name]
        elif generation_config is not None and getattr(generation_config, name) is not None:
            ids[name] = getattr(generation_config, name)
        else:
            ids[name] = defaults[index]
    config = _merged_config(model_config, generation_config, {**options, **ids})
    check_config(config)
    eos = token_ids("eos_token_id", config.eos_token_id)
    pad = config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    check_int("pad_token_id", pad, 0)
    seed = call.get("seed")
    if seed is not None:
        check_int("seed", seed, 0)
    if config.stop_strings and call.get("tokenizer") is None:
        raise ValueError(
            "stop_strings needs the tokenizer: pass tokenizer= to generate, as with Hugging "
            "Face's generate"
        )
    for name in ("logits_processor", "stopping_criteria"):
        value = call.get(name)
        if value is not None and not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    streamer = call.get("streamer")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise TypeError(
            "streamer must have put() and end() (a transformers BaseStreamer), got "
            f"{type(streamer).__name__}"
        )
    return GenerationArgs(
        config=config,
        eos_token_ids=eos,
        pad_token_id=pad,
        seed=seed,
        logits_processor=list(call.get("logits_processor") or []),
        stopping_criteria=list(call.get("stopping_criteria") or []),
        streamer=streamer,
        tokenizer=call.get("tokenizer"),
    )


__all__ = [
    "GenerationArgs",
    "check_config",
    "resolve_generation",
    "token_ids",
]
