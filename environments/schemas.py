"""Request bodies of the batching API, field for field those of atroposlib 0.4's run-api
(atroposlib/api/server.py), validated at the door: strict types (no "1" for 1, no 1.0 for an int,
no true for a number), finite and bounded numbers, sane strings, bounded list lengths, and the
shape checks that run-api leaves to the trainer.

A ScoredData is one group: one prompt and its completions, `len(tokens)` sequences. Checks that
need the trainer's registration (token ids against vocab_size, lengths against max_token_len,
group size against batch_size) live in environments/batching.py, which knows it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

IGNORE = -100  # mask value where no loss is taken (the prompt), as in Atropos
# Placeholder on prompt positions of inference_logprobs, as atroposlib's ManagedServer writes it
# (never a valid logprob, and masked out by `masks` anyway).
PROMPT_LOGPROB = 1.0
# overrides[i][WEIGHT_VERSION]: the trainer step whose weights generated sequence i.
WEIGHT_VERSION = "weight_version"
# group_overrides keys of our environments' dynamic sampling (DAPO): the groups the env dropped
# (all scores equal) since its previous post, and the seconds it spent generating them.
DYNAMIC_DROPPED = "dynamic_sampling_dropped_groups"
DYNAMIC_DROPPED_S = "dynamic_sampling_dropped_s"
MAX_TOKEN_ID = 2**31 - 1
MAX_VOCAB_SIZE = 1 << 24  # the largest real vocabularies are ~2**18
MAX_GROUP_SEQUENCES = 4096  # sequences in one group
MAX_SEQUENCE_TOKENS = 1 << 20
MAX_LIST_GROUPS = 1024  # groups in one POST /scored_data_list
MAX_TOP_K = 1024  # distillation alternatives per position
MAX_MESSAGES = 4096  # messages in one conversation
MAX_BATCH_SIZE = 1 << 20
MAX_CONTEXT = 1 << 24  # max_token_len / max_token_length
MAX_STEP = 2**31 - 1
MAX_ENV_WEIGHT = 1e6
# float32 holds about 3.4e38: a score of 1e39 would become inf in the trainer. 1e6 is far beyond
# any reward or advantage scale and far inside float32.
MAX_SCORE = 1e6
# Logprobs are <= 0; atroposlib's ManagedServer pads prompt positions with 1.0, and our envs
# floor -inf at -9999 (environments/inference_client.py MIN_LOGPROB).
LOGPROB_MIN, LOGPROB_MAX = -1e5, 1.0
MAX_JSON_DEPTH = 32  # nesting of the free-form fields (generation_params, messages, ...)
MAX_JSON_INT = 2**63 - 1

STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def _no_surrogates(text: str) -> str:
    # A lone surrogate passes pydantic but cannot be encoded as UTF-8: GET /batch would fail.
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ValueError("string contains a lone UTF-16 surrogate (not valid Unicode)")
    return text


def _name_like(text: str) -> str:
    _no_surrogates(text)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError("control characters are not allowed here")
    return text


Name = Annotated[str, Field(max_length=256), AfterValidator(_name_like)]
DirPath = Annotated[str, Field(max_length=4096), AfterValidator(_name_like)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
MaskId = Annotated[int, Field(ge=-100, le=MAX_TOKEN_ID)]  # -100 or the token (checked below)
Score = Annotated[float, Field(ge=-MAX_SCORE, le=MAX_SCORE)]
Logprob = Annotated[float, Field(ge=LOGPROB_MIN, le=LOGPROB_MAX)]
Step = Annotated[int, Field(ge=-1, le=MAX_STEP)]


def check_json_value(value: Any) -> Any:
    """Free-form JSON must come back out of GET /batch: finite numbers, ints that other JSON
    parsers read, valid strings, bounded depth. Walks iteratively: no recursion to exhaust."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels at {where or 'top'}")
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise ValueError(f"non-string key {key!r} at {where or 'top'}")
                _no_surrogates(key)
                stack.append((child, f"{where}.{key}", depth + 1))
        elif isinstance(node, list | tuple):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(node))
        elif isinstance(node, str):
            _no_surrogates(node)
        elif isinstance(node, bool) or node is None:
            continue
        elif isinstance(node, int):
            if abs(node) > MAX_JSON_INT:
                raise ValueError(f"integer at {where or 'top'} exceeds 64 bits")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ValueError(f"number at {where or 'top'} is NaN or infinite")
        else:
            raise ValueError(f"{type(node).__name__} at {where or 'top'} is not JSON")
    return value


JsonValue = Annotated[Any, AfterValidator(check_json_value)]
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_value)]

# [sequence][position] rows, each at most MAX_SEQUENCE_TOKENS long.
TokenRows = list[Annotated[list[TokenId], Field(max_length=MAX_SEQUENCE_TOKENS)]]
MaskRows = list[Annotated[list[MaskId], Field(max_length=MAX_SEQUENCE_TOKENS)]]
ScoreRows = list[Annotated[list[Score], Field(max_length=MAX_SEQUENCE_TOKENS)]]
LogprobRows = list[Annotated[list[Logprob], Field(max_length=MAX_SEQUENCE_TOKENS)]]
TopKIds = Annotated[list[TokenId], Field(max_length=MAX_TOP_K)]
TopKLogprobs = Annotated[list[Logprob], Field(max_length=MAX_TOP_K)]
DistillIds = list[Annotated[list[TopKIds], Field(max_length=MAX_SEQUENCE_TOKENS)]]
DistillLogprobs = list[Annotated[list[TopKLogprobs], Field(max_length=MAX_SEQUENCE_TOKENS)]]
Conversations = Annotated[list[Annotated[list[JsonObject], Field(max_length=MAX_MESSAGES)]],
                          Field(max_length=MAX_GROUP_SEQUENCES)]


class Registration(BaseModel):
    """POST /register, sent once by the trainer."""

    model_config = STRICT
    wandb_group: Name
    wandb_project: Name
    batch_size: int = Field(gt=0, le=MAX_BATCH_SIZE, description="sequences per batch")
    max_token_len: int = Field(ge=-1, le=MAX_CONTEXT,
                               description="longest sequence the trainer takes; <= 0: unknown")
    checkpoint_dir: DirPath
    save_checkpoint_interval: Step
    starting_step: int = Field(ge=0, le=MAX_STEP)
    num_steps: Step
    # Ours, optional (atroposlib's run-api ignores it): token ids must be below it when given.
    vocab_size: int | None = Field(default=None, gt=0, le=MAX_VOCAB_SIZE)


class RegisterEnv(BaseModel):
    """POST /register-env, sent by each environment process."""

    model_config = STRICT
    max_token_length: int = Field(gt=0, le=MAX_CONTEXT)
    desired_name: Name
    # atroposlib: "set to -1 to ignore it"; below MIN_ENV_WEIGHT counts as that floor.
    weight: float = Field(ge=-1.0, le=MAX_ENV_WEIGHT)
    group_size: int = Field(gt=0, le=MAX_GROUP_SEQUENCES)
    # Minimum share of every batch for this env (0..1), as in atroposlib.
    min_batch_allocation: float | None = Field(default=None, ge=0.0, le=1.0)


class EnvIdentifier(BaseModel):
    model_config = STRICT
    env_id: int = Field(ge=0, le=MAX_TOKEN_ID)


# Per-sequence optional fields: [] means absent (atroposlib's BaseEnv sends [] for "none").
PER_SEQUENCE_OPTIONAL = ("advantages", "ref_logprobs", "inference_logprobs", "overrides",
                         "distill_token_ids", "distill_logprobs")


class ScoredData(BaseModel):
    model_config = STRICT
    tokens: Annotated[TokenRows, Field(min_length=1, max_length=MAX_GROUP_SEQUENCES)]
    masks: MaskRows  # -100 where no loss, else the token id
    scores: list[Score]
    advantages: ScoreRows | None = None
    ref_logprobs: LogprobRows | None = None
    messages: Conversations | None = None
    generation_params: JsonObject | None = None
    # One logprob per token, prompt positions padded (atroposlib's ManagedServer uses 1.0).
    inference_logprobs: LogprobRows | None = None
    overrides: list[JsonObject] | None = None
    group_overrides: JsonObject | None = None
    images: JsonValue | None = None
    env_id: int | None = Field(default=None, ge=0, le=MAX_TOKEN_ID)
    # On-policy distillation fields of atroposlib 0.4: [sequence][position][top_k].
    distill_token_ids: DistillIds | None = None
    distill_logprobs: DistillLogprobs | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_lists_are_absent(cls, data: Any) -> Any:
        # atroposlib's BaseEnv.collect_trajectories (the default, for envs that implement
        # collect_trajectory) starts these as [] and posts [] when no sequence had one; its
        # run-api and trainer read [] as absent.
        if isinstance(data, dict) and data.get("tokens"):
            return {k: None if k in PER_SEQUENCE_OPTIONAL and v == [] else v
                    for k, v in data.items()}
        return data

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
        for name in ("masks", "scores", "advantages", "ref_logprobs", "inference_logprobs",
                     "overrides", "distill_token_ids", "distill_logprobs"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but tokens has {n} sequences")
        lps = self.inference_logprobs
        for i, (toks, mask) in enumerate(zip(self.tokens, self.masks, strict=True)):
            if not toks:
                raise ValueError(f"tokens[{i}] is empty: every sequence needs a token")
            if len(mask) != len(toks):
                raise ValueError(
                    f"masks[{i}] has {len(mask)} entries but tokens[{i}] has {len(toks)}")
            if any(m != IGNORE and m != t for m, t in zip(mask, toks, strict=True)):
                raise ValueError(f"masks[{i}] must hold -100 or the token id at each position")
            if lps is not None and len(lps[i]) != len(toks):
                raise ValueError(
                    f"inference_logprobs[{i}] has {len(lps[i])} entries but tokens[{i}] has "
                    f"{len(toks)}: send one logprob per token, prompt padded")
        return self

    @classmethod
    def from_completions(cls, prompt_ids: list[int], completions: list[list[int]],
                         logprobs: list[list[float]] | None, scores: list[float],
                         messages: list[list[dict]] | None = None,
                         weight_versions: list[int] | None = None) -> ScoredData:
        """The group of one prompt and its completions: tokens = prompt + completion, masks
        IGNORE on the prompt, inference_logprobs one per token (PROMPT_LOGPROB on the prompt,
        as atroposlib's ManagedServer `_create_sequence_node` writes them) when given."""
        n = len(prompt_ids)
        return cls(
            tokens=[prompt_ids + c for c in completions],
            masks=[[IGNORE] * n + c for c in completions],
            scores=[float(s) for s in scores],
            inference_logprobs=None if logprobs is None else [
                [PROMPT_LOGPROB] * n + lp for lp in logprobs],
            messages=messages,
            # Per sequence, in the field atroposlib's run-api passes through untouched.
            overrides=None if weight_versions is None else [
                {WEIGHT_VERSION: v} for v in weight_versions],
        )

    def weight_versions(self) -> list[int | None]:
        """Per sequence, overrides[i][WEIGHT_VERSION] when it is an int, else None."""
        rows = self.overrides or [{}] * len(self.tokens)
        return [v if type(v := row.get(WEIGHT_VERSION)) is int else None for row in rows]

    def oldest_weight_version(self) -> int | None:
        """The oldest version any sequence carries (None: no sequence carries one)."""
        return min((v for v in self.weight_versions() if v is not None), default=None)

    def max_token_id(self) -> int:
        """The largest token id anywhere in the group (tokens and distillation ids)."""
        top = max(max(seq) for seq in self.tokens)
        for seq in self.distill_token_ids or []:
            top = max([top, *(max(pos) for pos in seq if pos)])
        return top


# POST /scored_data_list
GROUP_LIST = TypeAdapter(Annotated[list[ScoredData], Field(min_length=1,
                                                           max_length=MAX_LIST_GROUPS)])
