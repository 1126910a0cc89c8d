"""Optimizer and LR schedule, picked once from the config.

Why several AdamWs: with bf16 weights (shared_vllm trains vLLM's own bf16 tensors) an update
smaller than half an ulp of the weight rounds back to the old value. At |w| ~ 0.5-1 an ulp is
2^-8 ~ 0.004, so a step of lr=1e-5 is lost entirely and plain AdamW stops learning. The fixes:
- adamw_fp32_master: AdamW runs on fp32 master copies (torch's own functional adam, so the math
  is torch's); the bf16 weight is the master's round-to-nearest after every step. Exact up to that
  one rounding; costs 12 bytes/param of state (master + two fp32 moments).
- adamw_kahan: torch-optimi's AdamW with Kahan summation: the rounding error of each bf16 update
  is kept in a bf16 compensation buffer and added back next step. 6 bytes/param of state.
  (torchao's bf16 stochastic rounding was the other candidate; in torchao 0.18 the plain AdamW
  is private (`_AdamW`) and compiles its step with torch.compile, so we chose torch-optimi, a
  pure-PyTorch package.)
- adamw_8bit / adamw_4bit: torchao's AdamW8bit / AdamW4bit: both moments block-quantized
  (8 bits + one fp32 scale per 256 values; 4 bits + one per 128), ~2.03 / ~1.06 bytes/param,
  and each bf16 update stochastically rounded: right in expectation, so small steps add up on
  average although each weight ends a random walk of about sqrt(travel) ulps from fp32's. The
  step is torch.compile'd per parameter shape (seconds to tens of seconds each, once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from example_trainer.config import TrainConfig


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master weights; the (low-precision) parameters receive their rounding.

    State per parameter: master (fp32), exp_avg, exp_avg_sq (fp32), step, all in state_dict().
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _init_state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["master"] = p.detach().to(torch.float32, copy=True)
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
            state["step"] = torch.tensor(0.0)  # on the CPU, as torch's non-capturable Adam keeps it
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            masters = [s["master"] for s in states]
            beta1, beta2 = group["betas"]
            adam(masters, [p.grad.to(torch.float32) for p in params],
                 [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                 [s["step"] for s in states], decoupled_weight_decay=True, amsgrad=False,
                 beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                 eps=group["eps"], maximize=False)
            # One rounding per step, from the exact fp32 value: no error accumulates.
            torch._foreach_copy_(params, masters)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        _restore_fp32_state(self, state_dict)


def _restore_fp32_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Put back the fp32 state tensors of a loaded state_dict.

    NOTE: Optimizer.load_state_dict casts floating state to each parameter's dtype; that would
    round fp32 masters and moments to bf16 on resume.
    """
    saved = state_dict["state"]
    for group_sd, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        for idx, p in zip(group_sd["params"], group["params"], strict=True):
            for key, value in saved.get(idx, {}).items():
                if key != "step" and type(value) is torch.Tensor and value.dtype == torch.float32:
                    optimizer.state[p][key] = value.to(p.device)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held now. A quantized state (torchao's tensor subclasses) counts
    its storage (codes, block scales, code book), not the dtype it poses as."""

    def nbytes(t: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    return sum(nbytes(t) for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


@functools.cache
def _torchao_adamw(name: str) -> type[torch.optim.Optimizer]:
    """torchao's AdamW8bit / AdamW4bit, adapted to this trainer (built on first use, so that
    torchao is imported only when asked for)."""
    try:
        import torchao.optim
    except ImportError as e:
        raise ImportError(f"torchao.optim.{name} (--optimizer adamw_8bit / adamw_4bit) needs "
                          "torchao: pip install torchao==0.18.0") from e

    class LowBitAdamW(getattr(torchao.optim, name)):
        """torchao's low-bit AdamW with two changes:
        - lr stays a float in param_groups, as torch's schedulers, our metrics and checkpoints
          expect; torchao keeps a 0-dim tensor (a new lr then does not recompile its step) and
          gets one for the duration of step().
        - Tensors torchao does not quantize (< 4,096 values or not a whole number of blocks:
          norms, biases) get fp32 moments, as in bitsandbytes; torchao would keep them in the
          parameter's dtype, where a bf16 second moment stops moving once beta2's increment is
          under half an ulp."""

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            torch.optim.Optimizer.add_param_group(self, param_group)  # skip torchao's tensor lr

        def _new_buffer(self, p: torch.Tensor, signed: bool) -> torch.Tensor:
            out = super()._new_buffer(p, signed)
            return out if is_traceable_wrapper_subclass(out) else out.float()

        def step(self, closure: Callable[[], float] | None = None) -> float | None:
            lrs = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            loss = super().step(closure)
            for group, lr in zip(self.param_groups, lrs, strict=True):
                group["lr"] = lr
            return loss

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)  # quantized states keep their class and dtype
            _restore_fp32_state(self, state_dict)

    return LowBitAdamW


def _adamw(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw_fp32_master(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return MasterWeightAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw_kahan(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    try:
        import optimi
    except ImportError as e:
        raise ImportError("--optimizer adamw_kahan needs torch-optimi: "
                          "pip install torch-optimi") from e
    # torch's AdamW defaults for betas and eps (optimi's own are 0.99 and 1e-6), so that the
    # three choices differ only in how the update meets the weight.
    return optimi.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=cfg.weight_decay, kahan_sum=True)


def _adamw_8bit(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # Stochastic rounding applies to bf16 parameters only; others get the exact fp32 result.
    return _torchao_adamw("AdamW8bit")(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       bf16_stochastic_round=True)


def _adamw_4bit(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return _torchao_adamw("AdamW4bit")(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       bf16_stochastic_round=True)


def _apollo_mini(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    from example_trainer.apollo import Apollo

    return Apollo(params, lr=cfg.lr, rank=1, update_gap=cfg.apollo_update_gap,
                  weight_decay=cfg.weight_decay, seed=cfg.seed)


def _apollo(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    from example_trainer.apollo import Apollo

    return Apollo(params, lr=cfg.lr, rank=cfg.apollo_rank, update_gap=cfg.apollo_update_gap,
                  weight_decay=cfg.weight_decay, seed=cfg.seed)


OPTIMIZERS: dict[str, Callable[[TrainConfig, list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw_fp32_master": _adamw_fp32_master,
    "adamw_kahan": _adamw_kahan,
    "adamw_8bit": _adamw_8bit,
    "adamw_4bit": _adamw_4bit,
    "apollo_mini": _apollo_mini,
    "apollo": _apollo,
}


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = OPTIMIZERS[cfg.optimizer](cfg, params)
    warmup = max(cfg.warmup_steps, 0)
    # Linear warmup to the peak lr, then constant.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler
