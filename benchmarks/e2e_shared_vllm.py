"""End to end with one copy of the weights: batching API + our vLLM server (exporting its
weights) + the arithmetic environment + `grpo.py --weight-bridge-mode shared_vllm`, with greedy
accuracy on held-out problems before and after, and the reward of every step.

    python benchmarks/e2e_shared_vllm.py --steps 25 [--optimizer adamw_fp32_master] [--lr 1e-5]
        [--trainer-args "--loss-aggregation dr-grpo"] [--env-args "--env.group_size 16"]
        [--seed 1] [--transfer]

Writes benchmarks/results/e2e_shared_vllm_<device>.json (or --out). Every process is stopped by
its pid on exit. --trainer-args / --env-args are passed through to grpo.py / the arithmetic env
after this script's own flags (so they win); each step stays 64 sequences whatever the group
size. --transfer also scores greedy accuracy on three-operand sums ("a + b + c", held out the
same way), before and after training: did it learn to add, or only the two-operand format?
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sync_latency import device_label, machine_info  # noqa: E402
from example_trainer.inference.manager import server_args  # noqa: E402
from example_trainer.launch import OPTIMIZER_FOR_DTYPE  # noqa: E402
from example_trainer.machine import DTYPE_CHOICES, resolve_dtype  # noqa: E402
from example_trainer.models import resolve_model  # noqa: E402
from example_trainer.process import ManagedProcess, free_port, raise_on_sigterm  # noqa: E402

log = logging.getLogger("e2e_shared_vllm")


# The per-step keys kept in the result; the optional ones only where the trainer logged them
# (staleness needs versioned rollouts, the dynamic-sampling counts come with that flag).
STEP_KEYS = ("step", "reward/mean", "loss/total", "optim/grad_norm", "time/sync", "sync/stall_s",
             "time/step")
OPTIONAL_STEP_KEYS = ("optim/lr", "data/dropped_groups", "data/stale_dropped_groups",
                      "data/staleness_mean", "data/staleness_max", "data/dynamic_dropped_groups",
                      "data/dynamic_extra_gen_s")


def accuracy(vllm_url: str, model: str, n: int, **env_fields) -> float:
    from environments.arithmetic_server import greedy_accuracy

    return float(greedy_accuracy(vllm_url, n=n, tokenizer_name=model, **env_fields)["accuracy"])


def start_stack(args: argparse.Namespace, run: Path, model: str, procs: list[ManagedProcess]
                ) -> tuple[str, str]:
    """API and vLLM, appended to `procs` as they start (the caller stops them, also when a
    start fails or a SIGTERM interrupts it)."""
    api_port, vllm_port = free_port(), free_port()
    api_url, vllm_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{vllm_port}"
    procs.append(ManagedProcess.python("api", ["-m", "environments.api_server", "--port",
                                               str(api_port)], run / "api.log"))
    procs.append(ManagedProcess.python(
        "vllm", server_args(model, vllm_port, args.vllm_args.split()), run / "vllm.log",
        env={"VLLM_ENABLE_SHARED_WEIGHTS": "1", "LOGDIR": str(run)}))
    procs[0].wait_healthy(f"{api_url}/status", 60)
    procs[1].wait_healthy(f"{vllm_url}/health", 900)
    return api_url, vllm_url


def train(args: argparse.Namespace, run: Path, model: str, api_url: str, vllm_url: str,
          procs: list[ManagedProcess]) -> float:
    t0 = time.monotonic()
    trainer = ManagedProcess.python("trainer", [
        "-m", "example_trainer.grpo", "--model-name", model, "--weight-bridge-mode",
        "shared_vllm", "--api-url", api_url, "--vllm-port", vllm_url.rsplit(":", 1)[1],
        "--training-steps", str(args.steps), "--lr", str(args.lr), "--optimizer",
        args.optimizer, "--dtype", args.dtype, "--batch-size", "64", "--max-token-len", "512",
        "--save-path", str(run / "trainer"), "--vllm-config-path", str(run),
        "--seed", str(args.seed), *args.trainer_args.split(),
    ], run / "trainer.log", env={"LOGDIR": str(run)})
    procs.append(trainer)
    procs.append(ManagedProcess.python("env", [
        "-m", "environments.arithmetic_server", "serve", "--env.rollout_server_url", api_url,
        "--env.tokenizer_name", model, "--env.group_size", "8", "--env.total_steps", "-1",
        "--env.max_new_tokens", "32", "--env.difficulty", "2", "--openai.base_url", vllm_url,
        "--openai.server_type", "vllm", "--openai.model_name", model, "--env.seed",
        str(args.seed), *args.env_args.split()], run / "env.log"))
    deadline = time.monotonic() + args.timeout
    while trainer.alive():
        dead = [p for p in procs if not p.alive() and p is not trainer]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{[p.name for p in dead] or 'deadline'}; trainer log:\n"
                               f"{trainer.log_tail()}")
        time.sleep(1.0)  # polling a child's exit, not synchronising on it
    if trainer.popen.returncode != 0:
        raise RuntimeError(f"trainer failed:\n{trainer.log_tail()}")
    return time.monotonic() - t0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--optimizer", default="",
                        help="default: adamw_fp32_master on bf16 weights, adamw on fp32")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights of vLLM and the trainer (auto: the machine's)")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems (0: skip)")
    # The GPU tests' server flags: a warm torch.compile cache on the same machine then applies.
    parser.add_argument("--vllm-args", default="--gpu-memory-utilization 0.3 "
                        "--max-model-len 1024")
    parser.add_argument("--trainer-args", default="",
                        help="extra grpo.py flags, one string (after ours: they win)")
    parser.add_argument("--env-args", default="",
                        help="extra arithmetic env flags, one string, e.g. '--env.group_size 16 "
                        "--env.temperature 1.2 --env.dynamic_sampling true'")
    parser.add_argument("--seed", type=int, default=0,
                        help="trainer seed and the env's training-problem order (the held-out "
                        "problems stay the same)")
    parser.add_argument("--transfer", action="store_true",
                        help="also score three-operand sums before and after training")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "e2e_shared_vllm")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.dtype = resolve_dtype(args.dtype)
    args.optimizer = args.optimizer or OPTIMIZER_FOR_DTYPE[args.dtype]
    args.vllm_args = f"--dtype {args.dtype} {args.vllm_args}"
    raise_on_sigterm()  # a `timeout` must not orphan the servers started here
    model = resolve_model(args.model)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    transfer = args.transfer and args.eval > 0
    procs: list[ManagedProcess] = []
    try:
        api_url, vllm_url = start_stack(args, args.run_dir, model, procs)
        before = accuracy(vllm_url, model, args.eval) if args.eval else None
        transfer_before = accuracy(vllm_url, model, args.eval, operands=3) if transfer else None
        seconds = train(args, args.run_dir, model, api_url, vllm_url, procs)
        after = accuracy(vllm_url, model, args.eval) if args.eval else None
        transfer_after = accuracy(vllm_url, model, args.eval, operands=3) if transfer else None
    finally:
        for proc in reversed(procs):
            proc.stop()
    rows = [json.loads(line) for line in
            (args.run_dir / "trainer" / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: r.get(k) for k in STEP_KEYS} | {k: r[k] for k in OPTIONAL_STEP_KEYS if k in r}
             for r in rows]
    result = {"benchmark": "e2e_shared_vllm", "model": model, "args": vars(args) | {
        "run_dir": str(args.run_dir), "out": str(args.out)}, "machine": machine_info(),
        "train_seconds": seconds, "greedy_accuracy_before": before,
        "greedy_accuracy_after": after, "steps": steps}
    if transfer:
        result["transfer"] = {"family": "three-operand sums (a + b + c, two-digit operands)",
                              "greedy_accuracy_before": transfer_before,
                              "greedy_accuracy_after": transfer_after}
    for r in result["steps"]:
        log.info("step %3d  reward %.3f  sync %.1f ms  stall %.1f ms  step %.2f s", r["step"],
                 r["reward/mean"], 1e3 * r["time/sync"], 1e3 * (r["sync/stall_s"] or 0),
                 r["time/step"])
    log.info("greedy accuracy %s -> %s; %d steps in %.0f s", before, after, len(rows), seconds)
    if transfer:
        log.info("transfer (a + b + c): greedy accuracy %s -> %s", transfer_before, transfer_after)
    out = args.out or ROOT / "benchmarks" / "results" / f"e2e_shared_vllm_{device_label()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
