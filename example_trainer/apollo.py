"""APOLLO and APOLLO-Mini (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
arXiv 2412.05270), written here from the paper (the reference package is CC-BY-NC and needs
bitsandbytes).

For a weight matrix W (m x n, m <= n after transposing) with gradient G, every step:
    P  = randn(r, m) / sqrt(r)        regenerated from a seed, new every `update_gap` steps
    R  = P G                          (r x n): Adam moments live here, not on G
    R~ = Adam(R)                      m_hat / (sqrt(v_hat) + eps)
    s  = ||R~|| / ||R||               per column (APOLLO) or one number (APOLLO-Mini, r = 1)
    U  = scale * s * G, its norm growth limited to 1.01x per step
    W <- W - lr (U + weight_decay W)
State per matrix: two r x n fp32 moments (nothing for P). Embeddings, lm_head and vectors (norms,
biases) get plain AdamW, as in the paper: a matrix is treated as an embedding when one side is
over 8x the other (vocab x hidden is 30-400x in every model we serve; attention and MLP are <= 4x).
bf16 weights receive each update through Kahan compensation (a bf16 buffer the size of the weight,
2 bytes/param), so steps below half an ulp are not lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

EMBEDDING_ASPECT = 8.0
NORM_GROWTH_LIMIT = 1.01
# Elements per slice of an element-wise (AdamW) update: a 128256 x 4096 embedding done at once
# would hold ~8 fp32 temporaries of 2 GiB each, more than the rest of an 8B step's headroom.
SLICE = 2**25


def is_projected(p: Tensor) -> bool:
    return p.ndim == 2 and max(p.shape) <= EMBEDDING_ASPECT * min(p.shape)


class Apollo(torch.optim.Optimizer):
    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, rank: int = 1,
                 scale: float | None = None, update_gap: int = 200,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        # APOLLO-Mini (rank 1, one scaling factor per tensor) needs the paper's sqrt(128) boost.
        scale = scale if scale is not None else (128**0.5 if rank == 1 else 1.0)
        super().__init__(params, dict(lr=lr, rank=rank, scale=scale, update_gap=update_gap,
                                      betas=betas, eps=eps, weight_decay=weight_decay, seed=seed))

    def _state(self, p: Tensor, index: int, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            g = p if not is_projected(p) else self._oriented(p)
            shape = g.shape if not is_projected(p) else (group["rank"], g.shape[1])
            state["step"] = 0
            state["index"] = index
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            state["prev_norm"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if p.dtype != torch.float32:
                state["comp"] = torch.zeros_like(p)
        return state

    @staticmethod
    def _oriented(t: Tensor) -> Tensor:
        """The matrix with its smaller side first (the side the projection compresses)."""
        return t if t.shape[0] <= t.shape[1] else t.T

    def _projection(self, group: dict[str, Any], state: dict[str, Any], m: int,
                    device: torch.device) -> Tensor:
        refresh = state["step"] // group["update_gap"]
        gen = torch.Generator(device=device).manual_seed(
            group["seed"] * 1_000_003 + state["index"] * 7919 + refresh)
        return torch.randn(group["rank"], m, generator=gen, device=device) / group["rank"] ** 0.5

    @staticmethod
    def _adam(x: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, t: int, group: dict[str, Any]
              ) -> Tensor:
        beta1, beta2 = group["betas"]
        exp_avg.lerp_(x, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(x, x, value=1 - beta2)
        v_hat = exp_avg_sq / (1 - beta2**t)
        return (exp_avg / (1 - beta1**t)).div_(v_hat.sqrt_().add_(group["eps"]))

    def _apollo_update(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
                       ) -> Tensor:
        g = self._oriented(grad)
        proj = self._projection(group, state, g.shape[0], g.device)
        r = proj @ g
        r_tilde = self._adam(r, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
        if group["rank"] == 1:  # APOLLO-Mini: one factor for the tensor
            s = r_tilde.norm() / r.norm().clamp_min(1e-30)
        else:  # APOLLO: one factor per column of the projected space
            s = r_tilde.norm(dim=0) / r.norm(dim=0).clamp_min(1e-30)
        update = g * (group["scale"] * s)
        norm = update.norm()
        prev = state["prev_norm"]
        if state["step"] > 1 and norm > NORM_GROWTH_LIMIT * prev:
            update = update * (NORM_GROWTH_LIMIT * prev / norm)
            norm = NORM_GROWTH_LIMIT * prev
        state["prev_norm"] = norm
        return update if grad.shape[0] <= grad.shape[1] else update.T

    @staticmethod
    def _write(p: Tensor, delta: Tensor, comp: Tensor | None) -> None:
        """p += delta; in bf16 through Kahan compensation (the rounding error is carried)."""
        if comp is None:
            p.add_(delta)
            return
        exact = p.float() + (delta + comp.float())
        rounded = exact.to(p.dtype)
        comp.copy_(exact - rounded.float())
        p.copy_(rounded)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self._state(p, index, group)
                state["step"] += 1
                if is_projected(p):
                    update = self._apollo_update(p.grad.float(), state, group)
                    self._apply(p, update, state.get("comp"), group)
                else:
                    self._elementwise(p, state, group)
        return loss

    def _apply(self, p: Tensor, update: Tensor, comp: Tensor | None, group: dict[str, Any]
               ) -> None:
        self._write(p, -group["lr"] * (update + group["weight_decay"] * p.float()), comp)

    def _elementwise(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """AdamW element by element (embeddings, lm_head, vectors), in slices of SLICE elements
        (the same numbers as all at once: nothing here mixes elements)."""
        names = ("exp_avg", "exp_avg_sq", "comp")
        tensors = [p, p.grad, *(state[k] for k in names if k in state)]
        if not all(t.is_contiguous() for t in tensors):  # views we cannot flatten: at once
            return self._apply(p, self._adam(p.grad.float(), state["exp_avg"],
                                             state["exp_avg_sq"], state["step"], group),
                               state.get("comp"), group)
        flat_p, flat_g, m, v, *comp = (t.view(-1) for t in tensors)
        for i in range(0, flat_p.numel(), SLICE):
            s = slice(i, i + SLICE)
            update = self._adam(flat_g[s].float(), m[s], v[s], state["step"], group)
            self._apply(flat_p[s], update, comp[0][s] if comp else None, group)
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # NOTE: Optimizer.load_state_dict casts floating state to the parameter's dtype: the fp32
        # moments would come back in bf16. Put the saved dtypes back.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for group_sd, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for idx, p in zip(group_sd["params"], group["params"], strict=True):
                for key, value in saved.get(idx, {}).items():
                    if isinstance(value, Tensor):
                        self.state[p][key] = value.to(device=p.device, dtype=value.dtype)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments and compensation) held now."""
        return sum(t.numel() * t.element_size() for s in self.state.values()
                   for t in s.values() if isinstance(t, Tensor))
