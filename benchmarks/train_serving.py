"""Serving while training inside the server: /v1/completions latency with the training worker
idle, then while a POST /train job runs on the same (shared) weights; plus the job's own pace.

    python benchmarks/train_serving.py [--model smollm2] [--steps 10] [--samples 8]

Writes benchmarks/results/train_serving_<device>.json (or --out) with the machine and versions.
The server is stopped by its pid on exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sync_latency import device_label, machine_info  # noqa: E402
from example_trainer.inference.manager import start_vllm  # noqa: E402
from example_trainer.models import resolve_model  # noqa: E402
from example_trainer.process import free_port, raise_on_sigterm  # noqa: E402

log = logging.getLogger("train_serving")


def completion_seconds(url: str, model: str, tokens: int) -> float:
    t0 = time.monotonic()
    r = requests.post(f"{url}/v1/completions", json={
        "model": model, "prompt": "Write a short poem about the sea.", "max_tokens": tokens,
        "temperature": 0.0, "ignore_eos": True}, timeout=300)
    r.raise_for_status()
    return time.monotonic() - t0


def rss_kib(pid: int) -> dict[str, int]:
    """The worker's own memory (RssAnon) and the shared weights it maps (RssShmem), KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median_s": statistics.median(xs), "max_s": max(xs),
            "mean_s": statistics.fmean(xs)}


def measure(args: argparse.Namespace, url: str, model: str) -> dict[str, Any]:
    def status() -> dict:
        return requests.get(f"{url}/train/status", timeout=30).json()

    deadline = time.monotonic() + 600
    while status()["worker"]["state"] != "idle":
        if time.monotonic() > deadline:
            raise TimeoutError("the training worker did not become ready in 600 s")
        time.sleep(0.5)
    idle = [completion_seconds(url, model, args.tokens) for _ in range(args.requests)]
    samples = [{"input": f"What is {a} + {a + 3}?", "expected_output": str(2 * a + 3)}
               for a in range(10, 10 + args.samples)]
    r = requests.post(f"{url}/train", json={"training_data": {"samples": samples, "config": {
        "learning_rate": 1e-5, "max_steps": args.steps, "batch_size": args.samples}}},
        timeout=30)
    r.raise_for_status()
    job_id, t0 = r.json()["job_id"], time.monotonic()
    during, pid, peak = [], status()["worker"]["pid"], {}
    while (job := requests.get(f"{url}/status/{job_id}", timeout=30).json())["status"] in (
            "queued", "running"):
        during.append(completion_seconds(url, model, args.tokens))
        peak = {k: max(v, peak.get(k, 0)) for k, v in rss_kib(pid).items()}
    if job["status"] != "completed":
        raise RuntimeError(f"the job failed: {job.get('error')}")
    job_s = time.monotonic() - t0
    out = {"idle": stats(idle), "during_training": stats(during or [float("nan")]),
           "job": {"steps": args.steps, "samples": args.samples, "seconds": job_s,
                   "seconds_per_step": job_s / args.steps, "loss_history": job["loss_history"]},
           "worker": status()["worker"],
           "worker_memory_peak_mib": {k: v / 1024 for k, v in peak.items()}}
    out["slowdown_median"] = out["during_training"]["median_s"] / out["idle"]["median_s"]
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of the job")
    parser.add_argument("--samples", type=int, default=8, help="samples (= batch) of the job")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--requests", type=int, default=8, help="completions while idle")
    parser.add_argument("--vllm-args", default="--max-model-len 1024 --enforce-eager")
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "train_serving")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    raise_on_sigterm()
    model = resolve_model(args.model)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc, start_s = start_vllm(
        model, port, args.run_dir / "vllm.log",
        [*args.vllm_args.split(), "--enable-training", "--training-dir",
         str(args.run_dir / "training")], timeout_s=900, env={"LOGDIR": str(args.run_dir)})
    try:
        result = measure(args, f"http://127.0.0.1:{port}", model)
    finally:
        proc.stop()
    report = {"benchmark": "train_serving", "model": model, "args": {
        k: str(v) for k, v in vars(args).items()}, "machine": machine_info(),
        "server_start_s": start_s, **result}
    out = args.out or ROOT / "benchmarks" / "results" / f"train_serving_{device_label()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    log.info("idle %.2f s, during training %.2f s (x%.2f) per %d-token completion; job %.1f s "
             "per step; wrote %s", result["idle"]["median_s"],
             result["during_training"]["median_s"], result["slowdown_median"], args.tokens,
             result["job"]["seconds_per_step"], out)


if __name__ == "__main__":
    main()
