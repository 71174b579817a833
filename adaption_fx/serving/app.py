"""The OpenAI-compatible HTTP API (FastAPI) over the scheduler
(:class:`~adaption_fx.serving.scheduler.Scheduler`).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}`` (run-time adapters, when allowed),
``GET /health``, ``GET /metrics``. Errors are OpenAI's error object with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaption_fx.generation.args import resolve_generation
from adaption_fx.model.mixed import BASE_ADAPTER
from adaption_fx.serving.metrics import ServerMetrics
from adaption_fx.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    SamplingFields,
    error_body,
)
from adaption_fx.serving.scheduler import Event, QueueFull, Scheduler, ShuttingDown
from adaption_fx.serving.scheduler import Request as GenerationRequest

logger = logging.getLogger(__name__)

#: what a client is told to wait before retrying a full queue (seconds).
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind, code, param)
        self.headers = headers


@dataclass
class ServerState:
    """What the routes share.

    Attributes:
        scheduler: runs the generations.
        tokenizer: the model's tokenizer.
        model_name: the name that selects the base model (no adapter).
        max_model_len: the longest prompt + generated tokens a request may ask for.
        api_key: the bearer token every ``/v1`` request must carry (None: no check).
        allow_adapter_loading: whether ``/v1/adapters`` may load and unload adapters.
        adapter_root: the only directory run-time adapters may be loaded from.
        metrics: the Prometheus metrics.
    """

    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    max_model_len: int
    api_key: str | None = None
    allow_adapter_loading: bool = False
    adapter_root: Path | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))


def _count(state: ServerState, adapter: str, status: int | str) -> None:
    state.metrics.requests.labels(adapter=adapter, status=str(status)).inc()


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state``; the scheduler is started with the app
    (lifespan) and drained when the app shuts down (uvicorn on SIGTERM)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        logger.info("serving %s with adapters %s", state.model_name, state.scheduler.adapters())
        yield
        logger.info("shutting down: finishing the requests taken")
        await asyncio.to_thread(state.scheduler.shutdown)

    app = FastAPI(title="adaption-fx", lifespan=lifespan)
    app.state.serving = state

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        param = None
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            param = param or where or None
            problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        message = "; ".join(problems) or "invalid request"
        return JSONResponse(error_body(message, "invalid_request_error", None, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), 500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    # ------------------------------------------------------------------ operations
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        entry = {"object": "model", "created": state.created, "owned_by": "adaption-fx"}
        data = [{"id": state.model_name, **entry, "root": state.model_name, "parent": None}]
        for name in state.scheduler.adapters():
            data.append({"id": name, **entry, "root": name, "parent": state.model_name})
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ adapters
    def adapter_admin(request: Request) -> None:
        authorize(request)
        if not state.allow_adapter_loading:
            raise ApiError(
                403,
                "loading adapters at run time is off; start the server with "
                "--allow-adapter-loading (and --adapter-root)",
                kind="permission_error",
            )

    @app.post("/v1/adapters")
    async def load_adapter(body: LoadAdapterRequest, request: Request) -> dict[str, Any]:
        adapter_admin(request)
        if body.name == state.model_name or body.name == BASE_ADAPTER:
            raise ApiError(400, f"{body.name!r} names the base model", param="name")
        if state.scheduler.loaded(body.name):
            raise ApiError(
                409, f"an adapter named {body.name!r} is loaded; unload it first",
                code="adapter_exists", param="name",
            )  # fmt: skip
        path = _inside_root(state.adapter_root, body.path)
        try:
            await asyncio.wrap_future(state.scheduler.load_adapter(body.name, path))
        except Exception as exc:  # what the checks refused (structure, names, shapes, files)
            message = f"could not load adapter {body.name!r}: {exc}"
            raise ApiError(400, message, param="path") from None
        logger.info("loaded adapter %r from %s", body.name, path)
        return {"id": body.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
        adapter_admin(request)
        try:
            future = state.scheduler.unload_adapter(name)
        except KeyError:
            raise ApiError(404, f"no adapter named {name!r}", code="model_not_found") from None
        await asyncio.wrap_future(future)
        logger.info("unloaded adapter %r", name)
        return {"id": name, "object": "model", "deleted": True}

    # ------------------------------------------------------------------ generation
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        authorize(request)
        tok = state.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise ApiError(400, "the model has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that refuses these messages (roles, order)
            raise ApiError(400, f"the chat template refused the messages: {exc}") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _generate(request, body, ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        authorize(request)
        if isinstance(body.prompt, str):
            ids = state.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(body.prompt)
            vocab = len(state.tokenizer)
            if max(ids) >= vocab:
                raise ApiError(400, f"token ids must be below {vocab}", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        echo = state.tokenizer.decode(ids) if body.echo else ""
        return await _generate(request, body, ids, body.max_tokens, chat=False, echo=echo)

    async def _generate(
        request: Request,
        body: SamplingFields,
        ids: list[int],
        max_tokens: int | None,
        chat: bool,
        echo: str = "",
    ) -> Response:
        adapter = _adapter_for(body.model)
        if body.n > state.scheduler.max_batch_size:
            _count(state, body.model, 400)
            raise ApiError(
                400, f"n={body.n} exceeds this server's batch of {state.scheduler.max_batch_size}",
                param="n",
            )  # fmt: skip
        limit = state.max_model_len
        if len(ids) >= limit:
            _count(state, body.model, 400)
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this server's maximum context length is "
                f"{limit} tokens (prompt and completion)",
                code="context_length_exceeded", param="messages" if chat else "prompt",
            )  # fmt: skip
        if max_tokens is None:
            max_tokens = limit - len(ids)
        elif len(ids) + max_tokens > limit:
            _count(state, body.model, 400)
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed this "
                f"server's maximum context length of {limit} tokens",
                code="context_length_exceeded", param="max_tokens",
            )  # fmt: skip
        try:
            args = [_options(body, max_tokens, index) for index in range(body.n)]
        except (ValueError, TypeError) as exc:
            _count(state, body.model, 400)
            raise ApiError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = GenerationRequest(
            prompt_ids=list(ids),
            adapter=adapter,
            args=args,
            max_new_tokens=max_tokens,
            stop=body.stop_strings(),
            sink=sink,
            label=body.model,
        )
        try:
            state.scheduler.submit(job)
        except QueueFull:
            _count(state, body.model, 429)
            raise ApiError(
                429, "the server is busy: too many requests are waiting; retry shortly",
                kind="rate_limit_error", code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None  # fmt: skip
        except ShuttingDown:
            _count(state, body.model, 503)
            raise ApiError(503, "the server is shutting down", kind="server_error") from None
        except KeyError:  # unloaded between the check and the submit
            _count(state, body.model, 404)
            message = f"model {body.model!r} is not served"
            raise ApiError(404, message, code="model_not_found") from None
        answer = _Answer(body, chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", echo)
        if body.stream:
            return StreamingResponse(
                _stream(job, events, answer), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
        try:
            while True:
                event = await events.get()
                if event.kind == "error":
                    _count(state, body.model, 500)
                    raise ApiError(500, event.message, kind="server_error")
                answer.take(event)
                if event.kind == "done":
                    _count(state, body.model, 200)
                    return JSONResponse(answer.whole())
        except asyncio.CancelledError:  # the client went away: free its rows
            job.cancel()
            raise

    async def _stream(
        job: GenerationRequest, events: asyncio.Queue[Event], answer: _Answer
    ) -> AsyncIterator[str]:
        status = "cancelled"
        try:
            for index in range(answer.body.n):
                if answer.chat:
                    yield _sse(answer.chunk(index, {"role": "assistant", "content": ""}))
                elif answer.echo:
                    yield _sse(answer.chunk(index, answer.delta(answer.echo)))
            while True:
                event = await events.get()
                if event.kind == "error":
                    status = "error"
                    yield _sse(error_body(event.message, "server_error"))
                    break
                if event.kind == "text":
                    yield _sse(answer.chunk(event.index, answer.delta(event.text)))
                elif event.kind == "finish":
                    yield _sse(answer.chunk(event.index, answer.delta(None), event.finish_reason))
                elif event.kind == "done":
                    status = "200"
                    yield _sse(answer.usage_chunk(event.usage))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if status == "cancelled":
                job.cancel()
            _count(state, answer.body.model, status)

    def _adapter_for(model: str) -> str:
        if model == state.model_name:
            return BASE_ADAPTER
        if model in state.scheduler.adapters():
            return model
        _count(state, model, 404)
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r} and "
            f"the adapters {state.scheduler.adapters()} (GET /v1/models)",
            code="model_not_found", param="model",
        )  # fmt: skip

    def _options(body: SamplingFields, max_tokens: int, index: int) -> Any:
        """The library's generation options for one choice (Hugging Face's names)."""
        options: dict[str, Any] = {"max_new_tokens": max_tokens}
        if body.temperature is not None:
            if body.temperature == 0.0:
                options["do_sample"] = False
            else:
                options.update(do_sample=True, temperature=body.temperature)
        if body.top_p is not None:
            options["top_p"] = body.top_p
        if body.seed is not None:
            options["seed"] = body.seed + index
        if body.stop_strings():
            options["stop_strings"] = body.stop_strings()
        if body.ignore_eos:
            options["eos_token_id"] = None  # the library's way to turn eos stopping off
        engine = state.scheduler.engine
        args = resolve_generation(
            engine.generation_config,
            engine.default_token_ids,
            tokenizer=state.tokenizer,
            **options,
        )
        if options.get("stop_strings"):
            try:  # transformers' stop-string matcher reads the vocabulary: some it cannot
                args.stopping()
            except Exception as exc:
                message = f"stop strings do not work with this model's tokenizer: {exc}"
                raise ValueError(message) from None
        return args

    return app


def _inside_root(root: Path | None, given: str) -> Path:
    """``given`` resolved (links followed), refused unless it is a directory under ``root``."""
    if root is None:
        raise ApiError(
            403, "no --adapter-root was given: no path may be loaded", "permission_error"
        )
    path = Path(given).expanduser()
    if not path.is_absolute():
        path = root / path
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ApiError(
            403, f"path {given!r} is outside the adapter root", "permission_error", param="path"
        )
    if not resolved.is_dir():
        raise ApiError(400, f"path {given!r} is not an adapter directory", param="path")
    return resolved


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Answer:
    """Builds one request's OpenAI response objects (whole, or chunk by chunk)."""

    def __init__(self, body: SamplingFields, chat: bool, answer_id: str, echo: str = ""):
        self.body = body
        self.chat = chat
        self.echo = echo  # the prompt's text, where the request asked for it back
        self.id = answer_id
        self.created = int(time.time())
        self.texts = [echo] * body.n
        self.reasons: list[str | None] = [None] * body.n
        self.usage: dict[str, int] | None = None

    def take(self, event: Event) -> None:
        if event.kind == "text":
            self.texts[event.index] += event.text
        elif event.kind == "finish":
            self.reasons[event.index] = event.finish_reason
        elif event.kind == "done":
            self.usage = event.usage

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model}

    def whole(self) -> dict[str, Any]:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
                for i, (text, reason) in enumerate(zip(self.texts, self.reasons, strict=True))
            ]
            return {**self._head("chat.completion"), "choices": choices, "usage": self.usage}
        choices = [
            {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(zip(self.texts, self.reasons, strict=True))
        ]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage}

    def delta(self, text: str | None) -> dict[str, Any]:
        if self.chat:
            return {} if text is None else {"content": text}
        return {"text": text or ""}

    def chunk(self, index: int, delta: dict[str, Any], reason: str | None = None):
        if self.chat:
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, **delta, "finish_reason": reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int] | None) -> dict[str, Any]:
        """The last chunk: no choices, the usage (sent always, not only with
        ``stream_options.include_usage``: usage is in every final response)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage}
