"""API batch -> padded tensors: tokens, loss mask, advantages, inference logprobs.

A batch is a list of ScoredData groups (one prompt, group_size completions each). Sequences are
checked, given group-relative advantages, packed into micro-batches and collated. Position t of
every (B, T-1) tensor describes the prediction of token t+1 from the prefix tokens[:t+1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from example_trainer.loss import group_advantages

IGNORE = -100  # mask value of tokens that are not trained (prompt), as in Atropos


@dataclass
class Rollout:
    tokens: list[int]
    trained: list[bool]  # (L,) True where masks[t] != -100
    inference_logprobs: list[float] | None  # (L,) aligned with tokens, or None
    score: float
    advantage: float = 0.0


@dataclass
class MicroBatch:
    input_ids: Tensor  # (B, T), right-padded: causal attention needs no mask (see trainer)
    targets: Tensor  # (B, T-1) tokens[:, 1:]
    loss_mask: Tensor  # (B, T-1) bool
    inference_logprobs: Tensor | None  # (B, T-1)
    advantages: Tensor  # (B,)
    scores: Tensor  # (B,)

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def _check_group(i: int, group: dict, max_len: int) -> None:
    """Raise a ValueError that says which group is malformed and how."""
    tokens, masks, scores = group.get("tokens"), group.get("masks"), group.get("scores")
    if not (isinstance(tokens, list) and isinstance(masks, list) and isinstance(scores, list)):
        raise ValueError(f"batch group {i}: needs lists 'tokens', 'masks' and 'scores' "
                         "(Atropos ScoredData); check the environment that produced it")
    if not (len(tokens) == len(masks) == len(scores)) or not tokens:
        raise ValueError(f"batch group {i}: {len(tokens)} token lists, {len(masks)} mask lists, "
                         f"{len(scores)} scores: they must be equal and non-zero")
    lps = group.get("inference_logprobs")
    for j, (t, m) in enumerate(zip(tokens, masks, strict=True)):
        if len(t) != len(m):
            raise ValueError(f"batch group {i} seq {j}: {len(t)} tokens but {len(m)} mask values")
        if lps is not None and len(lps[j]) != len(t):
            raise ValueError(f"batch group {i} seq {j}: {len(lps[j])} inference_logprobs for "
                             f"{len(t)} tokens: they must be aligned per token")
        if len(t) > max_len:
            raise ValueError(f"batch group {i} seq {j}: {len(t)} tokens > --max-token-len "
                             f"{max_len}; raise it or lower the environment's max_token_length")


def rollouts_from_batch(batch: list[dict], max_len: int, scale_advantages: bool) -> list[Rollout]:
    """Flatten groups into rollouts with group-relative advantages (score - group mean)."""
    rollouts: list[Rollout] = []
    group_ids: list[int] = []
    for i, group in enumerate(batch):
        _check_group(i, group, max_len)
        lps = group.get("inference_logprobs")
        for j, (tokens, masks) in enumerate(zip(group["tokens"], group["masks"], strict=True)):
            rollouts.append(Rollout(
                tokens=list(tokens),
                trained=[m != IGNORE for m in masks],
                inference_logprobs=list(lps[j]) if lps is not None else None,
                score=float(group["scores"][j]),
            ))
            group_ids.append(i)
    scores = torch.tensor([r.score for r in rollouts], dtype=torch.float32)
    advantages = group_advantages(scores, torch.tensor(group_ids), scale_advantages)
    for r, a in zip(rollouts, advantages.tolist(), strict=True):
        r.advantage = a
    return rollouts


def pack(rollouts: list[Rollout], batch_size: int, token_budget: int) -> list[list[Rollout]]:
    """Split a step's rollouts into micro-batches: `batch_size` sequences each, or, with a token
    budget, as many length-sorted sequences as fit in budget = rows x longest row (padding
    included). Sorting by length keeps padding waste small."""
    if token_budget <= 0:
        return [rollouts[i:i + batch_size] for i in range(0, len(rollouts), batch_size)]
    micro: list[list[Rollout]] = []
    current: list[Rollout] = []
    for r in sorted(rollouts, key=lambda r: len(r.tokens)):
        longest = max([len(r.tokens)] + [len(c.tokens) for c in current])
        if current and longest * (len(current) + 1) > token_budget:
            micro.append(current)
            current = []
        current.append(r)
    if current:
        micro.append(current)
    return micro


def collate(rollouts: list[Rollout], pad_id: int) -> MicroBatch:
    """Right-pad rollouts into tensors; padding is never trained."""
    B, T = len(rollouts), max(len(r.tokens) for r in rollouts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    trained = torch.zeros((B, T), dtype=torch.bool)
    has_lps = all(r.inference_logprobs is not None for r in rollouts)
    lps = torch.zeros((B, T), dtype=torch.float32)
    for b, r in enumerate(rollouts):
        n = len(r.tokens)
        input_ids[b, :n] = torch.tensor(r.tokens)
        trained[b, :n] = torch.tensor(r.trained)
        if has_lps:
            lps[b, :n] = torch.tensor(r.inference_logprobs)
    # The first token has no prefix: it can never be trained.
    return MicroBatch(
        input_ids=input_ids,
        targets=input_ids[:, 1:],
        loss_mask=trained[:, 1:],
        inference_logprobs=lps[:, 1:] if has_lps else None,
        advantages=torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
        scores=torch.tensor([r.score for r in rollouts], dtype=torch.float32),
    )
