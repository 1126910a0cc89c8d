"""API batch -> padded tensors: tokens, loss mask, advantages, inference logprobs.

A batch is a list of ScoredData groups (one prompt, group_size completions each), checked with the
wire schema the batching API uses (environments/schemas.py: an API such as atroposlib's run-api
may pass anything on), then against this trainer: lengths, token ids and --max-staleness.
Sequences get group-relative advantages and are packed into micro-batches and collated. Position
t of every (B, T-1) tensor describes the prediction of token t+1 from the prefix tokens[:t+1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import ValidationError
from torch import Tensor

from environments.schemas import DYNAMIC_DROPPED, DYNAMIC_DROPPED_S, IGNORE, ScoredData
from example_trainer.loss import group_advantages


@dataclass
class Rollout:
    tokens: list[int]
    trained: list[bool]  # (L,) True where masks[t] != -100
    inference_logprobs: list[float] | None  # (L,) aligned with tokens, or None
    score: float
    advantage: float = 0.0
    weight_version: int | None = None  # the trainer step whose weights generated it


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


def check_group(group: dict, max_len: int, vocab_size: int | None) -> ScoredData:
    """The group as ScoredData, or a ValueError that says what is wrong and where to fix it."""
    try:
        g = ScoredData.model_validate(group)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors(include_url=False)[:3])
        raise ValueError(f"not a valid ScoredData group ({problems}): check the environment "
                         "that produced it") from None
    longest = max(len(t) for t in g.tokens)
    if longest > max_len:
        raise ValueError(f"a sequence of {longest} tokens > --max-token-len {max_len}: raise it "
                         "or lower the environment's max_token_length")
    if vocab_size is not None and g.max_token_id() >= vocab_size:
        raise ValueError(f"token id {g.max_token_id()} >= the model's vocabulary ({vocab_size}):"
                         " the environment uses another tokenizer")
    return g


def usable_groups(batch: list[dict], max_len: int, vocab_size: int | None = None
                  ) -> tuple[list[ScoredData], list[str]]:
    """The groups this trainer can train on, and one problem line per group it cannot."""
    groups, problems = [], []
    for i, group in enumerate(batch):
        try:
            groups.append(check_group(group, max_len, vocab_size))
        except ValueError as e:
            problems.append(f"batch group {i}: {e}")
    return groups, problems


def rollouts_from_groups(groups: list[ScoredData], scale_advantages: bool) -> list[Rollout]:
    """Flatten groups into rollouts with group-relative advantages (score - group mean)."""
    rollouts: list[Rollout] = []
    group_ids: list[int] = []
    for i, g in enumerate(groups):
        lps = g.inference_logprobs
        versions = g.weight_versions()
        for j, (tokens, masks) in enumerate(zip(g.tokens, g.masks, strict=True)):
            rollouts.append(Rollout(
                tokens=tokens,
                trained=[m != IGNORE for m in masks],
                inference_logprobs=lps[j] if lps is not None else None,
                score=g.scores[j],
                weight_version=versions[j],
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


def staleness(rollouts: list[Rollout], step: int) -> dict[str, float]:
    """How many optimizer steps behind the weights that train step `step` (those of step - 1)
    each sequence was generated: mean and max over the sequences that carry a version."""
    lags = [step - 1 - r.weight_version for r in rollouts if r.weight_version is not None]
    if not lags:
        return {}
    return {"data/staleness_mean": sum(lags) / len(lags), "data/staleness_max": float(max(lags)),
            "data/versioned_fraction": len(lags) / len(rollouts)}


def fresh_groups(groups: list[ScoredData], step: int, max_staleness: int
                 ) -> tuple[list[ScoredData], int]:
    """The groups step `step` may train on, and how many it may not: a group whose oldest
    sequence's version is more than `max_staleness` steps behind the weights this step trains
    (those of step - 1) is too stale. A group without versions is kept; max_staleness < 0
    keeps every group."""
    if max_staleness < 0:
        return groups, 0
    kept = [g for g in groups
            if (v := g.oldest_weight_version()) is None or step - 1 - v <= max_staleness]
    return kept, len(groups) - len(kept)


def dynamic_sampling(groups: list[ScoredData]) -> dict[str, float]:
    """What dynamic sampling cost the environments for these groups: each group an env posts
    carries (group_overrides) the groups it dropped since its previous post because their scores
    were all equal (no advantage, no gradient), and the seconds it spent generating them."""
    dropped, seconds = 0, 0.0
    for g in groups:
        extra = g.group_overrides or {}
        n, s = extra.get(DYNAMIC_DROPPED), extra.get(DYNAMIC_DROPPED_S)
        dropped += n if type(n) is int and n > 0 else 0  # free-form JSON: trust only sane values
        seconds += s if type(s) in (int, float) and s > 0 else 0.0
    return {"data/dynamic_dropped_groups": dropped, "data/dynamic_extra_gen_s": seconds}
