"""Data-parallel ranks on the CPU (issue 16), with torch.distributed's gloo backend: two spawned
ranks all-reduce gradients exactly, compare replica checksums, and keep two trained copies of the
tiny Llama bit-identical (and show that without the all-reduce they are not). Plus the pure
parts: buckets, HF -> vLLM fused names, push compatibility, and the config's refusals."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import requests
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from example_trainer import distributed as D
from example_trainer.config import parse_config
from example_trainer.models import tiny_llama_path
from example_trainer.process import free_port
from example_trainer.trainer import train
from tests.helpers import NoSyncBridge, random_group
from vllm_patching import bridge_config
from vllm_patching.mapping import MappingError

WORLD = 2
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grad(rank: int, i: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(3 + i, 5, generator=g).to(dtype)


def _join(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    env = D.RankEnv.from_env(WORLD, {"RANK": str(rank), "WORLD_SIZE": str(WORLD),
                                     "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": str(port)})
    assert D.init_process_group(env, timeout_s=60) == "gloo"


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_path(), torch_dtype=torch.float32)


def _train(model: torch.nn.Module, rank: int, reduce: bool, steps: int = 3) -> None:
    """Three AdamW steps on this rank's own data (seeded by rank)."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if reduce:
            D.all_reduce_gradients(params, bucket_bytes=2**20)  # several buckets
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


def _checksum_error(model: torch.nn.Module, step: int) -> str:
    try:
        D.check_replicas(model, step)
    except RuntimeError as e:
        return str(e)
    return ""


def _worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    result: dict = {}
    # 1. All-reduce: mixed dtypes, a parameter without a gradient on rank 1, 64-byte buckets.
    params = []
    for i, dtype in enumerate(GRAD_DTYPES * 2):
        p = torch.nn.Parameter(torch.zeros(3 + i, 5, dtype=dtype))
        p.grad = None if (rank == 1 and i == 4) else _grad(rank, i, dtype)
        params.append(p)
    result["calls"] = D.all_reduce_gradients(params, bucket_bytes=64)
    result["grads"] = [p.grad.clone() for p in params]
    # 2. Replica checksum: identical models pass; one changed element on rank 1 is named.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    result["identical"] = _checksum_error(net, 7)
    if rank == 1:
        with torch.no_grad():
            net[1].bias[1] += 1e-6
    result["perturbed"] = _checksum_error(net, 8)
    # 3. Two trained copies of the tiny Llama, with and without the gradient all-reduce.
    for reduce in (True, False):
        torch.manual_seed(0)
        model = _tiny_llama()
        _train(model, rank, reduce)
        key = "with" if reduce else "without"
        result[f"check_{key}"] = _checksum_error(model, 3)
        result[f"params_{key}"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tiny_llama_path()  # build it once here, not in both ranks at the same time
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_all_reduce_averages_exactly_in_every_dtype(ranks):
    for i, dtype in enumerate(GRAD_DTYPES * 2):
        g1 = torch.zeros(3 + i, 5, dtype=dtype) if i == 4 else _grad(1, i, dtype)
        expected = (_grad(0, i, dtype) + g1) / WORLD
        for r in ranks:
            assert r["grads"][i].dtype == dtype
            assert torch.equal(r["grads"][i], expected), (i, dtype)
    # 64-byte buckets: every grad (>= 30 elements) travels alone, one call each.
    assert ranks[0]["calls"] == ranks[1]["calls"] == len(GRAD_DTYPES) * 2


def test_checksum_passes_identical_replicas_and_names_the_differing_parameter(ranks):
    assert ranks[0]["identical"] == ranks[1]["identical"] == ""
    for r in ranks:  # every rank raises, so none waits in the next collective
        assert r["perturbed"].startswith("step 8: replicas diverged: parameter '1.bias'")
        assert "rank 1" in r["perturbed"]


def test_trained_replicas_stay_bit_identical_only_with_the_all_reduce(ranks):
    p0, p1 = (ranks[r]["params_with"] for r in range(WORLD))
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[n], p1[n]) for n in p0)
    assert ranks[0]["check_with"] == ranks[1]["check_with"] == ""
    # The same training without it: each rank stepped on its own data, so the copies differ
    # (the test above can fail), and the checksum says so on every rank.
    without = [ranks[r]["params_without"] for r in range(WORLD)]
    assert not torch.equal(without[0]["model.embed_tokens.weight"],
                           without[1]["model.embed_tokens.weight"])
    for r in ranks:
        assert r["check_without"].startswith("step 3: replicas diverged: parameter 'model.")


def _metas(sizes: list[int]) -> list[D.TensorMeta]:
    return [D.TensorMeta(f"t{i}", (n,), torch.uint8, n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes,limit,expected", [
    ([10, 20, 30, 40], 50, [[10, 20], [30], [40]]),
    ([10, 200, 10, 10], 50, [[10], [200], [10, 10]]),  # oversize alone
    ([50, 50], 50, [[50], [50]]),  # exactly the bound fits
    ([], 50, []),
])
def test_buckets_are_bounded_ordered_and_cover_every_tensor_once(sizes, limit, expected):
    metas = _metas(sizes)
    buckets = D.bucket(metas, limit)
    assert [[m.nbytes for m in b] for b in buckets] == expected
    assert [m for b in buckets for m in b] == metas
    assert all(sum(m.nbytes for m in b) <= limit or len(b) == 1 for b in buckets)
    with pytest.raises(ValueError, match="bucket size"):
        D.bucket(metas, 0)


def test_hf_names_map_to_vllm_fused_tensors_and_back_on_the_tiny_llama():
    model = _tiny_llama()
    hf = dict(model.named_parameters(remove_duplicate=False))
    fused, mapping = D.vllm_layout(hf, model.config.to_dict())
    assert "lm_head.weight" not in fused  # tied: vLLM holds only the embedding
    assert not [n for n in fused if any(p in n for p in ("q_proj", "k_proj", "gate_proj"))]
    # Fuse as vLLM's loader does (q, k, v / gate, up stacked by rows), then every HF name's
    # mapped slice must give back exactly the HF tensor.
    tensors = {}
    for i in range(model.config.num_hidden_layers):
        pre = f"model.layers.{i}."
        tensors[pre + "self_attn.qkv_proj.weight"] = torch.cat(
            [hf[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        tensors[pre + "mlp.gate_up_proj.weight"] = torch.cat(
            [hf[pre + f"mlp.{x}_proj.weight"] for x in ("gate", "up")])
    tensors |= {n: hf[n] for n in fused if n not in tensors}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {n: m.shape
                                                               for n, m in fused.items()}
    for name, t in hf.items():
        e = mapping[name]
        view = tensors[e["vllm_name"]]
        if e["slice"]:
            view = view.narrow(0, e["slice"]["start"], e["slice"]["end"] - e["slice"]["start"])
        assert torch.equal(view, t), name
    assert mapping["lm_head.weight"]["vllm_name"] == "model.embed_tokens.weight"


def test_push_refuses_shape_and_dtype_mismatches():
    sender = [D.TensorMeta("a", (4, 2), torch.bfloat16, 16), D.TensorMeta("b", (3,), torch.float32,
                                                                          12)]
    D.check_push_compatible(sender, sender)
    bad = [D.TensorMeta("a", (4, 2), torch.float32, 32), D.TensorMeta("b", (6,), torch.float32, 24)]
    with pytest.raises(MappingError) as e:
        D.check_push_compatible(sender, bad)
    assert "a: sender (4, 2) torch.bfloat16, receiver (4, 2) torch.float32" in str(e.value)
    assert "b: sender (3,) torch.float32, receiver (6,) torch.float32" in str(e.value)
    with pytest.raises(MappingError, match="c: the receiver has no such tensor"):
        D.check_push_compatible([D.TensorMeta("c", (1,), torch.float32, 4)], sender)


TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


@pytest.fixture
def torchrun_env(monkeypatch):
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


def test_world_size_without_torchrun_names_the_fix(monkeypatch):
    for k in TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match=r"--world-size 2 needs the torchrun environment.*RANK"
                                         r".*torchrun --nproc-per-node 2"):
        parse_config(["--world-size", "2", "--weight-bridge-mode", "shared_vllm"])


def test_world_size_disagreeing_with_torchrun_is_refused(torchrun_env):
    torchrun_env.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--world-size 2 but torchrun started WORLD_SIZE=4"):
        parse_config(["--world-size", "2", "--weight-bridge-mode", "shared_vllm"])


@pytest.mark.parametrize("mode", ["none", "lora_only"])
def test_world_size_needs_shared_vllm(torchrun_env, mode):
    with pytest.raises(ValueError, match="--world-size 2 needs --weight-bridge-mode shared_vllm"):
        parse_config(["--world-size", "2", "--weight-bridge-mode", mode])


def _write_rank_config(folder: Path, process: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / bridge_config.CONFIG_NAME
    path.write_text(json.dumps({"process": process}))
    return path


def test_each_rank_gets_its_own_replica(torchrun_env, tmp_path):
    _write_rank_config(tmp_path / "rank1", bridge_config.process_identity())  # a live writer
    cfg = parse_config(["--world-size", "2", "--single-copy", "--vllm-port", "9001",
                        "--vllm-config-path", str(tmp_path)])
    assert (cfg.trainer_rank, cfg.vllm_port) == (1, 9002)
    assert cfg.vllm_config_path == os.path.join(tmp_path, "rank1")
    assert cfg.dist_backend == "auto"
    assert parse_config(["--replica-check-interval", "3"]).replica_check_interval == 3


def test_a_rank_without_its_own_config_is_refused_not_sent_to_the_fallbacks(torchrun_env,
                                                                           tmp_path,
                                                                           monkeypatch):
    # Configs in every fallback place (./, rank 0's folder) must not stand in for rank 1's.
    monkeypatch.chdir(tmp_path)
    _write_rank_config(tmp_path, bridge_config.process_identity())
    _write_rank_config(tmp_path / "rank0", bridge_config.process_identity())
    argv = ["--world-size", "2", "--single-copy", "--vllm-config-path", str(tmp_path)]
    expected = tmp_path / "rank1" / bridge_config.CONFIG_NAME
    with pytest.raises(FileNotFoundError) as e:
        parse_config(argv)
    assert f"local rank 1: its replica's bridge config {expected} is not there" in str(e.value)
    assert f"LOGDIR={tmp_path / 'rank1'}" in str(e.value)
    # The same through $LOGDIR instead of --vllm-config-path.
    torchrun_env.setenv("LOGDIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="rank1"):
        parse_config(argv[:3])
    # A config whose vLLM is gone is refused as well (find_live would skip to the fallbacks).
    dead = bridge_config.process_identity() | {"pid": 2**22 + 7, "start_ticks": 1}
    _write_rank_config(tmp_path / "rank1", dead)
    with pytest.raises(bridge_config.StaleBridgeConfig, match=f"{expected} is stale: "):
        parse_config(argv)


def test_dist_backend_flag_and_refusals(torchrun_env, tmp_path, monkeypatch):
    _write_rank_config(tmp_path / "rank1", bridge_config.process_identity())
    argv = ["--world-size", "2", "--single-copy", "--vllm-config-path", str(tmp_path)]
    assert parse_config([*argv, "--dist-backend", "gloo"]).dist_backend == "gloo"
    torchrun_env.setenv("GRPO_DIST_BACKEND", "nccl")
    assert parse_config(argv).dist_backend == "nccl"
    with pytest.raises(SystemExit):
        parse_config([*argv, "--dist-backend", "mpi"])
    with pytest.raises(ValueError, match="pick one of auto, gloo, nccl"):
        D.resolve_backend("mpi", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_backend("auto", 1) == D.resolve_backend("gloo", 1) == "gloo"
    with pytest.raises(ValueError, match="nccl needs CUDA.*--dist-backend gloo"):
        D.resolve_backend("nccl", 0)
    # Two ranks on one GPU: NCCL refuses the second, gloo shares the device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.resolve_backend("auto", 0) == D.resolve_backend("nccl", 0) == "nccl"
    assert D.resolve_backend("gloo", 1) == "gloo"
    with pytest.raises(ValueError, match="local rank 1 is beyond the 1 GPU.*--dist-backend gloo"):
        D.resolve_backend("nccl", 1)


def _train_rank(rank: int, port: int, cfg, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    bridge = NoSyncBridge(cfg)
    models = []
    bridge.attach = lambda model: models.append(model) or model  # keep the trained model
    rows = train(cfg, bridge)
    torch.save({"rows": rows, "params": {n: p.detach().clone()
                                         for n, p in models[0].named_parameters()}},
               Path(out) / f"train{rank}.pt")


@pytest.mark.integration  # starts the batching API
def test_two_ranks_of_the_real_loop_stay_identical_and_rank0_alone_writes(tiny_model, tmp_path,
                                                                          api_server):
    rng = random.Random(0)
    requests.post(f"{api_server}/register", json={
        "wandb_group": "t", "wandb_project": "t", "batch_size": 2, "max_token_len": 64,
        "checkpoint_dir": "", "save_checkpoint_interval": 0, "starting_step": 0, "num_steps": 2,
    }, timeout=10).raise_for_status()
    for _ in range(4):  # 2 ranks x 2 steps, one group each: every rank trains different data
        requests.post(f"{api_server}/scored_data", json=random_group(rng),
                      timeout=10).raise_for_status()
    cfg = parse_config(["--model-name", str(tiny_model), "--api-url", api_server,
                        "--save-path", str(tmp_path / "run"), "--training-steps", "2",
                        "--batch-size", "2", "--dtype", "float32", "--lr", "1e-2",
                        "--max-token-len", "64", "--batch-poll-timeout", "60",
                        "--replica-check-interval", "1"])
    cfg.world_size = 2  # the torchrun environment is set inside each rank
    mp.spawn(_train_rank, args=(free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"train{r}.pt") for r in range(2))
    # Different data per rank (different losses), one averaged gradient (equal grad norms).
    assert [row["loss/total"] for row in r0["rows"]] != [row["loss/total"] for row in r1["rows"]]
    assert [row["optim/grad_norm"] for row in r0["rows"]] == [row["optim/grad_norm"]
                                                              for row in r1["rows"]]
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]  # rank 0's rows only
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_2"]
