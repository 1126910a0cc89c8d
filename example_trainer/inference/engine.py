"""The engine side of our routes: pause/resume with a lease, an engine-core liveness probe, the
served model's limits, and which of vLLM's exceptions are the client's fault."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from vllm.v1.engine.exceptions import EngineGenerateError

from example_trainer.inference.requests import MAX_N, ModelLimits

try:  # 0.32: one base class for every request validation failure
    from vllm.exceptions import VLLMClientError
except ImportError:  # older releases raise plain ValueErrors
    VLLMClientError = ValueError  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

# Raised by vLLM for a request it refuses: each becomes a 400 carrying its message.
BAD_REQUEST_ERRORS = (VLLMClientError, ValueError, TypeError, OverflowError)
# How long the engine core may take to answer a utility call before /health says 503: one
# engine step, which is far shorter on every machine we run (ms on GPU, < 2 s on a 2-core CPU).
PROBE_TIMEOUT_S = 10.0


class GenerationPause:
    """Pause/resume of generation: the engine's own where it has one, else a server-side gate,
    with a lease: a pause not renewed within `lease_s` ends by itself.

    AsyncLLM.pause_generation(mode=..., clear_cache=...) / resume_generation / is_paused exist in
    0.26 and 0.32 (new requests are held in the scheduler); older releases lack them, and there
    requests wait at the gate in `admit()` while in-flight ones drain. Our /pause and /resume
    routes shadow vLLM's dev-mode ones, so the engine's pause state is ours alone to lease.
    """

    def __init__(self, engine_client: Any) -> None:
        self.engine = engine_client
        self.engine_pause = hasattr(engine_client, "pause_generation")
        self.gate = asyncio.Event()
        self.gate.set()
        self.inflight = 0  # requests inside admit(), paused ones included
        self.lease_s: float | None = None  # the lease of the pause in force, if any
        self.lease_deadline: float | None = None  # time.monotonic()
        self.lease_expirations = 0  # pauses that ended because nobody renewed them
        self._lease_task: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        self.inflight += 1
        try:
            await self.gate.wait()
            yield
        finally:
            self.inflight -= 1

    async def pause(self, mode: str, clear_cache: bool, lease_s: float) -> None:
        """Pause (again: a repeated pause renews the lease) for at most `lease_s` seconds."""
        if self.engine_pause:
            await self.engine.pause_generation(mode=mode, clear_cache=clear_cache)
        else:
            self.gate.clear()  # always "wait" semantics here
            while self.inflight:  # no drain event without the engine's pause: poll
                await asyncio.sleep(0.01)
        # The lease runs from when the pause is in force (mode=wait may drain for long); a new
        # lease replaces the old one, whether it ends earlier or later.
        self._end_lease()
        self.lease_s, self.lease_deadline = lease_s, time.monotonic() + lease_s
        self._lease_task = asyncio.create_task(self._expire_lease(lease_s))

    async def _expire_lease(self, lease_s: float) -> None:
        await asyncio.sleep(lease_s)
        log.warning("pause lease of %.1f s expired without renewal (POST /pause again to renew "
                    "it): the pausing client is gone or stuck; resuming generation", lease_s)
        self.lease_expirations += 1
        self._lease_task = None  # resume() must not cancel the task that is running it
        await self.resume()

    def _end_lease(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
        self._lease_task = self.lease_s = self.lease_deadline = None

    def lease_remaining_s(self) -> float | None:
        if self.lease_deadline is None:
            return None
        return max(0.0, self.lease_deadline - time.monotonic())

    async def resume(self) -> None:
        self._end_lease()
        if self.engine_pause:
            await self.engine.resume_generation()
        self.gate.set()

    async def is_paused(self) -> bool:
        if self.engine_pause:
            return await self.engine.is_paused()
        return not self.gate.is_set()


class EngineProbe:
    """Does the engine core still answer? One utility round trip, shared by concurrent callers.

    NOTE: vLLM's own /health checks only `errored` (core process dead, output loop stopped). A
    core whose input thread died (it decodes each request with msgspec and dies on the first it
    cannot decode) stays alive and silent: nothing is scheduled again, yet `errored` is False.
    A call that goes through that thread (is_paused) and gets no answer tells the difference.
    """

    def __init__(self, engine_client: Any, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.engine = engine_client
        self.timeout_s = timeout_s
        self._task: asyncio.Future | None = None
        self._started = 0.0
        self._reported: asyncio.Future | None = None

    def unresponsive(self) -> bool:
        """Known dead or silent right now, without waiting (for request paths)."""
        if self.engine.errored:
            return True
        task = self._task
        return (task is not None and not task.done()
                and time.monotonic() - self._started > self.timeout_s)

    async def alive(self) -> bool:
        if self.engine.errored:
            return False
        if self._task is None or self._task.done():
            round_trip = getattr(self.engine, "is_paused", None) or self.engine.check_health
            self._task = asyncio.ensure_future(round_trip())
            self._started = time.monotonic()
        left = self._started + self.timeout_s - time.monotonic()
        if left > 0:
            await asyncio.wait({self._task}, timeout=left)
        if not self._task.done():
            if self._reported is not self._task:  # once per silent probe, not per /health
                self._reported = self._task
                log.error("vLLM's engine core has not answered a call for %.0f s: /health "
                          "answers 503 until it does", time.monotonic() - self._started)
            return False
        return not self._task.cancelled() and self._task.exception() is None


def model_limits(engine_client: Any) -> ModelLimits:
    """The served model's vocabulary, context and logprobs caps, as /generate checks them."""
    import vllm.envs as envs

    config = engine_client.model_config
    return ModelLimits(vocab_size=config.get_vocab_size(), max_model_len=config.max_model_len,
                       max_logprobs=config.max_logprobs,
                       max_n=min(MAX_N, envs.VLLM_MAX_N_SEQUENCES))


def client_error(exc: BaseException) -> BaseException | None:
    """The error to show a client if `exc` from engine.generate() is its request's fault.

    AsyncLLM.generate re-raises request validation errors as they are (VLLMClientError in 0.32,
    ValueError in older releases) and wraps any other failure before the engine, such as a
    ValueError from input processing, in EngineGenerateError.
    """
    if isinstance(exc, EngineGenerateError):
        exc = exc.__cause__ or exc
    return exc if isinstance(exc, BAD_REQUEST_ERRORS) else None


