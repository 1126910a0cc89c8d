"""Weight bridges; `make_bridge` is the only reader of --weight-bridge-mode."""

from __future__ import annotations

from example_trainer.bridges.base import WeightBridge
from example_trainer.config import TrainConfig


def make_bridge(cfg: TrainConfig) -> WeightBridge:
    # Imports stay inside: each bridge pulls in what only it needs (peft, CUDA IPC).
    if cfg.weight_bridge_mode == "lora_only":
        from example_trainer.bridges.lora import LoraBridge

        return LoraBridge(cfg)
    if cfg.weight_bridge_mode == "none":
        from example_trainer.bridges.restart import RestartBridge

        return RestartBridge(cfg)
    if cfg.weight_bridge_mode == "shared_vllm":
        from example_trainer.bridges.shared_vllm import SharedVllmBridge

        return SharedVllmBridge(cfg)
    raise ValueError(f"unknown --weight-bridge-mode {cfg.weight_bridge_mode!r}")


__all__ = ["WeightBridge", "make_bridge"]
