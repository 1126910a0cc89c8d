"""What our routes add to vLLM's app state (app.state.grpo), and how a route finds it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from vllm.lora.request import LoRARequest

from example_trainer.inference.engine import EngineProbe, GenerationPause
from example_trainer.inference.requests import ModelLimits
from example_trainer.inference.training import TrainingService


@dataclass
class ServerState:
    """What our routes add to vLLM's app state (app.state.grpo)."""

    pause: GenerationPause
    probe: EngineProbe
    limits: ModelLimits
    lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active_lora: LoRARequest | None = None
    active_lora_sent_path: str | None = None  # as the client sent it (never resolved here)
    lora_load_count: int = 0
    # Bumped by each of shared_vllm's in-process fenced writes (salts the prefix cache); None
    # without that fence.
    fence_version: Callable[[], int] | None = None
    # The trainer step whose weights are served, as POST /bridge/notify_update last said.
    weight_version: int | None = None
    # In-server training (POST /train), with --enable-training.
    training: TrainingService | None = None


def state_of(request: Request) -> ServerState:
    return request.app.state.grpo

