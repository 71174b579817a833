"""One choice's text as it streams: the library's text pieces, with OpenAI's stop rule.

OpenAI's API leaves a stop string out of the answer. The stop itself is detected on tokens
by the generation core (``stop_strings``, transformers' ``StopStringCriteria``); here the
text is held back while its end could still grow into a stop string, so that a streamed
answer never shows part of one, and the answer is cut where the first stop string begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adaption_fx.generation.text import TextPieces


class ChoiceText:
    """Incremental text of one choice.

    Args:
        tokenizer: the model's tokenizer.
        stop: the request's stop strings (may be empty).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self._pieces = TextPieces(tokenizer)
        self._stop = [s for s in stop if s]
        self._text = ""  # everything decoded so far
        self._sent = 0  # how much of it was handed out

    def _held(self) -> int:
        """How many characters at the end of the text could begin a stop string."""
        held = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._text)), held, -1):
                if self._text.endswith(stop[:size]):
                    held = size
                    break
        return held

    def put(self, token: int) -> str:
        """Add a token; returns the new text that can be shown now."""
        self._text += self._pieces.put(token)
        if self._cut() is not None:  # the stop is complete: finish() hands out the rest
            return ""
        end = len(self._text) - self._held()
        if end <= self._sent:
            return ""
        delta, self._sent = self._text[self._sent : end], end
        return delta

    def _cut(self) -> int | None:
        found = [self._text.find(s) for s in self._stop]
        found = [i for i in found if i >= 0]
        return min(found) if found else None

    def finish(self) -> str:
        """The text not handed out yet, up to the first stop string; call once, at the end."""
        self._text += self._pieces.end()
        cut = self._cut()
        end = len(self._text) if cut is None else cut
        delta = self._text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta

    @property
    def stopped(self) -> bool:
        """Whether the text holds a stop string. The generation core stops on tokens; text
        can hold one the tokens do not (special tokens are skipped in the text)."""
        return self._cut() is not None

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self._text[: self._sent]
