"""Optimizer and LR schedule, picked once from the config."""

from __future__ import annotations

import torch
from torch import nn

from example_trainer.config import TrainConfig


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 0)
    # Linear warmup to the peak lr, then constant.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler
