"""Request bodies of the batching API, field for field those of atroposlib 0.4's run-api
(atroposlib/api/server.py), plus the shape checks that run-api leaves to the trainer.

A ScoredData is one group: one prompt and its completions, `len(tokens)` sequences.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator


class Registration(BaseModel):
    """POST /register, sent once by the trainer."""

    wandb_group: str
    wandb_project: str
    batch_size: int = Field(gt=0, description="sequences per batch")
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int
    num_steps: int


class RegisterEnv(BaseModel):
    """POST /register-env, sent by each environment process."""

    max_token_length: int
    desired_name: str
    weight: float = Field(ge=0.0)
    group_size: int = Field(gt=0)
    # Minimum share of every batch for this env (0..1), as in atroposlib.
    min_batch_allocation: float | None = Field(default=None, ge=0.0, le=1.0)


class EnvIdentifier(BaseModel):
    env_id: int


class ScoredData(BaseModel):
    tokens: list[list[int]]
    masks: list[list[int]]  # -100 where no loss, else the token id
    scores: list[float]
    advantages: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None
    messages: list[list[dict[str, Any]]] | None = None
    generation_params: dict[str, Any] | None = None
    # One logprob per token, prompt positions padded (atroposlib's ManagedServer uses 1.0).
    inference_logprobs: list[list[float]] | None = None
    overrides: list[dict] | None = None
    group_overrides: dict | None = None
    images: Any | None = None
    env_id: int | None = None
    # On-policy distillation fields of atroposlib 0.4: [sequence][position][top_k].
    distill_token_ids: list[list[list[int]]] | None = None
    distill_logprobs: list[list[list[float]]] | None = None

    @field_validator("messages")
    @classmethod
    def _messages_have_role_and_content(cls, v: list[list[dict]] | None) -> list[list[dict]] | None:
        for conversation in v or []:
            for msg in conversation:
                if "role" not in msg or "content" not in msg:
                    raise ValueError("Message must have 'role' and 'content' fields")
        return v

    @model_validator(mode="after")
    def _shapes_agree(self) -> ScoredData:
        # Caught here, a bad group is a 422 for the environment that sent it, not a crash
        # (or a silently misaligned loss) in the trainer several steps later.
        n = len(self.tokens)
        if n == 0:
            raise ValueError("tokens is empty: a group needs at least one sequence")
        for name in ("masks", "scores", "advantages", "ref_logprobs", "inference_logprobs",
                     "overrides", "distill_token_ids", "distill_logprobs"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but tokens has {n} sequences")
        for i, (toks, mask) in enumerate(zip(self.tokens, self.masks, strict=True)):
            if len(mask) != len(toks):
                raise ValueError(
                    f"masks[{i}] has {len(mask)} entries but tokens[{i}] has {len(toks)}")
            if self.inference_logprobs is not None and len(self.inference_logprobs[i]) != len(toks):
                raise ValueError(
                    f"inference_logprobs[{i}] has {len(self.inference_logprobs[i])} entries but "
                    f"tokens[{i}] has {len(toks)}: send one logprob per token, prompt padded"
                )
        # NaN/inf would pass pydantic but make the JSON of GET /batch unencodable.
        if not all(math.isfinite(s) for s in self.scores):
            raise ValueError("scores must be finite numbers (got NaN or inf)")
        for name in ("advantages", "ref_logprobs", "inference_logprobs"):
            rows = getattr(self, name) or []
            if not all(math.isfinite(x) for row in rows for x in row):
                raise ValueError(f"{name} must be finite numbers (got NaN or inf)")
        return self
