"""OpenAI API request bodies (pydantic) and OpenAI-shaped error answers.

The request models take the fields the server acts on; other fields OpenAI defines (``user``,
``logprobs: false``, ...) are accepted and ignored, as OpenAI-compatible servers do.
Values out of the documented ranges fail validation (400).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingFields(_Body):
    """The generation fields the chat and completion endpoints share."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    #: not OpenAI's: generate ``max_tokens`` even past the end-of-text token (vLLM's name).
    ignore_eos: bool = False
    # Refused when asked for (400), rather than silently answered without.
    logprobs: bool | int | None = None
    tools: list[Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> None:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tools (function calling) are not supported by this server")
        return None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def stop_strings(self) -> list[str]:
        """``stop`` as a list (the validator has made it one)."""
        return list(self.stop or [])


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: one prompt (a string, or a list of token ids)."""

    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | list[str]
    #: start each choice's text with the prompt's.
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (send the others as their own requests)")
            value = value[0]
        if isinstance(value, str) and not value:
            raise ValueError("the prompt is empty")
        return value


class LoadAdapterRequest(_Body):
    """``POST /v1/adapters``."""

    name: Annotated[str, Field(pattern=ADAPTER_NAME_PATTERN)]
    path: Annotated[str, Field(min_length=1)]


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None):
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
