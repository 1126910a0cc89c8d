"""The in-process fence: vLLM's forward passes and the trainer's optimizer writes take turns on
the one copy of the weights, with no HTTP and no sleep on the path. The protocol and why no
forward pass reads a half-written step: README.md, "The fence, and --hogwild".

Objects, created by the worker at export and named in the bridge config's "fence" section:
- turnstile T and mutex M: named POSIX semaphores (`sem_open`, ~0.1 us uncontended); the worker
  passes T and holds M around each forward pass, the trainer holds both around optimizer.step();
- a 128-byte shared memory block: the weight version (the trainer's step count), the trainer's
  IPC event generation and cudaIpcEventHandle, and its pid and what it holds: a worker or a next
  trainer blocked behind a writer that died inside the fence (SIGKILL, OOM) releases its hold
  (_Objects.recover), so a crashed trainer wedges nothing;
- on CUDA, two interprocess events ordering the GPU work: E_fwd (the worker's, handle in the
  config), recorded after each forward, and E_write (the trainer's), after each step.
"""

from __future__ import annotations

import _multiprocessing
import base64
import contextlib
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory, synchronize
from typing import Any

from vllm_patching import bridge_config

log = logging.getLogger("vllm.grpo_bridge")

BLOCK_BYTES = 128
VERSION, EVENT_GEN, EVENT_HANDLE, WRITER_PID, WRITER_PHASE = 0, 8, 16, 80, 88  # block offsets
ACQUIRE_TIMEOUT_S = 60.0
DEAD_WRITER_CHECK_S = 1.0  # how often a blocked party checks whether the writer died


def _sem(name: str, create: bool) -> Any:
    if create:
        return _multiprocessing.SemLock(synchronize.SEMAPHORE, 1, 1, name, False)
    return _multiprocessing.SemLock._rebuild(0, synchronize.SEMAPHORE, 1, name)


def _open_block(name: str) -> shared_memory.SharedMemory:
    # track=False: the opener must not unlink the creator's block when it exits (3.13+); on 3.11/
    # 3.12 the resource tracker would, so it is told to forget the name.
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    except TypeError:
        from multiprocessing import resource_tracker

        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return shm


class FenceTimeout(RuntimeError):
    pass


class _Objects:
    """The semaphores and block of one fence, created (worker) or opened (trainer, server)."""

    def __init__(self, section: dict[str, Any], create: bool) -> None:
        self.section = section
        self.turnstile = _sem(section["turnstile"], create)
        self.mutex = _sem(section["mutex"], create)
        self.recovery = _sem(section["recovery"], create)
        if create:
            self.block = shared_memory.SharedMemory(name=section["block"], create=True,
                                                    size=BLOCK_BYTES)
            self.block.buf[:BLOCK_BYTES] = bytes(BLOCK_BYTES)
        else:
            self.block = _open_block(section["block"])

    def read(self, offset: int) -> int:
        return struct.unpack_from("<q", self.block.buf, offset)[0]

    def write(self, offset: int, value: int) -> None:
        struct.pack_into("<q", self.block.buf, offset, value)

    def version(self) -> int:
        return self.read(VERSION)

    def recover(self) -> bool:
        """If the writer named in the block died inside the fence, release what it held.

        The writer records what it holds (phase 1: turnstile, 2: turnstile and mutex) right
        after each acquire and before each release, so a SIGKILL (OOM) anywhere but between
        those adjacent instructions leaves an exact record. The recovery semaphore keeps the
        worker and a new writer from both releasing the same hold."""
        if not self.recovery.acquire(False):
            return False
        try:
            pid, phase = self.read(WRITER_PID), self.read(WRITER_PHASE)
            if not pid or not phase or bridge_config.pid_alive(pid):
                return False
            log.warning("grpo_bridge: the trainer (pid %d) died inside the fence; releasing "
                        "its hold so that generation and the next trainer go on", pid)
            if phase >= 2:
                self.mutex.release()
            self.turnstile.release()
            self.write(WRITER_PHASE, 0)
            return True
        finally:
            self.recovery.release()


class WorkerFence:
    """Created in vLLM's worker; wraps its execute_model / sample_tokens."""

    def __init__(self, device: Any) -> None:
        tag = f"grpo-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.section: dict[str, Any] = {"turnstile": f"/{tag}-t", "mutex": f"/{tag}-m",
                                        "recovery": f"/{tag}-r", "block": f"{tag}-b",
                                        "cuda": device.type == "cuda"}
        self.objects = _Objects(self.section, create=True)
        self.cuda = self.section["cuda"]
        self._held = False
        self._event_gen = 0
        self._write_event: Any = None
        if self.cuda:
            import torch

            self.forward_event = torch.cuda.Event(interprocess=True)
            handle = self.forward_event.ipc_handle()
            self.section["forward_event_b64"] = base64.b64encode(handle).decode()
            self.section["device_index"] = device.index or 0

    def unlink(self) -> None:
        for name in (self.section["turnstile"], self.section["mutex"], self.section["recovery"]):
            with contextlib.suppress(OSError):
                _multiprocessing.sem_unlink(name)
        with contextlib.suppress(OSError):
            self.objects.block.unlink()

    def enter(self) -> None:
        o = self.objects
        if self._held:  # sample_tokens never came for the last execute_model: end that turn
            self.exit()
        self._acquire(o.turnstile)
        o.turnstile.release()
        self._acquire(o.mutex)
        self._held = True
        if self.cuda:
            event = self._trainer_event()
            if event is not None:
                import torch

                torch.cuda.current_stream().wait_event(event)

    def _acquire(self, sem: Any) -> None:
        """Acquire; while blocked, release what a writer that died inside the fence held."""
        while not sem.acquire(True, DEAD_WRITER_CHECK_S):
            self.objects.recover()

    def exit(self) -> None:
        if not self._held:
            return
        if self.cuda:
            self.forward_event.record()
        self._held = False
        self.objects.mutex.release()

    def _trainer_event(self) -> Any:
        gen = self.objects.read(EVENT_GEN)
        if gen != self._event_gen:  # the trainer published (another) event: open it
            import torch

            handle = bytes(self.objects.block.buf[EVENT_HANDLE:EVENT_HANDLE + 64])
            self._write_event = torch.cuda.Event.from_ipc_handle(
                torch.cuda.current_device(), handle)
            self._event_gen = gen
        return self._write_event

    def wrap(self, worker: Any) -> None:
        """Fence the worker's forward passes: instance attributes shadow the class's methods, so
        vLLM's executor (which looks them up on the worker) calls these."""
        execute, sample = worker.execute_model, getattr(worker, "sample_tokens", None)

        def fenced_execute(*args: Any, **kwargs: Any) -> Any:
            self.enter()
            try:
                out = execute(*args, **kwargs)
            except BaseException:
                self.exit()
                raise
            if out is not None:  # None: sample_tokens follows and reads the weights too
                self.exit()
            return out

        def fenced_sample(*args: Any, **kwargs: Any) -> Any:
            if not self._held:
                self.enter()
            try:
                return sample(*args, **kwargs)
            finally:
                self.exit()

        worker.execute_model = fenced_execute
        if sample is not None:
            worker.sample_tokens = fenced_sample


class TrainerFence:
    """Opened by the trainer from the bridge config's "fence" section."""

    def __init__(self, section: dict[str, Any], timeout_s: float = ACQUIRE_TIMEOUT_S) -> None:
        self.objects = _Objects(section, create=False)
        self.timeout_s = timeout_s
        self.cuda = bool(section.get("cuda"))
        self._lock = threading.Lock()  # one writer at a time within this process
        if self.cuda:
            import torch

            self.forward_event = torch.cuda.Event.from_ipc_handle(
                section["device_index"], base64.b64decode(section["forward_event_b64"]))
            self.write_event = torch.cuda.Event(interprocess=True)
            handle = self.write_event.ipc_handle()
            self.objects.block.buf[EVENT_HANDLE:EVENT_HANDLE + len(handle)] = handle
            self.objects.write(EVENT_GEN, self.objects.read(EVENT_GEN) + 1)

    def _acquire(self, sem: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not sem.acquire(True, DEAD_WRITER_CHECK_S):
            if sem is self.objects.turnstile:
                self.objects.recover()  # a writer before us may have died holding it
            if time.monotonic() > deadline:
                raise FenceTimeout(
                    f"vLLM's worker held the weights' {what} for {self.timeout_s:.0f} s: is "
                    "the server alive and not stuck? (restart it; the HTTP fence is used when "
                    "the bridge config has no fence section)")

    def _phase(self, phase: int) -> None:
        """What this writer holds, for recover(): written right after acquiring, right before
        releasing (phase first: a death between the two writes still names a holder)."""
        self.objects.write(WRITER_PHASE, phase)
        self.objects.write(WRITER_PID, os.getpid())

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """The block may write the weights: no forward pass runs or is launched meanwhile."""
        o = self.objects
        with self._lock:
            self._acquire(o.turnstile, "turnstile")
            self._phase(1)
            try:
                self._acquire(o.mutex, "mutex")
                self._phase(2)
                try:
                    if self.cuda:
                        import torch

                        torch.cuda.current_stream().wait_event(self.forward_event)
                    yield
                    if self.cuda:
                        self.write_event.record()
                    o.write(VERSION, o.version() + 1)
                finally:
                    self._phase(1)
                    o.mutex.release()
            finally:
                self._phase(0)
                o.turnstile.release()

    def version(self) -> int:
        return self.objects.version()


class VersionReader:
    """The weight version, for the server's /generate (salts the prefix cache, reports it)."""

    def __init__(self, section: dict[str, Any]) -> None:
        self.block = _open_block(section["block"])

    def __call__(self) -> int:
        return struct.unpack_from("<q", self.block.buf, VERSION)[0]


def install(worker: Any, device: Any) -> dict[str, Any]:
    """Create the fence in the worker, wrap its forward passes; return the config section."""
    fence = WorkerFence(device)
    fence.wrap(worker)
    worker._grpo_fence = fence
    import atexit

    atexit.register(fence.unlink)
    log.info("grpo_bridge: in-process fence %s (%s)", fence.section["mutex"],
             "CUDA IPC events" if fence.cuda else "CPU")
    return fence.section

