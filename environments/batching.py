"""What the batching API remembers and how it forms batches, without HTTP (the routes are in
environments/api_server.py).

Every queued group has already passed ScoredData's checks and is kept as the JSON bytes that
GET /batch will send, encoded once at the door: forming a batch only joins bytes, so it cannot
fail half-way and lose the groups it popped.

How a batch is chosen from the queue: environments/batch_plan.py.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

from environments.batch_plan import (
    BATCH_ORDERS,
    atropos_env_status,
    min_shares,
    pick_exact,
    priority_order,
    reachable,
)
from environments.schemas import RegisterEnv, Registration, ScoredData

log = logging.getLogger(__name__)

QUEUE_BATCHES = 16  # default bound: this many batches of sequences
UNREGISTERED_QUEUE_SEQUENCES = 4096  # bound until /register tells us the batch size
DEFAULT_QUEUE_BYTES = 1 << 30
# Settings that decide what the queue may hold and what a batch is: a second /register that
# changes one of them would get batches built for another trainer.
BATCH_SHAPING = ("batch_size", "max_token_len", "vocab_size")


class Rejected(ValueError):
    """Data or settings this API can never take as they are (422, with the reason)."""


def _unknown(value: Any) -> bool:
    """A registration value that says "not known": vocab_size None, max_token_len <= 0."""
    return value is None or (isinstance(value, int) and value <= 0)


class QueueFull(Exception):
    """Valid data that does not fit now; the client should retry (503 + Retry-After)."""


class UnknownEnv(LookupError):
    """An env_id this API never issued (it restarted or was reset): register again (409)."""


class RegistrationConflict(Exception):
    """A second /register whose batch-shaping settings differ from the first (409)."""


@dataclass(frozen=True)
class QueuedGroup:
    env_id: int | None
    size: int  # sequences
    longest: int  # tokens in the longest sequence
    max_token_id: int
    payload: bytes  # the group as GET /batch sends it
    version: int | None = None  # its oldest sequence's weight version, if it carries one

    @classmethod
    def from_scored(cls, group: ScoredData) -> QueuedGroup:
        return cls(group.env_id, len(group.tokens), max(map(len, group.tokens)),
                   group.max_token_id(), group.model_dump_json().encode(),
                   group.oldest_weight_version())


@dataclass
class EnvSlot:
    env_id: int
    desired_name: str
    real_name: str
    max_context_len: int
    weight: float
    group_size: int
    min_batch_allocation: float | None
    connected: bool = True


class BatchingState:
    """Everything the API remembers: the trainer's registration, the envs, the queue."""

    def __init__(self, max_queue_sequences: int | None = None,
                 max_queue_bytes: int = DEFAULT_QUEUE_BYTES, seed: int = 0,
                 wait_for_trainer: bool = True, env_id_base: int | None = None) -> None:
        self.max_queue_sequences = max_queue_sequences
        self.max_queue_bytes = max_queue_bytes
        self.wait_for_trainer = wait_for_trainer
        self.fixed_env_id_base = env_id_base
        self.rng = random.Random(seed)
        self.reset()

    def reset(self) -> None:
        self.registration: Registration | None = None
        self.envs: dict[int, EnvSlot] = {}
        self.queue: list[QueuedGroup] = []  # in arrival order
        self.queued_sequences = self.queued_bytes = 0
        self.step = 0
        self.started = False  # set by the trainer's first GET /batch
        self.latest: bytes | None = None
        self._warned_unpackable = False
        # env_ids from another API process (or before a reset) are never valid here, so an env
        # that outlived us gets 409 "unknown env_id" and registers again instead of posting
        # under another env's id.
        base = self.fixed_env_id_base
        self.env_id_base = base if base is not None else random.SystemRandom().randrange(
            1, 1 << 20) * 1000

    @property
    def batch_size(self) -> int:
        return self.registration.batch_size if self.registration else 0

    @property
    def queue_limit(self) -> int:
        if self.max_queue_sequences is not None:
            return self.max_queue_sequences
        return QUEUE_BATCHES * self.batch_size or UNREGISTERED_QUEUE_SEQUENCES

    # ---- registration -------------------------------------------------------------------------
    def register(self, reg: Registration) -> dict[str, Any]:
        if self.registration is not None:
            return self._register_again(reg)
        if reg.batch_size > (self.max_queue_sequences or reg.batch_size):
            raise Rejected(f"batch_size {reg.batch_size} exceeds the API's "
                             f"--max-queue-sequences {self.max_queue_sequences}: raise it")
        self.registration, self.step = reg, reg.starting_step
        dropped = [g for g in self.queue if self._unfit(g)]
        if dropped:  # queued before the trainer said what it can take
            log.warning("dropped %d queued groups the trainer cannot use: %s", len(dropped),
                        self._unfit(dropped[0]))
            self._remove(set(map(id, dropped)))
        log.info("trainer registered: batch_size %d, max_token_len %d, vocab_size %s, "
                 "starting_step %d, queue bound %d", reg.batch_size, reg.max_token_len,
                 reg.vocab_size, reg.starting_step, self.queue_limit)
        return {"uuid": uuid.uuid4().int}

    def _register_again(self, reg: Registration) -> dict[str, Any]:
        """Other ranks, or a restarted or resumed trainer. Settings that shape batches must
        agree; one the first left unknown (vocab_size None, max_token_len <= 0) is learned if
        everything queued fits it; the others are kept from the first (as atroposlib does)."""
        assert self.registration is not None
        first, now = self.registration.model_dump(), reg.model_dump()
        learned = {k: now[k] for k in BATCH_SHAPING if _unknown(first[k]) and not _unknown(now[k])}
        learning = self.registration.model_copy(update=learned)
        conflicts = [k for k in BATCH_SHAPING if k not in learned and not _unknown(now[k])
                     and first[k] != now[k]]
        if learned and any(self._unfit(g, learning) for g in self.queue):
            conflicts += list(learned)  # queued groups were taken without that check
        if conflicts:
            raise RegistrationConflict(
                "the API already serves a trainer with other "
                + ", ".join(f"{k} ({first[k]} registered, {now[k]} sent)" for k in conflicts)
                + ": restart the trainer with the same settings, or POST /reset_data first")
        if learned:
            log.info("second /register: now also checking %s", learned)
            self.registration = learning
        kept = [k for k in first if first[k] != now[k] and k not in BATCH_SHAPING]
        if kept:
            log.warning("second /register: kept the first registration's %s", kept)
        return {"uuid": uuid.uuid4().int, **({"kept_first": kept} if kept else {})}

    def register_env(self, req: RegisterEnv) -> dict[str, Any]:
        if self.wait_for_trainer and not self.started:
            return {"status": "wait for trainer to start"}
        env_id, reg = self.env_id_base + len(self.envs), self.registration
        same = sum(e.desired_name == req.desired_name for e in self.envs.values())
        slot = EnvSlot(env_id, req.desired_name, f"{req.desired_name}_{same}",
                       req.max_token_length, req.weight, req.group_size, req.min_batch_allocation)
        self.envs[env_id] = slot  # the last step: a failure above leaves no phantom env
        log.info("env %d registered as %s (weight %g)", env_id, slot.real_name, req.weight)
        return {"status": "success", "env_id": env_id, "wandb_name": slot.real_name,
                "checkpoint_dir": reg.checkpoint_dir if reg else "", "starting_step": self.step,
                "checkpoint_interval": reg.save_checkpoint_interval if reg else -1,
                "num_steps": reg.num_steps if reg else -1}

    def env(self, env_id: int) -> EnvSlot:
        if env_id not in self.envs:
            raise UnknownEnv(f"unknown env_id {env_id}: this API never issued it (restarted or "
                             "reset?); POST /register-env again and use the new env_id")
        return self.envs[env_id]

    # ---- the queue ----------------------------------------------------------------------------
    def _unfit(self, g: QueuedGroup, reg: Registration | None = None) -> str | None:
        """Why the registered trainer (or `reg`) could never use `g`, or None."""
        reg = reg or self.registration
        if reg is None:
            return None
        if g.size > reg.batch_size:
            return f"a group of {g.size} sequences can never fit a batch of {reg.batch_size}"
        if 0 < reg.max_token_len < g.longest:
            return (f"a sequence of {g.longest} tokens exceeds the trainer's max_token_len "
                    f"{reg.max_token_len}")
        if reg.vocab_size is not None and g.max_token_id >= reg.vocab_size:
            return f"token id {g.max_token_id} is outside the trainer's vocab_size {reg.vocab_size}"
        return None

    def enqueue(self, groups: list[QueuedGroup]) -> None:
        """All or nothing: every group is queued, or UnknownEnv / Rejected / QueueFull."""
        if not groups:
            return
        for g in groups:
            if g.env_id is not None:
                self.env(g.env_id)
            reason = self._unfit(g) or (
                f"a group of {len(g.payload)} bytes exceeds the queue's byte bound "
                f"{self.max_queue_bytes}" if len(g.payload) > self.max_queue_bytes else None)
            if reason:
                raise Rejected(reason)
        offered = sum(g.size for g in groups)
        nbytes = sum(len(g.payload) for g in groups)
        if (self.queued_sequences + offered > self.queue_limit
                or self.queued_bytes + nbytes > self.max_queue_bytes) and not self._unjams(groups):
            raise QueueFull(
                f"queue full: {self.queued_sequences} of {self.queue_limit} sequences and "
                f"{self.queued_bytes} of {self.max_queue_bytes} bytes queued, {offered} sequences "
                f"({nbytes} bytes) offered; retry after the trainer takes a batch")
        self.queue.extend(groups)
        self.queued_sequences += offered
        self.queued_bytes += nbytes
        self.latest = groups[-1].payload

    def _unjams(self, groups: list[QueuedGroup]) -> bool:
        """Past the bound, a queue that can form no batch would refuse everything and serve
        nothing, forever. So it still takes a request that completes a batch, or, within one
        batch of overshoot, one that lets its groups reach a sum they could not reach before:
        a step towards a batch, and there are at most batch_size such steps."""
        offered = sum(g.size for g in groups)
        if not self.batch_size or offered > self.batch_size or self._plan(self.queue) is not None:
            return False
        if self._plan(self.queue + groups) is not None:
            return True
        over = self.queued_sequences + offered - self.queue_limit
        fits_bytes = self.queued_bytes + sum(len(g.payload) for g in groups) <= self.max_queue_bytes
        before = reachable([g.size for g in self.queue], self.batch_size)
        after = reachable([g.size for g in self.queue + groups], self.batch_size)
        return over <= self.batch_size and fits_bytes and after != before

    def _plan(self, queue: list[QueuedGroup]) -> list[int] | None:
        """Queue positions of one exact batch (order ignored), or None; draws no random numbers."""
        if self._held(queue):
            return None
        return pick_exact([g.size for g in queue], self.batch_size)

    def _held(self, queue: list[QueuedGroup]) -> bool:
        # As atroposlib: an env with a minimum share and no data queued holds batches back.
        present = {g.env_id for g in queue}
        return any(env_id not in present
                   for env_id in min_shares(self.batch_size, self.envs.values()))

    def next_batch(self, order: str = "fifo") -> bytes | None:
        """One exact batch as a JSON array, removed from the queue; None to wait."""
        self.started = True
        if self.queued_sequences < self.batch_size or self._plan(self.queue) is None:
            if self.queued_sequences >= self.batch_size and not self._warned_unpackable:
                log.warning("%d sequences queued but no whole groups add up to batch_size %d; "
                            "waiting for more", self.queued_sequences, self.batch_size)
                self._warned_unpackable = True
            return None
        ranked = priority_order(self.queue, self.envs, self.batch_size, self.rng,
                                BATCH_ORDERS[order](self.queue))
        picked = pick_exact([self.queue[i].size for i in ranked], self.batch_size)
        assert picked is not None  # _plan found a subset; any order finds one
        chosen = {ranked[p] for p in picked}
        batch = [g for i, g in enumerate(self.queue) if i in chosen]  # in arrival order
        body = b"[" + b",".join(g.payload for g in batch) + b"]"  # built before anything is popped
        self._remove({id(g) for g in batch})
        self.step += 1
        self._warned_unpackable = False
        log.info("step %d: batch of %d groups; %d sequences still queued", self.step, len(batch),
                 self.queued_sequences)
        return body

    def _remove(self, ids: set[int]) -> None:
        gone = [g for g in self.queue if id(g) in ids]
        self.queue = [g for g in self.queue if id(g) not in ids]
        self.queued_sequences -= sum(g.size for g in gone)
        self.queued_bytes -= sum(len(g.payload) for g in gone)

    # ---- what clients read --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"current_step": self.step, "queue_size": len(self.queue),
                "queue_sequences": self.queued_sequences, "max_queue_sequences": self.queue_limit,
                "queue_bytes": self.queued_bytes, "max_queue_bytes": self.max_queue_bytes}

    def status_env(self, env_id: int) -> dict[str, Any]:
        """atroposlib's /status-env numbers (its envs throttle on them), plus ours."""
        env = self.env(env_id)
        return {"current_step": self.step,
                **atropos_env_status(self.queue, self.envs.values(), env, self.batch_size),
                # Ours (atroposlib's envs ignore unknown keys): the raw numbers.
                "batch_size": self.batch_size or -1, "queue_sequences": self.queued_sequences,
                "max_queue_sequences": self.queue_limit, "group_size": env.group_size}
