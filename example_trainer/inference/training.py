"""The server's side of in-server training: the job queue and the training worker's life.

Routes (train_routes.py) call submit / status / request from the event loop; none of them
blocks: jobs wait in a bounded deque here and go to the worker (example_trainer/sft_worker.py,
a spawned process) one at a time, over two multiprocessing queues. A pump thread reads the
worker's events, updates the job table, and notices a dead worker: its running job is marked
failed and a new worker is started, which puts the served weights back to the last checkpoint.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import multiprocessing as mp
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from example_trainer import sft_worker
from example_trainer.sft_worker import WorkerSettings

log = logging.getLogger("example_trainer.vllm_api_server")

MAX_JOBS_KEPT = 1000  # finished jobs remembered for GET /status/{job_id}
START_FAILURES_MAX = 3  # consecutive worker start failures before training is given up


class TrainingUnavailable(RuntimeError):
    """503: the worker is not running (starting, restarting, or given up)."""


class Busy(RuntimeError):
    """409 (a job runs or waits) or 429 (the queue is full)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _changes_weights(event: dict[str, Any]) -> bool:
    return event["event"] in ("ready", "reply") or event.get("status") in ("completed", "failed")


class TrainingService:
    def __init__(self, settings: WorkerSettings, queue_size: int,
                 on_weights_changed: Callable[[], None]) -> None:
        self.settings = settings
        self.queue_size = queue_size
        self.on_weights_changed = on_weights_changed  # blocking: resets vLLM's prefix cache
        self.lock = threading.Lock()
        self.jobs: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self.running: str | None = None
        self.state = "starting"  # starting | idle | busy | failed
        self.error: str | None = None
        self.restarts = 0
        self.start_failures = 0
        self.worker_pid: int | None = None
        self.optimizer_steps = 0
        self.current: str | None = None
        self.replies: dict[str, concurrent.futures.Future] = {}
        self._stopping = False
        self._spawn()
        self._pump_thread = threading.Thread(target=self._pump, name="train-pump", daemon=True)
        self._pump_thread.start()

    # ---- the worker process -------------------------------------------------------------------
    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        self.commands, self.events = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=sft_worker.main, name="grpo-train-worker", daemon=True,
                                args=(self.settings, self.commands, self.events))
        self.proc.start()
        log.info("training worker started (pid %d)", self.proc.pid)

    def _pump(self) -> None:
        while not self._stopping:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                if not self.proc.is_alive() and not self._stopping:
                    self._on_death(self.proc.exitcode)
                continue
            if _changes_weights(event):
                # Before anyone is told: no prefix-cache block of the old weights is reused.
                self.on_weights_changed()
            with self.lock:
                self._handle(event)
                self._dispatch()

    def _on_death(self, code: int | None) -> None:
        why = f"the training worker (pid {self.proc.pid}) died with exit code {code}"
        if code == -9:
            why += " (SIGKILL: out of memory?)"
        log.error("%s", why)
        with self.lock:
            if self.running is not None:
                self._finish(self.running, "failed", error=f"{why}; the served weights go back "
                             f"to {self.current} when the next worker starts")
            for fut in self.replies.values():
                fut.set_exception(TrainingUnavailable(why))
            self.replies.clear()
            self.start_failures += self.state == "starting"
            if self.start_failures >= START_FAILURES_MAX:
                self.state, self.error = "failed", f"{why}; gave up after {self.start_failures} " \
                    "failed starts (see the server log)"
                self._stopping = True
                return
            self.state, self.restarts = "starting", self.restarts + 1
            self._spawn()

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "fatal":
            self.error = event["error"]
        elif kind == "ready":
            self.state, self.start_failures, self.error = "idle", 0, None
            self.worker_pid, self.current = event["pid"], event["current"]
            self.optimizer_steps = event["optimizer_steps"]
            log.info("training worker ready in %.1f s: %s, %d optimizer steps", event["seconds"],
                     self.current, self.optimizer_steps)
        elif kind == "idle":
            self.state, self.running = "idle", None
            self.optimizer_steps, self.current = event["optimizer_steps"], event["current"]
        elif kind == "reply":
            fut = self.replies.pop(event["req_id"], None)
            if fut is not None:
                fut.set_result(event)
        elif kind == "job":
            job = self.jobs.get(event["job_id"])
            if job is None:
                return
            if "loss" in event:
                job["loss_history"].append(event["loss"])
            if event.get("status") == "running":
                job.update(status="running", started_at=time.time(),
                           optimizer_steps_before=event["optimizer_steps_before"])
            elif event.get("status") in ("completed", "failed"):
                self._finish(job["job_id"], event["status"], error=event.get("error"),
                             checkpoint_path=event.get("checkpoint_path"))

    def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        job = self.jobs[job_id]
        job.update(status=status, finished_at=time.time(),
                   **{k: v for k, v in fields.items() if v is not None})
        if self.running == job_id:
            self.running = None

    def _dispatch(self) -> None:
        """Hand the next job to an idle worker (under self.lock)."""
        if self.state != "idle" or not self.pending:
            return
        job_id, payload = self.pending.popleft()
        self.running, self.state = job_id, "busy"
        self.commands.put({"op": "train", "job_id": job_id, **payload})

    # ---- what the routes call -----------------------------------------------------------------
    def _available(self) -> None:
        if self.state == "failed":
            raise TrainingUnavailable(f"in-server training is down: {self.error}")

    def submit(self, samples: list[dict[str, str]], config: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._available()
            if len(self.pending) >= self.queue_size:
                raise Busy(f"{len(self.pending)} jobs are waiting (--training-queue-size "
                           f"{self.queue_size}): retry when one has started", 429)
            job_id = uuid.uuid4().hex[:16]
            self.jobs[job_id] = {"job_id": job_id, "status": "queued",
                                 "training_samples": len(samples), "loss_history": [],
                                 "checkpoint_path": None, "config": config,
                                 "created_at": time.time()}
            while len(self.jobs) > MAX_JOBS_KEPT:
                self.jobs.popitem(last=False)
            self.pending.append((job_id, {"samples": samples, "config": config}))
            position = len(self.pending) - 1 + (self.running is not None)
            self._dispatch()
            return {"job_id": job_id, "status": "accepted",
                    "message": f"queued; {position} job(s) ahead of it"}

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            job = self.jobs.get(job_id)
            return None if job is None else {**job, "loss_history": list(job["loss_history"])}

    def overview(self) -> dict[str, Any]:
        with self.lock:
            return {"worker": {"state": self.state, "pid": self.worker_pid,
                               "restarts": self.restarts, "error": self.error,
                               "optimizer": self.settings.optimizer,
                               "optimizer_steps": self.optimizer_steps},
                    "current_job": self.running, "queue": [j for j, _ in self.pending],
                    "current_checkpoint": self.current,
                    "training_dir": self.settings.training_dir}

    async def request(self, op: str, timeout_s: float = 600.0, **fields: Any) -> dict[str, Any]:
        """A checkpoint or restore, run by the worker between jobs (409 while one runs)."""
        with self.lock:
            self._available()
            if self.state != "idle" or self.pending:
                raise Busy(f"the training worker is {self.state} (job {self.running}, "
                           f"{len(self.pending)} waiting): retry when GET /train/status says "
                           "idle", 409)
            req_id = uuid.uuid4().hex
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self.replies[req_id] = fut
            self.state = "busy"
            self.commands.put({"op": op, "req_id": req_id, **fields})
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)

    def stop(self) -> None:
        self._stopping = True
        if self.proc.is_alive():
            self.commands.put({"op": "stop"})
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
