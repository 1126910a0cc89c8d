"""Issue 16, deliverable 4: on ONE GPU, two SmolLM2 replicas (two of our vLLM servers with shared
weights) trained by two data-parallel trainer ranks of the real loop stay bit-identical.

NCCL refuses two ranks on one device, so the ranks join with --dist-backend gloo (CUDA gradient
buckets staged through host memory). Each rank pulls its own groups from the batching API, so
the ranks' losses differ; the gradient all-reduce makes their updates equal, the replica checksum
runs after every step (a mismatch stops both ranks), and afterwards the two servers must serve
bit-identical prompt logprobs, different from before training, and hold bit-identical weights.
Run on the GPU machine:

    GRPO_MODELS_DIR=/root/models python -m pytest -m gpu -s tests/test_distributed_gpu.py

It prints `RESULT {...}` lines with its numbers.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
import torch.multiprocessing as mp

from example_trainer.config import parse_config
from example_trainer.inference.manager import start_vllm
from example_trainer.models import resolve_model
from example_trainer.process import free_port
from example_trainer.trainer import train
from tests.helpers import PROMPT_IDS, attach, random_group, vllm_prompt_logprobs
from vllm_patching import bridge_config

pytestmark = pytest.mark.gpu

MODEL = resolve_model("smollm2")
WORLD = 2
STEPS = 3
DTYPE, OPTIMIZER, LR = "bfloat16", "adamw_fp32_master", "3e-4"  # fp32 master: the steps show
SERVER_ARGS = ["--gpu-memory-utilization", "0.08", "--kv-cache-memory-bytes", str(2 << 30),
               "--max-model-len", "1024",
               "--dtype", DTYPE, "--enforce-eager"]
SHARED_ENV = {"VLLM_ENABLE_SHARED_WEIGHTS": "1"}


def result(name: str, **numbers) -> None:
    print(f"RESULT {json.dumps({'test': name, **numbers})}")


def _consecutive_free_ports() -> int:
    """A free port p whose neighbour p + 1 is free too: replica r serves at --vllm-port + r.

    Drawn below Linux's ephemeral range (32768-60999): every `free_port()` (bind to port 0) of
    processes running beside this test gets its port from that range, one of which took p + 1
    while replica 0 started on the H200 (two checks in one device call)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        try:
            for candidate in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no two consecutive free ports in 20000-32000")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[tuple[Path, int, float]]:
    """Replica r on port p + r with LOGDIR <root>/rank<r>. Started one after the other: vLLM's
    start-up memory profiling reads the device's free memory, which a second server starting at
    the same moment would change under it (~60 s each, eager)."""
    root = tmp_path_factory.mktemp("replicas")
    port = _consecutive_free_ports()
    procs = []
    t0 = time.monotonic()
    try:
        for r in range(WORLD):
            folder = root / f"rank{r}"
            folder.mkdir()
            proc, _ = start_vllm(MODEL, port + r, folder / "vllm.log", SERVER_ARGS, timeout_s=900,
                                 env={"LOGDIR": str(folder), **SHARED_ENV}, name=f"vllm{r}")
            procs.append(proc)
        for r in range(WORLD):
            assert (root / f"rank{r}" / bridge_config.CONFIG_NAME).is_file()
        yield root, port, time.monotonic() - t0
    finally:
        for proc in procs:  # by pid (each server's process group)
            proc.stop()


def _rank(rank: int, master_port: int, argv: list[str], out: str) -> None:
    """One torchrun-style rank: parse_config derives its port and config folder from LOCAL_RANK."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)})
    cfg = parse_config(argv)
    rows = train(cfg)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"rows": rows, "vllm_port": cfg.vllm_port, "vllm_config_path": cfg.vllm_config_path},
        default=float))


def _compare_weights(urls: list[str], root: Path) -> tuple[int, list[str]]:
    """Attach to each replica (views on its memory, no copy); the names of differing tensors."""
    attached = []
    try:
        for r, url in enumerate(urls):
            attached.append(attach(MODEL, url, str(root / f"rank{r}" / bridge_config.CONFIG_NAME)))
        p0, p1 = (dict(model.named_parameters()) for model, _ in attached)
        assert p0.keys() == p1.keys()
        return len(p0), [n for n in p0 if not torch.equal(p0[n], p1[n])]
    finally:
        for _, bridge in attached:
            bridge.close()


def test_two_gloo_ranks_keep_two_replicas_on_one_gpu_bit_identical(replicas, api_server,
                                                                    tmp_path):
    root, port, start_s = replicas
    urls = [f"http://127.0.0.1:{port + r}" for r in range(WORLD)]
    before = [vllm_prompt_logprobs(u, PROMPT_IDS) for u in urls]

    requests.post(f"{api_server}/register", json={
        "wandb_group": "t", "wandb_project": "t", "batch_size": 2, "max_token_len": 64,
        "checkpoint_dir": "", "save_checkpoint_interval": 0, "starting_step": 0,
        "num_steps": STEPS,
    }, timeout=10).raise_for_status()
    rng = random.Random(0)
    for _ in range(WORLD * STEPS):  # one group (2 sequences) per rank and step: different data
        requests.post(f"{api_server}/scored_data", json=random_group(rng, 12),
                      timeout=10).raise_for_status()
    argv = ["--model-name", MODEL, "--api-url", api_server, "--save-path", str(tmp_path / "run"),
            "--training-steps", str(STEPS), "--batch-size", "2", "--max-token-len", "64",
            "--batch-poll-timeout", "120", "--dtype", DTYPE, "--lr", LR,
            "--optimizer", OPTIMIZER, "--weight-bridge-mode", "shared_vllm",
            "--world-size", str(WORLD), "--dist-backend", "gloo", "--vllm-port", str(port),
            "--vllm-config-path", str(root), "--replica-check-interval", "1"]
    t0 = time.monotonic()
    # A checksum mismatch at any step raises in both ranks, and mp.spawn re-raises it here.
    mp.spawn(_rank, args=(free_port(), argv, str(tmp_path)), nprocs=WORLD, join=True)
    train_s = time.monotonic() - t0
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    after = [vllm_prompt_logprobs(u, PROMPT_IDS) for u in urls]
    losses = [[row["loss/total"] for row in r["rows"]] for r in ranks]
    grad_norms = [[row["optim/grad_norm"] for row in r["rows"]] for r in ranks]
    t0 = time.monotonic()
    n_params, differing = _compare_weights(urls, root)
    result("replicas_bit_identical",
           replica_logprob_max_diff=(after[0] - after[1]).abs().max().item(),
           replica_logprob_max_diff_before=(before[0] - before[1]).abs().max().item(),
           moved_logprob_max=(after[0] - before[0]).abs().max().item(),
           moved_logprob_max_rank1=(after[1] - before[1]).abs().max().item(),
           parameters_compared=n_params, parameters_differing=len(differing),
           first_differing=differing[:5], steps=STEPS, losses=losses, grad_norms=grad_norms,
           ports=[r["vllm_port"] for r in ranks], servers_start_s=start_s, train_s=train_s,
           compare_s=time.monotonic() - t0)

    # Every rank trained its own replica, on its own data, with the same averaged gradient.
    assert [r["vllm_port"] for r in ranks] == [port, port + 1]
    assert [r["vllm_config_path"] for r in ranks] == [str(root / f"rank{r}")
                                                      for r in range(WORLD)]
    assert [[row["step"] for row in r["rows"]] for r in ranks] == [list(range(1, STEPS + 1))] * 2
    assert losses[0] != losses[1]
    assert grad_norms[0] == grad_norms[1] and max(grad_norms[0]) > 0
    assert not differing  # the two replicas' weights, bit for bit
    assert torch.equal(before[0], before[1])  # same checkpoint, same kernels, same device
    assert torch.equal(after[0], after[1])  # and so they serve the same numbers after training
    assert not torch.equal(after[0], before[0])  # the weights moved: not the untrained model
