"""Weight-sync cost of the three bridges, measured side by side in one run on one machine.

    python benchmarks/sync_latency.py [--model smollm2] [--modes shared_vllm,lora_only,none]
                                      [--steps 20] [--restarts 2] [--vllm-args "..."]

Per mode, with the same model, the same vLLM server flags and the same trainer code path the
training loop uses (the bridge objects themselves):
- shared_vllm (single copy): the fence around an AdamW step (pause + step + resume) and its sync
  (pause + resume); the trainer allocates no weights.
- lora_only: peft save of the adapter + POST /lora/load, every step.
- none: save the full model + stop vLLM + start it on the checkpoint + wait for /health.
Memory: bytes the trainer process allocated for its model (torch.cuda.memory_allocated), the
device's used memory (cudaMemGetInfo) and vLLM's own (nvidia-smi, by process group), with vLLM at
the same --gpu-memory-utilization in every mode. Writes benchmarks/results/sync_latency_<dev>.json
with machine info, versions, per-mode numbers and ratios between the modes.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from example_trainer import machine  # noqa: E402
from example_trainer.config import TrainConfig  # noqa: E402
from example_trainer.inference.manager import start_vllm  # noqa: E402
from example_trainer.machine import torch_dtype  # noqa: E402
from example_trainer.models import resolve_model  # noqa: E402
from example_trainer.process import ManagedProcess, free_port, raise_on_sigterm  # noqa: E402

log = logging.getLogger("sync_latency")
CUDA = torch.cuda.is_available()
DEFAULT_VLLM_ARGS = (f"--gpu-memory-utilization {0.3 if CUDA else 0.1} --max-model-len 1024 "
                     "--enforce-eager")


# ----------------------------------------------------------------------------- machine


def device_label() -> str:
    if not CUDA:
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    known = next((k for k in ("h100", "h200", "a100", "l40s", "l4") if k in name), None)
    return known or re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def machine_info() -> dict[str, Any]:
    """example_trainer.machine's facts (CPU model and capability, auto dtype, GPU) + versions."""
    info = machine.machine_info() | {"device": device_label()}
    if CUDA:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip() or None
    return info


# ----------------------------------------------------------------------------- memory


def _group_pids(pgid: int) -> set[int]:
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of /proc/<pid>/stat: process group
            pids.add(int(stat.parent.name))
    return pids


def vllm_gpu_bytes(pgid: int) -> int | None:
    """GPU memory of every process in vLLM's process group (server, engine core, workers)."""
    if not CUDA:
        return None
    smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    pids = _group_pids(pgid)
    rows = [line.split(",") for line in smi.stdout.strip().splitlines() if "," in line]
    used = [int(mib) * 2**20 for pid, mib in rows if int(pid) in pids]
    return sum(used) if used else None


def memory(model: torch.nn.Module, vllm_pgid: int, shared: set[int]) -> dict[str, Any]:
    """The trainer's own weight bytes (parameters not backed by vLLM's memory) and the device."""
    params = {id(p): p for p in model.parameters()}.values()
    owned = sum(p.numel() * p.element_size() for p in params
                if p.untyped_storage().data_ptr() not in shared)
    out: dict[str, Any] = {"trainer_param_bytes_owned": owned, "vllm_gpu_bytes":
                           vllm_gpu_bytes(vllm_pgid)}
    if CUDA:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        out |= {"trainer_allocated_bytes": torch.cuda.memory_allocated(),
                "device_used_bytes": total - free}
    return out


def stats(rows: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for k in keys:
        xs = [r[k] for r in rows if k in r]
        if xs:
            out[k] = {"median": statistics.median(xs), "mean": statistics.fmean(xs),
                      "max": max(xs)}
    return out


# ----------------------------------------------------------------------------- modes


def make_cfg(args: argparse.Namespace, mode: str, run_dir: Path, port: int, **over: Any
             ) -> TrainConfig:
    return TrainConfig(model_name=args.model, weight_bridge_mode=mode, dtype=args.dtype,
                       vllm_port=port, save_path=str(run_dir / mode), logdir=str(run_dir / mode),
                       vllm_args=f"--dtype {args.dtype} {args.vllm_args}",
                       optimizer=args.optimizer, lr=1e-6, **over)


def start_server(cfg: TrainConfig, extra: list[str], env: dict[str, str]) -> ManagedProcess:
    proc, _ = start_vllm(resolve_model(cfg.model_name), cfg.vllm_port,
                         Path(cfg.save_path) / "vllm.log", [*cfg.vllm_args.split(), *extra],
                         timeout_s=cfg.vllm_start_timeout, env={"LOGDIR": cfg.logdir, **env})
    return proc


def loaded_model(cfg: TrainConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model_name),
                                                 dtype=torch_dtype(cfg.dtype))
    return model.to("cuda" if CUDA else "cpu")


def bench_shared_vllm(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from example_trainer.bridges.shared_vllm import SharedVllmBridge
    from example_trainer.optim import make_optimizer
    from example_trainer.trainer import load_model

    cfg = make_cfg(args, "shared_vllm", run_dir, free_port())
    t0 = time.perf_counter()
    proc = start_server(cfg, [], {"VLLM_ENABLE_SHARED_WEIGHTS": "1",
                                  "VLLM_SERVER_DEV_MODE": "1"})  # /collective_rpc, for copy
    bridge = SharedVllmBridge(cfg)
    try:
        setup_s = time.perf_counter() - t0
        model, _ = load_model(cfg, bridge)
        shared = {t.untyped_storage().data_ptr() for t in bridge.tensors.values()}
        mem = memory(model, proc.pid, shared)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer, _ = make_optimizer(cfg, params)
        with bridge.step_fence():
            optimizer.step()  # warm-up: allocates the optimizer state, not a steady-state step
        rows, unfenced = [], []
        # Fenced and unfenced (what --hogwild costs: the step alone) steps alternate, each
        # timed to the end of its GPU work, so that load on the machine moves both alike and
        # stall minus step is what the fence adds.
        for step in range(1, args.steps + 1):
            with bridge.step_fence():
                optimizer.step()
                if CUDA:
                    torch.cuda.synchronize()
            fenced = bridge.after_step(step)
            t = time.perf_counter()
            optimizer.step()
            if CUDA:
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t
            rows.append({**fenced, "fence_overhead_s": fenced["sync/stall_s"] - step_s})
            unfenced.append({"optimizer_step_s": step_s})
        copy = copy_rows(cfg, args.steps)
    finally:
        bridge.close()
        proc.stop()
    return {"setup_s": setup_s, "attach": bridge.attach_stats, "memory": mem,
            "fence_path": "inproc" if bridge.fence is not None else "http",
            **stats(rows, ("time/sync", "sync/pause_s", "sync/resume_s", "sync/stall_s",
                          "fence_overhead_s")),
            **stats(unfenced, ("optimizer_step_s",)), **stats(copy, ("copy_sync_s",))}


def copy_rows(cfg: TrainConfig, repeats: int) -> list[dict[str, float]]:
    """The copy row, on the same server: vLLM's load_weights of a full second copy of the
    weights (TRL's colocate sync), timed inside the worker."""
    import requests

    resp = requests.post(f"{cfg.vllm_url}/collective_rpc", timeout=600, json={
        "method": "copy_weights", "args": [str(repeats)]})
    resp.raise_for_status()
    return [{"copy_sync_s": float(x)} for x in resp.json()["results"][0]]


def bench_lora_only(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from example_trainer.bridges.lora import LoraBridge

    cfg = make_cfg(args, "lora_only", run_dir, free_port(), lora_r=16, lora_alpha=32)
    t0 = time.perf_counter()
    proc = start_server(cfg, ["--enable-lora", "--max-lora-rank", "16"],
                        {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    bridge = LoraBridge(cfg)
    try:
        setup_s = time.perf_counter() - t0
        model = bridge.attach(loaded_model(cfg))
        mem = memory(model, proc.pid, set())
        rows = [bridge.after_step(step) for step in range(1, args.steps + 1)]
    finally:
        bridge.close()
        proc.stop()
    return {"setup_s": setup_s, "memory": mem,
            **stats(rows, ("time/sync", "sync/save_s", "sync/load_s"))}


def bench_none(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from example_trainer.bridges.restart import RestartBridge

    cfg = make_cfg(args, "none", run_dir, free_port(), vllm_restart_interval=1)
    bridge = RestartBridge(cfg)
    try:
        t0 = time.perf_counter()
        model = bridge.attach(loaded_model(cfg))  # starts the trainer-owned vLLM
        setup_s = time.perf_counter() - t0
        mem = memory(model, bridge.proc.pid, set())
        rows = [bridge.after_step(step) for step in range(1, args.restarts + 1)]
    finally:
        bridge.close()
    return {"setup_s": setup_s, "memory": mem,
            **stats(rows, ("time/sync", "sync/save_s", "sync/restart_s"))}


BENCHES: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "shared_vllm": bench_shared_vllm, "lora_only": bench_lora_only, "none": bench_none}


def ratios(modes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each two-copy mode against single copy: sync time ratio and the trainer's extra bytes."""
    out: dict[str, float] = {}
    base = modes.get("shared_vllm")
    if not base or "time/sync" not in base:
        return out
    if "copy_sync_s" in base:  # one run, one server: the copy a two-copy trainer would make
        out["copy_sync_over_shared_vllm_sync"] = (base["copy_sync_s"]["median"]
                                                  / max(base["time/sync"]["median"], 1e-9))
    for name, m in modes.items():
        if name == "shared_vllm" or "time/sync" not in m:
            continue
        out[f"{name}_sync_over_shared_vllm_sync"] = (m["time/sync"]["median"]
                                                    / max(base["time/sync"]["median"], 1e-9))
        out[f"{name}_sync_over_shared_vllm_stall"] = (m["time/sync"]["median"]
                                                     / max(base["sync/stall_s"]["median"], 1e-9))
        for key in ("trainer_allocated_bytes", "trainer_param_bytes_owned", "device_used_bytes"):
            if key in m["memory"] and key in base["memory"]:
                out[f"{name}_minus_shared_vllm_{key}"] = m["memory"][key] - base["memory"][key]
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--modes", default="shared_vllm,lora_only,none")
    parser.add_argument("--steps", type=int, default=20, help="syncs per mode (not none)")
    parser.add_argument("--restarts", type=int, default=2, help="restarts for mode none")
    parser.add_argument("--optimizer", default="adamw", help="shared_vllm's optimizer")
    parser.add_argument("--dtype", choices=machine.DTYPE_CHOICES, default="auto",
                        help="weights of vLLM and the trainer (auto: the machine's)")
    parser.add_argument("--vllm-args", default=DEFAULT_VLLM_ARGS)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "sync_latency")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    args.dtype = machine.resolve_dtype(args.dtype)
    raise_on_sigterm()  # a `timeout` must not orphan the servers started here
    modes = {}
    for mode in args.modes.split(","):
        log.info("measuring %s", mode)
        modes[mode] = BENCHES[mode](args, args.run_dir)
        log.info("%s: %s", mode, json.dumps(modes[mode]))
    result = {"benchmark": "sync_latency", "model": resolve_model(args.model),
              "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(),
              "modes": modes, "ratios": ratios(modes),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = args.out or ROOT / "benchmarks" / "results" / f"sync_latency_{device_label()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s\nratios: %s", out, json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()

