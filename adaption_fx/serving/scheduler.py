"""Continuous batching over mixed adapters: one decode step at a time for every running row.

The scheduler owns one thread that loops:

1. run the adapter commands that are due (load now; unload once no row uses the adapter,
   so requests in flight finish with the adapter they started with);
2. admit waiting requests while the batch has room: each prompt is prefilled alone, with
   its adapter (so its first token is the one offline ``generate`` gives), and its first
   token chosen; its rows join the running batch;
3. drop the rows that ended or whose client went away; when rows joined or left, rebuild
   the batch's cache (rows left-padded to the longest, the columns no row needs trimmed);
4. one decode step for every running row, each with its own adapter (the mixed-batch
   graph), then each row's next token.

Tokens are chosen per row by the library's generation core
(:class:`~adaption_fx.generation.loop.TokenChooser` over the request's resolved Hugging
Face options), so a row's tokens depend only on its own logits: padding is masked, and each
row's positions count its own tokens. An exception while one request's tokens are chosen or
decoded into text fails that request only.

Events go to each request's ``sink`` (called on the scheduler thread; the HTTP layer hands
them to its event loop).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaption_fx.generation.args import GenerationArgs
from adaption_fx.generation.loop import TokenChooser
from adaption_fx.model.mixed import BASE_ADAPTER
from adaption_fx.serving.engines import Engine
from adaption_fx.serving.output import ChoiceText

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is full; the client should retry later."""


class ShuttingDown(Exception):
    """The server is draining and takes no new requests."""


@dataclass
class Event:
    """What a request's sink receives.

    ``kind``: "text" (``text`` of choice ``index``), "finish" (choice ``index`` ended for
    ``finish_reason``), "done" (every choice ended; ``usage`` set) or "error" (``message``;
    nothing follows).
    """

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    message: str = ""


@dataclass
class Request:
    """One generation request: ``n`` choices continuing one prompt with one adapter.

    Attributes:
        prompt_ids: the prompt's token ids.
        adapter: an adapter name, or ``"__base__"`` for the base model.
        args: one resolved set of generation options per choice (each choice has its own
            sampler; ``stop_strings`` and the tokenizer are in them).
        max_new_tokens: the most tokens a choice generates.
        stop: the stop strings, left out of the text.
        sink: receives the :class:`Event` s (on the scheduler thread).
    """

    def __post_init__(self) -> None:
        self.label = self.label or self.adapter

    prompt_ids: list[int]
    adapter: str
    args: list[GenerationArgs]
    max_new_tokens: int
    stop: Sequence[str]
    sink: Callable[[Event], None]
    label: str = ""  # the name the client used (metrics); default: ``adapter``
    id: str = ""
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    open_choices: int = 0
    failed: bool = False

    def cancel(self) -> None:
        """Stop this request: its rows leave the batch at the next step."""
        self.cancelled.set()


class _Row:
    """One choice in the running batch."""

    def __init__(self, request: Request, index: int, tokenizer: Any):
        self.request = request
        self.index = index
        args = request.args[index]
        prompt = torch.tensor([request.prompt_ids], dtype=torch.long)
        self.chooser = TokenChooser(args, torch.ones_like(prompt))
        # Processors and criteria read the tokens so far; the fast path needs none.
        self.sequence: torch.Tensor | None = None if self.chooser.plain else prompt
        self.text = ChoiceText(tokenizer, request.stop)
        self.generated = 0
        self.length = len(request.prompt_ids)  # tokens in the cache
        self.last_token = 0
        self.last_time = 0.0
        self.finished = False

    def take(self, logits: torch.Tensor) -> tuple[str, str | None]:
        """Choose the next token from this row's logits (1, vocab); returns the new text
        and the finish reason (None while it goes on)."""
        token = self.chooser.choose(logits, self.sequence)
        if self.sequence is not None:
            self.sequence = torch.cat([self.sequence, token[:, None]], dim=-1)
        self.last_token = int(token)
        self.generated += 1
        ended = bool(self.chooser.ended(token, self.sequence)[0]) if self.chooser.ends else False
        text = self.text.put(self.last_token)
        if ended or self.text.stopped:
            return text, "stop"
        if self.generated >= self.request.max_new_tokens:
            return text, "length"
        return text, None


class Scheduler:
    """Runs requests on ``engine`` with continuous batching (see the module docstring).

    Args:
        engine: the backend.
        tokenizer: the model's tokenizer (text out).
        max_batch_size: the most rows that decode together.
        max_queue: the most requests waiting for a row; :meth:`submit` refuses more
            (:class:`QueueFull`), which bounds memory.
        metrics: an :class:`~adaption_fx.serving.metrics.ServerMetrics` (or None).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        metrics: Any = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[_Row] = []
        self._commands: list[tuple[str, str, Path | None, concurrent.futures.Future]] = []
        self._leaving: set[str] = set()  # adapters being unloaded: no new requests
        # The engine's adapters as of the last command, read by the HTTP threads (the
        # engine's own table changes on the scheduler thread).
        self._names: list[str] = list(engine.adapter_names)
        self._lock = threading.Condition()
        self._accepting = True
        self._stop = False
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ the public side
    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="adaption-fx-scheduler")
        self._thread.daemon = True
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish every one taken (waiting or running), stop."""
        with self._lock:
            self._accepting = False
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (:class:`ShuttingDown`); the taken ones go on."""
        with self._lock:
            self._accepting = False

    def submit(self, request: Request) -> None:
        """Queue ``request``. Raises :class:`QueueFull`, :class:`ShuttingDown`, KeyError
        for an adapter that is not loaded (or is being unloaded), or ValueError for more
        choices than the batch holds."""
        if not 1 <= len(request.args) <= self.max_batch_size:
            raise ValueError(
                f"a request needs 1 to {self.max_batch_size} choices, got {len(request.args)}"
            )
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if request.adapter != BASE_ADAPTER and (
                request.adapter not in self._names or request.adapter in self._leaving
            ):
                raise KeyError(request.adapter)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            request.id = request.id or f"{next(self._ids)}"
            request.open_choices = len(request.args)
            self._waiting.append(request)
            self._gauges()
            self._lock.notify_all()

    def adapters(self) -> list[str]:
        """The adapters requests may name now."""
        with self._lock:
            return [a for a in self._names if a not in self._leaving]

    def loaded(self, name: str) -> bool:
        """Whether an adapter of that name is loaded (being unloaded included)."""
        with self._lock:
            return name in self._names

    def load_adapter(self, name: str, path: Path) -> concurrent.futures.Future:
        """Load an adapter between two steps; the future ends when it is usable (or holds
        the error that refused it)."""
        return self._command("load", name, path)

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Unload an adapter: no new request may name it from now; it goes once the
        requests using it have finished (the future ends then)."""
        with self._lock:
            if name not in self._names or name in self._leaving:
                raise KeyError(name)
            self._leaving.add(name)
        return self._command("unload", name, None)

    def _command(self, kind: str, name: str, path: Path | None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                future.set_exception(RuntimeError("the scheduler is not running"))
                return future
            self._commands.append((kind, name, path, future))
            self._lock.notify_all()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._commands or self._stop):
                    self._lock.wait()
                if self._stop and not (self._waiting or self._running or self._commands):
                    return
            try:
                self._iteration()
            except Exception:  # a fault of the batch, not of one request: fail the rows
                logger.exception("decode step failed; failing the running requests")
                for row in self._running:
                    self._fail(row.request, "internal error while decoding")
                self._running = []

    def _iteration(self) -> None:
        self._run_commands()
        joined = self._admit()
        before = len(self._running)
        kept = [r for r in self._running if not r.finished and not r.request.cancelled.is_set()]
        for row in self._running:
            if row.request.cancelled.is_set() and not row.finished:
                row.finished = True
                self._end_choice(row, None)
        changed = bool(joined) or len(kept) != before
        if changed:
            self._rebuild(kept, joined)
        with self._lock:
            self._gauges()
        if self._running:
            self._step()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._running))

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        used = {r.request.adapter for r in self._running} | {r.adapter for r in self._waiting}
        later = []
        for kind, name, path, future in commands:
            if kind == "unload" and name in used:
                later.append((kind, name, path, future))
                continue
            error = None
            try:
                if kind == "load":
                    self.engine.load_adapter(name, path)
                else:
                    self.engine.unload_adapter(name)
                logger.info("adapter %r %sed", name, kind)
            except Exception as exc:
                error = exc
            with self._lock:  # before the caller hears of it: requests may name it now
                self._names = list(self.engine.adapter_names)
                if kind == "unload":
                    self._leaving.discard(name)
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if later:
            with self._lock:
                self._commands = later + self._commands

    def _admit(self) -> list[tuple[_Row, list[torch.Tensor]]]:
        joined: list[tuple[_Row, list[torch.Tensor]]] = []
        room = self.max_batch_size - sum(not r.finished for r in self._running)
        while True:
            with self._lock:
                if not self._waiting:
                    break
                request = self._waiting[0]
                if len(request.args) > room:
                    break
                self._waiting.popleft()
            if request.cancelled.is_set():
                self._finish_request(request, "cancelled")
                continue
            try:
                rows = self._prefill(request)
            except Exception as exc:
                logger.exception("request %s failed in its prefill", request.id)
                self._fail(request, f"generation failed: {exc}")
                continue
            room -= len(request.args)
            joined += [(row, cache) for row, cache in rows if not row.finished]
        return joined

    def _prefill(self, request: Request) -> list[tuple[_Row, list[torch.Tensor]]]:
        ids = torch.tensor([request.prompt_ids], dtype=torch.long)
        logits, cache = self.engine.prefill(ids, request.adapter)
        out = []
        for index in range(len(request.args)):
            row = _Row(request, index, self.tokenizer)
            text, reason = row.take(logits)
            now = time.perf_counter()
            if self.metrics is not None and index == 0:
                self.metrics.time_to_first_token.observe(now - request.arrived)
            row.last_time = now
            self._emit(row, text, reason)
            out.append((row, cache))
        return out

    def _rebuild(self, kept: list[_Row], joined: list[tuple[_Row, list[torch.Tensor]]]) -> None:
        """The running batch becomes ``kept`` then ``joined``: caches left-padded to the
        longest row, leading columns no row needs trimmed."""
        rows = kept + [row for row, _ in joined]
        if not rows:
            self._running = []
            return
        width = max(row.length for row in rows)
        parts: list[list[torch.Tensor]] = []
        if kept:
            old = self.engine.batch_cache()
            index = torch.tensor([self._running.index(row) for row in kept])
            old_width = old[0].shape[2]
            parts.append([_left_pad(t.index_select(0, index), width, old_width) for t in old])
        for _, cache in joined:
            parts.append([_left_pad(t, width, t.shape[2]) for t in cache])
        cache = [torch.cat(layer, dim=0) for layer in zip(*parts, strict=True)]
        self._running = rows
        self.engine.set_batch(cache, [row.request.adapter for row in rows])

    def _step(self) -> None:
        rows = self._running
        width = max(row.length for row in rows)
        lengths = torch.tensor([row.length for row in rows])
        columns = torch.arange(width + 1)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        tokens = torch.tensor([[row.last_token] for row in rows], dtype=torch.long)
        positions = lengths[:, None].clone()
        logits = self.engine.decode(tokens, mask, positions)
        self.steps += 1
        now = time.perf_counter()
        for index, row in enumerate(rows):
            row.length += 1
            if row.request.cancelled.is_set() or row.request.failed:
                row.finished = True
                continue
            try:
                text, reason = row.take(logits[index : index + 1])
            except Exception as exc:
                logger.exception("request %s failed choosing a token", row.request.id)
                self._fail(row.request, f"generation failed: {exc}")
                continue
            if self.metrics is not None:
                self.metrics.inter_token_latency.observe(now - row.last_time)
            row.last_time = now
            self._emit(row, text, reason)

    # ------------------------------------------------------------------ events
    def _emit(self, row: _Row, text: str, reason: str | None) -> None:
        request = row.request
        request.generated += 1
        if self.metrics is not None:
            self.metrics.generated_tokens.labels(adapter=request.label).inc()
        try:
            if text:
                request.sink(Event("text", row.index, text=text))
            if reason is not None:
                row.finished = True
                self._end_choice(row, reason)
        except Exception as exc:
            logger.exception("request %s failed producing its text", request.id)
            self._fail(request, f"generation failed: {exc}")

    def _end_choice(self, row: _Row, reason: str | None) -> None:
        request = row.request
        if request.failed:
            return
        if reason is not None:
            rest = row.text.finish()
            if rest:
                request.sink(Event("text", row.index, text=rest))
            request.sink(Event("finish", row.index, finish_reason=reason))
        request.open_choices -= 1
        if request.open_choices == 0:
            self._finish_request(request, "cancelled" if reason is None else "ok")

    def _finish_request(self, request: Request, status: str) -> None:
        usage = {
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": request.generated,
            "total_tokens": len(request.prompt_ids) + request.generated,
        }
        if self.metrics is not None:
            self.metrics.finished(request.label, status, len(request.prompt_ids))
        self._log(request, status)
        if status != "cancelled":
            request.sink(Event("done", usage=usage))

    def _log(self, request: Request, status: str, error: str | None = None) -> None:
        fields = {
            "request_id": request.id,
            "model": request.label,
            "status": status,
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": request.generated,
            "choices": len(request.args),
            "seconds": round(time.perf_counter() - request.arrived, 4),
        }
        if error is not None:
            fields["error"] = error
        logger.info("request %s %s", request.id, status, extra=fields)

    def _fail(self, request: Request, message: str) -> None:
        if request.failed:
            return
        request.failed = True
        for row in self._running:
            if row.request is request:
                row.finished = True
        if self.metrics is not None:
            self.metrics.finished(request.label, "error", len(request.prompt_ids))
        try:
            request.sink(Event("error", message=message))
        except Exception:
            logger.exception("request %s: its error could not be delivered", request.id)


def _left_pad(cache: torch.Tensor, width: int, current: int) -> torch.Tensor:
    """``cache`` (rows, heads, current, dim) cut or zero-padded on the left to ``width``."""
    if current >= width:
        return cache[:, :, current - width :]
    return torch.nn.functional.pad(cache, (0, 0, width - current, 0))


__all__ = ["Event", "QueueFull", "Request", "Scheduler", "ShuttingDown"]
