"""Text in, text out: generation from string prompts with a Hugging Face tokenizer."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object, or one loaded from a local directory with ``AutoTokenizer``."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        if not os.path.isdir(tokenizer):
            raise FileNotFoundError(f"no tokenizer directory at {str(tokenizer)!r}")
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer), local_files_only=True)
    if not callable(getattr(tokenizer, "batch_decode", None)):
        raise TypeError(
            "tokenizer must be a Hugging Face tokenizer or the path of a saved one, got "
            f"{type(tokenizer).__name__}"
        )
    return tokenizer


def generate_text(
    model: Any, tokenizer: Any, prompt: str | list[str], **generate_kwargs: Any
) -> str | list[str]:
    """Continue ``prompt`` (a string or a list of strings) with ``model.generate``.

    Args:
        model: an AdaptedModel, or an ``OrtModel`` of a ``for_generation`` export.
        tokenizer: a Hugging Face tokenizer, or the directory it was saved to.
        prompt: one prompt or a batch of them (left-padded together).
        generate_kwargs: passed to ``generate`` (``generation_config``, ``max_new_tokens``,
            ``do_sample``, ``stop_strings``, ``streamer``, ...; the tokenizer goes with
            them, for ``stop_strings``). ``eos_token_id`` and ``pad_token_id`` left out
            default to the model's (its ``default_token_ids``, from the source model's
            generation config), as in ``generate``; where the model has none, to the
            tokenizer's.

    Returns:
        The generated continuation(s) only, decoded without special tokens.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a str or a list of str, got {prompt!r}")
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be non-empty strings")
    tok = load_tokenizer(tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        pad = 0
    # Left padding by hand: generation continues every row from its last column, and some
    # tokenizers (GGUF ones on transformers 4.x) have no pad token for the tokenizer to pad.
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    empty = [p for p, r in zip(prompts, rows, strict=True) if not r]
    if empty:
        raise ValueError(f"the tokenizer turned {empty!r} into no tokens")
    width = max(len(r) for r in rows)
    encoded = {
        "input_ids": torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }
    ids = encoded["input_ids"]
    # The model's defaults first, as Hugging Face's generate: a chat model's generation
    # config often lists more stop tokens (end of turn, end of text) than the tokenizer's
    # single eos token. Left out here, generate applies them itself.
    model_eos, model_pad = getattr(model, "default_token_ids", (None, None))
    if model_eos is None:
        generate_kwargs.setdefault("eos_token_id", tok.eos_token_id)
    if model_pad is None:
        generate_kwargs.setdefault("pad_token_id", pad)
    generate_kwargs.setdefault("tokenizer", tok)
    out = model.generate(ids, encoded["attention_mask"], **generate_kwargs)
    sequences = getattr(out, "sequences", out)  # return_dict_in_generate=True
    new = torch.as_tensor(sequences)[:, ids.shape[-1] :]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return texts[0] if single else texts


def generate_in_batches(
    model: Any, tokenizer: Any, prompts: list[str], batch_size: int, **generate_kwargs: Any
) -> list[str]:
    """:func:`generate_text` over ``prompts``, ``batch_size`` at a time (which bounds the
    padding and memory of a long list); the continuations in prompt order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        answers += generate_text(
            model, tokenizer, prompts[start : start + batch_size], **generate_kwargs
        )
    return answers


class TextPieces:
    """One row's new tokens in, its text out as it becomes printable: transformers'
    ``TextStreamer`` decides when (whole words, completed multi-byte characters); special
    tokens are skipped. Push-based, for callers that receive tokens one at a time (the
    server's scheduler); :func:`text_chunks` is the same over an iterator.
    """

    def __init__(self, tokenizer: Any):
        from transformers import TextStreamer

        pieces: list[str] = []
        self._pieces = pieces

        class Collect(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    pieces.append(text)

        self._streamer = Collect(load_tokenizer(tokenizer), skip_special_tokens=True)

    def _take(self) -> str:
        text = "".join(self._pieces)
        self._pieces.clear()
        return text

    def put(self, token: int | torch.Tensor) -> str:
        """Add one token; returns the text it made printable ("" if none yet)."""
        token = torch.as_tensor(token).reshape(-1)
        if token.numel() != 1:
            raise ValueError(
                f"text streaming takes one prompt at a time, got a batch of {token.numel()}"
            )
        self._streamer.put(token.cpu())
        return self._take()

    def end(self) -> str:
        """The text still held back (the last word); call once, after the last token."""
        self._streamer.end()
        return self._take()


def text_chunks(tokens: Iterable[torch.Tensor], tokenizer: Any) -> Iterator[str]:
    """The text of a stream of new tokens (one row: each item a (1,) tensor), piece by
    piece as it becomes printable (see :class:`TextPieces`)."""
    pieces = TextPieces(tokenizer)
    for token in tokens:
        text = pieces.put(token)
        if text:
            yield text
    text = pieces.end()
    if text:
        yield text
