"""AsyncLLMEngine: an LLMEngine driven by one background thread, used from asyncio.

The thread owns the engine: every engine call (adding, aborting, stepping,
adapter loading) runs there, so the engine needs no locks. asyncio code
talks to it through a thread-safe command queue; results come back through
``loop.call_soon_threadsafe`` into per-request ``asyncio.Queue``s. With no
unfinished requests the thread blocks on the command queue, so an idle
server uses no CPU.

If the thread dies (an exception escapes ``step()``), every open stream and
every later call fails with ``EngineDeadError``; the process keeps running
so that the API server can report the failure.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vllm.engine.llm_engine import LLMEngine, PromptType
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

logger = init_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class StatsObserver(Protocol):
    """What the engine thread reports, for metrics (see vllm.engine.metrics)."""

    def request_added(self, request_id: str, lora_request: LoRARequest | None,
                      arrival_time: float) -> None: ...

    def request_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...

    def request_aborted(self, request_id: str) -> None: ...

    def scheduler_state(self, num_running: int, num_waiting: int, kv_usage: float) -> None: ...


@dataclass
class GenerationRequest:
    """One prompt to add: the arguments of ``LLMEngine.add_request``."""
    request_id: str
    prompt: PromptType
    params: SamplingParams
    lora_request: LoRARequest | None = None


class RequestStream:
    """The outputs of one or more engine requests, in the order they are
    produced; iteration ends when all of them have finished. ``close()``
    aborts whatever has not finished (call it however the consumer exits,
    e.g. from a ``finally`` that a client disconnect runs)."""

    def __init__(self, engine: "AsyncLLMEngine", request_ids: list[str],
                 loop: asyncio.AbstractEventLoop):
        self.request_ids = request_ids
        self.loop = loop
        self._engine = engine
        self._pending = set(request_ids)
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called on the event loop (via call_soon_threadsafe)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self._pending:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._pending.clear()
                raise item
            if item.finished:
                self._pending.discard(item.request_id)
            yield item

    def close(self) -> None:
        """Abort the requests that have not finished (idempotent, never blocks)."""
        if self._pending:
            self._engine.abort_nowait(list(self._pending))
            self._pending.clear()


_Command = tuple[Callable[[], Any], concurrent.futures.Future | None]


class AsyncLLMEngine:
    """An ``LLMEngine`` run on a background thread, with an asyncio API."""

    def __init__(self, engine: LLMEngine, stats: StatsObserver | None = None):
        self.engine = engine
        self.stats = stats
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        # only the engine thread touches _streams
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    # -- asyncio side ---------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._error is None and self._thread.is_alive()

    @property
    def dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine thread has stopped: {self._error!r}")

    def _submit(self, fn: Callable[[], Any],
                future: concurrent.futures.Future | None = None) -> None:
        with self._lock:
            if not self.is_running:
                raise self.dead_error
            self._commands.put((fn, future))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread and return its result (or raise its error)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(fn, future)
        return await asyncio.wrap_future(future)

    async def add_requests(self, requests: list[GenerationRequest]) -> RequestStream:
        """Add several requests at once, all or none: an invalid one raises
        (``InvalidRequestError``, ``ValueError``, ``LoRAError``) and none is added."""
        stream = RequestStream(self, [r.request_id for r in requests], asyncio.get_running_loop())
        arrival = time.monotonic()
        try:
            await self._call(lambda: self._add(stream, requests, arrival))
        except BaseException:
            stream.close()  # the caller may be cancelled after the add ran
            raise
        return stream

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       lora_request: LoRARequest | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes; leaving the
        loop early (or being cancelled) aborts the request."""
        stream = await self.add_requests([GenerationRequest(request_id, prompt, params,
                                                            lora_request)])
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    async def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await self._call(lambda: self._abort(ids))

    def abort_nowait(self, request_ids: list[str]) -> None:
        """Queue an abort without waiting (safe from ``finally`` blocks and
        from cancelled tasks); a dead engine has nothing left to abort."""
        try:
            self._submit(lambda: self._abort(request_ids))
        except EngineDeadError:
            pass

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Read and validate an adapter; raises ``LoRAError`` with the reason."""
        await self._call(lambda: self.engine.add_lora(lora_request))

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._call(lambda: self.engine.remove_lora(lora_int_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout)

    # -- engine thread ----------------------------------------------------------------
    def _add(self, stream: RequestStream, requests: list[GenerationRequest],
             arrival: float) -> None:
        added: list[str] = []
        try:
            for r in requests:
                self.engine.add_request(r.request_id, r.prompt, r.params, r.lora_request,
                                        arrival_time=arrival)
                added.append(r.request_id)
        except BaseException:
            self.engine.abort_request(added)
            raise
        for r in requests:
            self._streams[r.request_id] = stream
            if self.stats is not None:
                self.stats.request_added(r.request_id, r.lora_request, arrival)

    def _abort(self, request_ids: list[str]) -> None:
        live = [rid for rid in request_ids if self._streams.pop(rid, None) is not None]
        self.engine.abort_request(live)
        if self.stats is not None:
            for rid in live:
                self.stats.request_aborted(rid)

    def _run_command(self, command: _Command) -> None:
        fn, future = command
        if future is None:
            fn()
            return
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # a bad command fails its caller, not the thread
            future.set_exception(e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = (self._streams.pop(output.request_id, None) if output.finished
                      else self._streams.get(output.request_id))
            if stream is None:
                continue
            try:
                stream.loop.call_soon_threadsafe(stream.put, output)
            except RuntimeError:  # its event loop is closed: nobody is listening
                self._abort([output.request_id])

    def _report_state(self) -> None:
        if self.stats is not None:
            scheduler = self.engine.scheduler
            self.stats.scheduler_state(len(scheduler.running), len(scheduler.waiting),
                                       self.engine.block_manager.usage)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                # block only when there is nothing to step
                command = self._commands.get() if not engine.has_unfinished_requests() \
                    else self._next_command()
                while command is not None:
                    self._run_command(command)
                    command = self._next_command()
                if self._stopping:
                    return
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    if self.stats is not None:
                        self.stats.request_outputs(outputs, time.monotonic())
                    self._deliver(outputs)
                self._report_state()
        except BaseException as e:
            logger.exception("the engine thread died")
            self._die(e)

    def _next_command(self) -> _Command | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _die(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
        dead = self.dead_error
        for stream in set(self._streams.values()):
            try:
                stream.loop.call_soon_threadsafe(stream.put, dead)
            except RuntimeError:
                pass
        self._streams.clear()
        while (command := self._next_command()) is not None:
            _, future = command
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(dead)
