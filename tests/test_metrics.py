"""Metrics rows: JSONL per step, non-finite values dropped, wandb offline, the plot CLI."""

from __future__ import annotations

import json
import math

import pytest

from example_trainer.config import parse_config
from example_trainer.metrics import STEP_KEYS, MetricsLogger
from example_trainer.plot import plot


def row(step: int, reward: float) -> dict[str, float]:
    r = {k: 0.0 for k in STEP_KEYS}
    r.update({"step": step, "reward/mean": reward, "loss/total": 1.0 / step})
    return r


def test_jsonl_rows_and_non_finite_values_dropped(tmp_path):
    log = MetricsLogger(parse_config(["--training-steps", "2"]), tmp_path, first_step=0)
    log.log_step(row(1, 0.25))
    log.log_step({**row(2, 0.5), "loss/approx_kl": math.nan})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in rows] == [0.25, 0.5]
    assert "loss/approx_kl" in rows[0] and "loss/approx_kl" not in rows[1]


def test_wandb_offline_logs_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    log = MetricsLogger(parse_config(["--use-wandb", "--training-steps", "1"]), tmp_path / "run",
                        first_step=0)
    log.log_step(row(1, 0.75))
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_plot_writes_a_png(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("\n".join(json.dumps(row(s, s / 10)) for s in range(1, 6)))
    out = plot(jsonl, tmp_path / "run.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
