"""Per-step metrics: one line-buffered JSONL row, one human-readable log line, optional wandb."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from tqdm import tqdm

from example_trainer.config import TrainConfig

log = logging.getLogger(__name__)

# The keys every step row carries (pinned by a test); bridges and the loss may add more.
STEP_KEYS = (
    "step", "loss/total", "loss/pg", "loss/clipfrac_low", "loss/clipfrac_high", "loss/approx_kl",
    "loss/entropy", "reward/mean", "reward/std", "adv/std", "optim/grad_norm", "optim/lr",
    "perf/tokens_per_s", "perf/mem_gib", "time/wait_batch", "time/fwd_bwd", "time/sync",
    "time/step", "data/dropped_groups", "data/stale_dropped_groups",
    "data/dynamic_dropped_groups", "data/dynamic_extra_gen_s",
)


BENCHMARK_KEYS = ("time/step", "time/wait_batch", "time/fwd_bwd", "time/sync", "perf/tokens_per_s")


def _truncate_after(path: Path, step: int) -> None:
    """Drop rows of steps after `step`: a run resumed from an earlier checkpoint redoes them,
    and each step must appear once. Rewritten atomically (temp file + rename)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) == len(lines):
        return
    log.info("metrics: dropping %d rows after step %d (redone on resume)", len(lines) - len(keep),
             step)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


class MetricsLogger:
    def __init__(self, cfg: TrainConfig, run_dir: Path, first_step: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.benchmark = cfg.benchmark
        self.rows: list[dict[str, float]] = []
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, first_step)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._bar = tqdm(total=cfg.training_steps, initial=first_step, desc="grpo", unit="step",
                         dynamic_ncols=True, disable=None)
        self._wandb = None
        if cfg.use_wandb:
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, group=cfg.wandb_group or None,
                                     config=json.loads(cfg.to_json()), resume="allow")

    def log_step(self, row: dict[str, float]) -> None:
        finite = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if len(finite) != len(row):
            log.warning("dropping non-finite metrics: %s", sorted(set(row) - set(finite)))
        self._file.write(json.dumps(finite) + "\n")
        self.rows.append(finite)
        if self._wandb is not None:
            self._wandb.log(finite, step=int(row["step"]))
        self._bar.update(1)
        self._bar.set_postfix(reward=f"{row.get('reward/mean', float('nan')):.3f}")
        log.info(
            "step %d | reward %.3f | loss %.4f | clip %.3f/%.3f | kl %.4f | grad %.3f | "
            "%.0f tok/s | wait %.2fs | sync %.2fs | step %.1fs",
            row["step"], row["reward/mean"], row["loss/total"], row["loss/clipfrac_low"],
            row["loss/clipfrac_high"], row["loss/approx_kl"], row["optim/grad_norm"],
            row["perf/tokens_per_s"], row["time/wait_batch"], row["time/sync"], row["time/step"],
        )

    def _write_benchmark(self) -> None:
        summary = {k: statistics.median(r[k] for r in self.rows if k in r)
                   for k in BENCHMARK_KEYS if any(k in r for r in self.rows)}
        summary["steps"] = len(self.rows)
        (self.run_dir / "benchmark.json").write_text(json.dumps(summary, indent=2))
        log.info("benchmark (medians over %d steps): %s", len(self.rows),
                 ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k != "steps"))

    def close(self) -> None:
        if self.benchmark and self.rows:
            self._write_benchmark()
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
