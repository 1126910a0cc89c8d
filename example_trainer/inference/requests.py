"""What our inference server accepts: each body and query of our routes, parsed once at the door.

Strict JSON types (1.0 is not an int, true is not a number, "7" is not a seed), finite floats,
bounds and size caps, and where they depend on the served model, checks against its vocabulary,
max_model_len and max_logprobs (`ModelLimits`, passed as validation context). Nothing that fails
here reaches vLLM (STYLE.md habit 14).

NOTE: vLLM's SamplingParams(**body) checks no types, and the engine core decodes each request
with msgspec in its input thread: a float where an int belongs (max_tokens 1.5), a string seed or
a list logit_bias raised there and killed that thread for good, while /health still said 200.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the engine's msgpack transport carries int64
MAX_N = 1024  # completions per request (vLLM's own cap, VLLM_MAX_N_SEQUENCES, is 16384)
MAX_TOKEN_LIST = 4096  # entries of stop_token_ids and logit_bias
MAX_STOP_STRINGS, MAX_STOP_CHARS = 64, 512
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 64, 256
MAX_NAME_CHARS = 4096  # model / lora names (a served model's name may be its path)
MAX_REPETITION_PENALTY = 10.0  # vLLM only asks > 0; beyond ~2 the output is garbage anyway
MAX_GRAMMAR_CHARS = 65536  # structured_outputs json schema, grammar, regex
MAX_CHOICES, MAX_CHOICE_CHARS = 256, 512
# A text prompt is tokenized by vLLM, which then checks it against max_model_len; this bounds
# the tokenizer's work first, generously (a token averages ~4 characters of text).
TEXT_CHARS_PER_TOKEN = 64

STRICT = ConfigDict(extra="forbid", strict=True)
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
Grammar = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Choice = Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]
BadWord = Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS)]


@dataclass(frozen=True)
class ModelLimits:
    """What the served model allows; read from vLLM's model config at start-up."""

    vocab_size: int  # rows of the embedding / columns of the logits
    max_model_len: int  # prompt + completion tokens
    max_logprobs: int  # top logprobs per position (vLLM's --max-logprobs; -1 = vocab_size)
    max_n: int = MAX_N

    @property
    def logprobs_cap(self) -> int:
        return self.vocab_size if self.max_logprobs == -1 else self.max_logprobs


def problem(message: str) -> PydanticCustomError:
    return PydanticCustomError("out_of_range", message)


# ----------------------------------------------------------------------------- /generate
class TokensPrompt(BaseModel):
    model_config = STRICT
    prompt_token_ids: list[TokenId] = Field(min_length=1)


def _prompt_kind(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "ids" if isinstance(value, dict) else None


Prompt = Annotated[
    Annotated[str, Tag("text"), Field(min_length=1)] | Annotated[TokensPrompt, Tag("ids")],
    Discriminator(_prompt_kind, custom_error_type="prompt_type", custom_error_message=(
        'prompt must be a string or {"prompt_token_ids": [int, ...]}')),
]


class StructuredOutputs(BaseModel):
    """vLLM's StructuredOutputsParams minus structural_tag: exactly one constraint; vLLM then
    compiles it (xgrammar / guidance) and answers 400 if it does not."""

    model_config = STRICT
    json_schema: dict[str, Any] | Grammar | None = Field(None, alias="json")
    regex: Annotated[str, Field(max_length=MAX_GRAMMAR_CHARS)] | None = None
    choice: Annotated[list[Choice], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: Grammar | None = None
    json_object: Literal[True] | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema_size(cls, v: Any) -> Any:
        if isinstance(v, dict) and len(json.dumps(v)) > MAX_GRAMMAR_CHARS:
            raise problem(f"the json schema is over {MAX_GRAMMAR_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in ("json_schema", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise problem("structured_outputs needs exactly one of json, regex, choice, grammar, "
                           f"json_object (got {len(given)})")
        return self

    def vllm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of vllm.sampling_params.StructuredOutputsParams."""
        return self.model_dump(by_alias=True, exclude_none=True)


class GenerateRequest(BaseModel):
    """POST /generate: Atropos' VLLMServer body. Every SamplingParams field we pass on is listed
    here with its type and bounds; any other key is refused (422) rather than passed through."""

    model_config = STRICT
    prompt: Prompt
    model: Name | None = None  # an adapter or the base model's name; else the active adapter
    lora: Name | None = None
    stream: bool = False  # refused when true: /v1/completions streams
    n: int = Field(1, ge=1)
    # None: up to max_model_len (vLLM's meaning). More than max_model_len is not refused: the
    # engine stops there ("length"), and atroposlib's proxy asks for 1024 whatever the model.
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY,
                                      allow_inf_nan=False)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None \
        = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_LIST)] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=-1)  # -1: the whole vocabulary (if the server allows)
    prompt_logprobs: int | None = Field(None, ge=-1)
    logit_bias: Annotated[dict[str, Bias], Field(max_length=MAX_TOKEN_LIST)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: Annotated[list[BadWord], Field(max_length=MAX_BAD_WORDS)] | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _fits_the_model(self, info: ValidationInfo) -> GenerateRequest:
        limits = info.context
        if not isinstance(limits, ModelLimits):  # parsing without a model: shape checks only
            return self
        problems = _model_problems(self, limits)
        if problems:
            raise problem("; ".join(problems))
        return self

    def prompt_for_vllm(self) -> str | dict[str, list[int]]:
        if isinstance(self.prompt, str):
            return self.prompt
        return {"prompt_token_ids": self.prompt.prompt_token_ids}

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of vllm.SamplingParams, field by field (structured_outputs apart)."""
        return dict(
            n=self.n, max_tokens=self.max_tokens, min_tokens=self.min_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
            logit_bias=({int(k): v for k, v in self.logit_bias.items()}
                        if self.logit_bias is not None else None),
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            detokenize=self.detokenize, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )


def _out_of_vocab(name: str, ids: list[int], vocab_size: int) -> list[str]:
    bad = [t for t in ids if t >= vocab_size]
    return [f"{name}: token id(s) {bad[:5]} not below the vocabulary size {vocab_size}"] if bad \
        else []


def _model_problems(req: GenerateRequest, lim: ModelLimits) -> list[str]:
    """Checks that need the served model's numbers, as messages naming the field and the bound."""
    p: list[str] = []
    if isinstance(req.prompt, str):
        if len(req.prompt) > TEXT_CHARS_PER_TOKEN * lim.max_model_len:
            p.append(f"prompt: {len(req.prompt)} characters, over {TEXT_CHARS_PER_TOKEN} x "
                     f"max_model_len ({lim.max_model_len})")
    else:
        ids = req.prompt.prompt_token_ids
        if len(ids) >= lim.max_model_len:
            p.append(f"prompt.prompt_token_ids: {len(ids)} tokens leave no room to generate "
                     f"within max_model_len {lim.max_model_len}")
        p += _out_of_vocab("prompt.prompt_token_ids", ids, lim.vocab_size)
    if req.n > lim.max_n:
        p.append(f"n: {req.n} > {lim.max_n}")
    if req.min_tokens > (req.max_tokens or lim.max_model_len):
        p.append(f"min_tokens: {req.min_tokens} > max_tokens")
    if req.top_k > lim.vocab_size:
        p.append(f"top_k: {req.top_k} > vocabulary size {lim.vocab_size}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(req, name)
        if k is not None and (k > lim.logprobs_cap or (k == -1 and lim.max_logprobs != -1)):
            p.append(f"{name}: {k} outside 0..{lim.logprobs_cap} (the server's --max-logprobs)")
    p += _out_of_vocab("stop_token_ids", req.stop_token_ids or [], lim.vocab_size)
    p += _out_of_vocab("allowed_token_ids", req.allowed_token_ids or [], lim.vocab_size)
    if req.allowed_token_ids is not None and len(req.allowed_token_ids) > lim.vocab_size:
        p.append(f"allowed_token_ids: more entries than the vocabulary ({lim.vocab_size})")
    keys = list(req.logit_bias or {})
    not_ids = [k for k in keys if not (k.isascii() and k.isdigit() and len(k) <= 10)]
    if not_ids:
        p.append(f"logit_bias: key(s) {not_ids[:5]} are not token ids (decimal integers)")
    else:
        p += _out_of_vocab("logit_bias", [int(k) for k in keys], lim.vocab_size)
    return p


