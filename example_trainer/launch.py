"""One command for the whole stack on one machine: batching API, inference server, environment
and trainer, on free ports, health-checked, with step/reward lines streamed, and every process
stopped by its pid on exit, error or Ctrl-C.

    python -m example_trainer.launch --preset cpu-demo   # SmolLM2-135M, arithmetic, single copy
    python -m example_trainer.launch --preset cpu-lora   # the same with lora_only (slow on CPU)
    python -m example_trainer.launch --preset gpu        # shared_vllm on one GPU

Before and after training it prints the served model's greedy accuracy on held-out problems.
Logs of each process: <run-dir>/logs/*.log; metrics: <run-dir>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from example_trainer.inference.manager import server_args
from example_trainer.machine import DTYPE_CHOICES, machine_info, resolve_dtype
from example_trainer.models import resolve_model
from example_trainer.process import ManagedProcess, free_port, raise_on_sigterm

log = logging.getLogger("launch")


@dataclass(frozen=True)
class Preset:
    model: str
    bridge: str
    steps: int
    group_size: int  # completions per prompt
    prompts_per_step: int
    lr: float
    full_finetune: bool  # the optimizer then follows the dtype (OPTIMIZER_FOR_DTYPE)
    trainer_args: tuple[str, ...] = ()
    vllm_args: tuple[str, ...] = ()
    # The task, the same for training rollouts and the greedy evaluations before and after.
    task: dict[str, int] = field(default_factory=lambda: {"difficulty": 2, "max_new_tokens": 16})
    env_args: tuple[str, ...] = ()
    eval_problems: int = 200
    vllm_env: dict[str, str] = field(default_factory=dict)

    @property
    def task_args(self) -> list[str]:
        """The task as the environment's command-line flags."""
        return [a for k, v in self.task.items() for a in (f"--env.{k}", str(v))]

    @property
    def batch(self) -> int:
        """Sequences per optimizer step."""
        return self.group_size * self.prompts_per_step


# Full fine-tuning: bf16 weights lose AdamW steps below half an ulp, so they train through fp32
# masters; fp32 weights need nothing more than AdamW. LoRA adapters are fp32 in either case.
OPTIMIZER_FOR_DTYPE = {"bfloat16": "adamw_fp32_master", "float16": "adamw_fp32_master",
                       "float32": "adamw"}
# 2-core CPU: generation is paused while the trainer computes (--pause-generation-during-step),
# so vLLM may use both cores instead of reserving one for its API process; eager mode starts in
# seconds where torch.compile takes ~90 s on a cold cache, and generates as fast here.
CPU_VLLM_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
CPU_VLLM_ARGS = ("--enforce-eager", "--max-model-len", "512")

PRESETS = {
    # 2-core CPU, LoRA r=16: vllm-cpu 0.32 generates with an adapter at ~15 tokens/s (~300
    # without), so steps take ~80 s where cpu-demo's take ~20 s.
    "cpu-lora": Preset(
        model="smollm2", bridge="lora_only", steps=30, group_size=8, prompts_per_step=8, lr=2e-4,
        full_finetune=False,
        trainer_args=("--batch-size", "16", "--gradient-accumulation-steps", "4",
                      "--lora-r", "16", "--lora-alpha", "32", "--pause-generation-during-step"),
        # --max-loras 2: requests still running on the previous adapter keep their slot.
        vllm_args=("--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                   "--gpu-memory-utilization", "0.2", *CPU_VLLM_ARGS),
        # 8 groups in flight: the whole step's 64 completions share one engine batch.
        env_args=("--env.temperature", "0.7", "--env.max_num_workers", "8"),
        vllm_env=CPU_VLLM_ENV,
    ),
    # 2-core CPU, single copy (shared memory, see README). Sized for a CPU without native bf16
    # (float32: ~0.4 s of forward/backward per sequence): 4 prompts x 8 completions per step,
    # only groups whose completions disagree (the others carry no GRPO signal); about half are
    # dropped, so 12 groups in flight make one engine batch that fills a step.
    "cpu-demo": Preset(
        model="smollm2", bridge="shared_vllm", steps=16, group_size=8, prompts_per_step=4,
        lr=4e-5, full_finetune=True,
        trainer_args=("--batch-size", "32", "--pause-generation-during-step"),
        vllm_args=("--gpu-memory-utilization", "0.2", *CPU_VLLM_ARGS),
        env_args=("--env.temperature", "0.7", "--env.max_num_workers", "12",
                  "--env.ensure_scores_are_not_same", "true"),
        vllm_env={"VLLM_ENABLE_SHARED_WEIGHTS": "1", **CPU_VLLM_ENV},
    ),
    # One GPU, single copy; learning_sweep's cpu_recipe unpaused (README, "What learns more").
    "gpu": Preset(
        model="smollm2", bridge="shared_vllm", steps=60, group_size=8, prompts_per_step=8,
        lr=2e-5, full_finetune=True, trainer_args=("--batch-size", "64",),
        vllm_args=("--gpu-memory-utilization", "0.4", "--max-model-len", "512"),
        task={"difficulty": 2, "max_new_tokens": 32},
        env_args=("--env.temperature", "0.7", "--env.max_num_workers", "12",
                  "--env.dynamic_sampling", "true"),
        vllm_env={"VLLM_ENABLE_SHARED_WEIGHTS": "1"},
    ),
}

STEP_LINE = re.compile(r"step \d+ \|")


class Stack:
    """The processes of one run, stopped in reverse start order."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: list[ManagedProcess] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None
              ) -> ManagedProcess:
        proc = ManagedProcess.python(name, args, self.run_dir / "logs" / f"{name}.log", env=env)
        self.procs.append(proc)
        return proc

    def check_alive(self, finishing: ManagedProcess) -> None:
        """Every process but `finishing` serves the whole run: any exit is a failure."""
        for proc in self.procs:
            if proc is not finishing and not proc.alive():
                raise RuntimeError(f"{proc.name} (pid {proc.pid}) exited with code "
                                   f"{proc.popen.returncode}; {proc.log_excerpt()}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def evaluate(preset: Preset, vllm_url: str, tokenizer: str, label: str) -> float:
    """Greedy accuracy of the served model on the preset's held-out problems."""
    from environments.arithmetic_server import greedy_accuracy

    n = preset.eval_problems
    accuracy = float(greedy_accuracy(vllm_url, tokenizer, n, **preset.task)["accuracy"])
    log.info("greedy accuracy %s training: %.1f%% on %d held-out problems", label,
             100 * accuracy, n)
    return accuracy


def dtype_args(preset: Preset, dtype: str) -> tuple[list[str], list[str]]:
    """(trainer args, vLLM args) that put both processes on `dtype`, with its optimizer."""
    trainer = ["--dtype", dtype]
    if preset.full_finetune:
        trainer += ["--optimizer", OPTIMIZER_FOR_DTYPE[dtype]]
    return trainer, ["--dtype", dtype]


def start_servers(stack: Stack, preset: Preset, model: str, dtype: str) -> tuple[str, str]:
    """The batching API and the inference server on free ports, healthy; returns their URLs."""
    api_port, vllm_port = free_port(), free_port()
    # A queue of two steps bounds staleness, and on a small machine keeps generation from
    # taking the cores the trainer needs (the env throttles on /status-env and backs off on 503).
    api = stack.start("api", ["-m", "environments.api_server", "--port", str(api_port),
                              "--max-queue-sequences", str(2 * preset.batch)])
    vllm = stack.start("vllm", server_args(model, vllm_port,
                                           [*preset.vllm_args, *dtype_args(preset, dtype)[1]]),
                       env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                            "LOGDIR": str(stack.run_dir), **preset.vllm_env})
    api_url, vllm_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{vllm_port}"
    api.wait_healthy(f"{api_url}/status", 60)
    log.info("waiting for vLLM to load %s in %s (30-90 s on a CPU) ...", model, dtype)
    vllm.wait_healthy(f"{vllm_url}/health", 900)
    return api_url, vllm_url


def start_training(stack: Stack, preset: Preset, model: str, dtype: str, api_url: str,
                   vllm_url: str) -> tuple[ManagedProcess, ManagedProcess]:
    """The trainer and the environment; returns (trainer, env)."""
    trainer = stack.start("trainer", [
        "-m", "example_trainer.grpo", "--model-name", model,
        "--weight-bridge-mode", preset.bridge, "--api-url", api_url,
        "--vllm-port", vllm_url.rsplit(":", 1)[1], "--training-steps", str(preset.steps),
        "--lr", str(preset.lr), "--save-path", str(stack.run_dir), "--max-token-len", "512",
        *dtype_args(preset, dtype)[0], *preset.trainer_args,
    ], env={"LOGDIR": str(stack.run_dir)})
    env = stack.start("env", [
        "-m", "environments.arithmetic_server", "serve",
        "--env.rollout_server_url", api_url, "--env.tokenizer_name", model,
        "--env.group_size", str(preset.group_size), "--env.batch_size", str(preset.batch),
        "--openai.base_url", vllm_url, "--openai.model_name", model,
        "--openai.server_type", "vllm", *preset.task_args, *preset.env_args,
    ])
    return trainer, env


def run(preset: Preset, run_dir: Path, skip_eval: bool, dtype: str) -> dict[str, Any]:
    """Start the stack, train, evaluate before/after, stop everything; returns the report that
    is also written to <run_dir>/report.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(preset.model)
    report: dict[str, Any] = {"command": " ".join(["python -m example_trainer.launch",
                                                   *sys.argv[1:]]),
                              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "preset": asdict(preset), "dtype": dtype, "machine": machine_info()}
    stack = Stack(run_dir)
    t0 = time.monotonic()
    try:
        api_url, vllm_url = start_servers(stack, preset, model, dtype)
        log.info("stack up after %.0fs: api %s, vllm %s", time.monotonic() - t0, api_url, vllm_url)
        if not skip_eval:
            report["greedy_accuracy_before"] = evaluate(preset, vllm_url, model, "before")
        trainer, env = start_training(stack, preset, model, dtype, api_url, vllm_url)
        stream_steps(stack, trainer)
        env.stop()  # its rollouts would compete with the evaluation for the same cores
        report["training_done_s"] = round(time.monotonic() - t0, 1)
        log.info("training done in %.0fs", report["training_done_s"])
        if not skip_eval:
            after = evaluate(preset, vllm_url, model, "after")
            before = report["greedy_accuracy_before"]
            report["greedy_accuracy_after"] = after
            log.info("greedy accuracy: %.3f -> %.3f (%+.1f points)", before, after,
                     100 * (after - before))
    finally:
        stack.stop_all()
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    report |= step_summary(run_dir / "metrics.jsonl")
    write_json_atomic(run_dir / "report.json", report)
    log.info("all processes stopped after %.0fs; run folder %s", report["wall_seconds"], run_dir)
    return report


def step_summary(metrics_path: Path) -> dict[str, Any]:
    """Reward per step and median step/sync seconds from the trainer's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    return {"reward_per_step": [round(r["reward/mean"], 4) for r in rows],
            "median_step_s": statistics.median(r["time/step"] for r in rows),
            "median_fwd_bwd_s": statistics.median(r["time/fwd_bwd"] for r in rows),
            "median_sync_s": statistics.median(r["time/sync"] for r in rows)}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def stream_steps(stack: Stack, trainer: ManagedProcess) -> None:
    """Echo the trainer's step lines until it exits; fail fast if any process dies."""
    offset = 0
    while True:
        done = not trainer.alive()
        text = trainer.log_path.read_text(errors="replace")
        for line in text[offset:].splitlines():
            if STEP_LINE.search(line) or "Error" in line:
                log.info("trainer: %s", line.split(": ", 1)[-1])
        offset = len(text)
        if done:
            if trainer.popen.returncode != 0:
                raise RuntimeError(f"trainer failed; {trainer.log_excerpt()}")
            return
        stack.check_alive(finishing=trainer)
        time.sleep(1.0)  # polling a log file, not synchronising


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--model", help="override the preset's model (path or hub name)")
    parser.add_argument("--run-dir", type=Path,
                        default=Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--skip-eval", action="store_true", help="no accuracy before/after")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights of vLLM and the trainer; auto: bfloat16 on CUDA and on CPUs "
                        "with native bf16, else float32 (example_trainer.machine)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, steps=args.steps)
    if args.model:
        preset = replace(preset, model=args.model)
    raise_on_sigterm()  # the `finally` in run() stops every child
    try:
        run(preset, args.run_dir, args.skip_eval, resolve_dtype(args.dtype))
    except KeyboardInterrupt:
        log.info("interrupted; stopped everything")
        sys.exit(130)


if __name__ == "__main__":
    main()
