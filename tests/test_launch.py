"""The one-command launcher: the whole stack runs a short training and every process it started
is gone afterwards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import DTYPE, ROOT


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.integration
def test_launcher_trains_and_stops_everything(smollm2_model, tmp_path):
    """The README's demo command, 2 steps. SmolLM2, not the tiny random model: the demo trains
    only on groups whose rewards differ, and a random model never earns one."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "example_trainer.launch", "--preset", "cpu-demo", "--model",
         str(smollm2_model), "--steps", "2", "--skip-eval", "--run-dir", str(run_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-10000:]  # the launcher puts the first error in it
    started = {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", log)}
    assert set(started) == {"api", "vllm", "trainer", "env"}
    assert not [name for name, pid in started.items() if pid_alive(pid)]
    assert len(re.findall(r"trainer: step \d+ \|", log)) == 2  # step lines were streamed
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["adv/std"] > 0 for r in rows)  # only groups with a reward spread were trained
    report = json.loads((run_dir / "report.json").read_text())
    assert report["dtype"] == DTYPE and report["machine"]["auto_dtype"] == DTYPE
    assert len(report["reward_per_step"]) == 2 and report["wall_seconds"] > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dtype"] == DTYPE  # vLLM and the trainer on the machine's dtype
