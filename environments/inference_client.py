"""The environments' HTTP side: the --openai.* config, retries with backoff, and one group of
completions per request from the inference server (vLLM /generate, or OpenAI /v1/completions).

Completion token ids are exactly what the server sampled: with server_type vllm they come from the
keys of /generate's logprobs (`logprobs[c][t][0]`'s first key is the sampled id as a string, the
shape atroposlib's VLLMServer parses); with server_type openai from vLLM's
`return_tokens_as_token_ids` ("token_id:<id>"), else by re-tokenizing the text (then no logprobs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import requests

log = logging.getLogger(__name__)

# NOTE: JSON has no -inf; a sampled token the server scores -inf (possible with top-k/top-p
# filtering) is sent as this floor instead, so every payload stays valid JSON.
MIN_LOGPROB = -9999.0
RETRY_STATUSES = (429, 500, 502, 503, 504)


class StopRequested(Exception):
    """Raised out of a retry wait when the environment is stopping (SIGTERM)."""


@dataclass
class OpenAIConfig:
    """The --openai.* flags (names from atroposlib's APIServerConfig)."""

    model_name: str = field(default="default", metadata={
        "help": "model name sent on the OpenAI route (vLLM's served model name)"})
    base_url: str = field(default="http://localhost:9001", metadata={
        "help": "inference server; a trailing /v1 is fine (stripped for /generate)"})
    api_key: str = field(default="", metadata={"help": "sent as a Bearer token when set"})
    server_type: str = field(default="vllm", metadata={
        "help": "vllm: POST /generate (token ids + logprobs); openai: POST /v1/completions",
        "choices": ("vllm", "openai")})
    timeout: int = field(default=1200, metadata={"help": "seconds one generation request may take"})


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None  # one per token of token_ids, the sampled token's logprob
    finish_reason: str | None = None
    weight_version: int | None = None  # the trainer step whose weights served it, if known


def server_root(base_url: str) -> str:
    """`http://h:9001/v1/` -> `http://h:9001` (atroposlib strips /v1 the same way)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def request_with_retry(method: str, url: str, what: str, stop_event: threading.Event, *,
                       json: Any = None, headers: dict | None = None, timeout: float = 60.0,
                       max_delay_s: float = 30.0, accept: Collection[int] = (),
                       ) -> requests.Response:
    """Send until the answer is neither a connection error nor 429/5xx, backing off exponentially
    (0.5 s doubling to `max_delay_s`, at least the server's Retry-After) and logging what we wait
    for. Other 4xx raise at once, except the statuses in `accept`, returned to the caller."""
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            resp = requests.request(method, url, json=json, headers=headers, timeout=timeout)
            if resp.status_code not in RETRY_STATUSES:
                if resp.status_code >= 400 and resp.status_code not in accept:
                    raise requests.HTTPError(
                        f"{method} {url} -> {resp.status_code}: {resp.text[:500]}", response=resp)
                return resp
            reason = f"HTTP {resp.status_code} {resp.text[:200]!r}"
            retry_after = resp.headers.get("Retry-After", "")
            if retry_after.isdigit():  # the server says when: never sooner
                delay = max(delay, min(float(retry_after), max_delay_s))
        except (requests.ConnectionError, requests.Timeout) as exc:
            reason = type(exc).__name__
        log.warning("waiting for %s: %s %s gave %s (attempt %d); retrying in %.1fs",
                    what, method, url, reason, attempt, delay)
        if stop_event.wait(delay):
            raise StopRequested
        delay = min(delay * 2, max_delay_s)


def _first_entry(position: list[dict[str, float]]) -> tuple[int, float]:
    token, logprob = next(iter(position[0].items()))
    return int(token), max(float(logprob), MIN_LOGPROB)


def parse_generate_response(body: dict[str, Any]) -> list[Completion]:
    """/generate's {"logprobs": [[[{id: lp}, ...], ...], ...], "finish_reasons": [...]}."""
    if body.get("logprobs") is None:
        raise ValueError("/generate answered without logprobs; request them (logprobs=0)")
    reasons = body.get("finish_reasons") or [None] * len(body["logprobs"])
    version = body.get("weight_version")
    out = []
    for positions, reason in zip(body["logprobs"], reasons, strict=True):
        pairs = [_first_entry(p) for p in positions]
        out.append(Completion([t for t, _ in pairs], [lp for _, lp in pairs], reason,
                              version if isinstance(version, int) else None))
    return out


def parse_openai_choice(choice: dict[str, Any], tokenize: Callable[[str], list[int]]) -> Completion:
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    if tokens and all(str(t).startswith("token_id:") for t in tokens):
        ids = [int(str(t).split(":", 1)[1]) for t in tokens]
        logprobs = [MIN_LOGPROB if v is None else max(float(v), MIN_LOGPROB)
                    for v in lp["token_logprobs"]]
        return Completion(ids, logprobs, choice.get("finish_reason"))
    # A server without token ids: re-tokenize, and send no logprobs rather than misaligned ones.
    ids = tokenize(choice["text"])
    return Completion(ids, None, choice.get("finish_reason"))


class InferenceClient:
    """Asks for all n completions of one prompt in ONE request, so the server batches the group."""

    def __init__(self, config: OpenAIConfig, tokenize: Callable[[str], list[int]],
                 stop_event: threading.Event) -> None:
        self.config = config
        self.tokenize = tokenize
        self.stop_event = stop_event
        self.root = server_root(config.base_url)
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None

    def generate(self, prompt_ids: list[int], n: int, max_tokens: int,
                 temperature: float) -> list[Completion]:
        if self.config.server_type == "vllm":
            url = f"{self.root}/generate"
            # logprobs 0: vLLM returns just the sampled token's logprob (and with it its id).
            payload: dict[str, Any] = {"prompt": {"prompt_token_ids": prompt_ids}, "n": n,
                                       "max_tokens": max_tokens, "temperature": temperature,
                                       "logprobs": 0}
        else:
            url = f"{self.root}/v1/completions"
            payload = {"model": self.config.model_name, "prompt": prompt_ids, "n": n,
                       "max_tokens": max_tokens, "temperature": temperature,
                       "logprobs": 1, "return_tokens_as_token_ids": True}
        resp = request_with_retry("POST", url, "the inference server", self.stop_event,
                                  json=payload, headers=self.headers, timeout=self.config.timeout)
        body = resp.json()
        if self.config.server_type == "vllm":
            completions = parse_generate_response(body)
        else:
            completions = [parse_openai_choice(c, self.tokenize)
                           for c in sorted(body["choices"], key=lambda c: c.get("index", 0))]
        if len(completions) != n:
            raise ValueError(f"asked {url} for {n} completions, got {len(completions)}")
        return completions
