"""What our routes add to vLLM's app state (app.state.grpo), and how a route finds it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from vllm.lora.request import LoRARequest

from example_trainer.inference.engine import EngineProbe, GenerationPause
from example_trainer.inference.requests import ModelLimits


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
    # The live weights' version (the trainer's fenced writes), with shared_vllm's in-process
    # fence; None otherwise.
    weight_version: Callable[[], int] | None = None


def state_of(request: Request) -> ServerState:
    return request.app.state.grpo

