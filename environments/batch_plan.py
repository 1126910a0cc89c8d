"""Which queued groups make the next batch: exact subset sums (a batch is whole groups totalling
exactly batch_size sequences) and the draw order that honours env weights and minimum shares,
as atroposlib's run-api does; within an env oldest first (atroposlib) or, on request, freshest
first. Pure functions of the queue; tested without HTTP.

Batches are whole groups totalling exactly `batch_size` sequences. If any set of queued groups
sums to `batch_size`, GET /batch forms one (pick_exact searches all subsets). What can remain
queued: groups whose sizes cannot complete a batch with the others (sizes 3 and 3 for a batch
of 8, or the tail of a run), and everything while an env with a min_batch_allocation has nothing
queued (atroposlib holds batches for it the same way). Group sizes where each divides the next
(1, 2, 4, 8 for a batch of 8) always pack: then fewer than batch_size sequences remain. Other
mixes (only 5s and 6s for a batch of 8) may never pack, and a full queue of them takes only
groups that bring a batch closer (see _unjams); the envs posting the rest wait on 503.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MIN_ENV_WEIGHT = 0.01  # atroposlib's floor: no env starves completely


def reachable(sizes: Sequence[int], target: int) -> int:
    """Bitset of the sums up to `target` that subsets of `sizes` can make (bit k: sum k)."""
    reach, full = 1, (1 << (target + 1)) - 1
    for size in sizes:
        reach = (reach | (reach << size)) & full
    return reach


def pick_exact(sizes: Sequence[int], target: int) -> list[int] | None:
    """Positions of items whose sizes sum to exactly `target`, preferring earlier positions.

    Takes each item in turn if the rest can still complete the sum; `reach[i]` is the bitset of
    sums that items i.. can make. None when no subset fits.
    """
    full = (1 << (target + 1)) - 1
    reach = [1] * (len(sizes) + 1)
    for i in range(len(sizes) - 1, -1, -1):
        reach[i] = (reach[i + 1] | (reach[i + 1] << sizes[i])) & full
    if target <= 0 or not (reach[0] >> target) & 1:
        return None
    picked, left = [], target
    for i, size in enumerate(sizes):
        if 0 < size <= left and (reach[i + 1] >> (left - size)) & 1:
            picked.append(i)
            left -= size
    return picked



def min_shares(batch_size: int, envs: Iterable[Any]) -> dict[int, int]:
    """Sequences per batch each connected env with a min_batch_allocation is owed."""
    mins = {e.env_id: int(batch_size * e.min_batch_allocation)
            for e in envs if e.connected and e.min_batch_allocation is not None}
    mins = {k: v for k, v in mins.items() if v > 0}
    total = sum(mins.values())
    if total > batch_size:  # over-subscribed: scale down, at least one group each
        mins = {k: max(1, v * batch_size // total) for k, v in mins.items()}
    return mins


def env_weight(envs: Mapping[int, Any], env_id: int | None) -> float:
    env = envs.get(env_id) if env_id is not None else None
    return max(MIN_ENV_WEIGHT, env.weight) if env else 1.0


def fifo(queue: Sequence[Any]) -> list[int]:
    """Oldest arrival first (atroposlib's order)."""
    return list(range(len(queue)))


def freshest(queue: Sequence[Any]) -> list[int]:
    """Newest weights first: by the group's oldest weight version, then latest arrival; groups
    without a version come after those with one, latest arrival first."""
    return sorted(range(len(queue)), reverse=True,
                  key=lambda i: (queue[i].version is not None, queue[i].version or 0, i))


# GET /batch?order=...: the order in which each env's queued groups are offered to a batch.
BATCH_ORDERS = {"fifo": fifo, "freshest": freshest}


def priority_order(queue: Sequence[Any], envs: Mapping[int, Any], batch_size: int,
                   rng: random.Random, within_env: Sequence[int] | None = None) -> list[int]:
    """Queue positions in the order a batch should draw them: each env's minimum share
    first, then a draw weighted by env weight (seeded); within an env, in the order of
    `within_env` (queue positions; default oldest first)."""
    by_env: dict[int | None, deque[int]] = {}
    for i in range(len(queue)) if within_env is None else within_env:
        by_env.setdefault(queue[i].env_id, deque()).append(i)
    order: list[int] = []
    for env_id, min_seqs in min_shares(batch_size, envs.values()).items():
        pending, taken = by_env[env_id], 0
        while pending and taken < min_seqs:
            order.append(pending.popleft())
            taken += queue[order[-1]].size
    keys = [k for k, pending in by_env.items() if pending]
    while len(keys) > 1:
        k = rng.choices(keys, weights=[env_weight(envs, k) for k in keys])[0]
        order.append(by_env[k].popleft())
        if not by_env[k]:
            keys.remove(k)
    return order + [i for k in keys for i in by_env[k]]


def atropos_env_status(queue: Sequence[Any], envs: Iterable[Any], env: Any, batch_size: int
                       ) -> dict[str, Any]:
    """atroposlib's /status-env numbers for `env` (its envs start no new group while
    queue_size * group_size >= max_batches_offpolicy * batch_size). Updates env.group_size to
    the largest group it queued, as atroposlib tracks dynamic group sizes."""
    connected = [e for e in envs if e.connected]
    total = sum(e.max_context_len * max(0.0, e.weight) for e in connected)
    share = env.max_context_len * max(0.0, env.weight) / total if total > 0 else 0.0
    mins = {e.env_id: int(batch_size * e.min_batch_allocation) for e in connected
            if e.min_batch_allocation is not None}
    max_group = max([1, *(g.size for g in queue)])
    own = sum(g.size for g in queue if g.env_id == env.env_id)
    env.group_size = max([env.group_size, *(g.size for g in queue if g.env_id == env.env_id)])
    others: dict[int | None, int] = {}
    for g in queue:
        if g.env_id != env.env_id:
            others[g.env_id] = others.get(g.env_id, 0) + g.size
    available = 0
    if max_group > 1:  # other envs' data counts in packs of the largest group, less minimums
        for other, seqs in others.items():
            packs = -(-seqs // max_group)
            available += max(0, packs * max_group - mins.get(other, 0))
    allocated = sum(e.min_batch_allocation or 0.0 for e in connected)
    return {"queue_size": (own + available) // env.group_size,
            "unallocated_fraction": 1.0 - min(allocated, 1.0),
            "self_queue_size": own // env.group_size, "max_group_size": max_group,
            "env_weight": max(MIN_ENV_WEIGHT, share)}
