"""shared_vllm end to end on vLLM's CPU build: the same bridge code as on a GPU, with CPU shared
memory in place of CUDA IPC (vllm_patching keeps vLLM's plain weights there, see plugin.py).
Real servers: ours (worker-extension door) and stock `vllm.entrypoints.openai.api_server`
(plugin door, VLLM_PLUGINS=grpo_bridge)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from transformers import AutoTokenizer

from example_trainer.checkpoint import save_model_folder
from example_trainer.inference.manager import STOCK_SERVER
from example_trainer.trainer import train
from tests.helpers import (
    DTYPE,
    PROMPT_IDS,
    attach,
    hf_logits,
    parity,
    restore,
    shared_memory_left,
    snapshot,
    start_env,
    start_vllm_server,
    train_until_greedy_is,
    trainer_cfg,
    vllm_greedy_token,
    vllm_prompt_logprobs,
    wait_until_stale,
)
from vllm_patching import bridge_config

pytestmark = pytest.mark.integration
SHARED_ENV = {"VLLM_ENABLE_SHARED_WEIGHTS": "1"}


@pytest.fixture(scope="module")
def shared_server(smollm2_model, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """Our server on SmolLM2 exporting its weights; yields (url, bridge config path)."""
    logdir = tmp_path_factory.mktemp("shared_cpu")
    proc, url = start_vllm_server(smollm2_model, logdir / "vllm.log", [],
                                  env={**SHARED_ENV, "LOGDIR": str(logdir)})
    config = logdir / bridge_config.CONFIG_NAME
    yield url, str(config)
    proc.stop()
    # vLLM SIGKILLs torch_shm_manager at shutdown; our plugin unlinks the weights and the fence
    assert shared_memory_left(config) == []


def test_parity_and_visibility_on_cpu(smollm2_model, shared_server, tmp_path):
    url, config_path = shared_server
    model, bridge = attach(smollm2_model, url, config_path)
    # No copy: every parameter lives in one of vLLM's tensors (shared memory files).
    assert all(p.untyped_storage().is_shared() for p in model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == len(
        bridge.tensors)
    p = parity(model, url, str(smollm2_model))
    print(f"cpu parity: {p}")
    # vLLM's CPU kernels and HF's differ (bf16: ~0.1 over 30 layers, measured against the
    # checkpoint loaded normally too); the views themselves compute what the checkpoint does.
    assert p["bound_vs_checkpoint_max"] < 1e-3
    assert p["max_abs_diff"] <= p["checkpoint_max_abs_diff"] + 1e-3
    assert p["max_abs_diff"] < 0.25 and p["mean_abs_diff"] < 0.1

    saved = snapshot(model)
    before = vllm_greedy_token(url, PROMPT_IDS)
    assert before == int(hf_logits(model, PROMPT_IDS)[-1].argmax())
    target = int(hf_logits(model, PROMPT_IDS)[-1].topk(2).indices[1])  # the runner-up
    served_before = vllm_prompt_logprobs(url, PROMPT_IDS)
    try:
        steps = train_until_greedy_is(model, bridge, PROMPT_IDS, target)
        # No copy, no reload: vLLM's next request already computes with the trainer's update.
        assert vllm_greedy_token(url, PROMPT_IDS) == target
        served_after = vllm_prompt_logprobs(url, PROMPT_IDS)
        moved = (served_after - served_before).abs().max().item()
        # Exact by construction: a fresh server, with the same kernels, started on the weights
        # the trainer now holds, must serve what the in-place server serves. A tensor kind left
        # behind, a repacked stale copy or a stale prefix-cache block would show up here.
        trained = save_model_folder(model, AutoTokenizer.from_pretrained(smollm2_model),
                                    tmp_path / "trained")
        fresh, fresh_url = start_vllm_server(
            trained, tmp_path / "fresh.log", [],
            env={**SHARED_ENV, "LOGDIR": str(tmp_path / "fresh")})
        try:
            reference = vllm_prompt_logprobs(fresh_url, PROMPT_IDS)
        finally:
            fresh.stop()
        assert shared_memory_left(tmp_path / "fresh" / bridge_config.CONFIG_NAME) == []
        gap = (served_after - reference).abs().max().item()
        print(f"cpu visibility ({DTYPE}): greedy token {before} -> {target} after {steps} "
              f"fenced steps; served logprobs moved max {moved:.3f}; in-place vs fresh server "
              f"on the saved weights: max {gap:.2e}; fence {bridge.after_step(steps)}")
        assert moved > 0.5 and gap < 1e-3
    finally:
        restore(model, saved, bridge)  # the module's server is shared with the next test
    assert vllm_greedy_token(url, PROMPT_IDS) == before
    bridge.close()


def test_grpo_trains_vllm_weights_in_place(smollm2_model, shared_server, api_server, tmp_path):
    url, config_path = shared_server
    port = int(url.rsplit(":", 1)[1])
    before = vllm_prompt_logprobs(url, PROMPT_IDS)
    env = start_env(tmp_path, api_server, url, smollm2_model)
    try:
        rows = train(trainer_cfg(smollm2_model, tmp_path, api_server, port,
                                 "--weight-bridge-mode", "shared_vllm", "--training-steps", "4",
                                 "--vllm-config-path", config_path, "--lr", "1e-4",
                                 "--optimizer", "adamw_fp32_master"))
    finally:
        env.stop()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["sync/pause_s"] > 0 and r["sync/resume_s"] > 0 for r in rows)
    assert all(r["time/sync"] == pytest.approx(r["sync/pause_s"] + r["sync/resume_s"])
               for r in rows)
    assert max(r["optim/grad_norm"] for r in rows) > 0
    moved = (vllm_prompt_logprobs(url, PROMPT_IDS) - before).abs().max().item()
    assert moved > 1e-3  # the server serves the trained weights; nothing was reloaded
    assert not requests.get(f"{url}/is_paused", timeout=10).json()["is_paused"]


def test_stock_vllm_serve_exports_through_the_plugin(tiny_model, tmp_path):
    proc, url = start_vllm_server(
        tiny_model, tmp_path / "vllm_stock.log", module=STOCK_SERVER,
        env={**SHARED_ENV, "LOGDIR": str(tmp_path), "VLLM_PLUGINS": "grpo_bridge",
             "VLLM_SERVER_DEV_MODE": "1"})
    try:
        path, config = bridge_config.find_live(logdir=str(tmp_path))
        assert config["transport"] == "cpu_shm" and config["num_params"] == 14
        # vLLM's own dev routes fence the step: POST /pause?mode=keep, POST /resume.
        model, bridge = attach(tiny_model, url, str(path))
        target = int(hf_logits(model, PROMPT_IDS)[-1].topk(2).indices[1])
        train_until_greedy_is(model, bridge, PROMPT_IDS, target, lr=1e-2)
        assert vllm_greedy_token(url, PROMPT_IDS) == target
        bridge.close()
    finally:
        proc.stop()
    wait_until_stale(config["process"])
    with pytest.raises(bridge_config.StaleBridgeConfig, match="is gone"):
        bridge_config.find_live(logdir=str(tmp_path))
    assert shared_memory_left(path) == []  # the plugin freed them in stock vLLM's API process

