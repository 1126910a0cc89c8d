"""Batching API: environments POST scored groups, the trainer GETs fixed-size batches.

Wire-compatible with atroposlib 0.4's `run-api` (atroposlib/api/server.py): same routes, bodies
and answers. Where we differ, on purpose:
- A batch is whole groups totalling exactly `batch_size` sequences: envs with a
  `min_batch_allocation` first (as atroposlib), then drawn by env weight (seeded), oldest first
  within an env. If no set of queued groups sums to `batch_size` (groups of 3, batch 8), GET /batch
  answers {"batch": null} until more data comes: never a wrong-size batch.
- The queue is bounded (--max-queue-sequences, default 16 batches): past it POST /scored_data is a
  429 and the env retries. A full queue that cannot form a batch stays full (logged).
- Bad groups (shapes, NaN) are a 422 with the reason; GET /batch before POST /register is a 409.
- One batch per GET /batch; current_step counts batches handed out (atroposlib forms all it can
  at once and advances the step by all of them).
- POST /register-env is accepted before the trainer starts, with checkpoint_interval and
  num_steps -1 until POST /register (atroposlib: "wait for trainer to start"; --wait-for-trainer).
- Groups of another size than the env's group_size are queued as they are (atroposlib buffers
  them until they add up to group_size and answers {"status": "buffered"}).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from environments.schemas import EnvIdentifier, RegisterEnv, Registration, ScoredData

log = logging.getLogger(__name__)

MIN_ENV_WEIGHT = 0.01  # atroposlib's floor: no env starves completely
QUEUE_BATCHES = 16  # default bound: this many batches of sequences
UNREGISTERED_QUEUE_SEQUENCES = 4096  # bound until /register tells us the batch size


def pick_exact(sizes: Sequence[int], target: int) -> list[int] | None:
    """Positions of items whose sizes sum to exactly `target`, preferring earlier positions.

    Takes each item in turn if the rest can still complete the sum; `reach[i]` is the bitset of
    sums that items i.. can make. None when no subset fits.
    """
    full = (1 << (target + 1)) - 1
    reach = [1] * (len(sizes) + 1)
    for i in range(len(sizes) - 1, -1, -1):
        reach[i] = (reach[i + 1] | (reach[i + 1] << sizes[i])) & full
    if not (reach[0] >> target) & 1:
        return None
    picked, left = [], target
    for i, size in enumerate(sizes):
        if 0 < size <= left and (reach[i + 1] >> (left - size)) & 1:
            picked.append(i)
            left -= size
    return picked


class QueueFull(Exception):
    pass


class BatchingState:
    """Everything the API remembers: the trainer's registration, the envs, the queue."""

    def __init__(self, max_queue_sequences: int | None, seed: int, wait_for_trainer: bool) -> None:
        self.max_queue_sequences = max_queue_sequences
        self.wait_for_trainer = wait_for_trainer
        self.rng = random.Random(seed)
        self.reset()

    def reset(self) -> None:
        self.registration: Registration | None = None
        self.envs: list[dict[str, Any]] = []
        self.queue: list[dict[str, Any]] = []  # groups in arrival order
        self.queued_sequences = 0
        self.step = 0
        self.started = False  # set by the trainer's first GET /batch
        self.latest: dict[str, Any] | None = None
        self._warned_unpackable = False

    @property
    def batch_size(self) -> int:
        return self.registration.batch_size if self.registration else 0

    @property
    def queue_limit(self) -> int:
        if self.max_queue_sequences is not None:
            return self.max_queue_sequences
        return QUEUE_BATCHES * self.batch_size or UNREGISTERED_QUEUE_SEQUENCES

    def register(self, reg: Registration) -> int:
        if self.registration is None:
            if reg.batch_size > (self.max_queue_sequences or reg.batch_size):
                raise ValueError(f"batch_size {reg.batch_size} exceeds the API's "
                                 f"--max-queue-sequences {self.max_queue_sequences}: raise it")
            self.registration, self.step = reg, reg.starting_step
            log.info("trainer registered: batch_size %d, starting_step %d, queue bound %d",
                     reg.batch_size, reg.starting_step, self.queue_limit)
        elif reg != self.registration:  # atroposlib also keeps the first (other ranks re-register)
            log.warning("ignoring a second registration with other settings: %s", reg)
        return uuid.uuid4().int

    def register_env(self, req: RegisterEnv) -> dict[str, Any]:
        env_id, reg = len(self.envs), self.registration
        name = f"{req.desired_name}_{sum(e['desired_name'] == req.desired_name for e in self.envs)}"
        self.envs.append({"max_context_len": req.max_token_length, "weight": req.weight,
                          "desired_name": req.desired_name, "real_name": name,
                          "registered_id": env_id, "last_update": time.time(), "connected": True,
                          "min_batch_allocation": req.min_batch_allocation,
                          "group_size": req.group_size})
        log.info("env %d registered as %s (weight %g)", env_id, name, req.weight)
        return {"status": "success", "env_id": env_id, "wandb_name": name,
                "checkpoint_dir": reg.checkpoint_dir if reg else "", "starting_step": self.step,
                "checkpoint_interval": reg.save_checkpoint_interval if reg else -1,
                "num_steps": reg.num_steps if reg else -1}

    def enqueue(self, groups: list[ScoredData]) -> None:
        """All or nothing: the whole request is queued, or QueueFull / ValueError is raised."""
        for g in groups:
            if self.batch_size and len(g.tokens) > self.batch_size:
                raise ValueError(f"a group of {len(g.tokens)} sequences can never fit a batch "
                                 f"of {self.batch_size}")
        offered = sum(len(g.tokens) for g in groups)
        if self.queued_sequences + offered > self.queue_limit:
            raise QueueFull(f"queue full: {self.queued_sequences} of {self.queue_limit} sequences "
                            f"queued, {offered} offered; retry after the trainer takes a batch")
        self.queue.extend(g.model_dump() for g in groups)
        self.queued_sequences += offered
        self.latest = self.queue[-1]

    def _weight(self, env_id: int | None) -> float:
        known = env_id is not None and 0 <= env_id < len(self.envs)
        return max(MIN_ENV_WEIGHT, self.envs[env_id]["weight"]) if known else 1.0

    def _min_sequences(self) -> dict[int, int]:
        mins = {e["registered_id"]: int(self.batch_size * e["min_batch_allocation"])
                for e in self.envs if e["connected"] and e["min_batch_allocation"] is not None}
        mins = {k: v for k, v in mins.items() if v > 0}
        total = sum(mins.values())
        if total > self.batch_size:  # over-subscribed: scale down, at least one group each
            mins = {k: max(1, v * self.batch_size // total) for k, v in mins.items()}
        return mins

    def _priority_order(self) -> list[int] | None:
        """Queue positions in the order a batch should draw them; None to wait."""
        by_env: dict[int | None, deque[int]] = {}
        for i, g in enumerate(self.queue):
            by_env.setdefault(g["env_id"], deque()).append(i)
        order: list[int] = []
        for env_id, min_seqs in self._min_sequences().items():
            pending = by_env.get(env_id)
            if not pending:
                return None  # as atroposlib: an env with a minimum share and no data holds batches
            taken = 0
            while pending and taken < min_seqs:
                order.append(pending.popleft())
                taken += len(self.queue[order[-1]]["tokens"])
        keys = [k for k, pending in by_env.items() if pending]
        while len(keys) > 1:  # weighted interleave; each env stays oldest first
            k = self.rng.choices(keys, weights=[self._weight(k) for k in keys])[0]
            order.append(by_env[k].popleft())
            if not by_env[k]:
                keys.remove(k)
        return order + [i for k in keys for i in by_env[k]]

    def next_batch(self) -> list[dict[str, Any]] | None:
        self.started = True
        order = self._priority_order() if self.queued_sequences >= self.batch_size else None
        picked = order and pick_exact([len(self.queue[i]["tokens"]) for i in order],
                                      self.batch_size)
        if not picked:
            if order and not self._warned_unpackable:
                log.warning("%d sequences queued but no whole groups add up to batch_size %d; "
                            "waiting for more", self.queued_sequences, self.batch_size)
                self._warned_unpackable = True
            return None
        chosen = {order[p] for p in picked}
        batch = [g for i, g in enumerate(self.queue) if i in chosen]  # in arrival order
        self.queue = [g for i, g in enumerate(self.queue) if i not in chosen]
        self.queued_sequences -= self.batch_size
        self.step += 1
        self._warned_unpackable = False
        log.info("step %d: batch of %d groups; %d sequences still queued", self.step, len(batch),
                 self.queued_sequences)
        return batch

    def status_env(self, env_id: int) -> dict[str, Any]:
        """atroposlib's /status-env numbers: how much of the queue this env may count as its own."""
        env, connected = self.envs[env_id], [e for e in self.envs if e["connected"]]
        total = sum(e["max_context_len"] * max(0.0, e["weight"]) for e in connected)
        share = env["max_context_len"] * env["weight"] / total if total > 0 else 0.0
        allocs = {e["registered_id"]: e["min_batch_allocation"] for e in connected
                  if e["min_batch_allocation"] is not None}
        max_group = max([1, *(len(g["tokens"]) for g in self.queue)])
        own = [len(g["tokens"]) for g in self.queue if g["env_id"] == env_id]
        env["group_size"] = max([env["group_size"], *own])  # atroposlib tracks dynamic sizes so
        others: dict[int | None, int] = {}
        for g in self.queue:
            if g["env_id"] != env_id:
                others[g["env_id"]] = others.get(g["env_id"], 0) + len(g["tokens"])
        available = 0
        if max_group > 1:  # other envs' data counts in packs of the largest group, less minimums
            for other, seqs in others.items():
                min_seqs = int(self.batch_size * allocs.get(other, 0.0))
                available += max(0, math.ceil(seqs / max_group) * max_group - min_seqs)
        size = env["group_size"]
        return {"current_step": self.step, "queue_size": (sum(own) + available) // size,
                "unallocated_fraction": 1.0 - min(sum(allocs.values()), 1.0),
                "self_queue_size": sum(own) // size, "max_group_size": max_group,
                "env_weight": max(MIN_ENV_WEIGHT, share)}


class GzipRequestMiddleware:
    """Inflates gzip request bodies: atroposlib 0.4 envs gzip payloads of 1 KiB and more."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = scope["type"] == "http"
        if not http or "gzip" not in Headers(scope=scope).get("content-encoding", "").lower():
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        try:
            body = gzip.decompress(b"".join(chunks))
        except (OSError, EOFError):
            bad = JSONResponse({"detail": "invalid gzip request body"}, 400)
            return await bad(scope, receive, send)
        headers = [h for h in scope["headers"]
                   if h[0] not in (b"content-encoding", b"content-length")]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        first = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> dict[str, Any]:  # the body once, then the client's own messages
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)


def create_app(max_queue_sequences: int | None = None, seed: int = 0,
               wait_for_trainer: bool = False) -> FastAPI:
    """The API over one fresh BatchingState (kept on `app.state.batching`)."""
    app = FastAPI(title="Batching API (Atropos-compatible)")
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    app.add_middleware(GzipRequestMiddleware)
    state = app.state.batching = BatchingState(max_queue_sequences, seed, wait_for_trainer)

    def error(code: int, detail: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"detail": detail, **extra}, code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the whole input back: megabytes for a big group.
        return JSONResponse({"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                                        for e in exc.errors()]}, 422)

    def enqueue(groups: list[ScoredData], answer: dict) -> dict | JSONResponse:
        try:
            state.enqueue(groups)
        except QueueFull as e:
            log.info("%s", e)
            return JSONResponse({"detail": str(e), "status": "queue full"}, 429,
                                headers={"Retry-After": "1"})  # clients back off, then retry
        except ValueError as e:
            return error(422, str(e))
        return answer

    @app.get("/")
    async def root() -> dict:
        return {"message": "AtroposLib API"}

    @app.post("/register", response_model=None)
    async def register(reg: Registration) -> dict | JSONResponse:
        try:
            return {"uuid": state.register(reg)}
        except ValueError as e:
            return error(422, str(e))

    @app.post("/register-env")
    async def register_env(req: RegisterEnv) -> dict:
        if state.wait_for_trainer and not state.started:
            return {"status": "wait for trainer to start"}
        return state.register_env(req)

    @app.post("/disconnect-env")
    async def disconnect_env(req: EnvIdentifier) -> dict:
        if not 0 <= req.env_id < len(state.envs):
            return {"status": "failure", "error": f"unknown env_id {req.env_id}"}
        state.envs[req.env_id]["connected"] = False
        log.info("env %d disconnected", req.env_id)
        return {"status": "success"}

    @app.get("/wandb_info")
    async def wandb_info() -> dict:
        reg = state.registration
        return {"group": reg and reg.wandb_group, "project": reg and reg.wandb_project}

    @app.get("/info")
    async def info() -> dict:
        reg = state.registration
        return {"batch_size": reg.batch_size if reg else -1,
                "max_token_len": reg.max_token_len if reg else -1}

    @app.get("/batch", response_model=None)
    async def batch() -> dict | JSONResponse:
        if state.registration is None:
            msg = "trainer not registered: call POST /register first"
            return error(409, msg, status="error", message=msg)
        return {"batch": state.next_batch()}

    @app.get("/latest_example")
    async def latest_example() -> dict:
        return state.latest or {k: [] for k in ("tokens", "masks", "scores", "advantages",
                                                "ref_logprobs", "generation_params",
                                                "inference_logprobs", "messages", "images")}

    @app.post("/scored_data", response_model=None)
    async def scored_data(group: ScoredData) -> dict | JSONResponse:
        return enqueue([group], {"status": "received"})

    @app.post("/scored_data_list", response_model=None)
    async def scored_data_list(groups: list[ScoredData]) -> dict | JSONResponse:
        return enqueue(groups, {"status": "received", "groups_processed": len(groups)})

    @app.get("/status")
    async def status() -> dict:
        return {"current_step": state.step, "queue_size": len(state.queue),
                "queue_sequences": state.queued_sequences, "max_queue_sequences": state.queue_limit}

    @app.get("/status-env", response_model=None)
    async def status_env(request: Request) -> dict | JSONResponse:
        # atroposlib's envs send {"env_id": n} as the JSON body of this GET; ?env_id=n works too.
        raw: Any = dict(request.query_params)
        body = await request.body()
        try:
            env_id = EnvIdentifier.model_validate(
                json.loads(body) if body and "env_id" not in raw else raw).env_id
        except (ValueError, ValidationError) as e:
            return error(422, f"send env_id as a JSON body or query parameter: {e}")
        if not 0 <= env_id < len(state.envs):
            return error(404, f"unknown env_id {env_id}: POST /register-env first")
        return state.status_env(env_id)

    @app.get("/reset_data")
    async def reset_data() -> PlainTextResponse:
        state.reset()
        log.info("state reset")
        return PlainTextResponse("Reset successful")

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m environments.api_server",
        description="Atropos-compatible batching API: envs POST /scored_data, the trainer GETs "
                    "/batch.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (atroposlib binds 0.0.0.0; default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--max-queue-sequences", type=int, default=None, metavar="N",
                        help=f"bound on queued sequences; POST /scored_data answers 429 past it "
                             f"(default: {QUEUE_BATCHES} x batch_size, "
                             f"{UNREGISTERED_QUEUE_SEQUENCES} until the trainer registers)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weighted draw between envs (default: %(default)s)")
    parser.add_argument("--wait-for-trainer", action="store_true",
                        help="answer POST /register-env 'wait for trainer to start' until the "
                             "first GET /batch, as atroposlib does")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"], help="%(default)s")
    args = parser.parse_args(argv)
    if args.max_queue_sequences is not None and args.max_queue_sequences <= 0:
        parser.error("--max-queue-sequences must be positive")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args.max_queue_sequences, args.seed, args.wait_for_trainer)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
