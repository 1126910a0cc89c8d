"""The in-process fence (vllm_patching/fence.py) between two real processes on the CPU: a
"worker" reads a two-word value, a "trainer" writes it word by word. With the fence no read is
torn; without it the same workload tears. The GPU side (IPC events): test_shared_vllm_gpu.py.
"""

from __future__ import annotations

import multiprocessing as mp
import struct
import threading
import time
from multiprocessing import shared_memory
from types import SimpleNamespace

import pytest
import torch

from vllm_patching.fence import TrainerFence, VersionReader, WorkerFence

ROUNDS = 300


def reader(section: dict, data_name: str, fenced: bool, out: mp.Queue) -> None:
    """A forward pass that reads the 'weights' twice, some time apart."""
    fence = SimpleNamespace(objects=None)
    if fenced:
        from vllm_patching.fence import _Objects

        fence = WorkerFence.__new__(WorkerFence)
        fence.objects, fence.cuda, fence._held = _Objects(section, create=False), False, False
    data = shared_memory.SharedMemory(name=data_name)
    torn = reads = 0
    deadline = time.monotonic() + 60
    while reads < ROUNDS and time.monotonic() < deadline:
        if fenced:
            fence.enter()
        a = struct.unpack_from("<q", data.buf, 0)[0]
        time.sleep(0.0002)
        b = struct.unpack_from("<q", data.buf, 8)[0]
        if fenced:
            fence.exit()
        torn += a != b
        reads += 1
    data.close()
    out.put((reads, torn))


def run(fenced: bool) -> tuple[int, int, int]:
    worker = WorkerFence(torch.device("cpu"))
    data = shared_memory.SharedMemory(create=True, size=16)
    try:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=reader, args=(worker.section, data.name, fenced, out))
        proc.start()
        trainer = TrainerFence(worker.section)
        version = VersionReader(worker.section)
        writes = 0
        while proc.is_alive() and out.empty():
            with trainer.write():
                writes += 1
                struct.pack_into("<q", data.buf, 0, writes)
                time.sleep(0.0002)  # a write that takes time, as an optimizer step does
                struct.pack_into("<q", data.buf, 8, writes)
        reads, torn = out.get(timeout=60)
        proc.join(timeout=30)
        assert version() == trainer.version() == writes
        return reads, torn, writes
    finally:
        data.close()
        data.unlink()
        worker.unlink()


def test_fenced_reads_are_never_torn():
    reads, torn, writes = run(fenced=True)
    assert reads == ROUNDS and writes > 10 and torn == 0


def test_the_same_workload_without_the_fence_tears():
    """The probe can fail: the reader that skips the fence sees half-written values."""
    reads, torn, writes = run(fenced=False)
    assert reads == ROUNDS and torn > 0


def test_a_held_fence_times_out_with_the_fix():
    worker = WorkerFence(torch.device("cpu"))
    try:
        worker.enter()  # a worker stuck inside a forward pass
        trainer = TrainerFence(worker.section, timeout_s=0.2)
        try:
            with trainer.write():
                raise AssertionError("the write must not start")
        except RuntimeError as e:
            assert "held the weights' mutex" in str(e)
        worker.exit()
        with trainer.write():  # released: the next write goes through at once
            pass
        assert trainer.version() == 1
    finally:
        worker.unlink()


def die_inside_the_fence(section: dict) -> None:
    import os
    import signal

    with TrainerFence(section).write():
        os.kill(os.getpid(), signal.SIGKILL)  # an OOM kill in the middle of optimizer.step()


@pytest.mark.parametrize("first", ["worker", "next_writer"])
def test_a_writer_killed_inside_the_fence_wedges_nothing(first):
    """Whoever comes next, vLLM's worker (generation) or a restarted trainer, gets through."""
    worker = WorkerFence(torch.device("cpu"))
    try:
        proc = mp.get_context("spawn").Process(target=die_inside_the_fence,
                                               args=(worker.section,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == -9
        # The dead writer held turnstile and mutex. Threads, so that a wedge fails the test
        # instead of hanging it.
        def next_write() -> None:
            with TrainerFence(worker.section, timeout_s=30).write():
                pass

        def next_forward() -> None:
            worker.enter()
            worker.exit()

        order = [next_forward, next_write] if first == "worker" else [next_write, next_forward]
        for step in order:
            t = threading.Thread(target=step, daemon=True)
            t.start()
            t.join(15)
            assert not t.is_alive(), f"{step.__name__} stayed blocked behind a dead writer"
        assert TrainerFence(worker.section).version() == 1  # the next write went through once
        # Nothing was released twice: a writer and a forward still exclude each other.
        assert worker.objects.mutex.acquire(False)
        assert not TrainerFence(worker.section, timeout_s=0.2).objects.mutex.acquire(False)
        worker.objects.mutex.release()
    finally:
        worker.unlink()
