"""Does a GRPO step loop fit in an 80 GiB GPU with vLLM beside it? One real step loop per
configuration (vLLM generates 8 prompts x 8 completions of 32 tokens through /generate, the
trainer's own forward/backward, clip, optimizer step in the bridge's fence, sync), with the whole
device capped: vLLM gets --gpu-memory-utilization = --vllm-gib / device and the trainer
torch.cuda.set_per_process_memory_fraction((--cap-gib - --vllm-gib) / device).

    python benchmarks/memory.py --model llama3-8b-shape --vllm-gib 36 --cap-gib 80
    python benchmarks/memory.py --model smollm2 --configs shared_vllm+apollo_mini,none

Per configuration: fits or not (an OOM is caught in the trainer and reported with the phase it
hit, never skipped), peak device memory of vLLM's and the trainer's processes (nvidia-smi, i.e.
NVML, sampled), the KV cache vLLM got (from its log), optimizer-state bytes, seconds per step
(median of the steps after the first). Shape models (llama3-8b-shape) run on dummy weights: vLLM
--load-format dummy, the trainer's own copy (lora_only, none) random; the rewards are random 0/1
(the loop, not the learning, is measured). Writes benchmarks/results/memory_<device>.json (or
--out), merged with the rows of other models already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sync_latency import _group_pids, device_label, machine_info  # noqa: E402
from example_trainer.inference.manager import server_args  # noqa: E402
from example_trainer.models import is_shape_model, resolve_model  # noqa: E402
from example_trainer.process import ManagedProcess, free_port, raise_on_sigterm  # noqa: E402

log = logging.getLogger("memory")

# name -> (bridge, optimizer, gradient checkpointing)
CONFIGS: dict[str, tuple[str, str, bool]] = {
    "shared_vllm+apollo_mini": ("shared_vllm", "apollo_mini", True),
    "shared_vllm+adamw_8bit": ("shared_vllm", "adamw_8bit", True),
    "shared_vllm+adamw_fp32_master": ("shared_vllm", "adamw_fp32_master", True),
    "lora_only_r16": ("lora_only", "adamw", True),
    "none": ("none", "adamw_fp32_master", True),
    # the gradient-checkpointing lever, measured by its absence
    "shared_vllm+apollo_mini-no_gc": ("shared_vllm", "apollo_mini", False),
}
PROMPTS, GROUP, NEW_TOKENS = 8, 8, 32
GIB = 2**30
CONTEXT_GIB = 0.75


# ----------------------------------------------------------------------------- the trainer side


def _generate(url: str, tokenizer: Any, step: int) -> list[dict]:
    """8 ScoredData groups of 8 completions from the server, with its logprobs; random scores.
    The 8 requests go together, as environments send them (one after another, the 8B step's
    generation took 4.9 s of its 6.0 s on the H200)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import requests

    rng = random.Random(step)

    def group(i: int) -> dict:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {10 + 7 * i + step % 50} + {i + 10}?"}],
            add_generation_prompt=True, tokenize=True)
        prompt = list(getattr(prompt, "input_ids", prompt))
        r = requests.post(f"{url}/generate", timeout=600, json={
            "prompt": {"prompt_token_ids": prompt}, "n": GROUP, "max_tokens": NEW_TOKENS,
            "temperature": 1.0, "logprobs": 0, "detokenize": False})
        r.raise_for_status()
        out = r.json()
        lps = [[1.0] * len(prompt) + [pos[0][str(t)] for t, pos in zip(ids, lp, strict=True)]
               for ids, lp in zip(out["token_ids"], out["logprobs"], strict=True)]
        return {"tokens": [prompt + ids for ids in out["token_ids"]],
                "masks": [[-100] * len(prompt) + ids for ids in out["token_ids"]],
                "inference_logprobs": lps}

    with ThreadPoolExecutor(PROMPTS) as pool:
        groups = list(pool.map(group, range(PROMPTS)))
    for g in groups:  # scores drawn here, in order: the same for every configuration
        g["scores"] = [float(rng.random() < 0.5) for _ in g["tokens"]]
    return groups


def trainer_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The measured loop, in its own process (its memory cap and its peak are its own)."""
    import torch

    from environments.schemas import ScoredData
    from example_trainer.bridges import make_bridge
    from example_trainer.config import TrainConfig, finalize
    from example_trainer.data import collate, pack, rollouts_from_groups
    from example_trainer.loss import StepTotals, make_loss_fn
    from example_trainer.optim import make_optimizer, state_bytes
    from example_trainer.trainer import apply_step, forward_backward, load_model, make_ref_fn

    cuda = torch.cuda.is_available()  # the CPU build runs the same loop, uncapped (a check)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(spec["fraction"])
    mode, optimizer_name, gc = CONFIGS[spec["config"]]
    cfg = finalize(TrainConfig(
        model_name=spec["model"], weight_bridge_mode=mode, optimizer=optimizer_name,
        dtype="bfloat16" if cuda else "auto", gradient_checkpointing=gc,
        batch_size=spec["micro_batch"], lr=1e-6, vllm_port=spec["port"],
        save_path=spec["run_dir"], logdir=spec["bridge_dir"],
        vllm_config_path=spec["bridge_dir"], vllm_args=spec["vllm_args"],
        vllm_restart_interval=spec["steps"], lora_r=16, max_token_len=1024))
    bridge = make_bridge(cfg)
    out: dict[str, Any] = {"fits": False, "phase": "build"}
    rows: list[dict[str, float]] = []
    try:
        model, tokenizer = load_model(cfg, bridge)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(cfg, params)
        loss_fn, ref_fn = make_loss_fn(cfg), make_ref_fn(cfg, bridge, model)
        for step in range(1, spec["steps"] + 1):
            t0 = time.monotonic()
            out["phase"] = "generate"
            groups = [ScoredData.model_validate(g) for g in _generate(cfg.vllm_url, tokenizer,
                                                                       step)]
            rollouts = rollouts_from_groups(groups, False)
            t_gen = time.monotonic() - t0
            micro = [collate(m, tokenizer.pad_token_id or 0)
                     for m in pack(rollouts, cfg.batch_size, 0)]
            out["phase"] = "forward_backward"
            optimizer.zero_grad(set_to_none=True)
            loss, _ = forward_backward(model, micro, loss_fn, ref_fn, StepTotals(
                num_tokens=sum(mb.num_tokens for mb in micro), num_seqs=len(rollouts)))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            out["phase"] = "optimizer_step"
            t_opt = apply_step(bridge, optimizer, scheduler, step, loss, grad_norm)
            out["phase"] = "sync"
            sync = bridge.after_step(step)
            if cuda:
                torch.cuda.synchronize()
            rows.append({"step_s": time.monotonic() - t0, "generate_s": t_gen,
                         "optimizer_step_s": t_opt or 0.0, "sync_s": sync["time/sync"]})
            log.info("%s step %d: %.2f s (generate %.2f s), peak allocated %.1f GiB",
                     spec["config"], step, rows[-1]["step_s"], t_gen,
                     torch.cuda.max_memory_allocated() / GIB if cuda else 0.0)
        out |= {"fits": True, "phase": "done", "optimizer_state_bytes": state_bytes(optimizer),
                "trainable_params": sum(p.numel() for p in params)}
    except torch.OutOfMemoryError as e:
        out["error"] = str(e).splitlines()[0][:400]
        log.warning("%s: out of memory in %s: %s", spec["config"], out["phase"], out["error"])
    finally:
        bridge.close()
    later = rows[1:] or rows
    out["steps"] = rows
    if cuda:
        out |= {"trainer_max_allocated_bytes": torch.cuda.max_memory_allocated(),
                "trainer_max_reserved_bytes": torch.cuda.max_memory_reserved()}
    for key in ("step_s", "generate_s", "optimizer_step_s", "sync_s"):
        out[f"median_{key}"] = statistics.median(r[key] for r in later) if later else None
    return out


# ----------------------------------------------------------------------------- the parent side


def _tree(roots: set[int]) -> set[int]:
    """The pids of `roots`, their process groups and every descendant."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    pids = set(roots).union(*(_group_pids(r) for r in roots))
    grew = True
    while grew:
        new = {p for p, pp in parent.items() if pp in pids} - pids
        pids |= new
        grew = bool(new)
    return pids


class PeakSampler(threading.Thread):
    """Peak over time of the GPU memory (NVML, through nvidia-smi) of some process trees."""

    def __init__(self, roots: set[int]) -> None:
        super().__init__(daemon=True)
        self.roots, self.peak, self.done = roots, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            try:
                smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True)
            except FileNotFoundError:  # no NVIDIA driver: the CPU check of the loop
                return
            pids = _tree(self.roots)
            used = sum(int(mib) * 2**20 for pid, mib in
                       (line.split(",") for line in smi.stdout.splitlines() if "," in line)
                       if int(pid) in pids)
            self.peak = max(self.peak, used)


def kv_cache(logs: list[Path], fixed_gib: float | None) -> dict[str, float | None]:
    """What vLLM logged it kept for the KV cache (the last server's, for mode none)."""
    found: dict[str, float | None] = {"kv_cache_gib": fixed_gib, "kv_cache_tokens": None}
    for path in logs:
        text = path.read_text(errors="replace") if path.exists() else ""
        for m in re.finditer(r"Available KV cache memory: ([\d.]+) GiB", text):
            found["kv_cache_gib"] = float(m.group(1))
        for m in re.finditer(r"[GC]PU KV cache size: ([\d,]+) tokens", text):
            found["kv_cache_tokens"] = float(m.group(1).replace(",", ""))
    return found


def server_flags(args: argparse.Namespace, model: str, total_bytes: int) -> list[str]:
    flags = ["--max-model-len", "1024", "--max-num-seqs", str(PROMPTS * GROUP)]
    if total_bytes:
        flags += ["--dtype", "bfloat16", "--enforce-eager",
                  "--gpu-memory-utilization", f"{args.vllm_gib * GIB / total_bytes:.4f}"]
    if args.kv_gib:
        # A fixed KV cache: vLLM then skips sizing it from whole-device free memory, which
        # other processes starting or stopping beside it would skew.
        flags += ["--kv-cache-memory-bytes", str(int(args.kv_gib * GIB))]
    if is_shape_model(model):
        flags += ["--load-format", "dummy"]
    return flags


def run_config(args: argparse.Namespace, name: str, model: str, total_bytes: int,
               server: ManagedProcess | None, port: int, run_dir: Path, bridge_dir: Path
               ) -> dict[str, Any]:
    # The trainer's CUDA context (~0.5 GiB) is outside the allocator's cap: leave room for it.
    budget = args.cap_gib - args.vllm_gib - CONTEXT_GIB
    spec = {"config": name, "model": model, "port": port, "run_dir": str(run_dir),
            "bridge_dir": str(bridge_dir), "steps": args.steps, "micro_batch": args.micro_batch,
            "fraction": budget * GIB / total_bytes if total_bytes else 1.0,
            "vllm_args": " ".join(server_flags(args, model, total_bytes))}
    result_path = run_dir / f"{name}.result.json"
    child = ManagedProcess.python(f"trainer-{name}", [
        str(Path(__file__).resolve()), "--child", json.dumps(spec), "--out", str(result_path)],
        run_dir / f"{name}.trainer.log")
    sampler = PeakSampler({child.pid} | ({server.pid} if server else set()))
    sampler.start()
    deadline = time.monotonic() + args.timeout
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.5)  # polling a child's exit, not synchronising on it
    sampler.done.set()
    sampler.join()
    child.stop()
    if result_path.exists():
        row = json.loads(result_path.read_text())
    else:
        row = {"fits": False, "phase": "crashed", "error": child.log_tail()[-2000:]}
    logs = [server.log_path] if server else sorted(run_dir.glob("logs/vllm_*.log"))
    return {"config": name, "bridge": CONFIGS[name][0], "optimizer": CONFIGS[name][1],
            "gradient_checkpointing": CONFIGS[name][2], **row,
            "peak_device_bytes": sampler.peak, "peak_device_gib": sampler.peak / GIB,
            **kv_cache(logs, args.kv_gib), "trainer_fraction": spec["fraction"],
            "vllm_args": spec["vllm_args"]}


def start_servers(args: argparse.Namespace, model: str, total: int, bridges: set[str]
                  ) -> dict[str, tuple[ManagedProcess, int, Path]]:
    """bridge -> (its server, port, folder of its log and bridge config), started at once."""
    servers = {}
    try:
        for bridge in sorted(bridges):
            port, folder = free_port(), args.run_dir / args.model / f"server_{bridge}"
            extra = server_flags(args, model, total) + (
                ["--enable-lora", "--max-lora-rank", "16"] if bridge == "lora_only" else [])
            env = {"VLLM_ENABLE_SHARED_WEIGHTS": "1"} if bridge == "shared_vllm" else {}
            proc = ManagedProcess.python(f"vllm-{bridge}", server_args(model, port, extra),
                                         folder / "vllm.log", env={"LOGDIR": str(folder), **env})
            servers[bridge] = (proc, port, folder)
        for proc, port, _ in servers.values():
            proc.wait_healthy(f"http://127.0.0.1:{port}/health", 900)
    except BaseException:
        for proc, _, _ in servers.values():
            proc.stop()
        raise
    return servers


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--cap-gib", type=float, default=80.0, help="vLLM + trainer, GiB")
    parser.add_argument("--vllm-gib", type=float, default=35.0,
                        help="vLLM's share: weights, activations and the KV cache")
    parser.add_argument("--kv-gib", type=float, help="a fixed KV cache (GiB) instead of what "
                        "is left of --vllm-gib after weights and activations")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "memory")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: the trainer process
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(trainer_child(json.loads(args.child))))
        return
    import torch

    raise_on_sigterm()  # a `timeout` must not orphan the servers started here
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    model = resolve_model(args.model)
    names = args.configs.split(",")
    rows = []
    # The servers the configurations need start together (a cold 8B start is minutes); each
    # stops after its last configuration, before mode none starts its own. A row counts only
    # its own processes: its server's and its trainer's.
    servers = start_servers(args, model, total, {CONFIGS[n][0] for n in names} - {"none"})
    try:
        for name in names:
            bridge = CONFIGS[name][0]
            run_dir = args.run_dir / args.model / name
            run_dir.mkdir(parents=True, exist_ok=True)
            server, port, bridge_dir = servers.get(bridge, (None, free_port(), run_dir))
            row = run_config(args, name, model, total, server, port, run_dir, bridge_dir)
            rows.append(row)
            write(args, total, rows)  # each row as it comes: a killed run keeps what it measured
            log.info("%s: fits %s (%s), peak %.1f GiB, KV cache %s GiB, optimizer state %s, "
                     "step %s s", name, row["fits"], row["phase"], row["peak_device_gib"],
                     row["kv_cache_gib"], row.get("optimizer_state_bytes"),
                     row.get("median_step_s"))
            if server is not None and all(CONFIGS[n][0] != bridge
                                          for n in names[names.index(name) + 1:]):
                server.stop()
    finally:
        for server, _, _ in servers.values():
            server.stop()


def write(args: argparse.Namespace, total: int, rows: list[dict[str, Any]]) -> None:
    out = args.out or ROOT / "benchmarks" / "results" / f"memory_{device_label()}.json"
    merged = json.loads(out.read_text()) if out.exists() else {"benchmark": "memory"}
    merged |= {"machine": machine_info(), "device_total_bytes": total,
               "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    merged.setdefault("models", {})[args.model] = {
        "cap_gib": args.cap_gib, "vllm_gib": args.vllm_gib, "kv_gib": args.kv_gib,
        "steps": args.steps,        "micro_batch": args.micro_batch, "completions": PROMPTS * GROUP,
        "new_tokens": NEW_TOKENS, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
