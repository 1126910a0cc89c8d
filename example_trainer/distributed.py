"""Data-parallel ranks (issue 16): torchrun's environment, gradient all-reduce, a replica checksum,
and the bucketing and name handling that a weight push to remote inference needs.

Each rank trains its own single-copy replica (its own vLLM, its own shared weights), so after the
optimizer step the replicas must hold the same bits. That only holds if every rank applied the
same gradient: hence the all-reduce before clipping, and a checksum every K steps that stops the
run loudly rather than letting replicas drift apart. Tested with gloo on the CPU; gloo also lets
several ranks share one GPU (--dist-backend gloo), which NCCL refuses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vllm_patching.mapping import LLAMA_PACKED, MappingError, build_mapping, check_coverage

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, world_size: int, environ: Mapping[str, str] = os.environ) -> RankEnv:
        """Read torchrun's variables; refuse an incomplete environment or a world size that
        disagrees with --world-size (a rank left out would hang every collective)."""
        missing = [k for k in TORCHRUN_VARS if not environ.get(k)]
        if missing:
            raise ValueError(f"--world-size {world_size} needs the torchrun environment, but "
                             f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                             f"set: start the trainer with `torchrun --nproc-per-node "
                             f"{world_size} example_trainer/grpo.py ...`")
        env = cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]),
                  environ["MASTER_ADDR"], int(environ["MASTER_PORT"]))
        if env.world_size != world_size:
            raise ValueError(f"--world-size {world_size} but torchrun started WORLD_SIZE="
                             f"{env.world_size} ranks: pass --world-size {env.world_size} or "
                             f"torchrun --nproc-per-node {world_size}")
        if not 0 <= env.rank < env.world_size:
            raise ValueError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
        return env


def replica_port(base_port: int, local_rank: int) -> int:
    """Convention: local rank r trains the replica served at --vllm-port + r."""
    return base_port + local_rank


def replica_config_dir(root: str, local_rank: int) -> str:
    """Convention: replica r writes its bridge config into <root>/rank<r> (its LOGDIR)."""
    return os.path.join(root or "/tmp/atropos_bridge", f"rank{local_rank}")


BACKENDS = ("auto", "gloo", "nccl")


def resolve_backend(requested: str, local_rank: int) -> str:
    """auto: NCCL on CUDA, gloo on the CPU. NCCL needs one GPU per rank (it refuses two ranks on
    one device); gloo works on any device, so several ranks can share one GPU."""
    if requested not in BACKENDS:
        raise ValueError(f"--dist-backend {requested!r}: pick one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("--dist-backend nccl needs CUDA, and this process sees no GPU: "
                             "pass --dist-backend gloo (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"--dist-backend nccl needs one GPU per rank, but local rank "
                             f"{local_rank} is beyond the {torch.cuda.device_count()} GPU(s) "
                             "this process sees: start fewer ranks per node, or pass "
                             "--dist-backend gloo to share GPUs between ranks")
    return requested


def init_process_group(env: RankEnv, timeout_s: float = 300.0, backend: str = "auto") -> str:
    """Join the group (backend: see resolve_backend). The timeout bounds the rendezvous and every
    collective, so a rank that never arrives (or died) stops the others with an error instead of
    a hang."""
    backend = resolve_backend(backend, env.local_rank)
    if torch.cuda.is_available():  # gloo with more ranks than GPUs: ranks share GPUs round-robin
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    log.info("rank %d/%d joined the %s group", env.rank, env.world_size, backend)
    return backend


class TensorMeta(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def bucket(metas: Sequence[TensorMeta], max_bytes: int) -> list[list[TensorMeta]]:
    """Consecutive runs of tensors of at most max_bytes each, order kept. A tensor larger than
    max_bytes travels alone: splitting it would need a receiver that reassembles slices."""
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {max_bytes}")
    buckets: list[list[TensorMeta]] = []
    size = 0
    for meta in metas:
        if not buckets or size + meta.nbytes > max_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(meta)
        size += meta.nbytes
    return buckets


def _meta(name: str, t: Tensor) -> TensorMeta:
    return TensorMeta(name, tuple(t.shape), t.dtype, t.numel() * t.element_size())


def all_reduce_gradients(params: Sequence[nn.Parameter], bucket_bytes: int = 25 * 2**20) -> int:
    """Average the gradients over the ranks in place; returns the number of all_reduce calls.

    Flattening needs one dtype per buffer, so buckets are formed per dtype. A parameter without
    a gradient on this rank contributes zeros: every rank must issue the same collectives in the
    same order, or they deadlock. With gloo, CUDA buckets are staged through host memory.
    """
    world = dist.get_world_size()
    stage = dist.get_backend() != "nccl"  # only NCCL reduces device tensors in place
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    calls = 0
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        grads = by_dtype[dtype]
        for b in bucket([_meta(str(i), g) for i, g in enumerate(grads)], bucket_bytes):
            chunk = [grads[int(m.name)] for m in b]
            flat = torch.cat([g.reshape(-1) for g in chunk])
            if stage and flat.device.type != "cpu":
                flat = flat.cpu()  # gloo: reduce a host copy (same bits on every rank)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            for g, part in zip(chunk, flat.split([g.numel() for g in chunk]), strict=True):
                g.copy_(part.view_as(g))
            calls += 1
    return calls


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_checksum(t: Tensor, stride: int = 1) -> int:
    """Position-weighted integer sum of the raw bits of every stride-th element: exact and
    order-independent (integer adds), so replicas agree iff their sampled bits agree (up to the
    odd collision), on any device and any reduction order."""
    flat = t.detach().reshape(-1)[::stride]
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return int((bits * weights).sum())


def check_replicas(model: nn.Module, step: int, stride: int = 1) -> None:
    """Gather every rank's per-parameter checksums; on a difference, raise on every rank."""
    names, params = zip(*model.named_parameters(), strict=True)
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([tensor_checksum(p, stride) for p in params], dtype=torch.int64,
                        device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    for r, other in enumerate(gathered):
        differ = (other != gathered[0]).nonzero()
        if len(differ):
            i = int(differ[0])
            raise RuntimeError(
                f"step {step}: replicas diverged: parameter {names[i]!r} differs between rank 0 "
                f"and rank {r} ({int((other != gathered[0]).sum())} of {len(names)} parameters "
                "differ). Ranks must all-reduce gradients and use the same seed, optimizer and "
                "dtype; each rank must attach to its own replica")


class RankGroup:
    """What the loop calls, picked once: one process (no-ops) or data-parallel ranks."""

    def __init__(self, env: RankEnv | None, check_interval: int) -> None:
        self.env = env
        self.check_interval = check_interval
        self.is_main = env is None or env.rank == 0

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        if self.env is not None:
            all_reduce_gradients(params)

    def check(self, model: nn.Module, step: int) -> None:
        """Compare the replicas at step 0 (attached the same weights?) and every K steps."""
        if self.env is not None and self.check_interval > 0 and step % self.check_interval == 0:
            check_replicas(model, step)

    def close(self) -> None:
        if self.env is not None and dist.is_initialized():
            dist.destroy_process_group()


def make_rank_group(world_size: int, check_interval: int, backend: str = "auto") -> RankGroup:
    if world_size == 1:
        return RankGroup(None, check_interval)
    env = RankEnv.from_env(world_size)
    init_process_group(env, backend=backend)
    return RankGroup(env, check_interval)


# --- names and layouts for a push to remote vLLM (not run yet: no multi-GPU machine) ---

def vllm_layout(hf_params: Mapping[str, Tensor], hf_config: Mapping[str, Any],
                packed: Mapping[str, Sequence[str]] = LLAMA_PACKED
                ) -> tuple[dict[str, TensorMeta], dict[str, dict[str, Any]]]:
    """HF parameters -> (vLLM's fused tensors, HF name -> {vllm_name, slice}) at TP 1.

    Only the fused names and shapes are derived here (parts stacked along dim 0 in `packed`'s
    order); which rows each HF tensor is comes from vllm_patching.mapping, the same code the
    shared_vllm bridge binds its views with, so a push and a shared view agree by construction.
    """
    part_of = {part: fused for fused, parts in packed.items() for part in parts}
    fused: dict[str, TensorMeta] = {}
    tied = hf_config.get("tie_word_embeddings", True)
    for name, t in hf_params.items():
        if tied and name == "lm_head.weight":
            continue  # vLLM registers no lm_head when it is tied to the embedding
        pieces = name.split(".")
        hit = next((i for i, x in enumerate(pieces) if x in part_of), None)
        if hit is None:
            fused[name] = _meta(name, t)
            continue
        vname = ".".join([*pieces[:hit], part_of[pieces[hit]], *pieces[hit + 1:]])
        prev = fused.get(vname)
        rows, nbytes = (prev.shape[0], prev.nbytes) if prev else (0, 0)
        fused[vname] = TensorMeta(vname, (rows + t.shape[0], *t.shape[1:]), t.dtype,
                                  nbytes + t.numel() * t.element_size())
    table = {n: {"shape": list(m.shape), "dtype": str(m.dtype)} for n, m in fused.items()}
    mapping = build_mapping(table, packed, hf_config)
    check_coverage(list(hf_params), mapping)
    return fused, mapping


def check_push_compatible(sender: Sequence[TensorMeta], receiver: Sequence[TensorMeta]) -> None:
    """Refuse a push whose tensors the receiver does not hold with the same shape and dtype."""
    theirs, problems = {m.name: m for m in receiver}, []
    for m in sender:
        r = theirs.get(m.name)
        if r is None:
            problems.append(f"{m.name}: the receiver has no such tensor")
        elif (tuple(r.shape), r.dtype) != (tuple(m.shape), m.dtype):
            problems.append(f"{m.name}: sender {tuple(m.shape)} {m.dtype}, receiver "
                            f"{tuple(r.shape)} {r.dtype}")
    if problems:
        raise MappingError("the trainer's weights do not fit the inference server's:\n  "
                           + "\n  ".join(problems[:10]) + "\nFix: serve the same model, dtype "
                           "and tensor-parallel layout the trainer pushes")
