"""Property-based fuzzing of the batching API in process (hypothesis over the FastAPI app through
TestClient): hostile bodies, headers and methods on every route never get a 5xx (except 503
"queue full" for valid groups), every accepted group comes out of GET /batch exactly once and
exactly as posted, and a normal round trip still works afterwards.

benchmarks/fuzz_api.py runs a longer fuzz against a real API process.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from environments.api_server import create_app
from environments.schemas import ScoredData

BASE_URL = "http://127.0.0.1:8000"
GROUP_KEYS = list(ScoredData.model_fields)
SCORED = ("/scored_data", "/scored_data_list")
ROUTES = [("GET", "/"), ("POST", "/register"), ("POST", "/register-env"),
          ("POST", "/disconnect-env"), ("GET", "/wandb_info"), ("GET", "/info"),
          ("GET", "/batch"), ("GET", "/latest_example"), ("POST", "/scored_data"),
          ("POST", "/scored_data_list"), ("GET", "/status"), ("GET", "/status-env"),
          ("POST", "/reset_data"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")]
# Drawn more often: the routes that change the queue. A reset (which empties it) stays rare.
WEIGHTED = [*ROUTES, *[r for r in ROUTES if r[1] in ("/scored_data", "/scored_data_list",
                                                    "/batch", "/status-env")] * 4]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
VOCAB, BATCH = 100, 4
REGISTRATION = {"wandb_group": "g", "wandb_project": "p", "batch_size": BATCH,
                "max_token_len": 8, "checkpoint_dir": "/tmp/c", "save_checkpoint_interval": 5,
                "starting_step": 0, "num_steps": 50, "vocab_size": VOCAB}
ENV = {"max_token_length": 8, "desired_name": "fuzz", "weight": 1.0, "group_size": 2}
HOSTILE = [
    b"", b"{", b"null", b"[]", b"NaN", b'"\\ud800"', b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000,
    b'{"env_id": ' + b"9" * 400 + b"}", b'{"tokens": [[1e400]], "masks": [[1]], "scores": [1]}',
    b'{"tokens": [[1]], "masks": [[1]], "scores": [Infinity]}',
    b'{"tokens": [[1]], "masks": [[1]], "scores": [1], "inference_logprobs": [[-1e39]]}',
    b'{"tokens": [[1]], "masks": [[1]], "scores": [1], "generation_params": {"t": NaN}}',
    b'{"tokens": [[1]], "masks": [[1]], "scores": [1], "overrides": [{"a": "\\udc00"}]}',
    b'{"tokens": [[]], "masks": [[]], "scores": [1]}', b'{"weight": 1e308}',
]

json_leaf = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda children: st.lists(children, max_size=4)
                          | st.dictionaries(st.text(max_size=6), children, max_size=4),
                          max_leaves=16)


@st.composite
def groups(draw: Any) -> dict:
    """Mostly valid groups (sizes 1-4, a few token ids past the vocabulary), sometimes odd."""
    n, length = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    tokens = [draw(st.lists(st.integers(0, VOCAB + 2), min_size=length, max_size=length))
              for _ in range(n)]
    masks = [[t if draw(st.booleans()) else -100 for t in seq] for seq in tokens]
    g: dict[str, Any] = {"tokens": tokens, "masks": masks,
                         "scores": draw(st.lists(st.floats(-2, 2), min_size=n, max_size=n))}
    if draw(st.booleans()):
        g["inference_logprobs"] = [[1.0] + [-0.5] * (len(s) - 1) for s in tokens]
    if draw(st.booleans()):
        g["env_id"] = draw(st.sampled_from([None, 0, 1, 7, 2**31 - 1]))
    if draw(st.booleans()):
        g["generation_params"] = draw(st.dictionaries(st.text(max_size=4), json_leaf, max_size=3))
    # Poison an otherwise valid group with one absurd number, where a trainer would choke.
    poison = draw(st.sampled_from([None] * 4 + ["scores", "inference_logprobs",
                                                "generation_params", "advantages"]))
    if poison:
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e39, 10**30]))
        g[poison] = ({"t": bad} if poison == "generation_params" else [[bad] * len(s) for s in
                     tokens] if poison != "scores" else [bad] * n)
    return g


def mutate(draw: Any, payload: Any) -> Any:
    """One field replaced by an arbitrary JSON value, or dropped."""
    if not isinstance(payload, dict) or not payload:
        return draw(json_value)
    key = draw(st.sampled_from(sorted(payload)))
    changed = dict(payload)
    if draw(st.booleans()):
        del changed[key]
    else:
        changed[key] = draw(json_value)
    return changed


def template(draw: Any, path: str) -> Any:
    env_id = draw(st.sampled_from([0, 1, 5]))
    return {"/register": REGISTRATION, "/register-env": ENV, "/disconnect-env": {"env_id": env_id},
            "/status-env": {"env_id": env_id}, "/scored_data": draw(groups()),
            "/scored_data_list": draw(st.lists(groups(), min_size=1, max_size=3))}.get(path, {})


@st.composite
def hostile_requests(draw: Any) -> tuple[str, str, bytes, dict]:
    method, path = draw(st.sampled_from(WEIGHTED))
    if draw(st.integers(0, 19)) == 0:
        method = draw(st.sampled_from(METHODS))
    kind = draw(st.sampled_from(["valid", "valid", "valid", "mutated", "json", "hostile", "bytes"]))
    if kind in ("valid", "mutated"):
        value = template(draw, path)
        body = json.dumps(mutate(draw, value) if kind == "mutated" else value).encode()
    elif kind == "json":
        body = json.dumps(draw(json_value)).encode()
    else:
        body = draw(st.sampled_from(HOSTILE)) if kind == "hostile" else draw(st.binary(max_size=64))
    headers = {"content-type": "application/json"}
    trick = draw(st.sampled_from([None] * 6 + ["gzip", "bomb", "badgzip", "host", "origin",
                                               "fetch", "br"]))
    if trick in ("gzip", "badgzip"):  # badgzip: says gzip, is not
        body = gzip.compress(body) if trick == "gzip" else body
        headers["content-encoding"] = "gzip"
    elif trick == "bomb":  # inflates past the app's 64 KiB cap
        body, headers["content-encoding"] = gzip.compress(b"[" * 70_000), "gzip"
    elif trick in ("host", "origin", "fetch", "br"):
        headers[{"host": "host", "origin": "origin", "fetch": "sec-fetch-site",
                 "br": "content-encoding"}[trick]] = {
            "host": "evil.example:8000", "origin": "http://evil.example", "fetch": "cross-site",
            "br": "br"}[trick]
    return method, path, body, headers


def canon(value: Any) -> str:
    """A group as comparable text: JSON drops the int/float distinction, so do we."""
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return float(x) if isinstance(x, int) and not isinstance(x, bool) else x
    return json.dumps(walk({k: value.get(k) for k in GROUP_KEYS}), sort_keys=True)


class Ledger:
    """What the app accepted and what it handed out, to check that nothing is lost or doubled."""

    def __init__(self, app) -> None:
        self.state = app.state.batching
        self.accepted: Counter[str] = Counter()
        self.served: Counter[str] = Counter()

    def record(self, method: str, path: str, body: bytes, headers: dict, resp) -> None:
        if resp.status_code != 200:
            return
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if path in SCORED and method == "POST":
            posted = json.loads(body)
            self.accepted.update(canon(g) for g in (posted if path == SCORED[1] else [posted]))
        elif (method, path) == ("GET", "/batch"):
            self.served.update(canon(g) for g in resp.json()["batch"] or [])

    def dropped(self, before: list, reason: str) -> None:
        """Queued groups gone on purpose: a reset empties the queue, a fresh trainer drops what
        it cannot use."""
        kept = set(map(id, self.state.queue)) if reason == "register" else set()
        self.accepted.subtract(canon(json.loads(g.payload)) for g in before if id(g) not in kept)

    def check(self) -> None:
        queued = Counter(canon(json.loads(g.payload)) for g in self.state.queue)
        assert self.served + queued == self.accepted
        assert self.state.queued_sequences == sum(g.size for g in self.state.queue)
        assert self.state.queued_bytes == sum(len(g.payload) for g in self.state.queue)
        for g in self.state.queue:  # nothing unvalidated is queued
            ScoredData.model_validate_json(g.payload)


def round_trip(c: TestClient) -> None:
    """A fresh trainer and env, two groups posted, one batch with exactly those groups."""
    assert c.post("/reset_data").status_code == 200
    assert c.post("/register", json=REGISTRATION).status_code == 200
    assert c.get("/batch").json() == {"batch": None}
    env_id = c.post("/register-env", json=ENV).json()["env_id"]
    posted = [{"tokens": [[i, 5], [i, 6]], "masks": [[-100, 5], [-100, 6]], "scores": [1.0, 0.0],
               "env_id": env_id, "generation_params": {"temperature": 0.7}} for i in (1, 2)]
    for g in posted:
        assert c.post("/scored_data", json=g).json() == {"status": "received"}
    batch = c.get("/batch").json()["batch"]
    assert [{k: g[k] for k in posted[0]} for g in batch] == posted


@settings(max_examples=700, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def _fuzz(c: TestClient, ledger: Ledger, seen: Counter, data: Any) -> None:
    if seen.total() % 2:
        fill(c, ledger)
    method, path, body, headers = data.draw(hostile_requests())
    before = list(ledger.state.queue)
    resp = c.request(method, path, content=body, headers=headers)
    seen[(path, resp.status_code)] += 1
    queue_full = (resp.status_code == 503 and path in SCORED
                  and resp.json().get("status") == "queue full")
    assert resp.status_code < 500 or queue_full, (method, path, body[:200], resp.text[:300])
    if method == "POST" and path in ("/register", "/reset_data") and resp.status_code == 200:
        ledger.dropped(before, path[1:])
    ledger.record(method, path, body, headers, resp)
    if ledger.state.registration is None:  # reset: the trainer and the env come back, as they do
        start(c)


def fill(c: TestClient, ledger: Ledger) -> None:
    """Tops the queue up to its bound with valid one-sequence groups. Every other hostile request
    meets a full queue (503, the unjamming rule) whatever hypothesis draws: its draw shifts with
    the constants of every local module imported beside this one, and /batch drains faster than
    the drawn posts fill."""
    room = ledger.state.queue_limit - ledger.state.queued_sequences
    if room <= 0:
        return
    headers = {"content-type": "application/json"}
    body = json.dumps([{"tokens": [[1, 2]], "masks": [[-100, 2]], "scores": [0.5]}] * room).encode()
    resp = c.post("/scored_data_list", content=body, headers=headers)
    assert resp.json()["status"] == "received", resp.text
    ledger.record("POST", "/scored_data_list", body, headers, resp)


def start(c: TestClient) -> None:
    assert c.post("/register", json=REGISTRATION).status_code == 200
    assert c.get("/batch").json() == {"batch": None}  # the trainer polls: envs may register
    assert c.post("/register-env", json=ENV).json()["env_id"] == 0


def test_hostile_requests_on_every_route_never_5xx_and_lose_nothing():
    app = create_app(max_queue_sequences=12, max_body_bytes=64 << 10, env_id_base=0)
    c = TestClient(app, base_url=BASE_URL)
    start(c)
    ledger, seen = Ledger(app), Counter()
    _fuzz(c=c, ledger=ledger, seen=seen)
    ledger.check()
    codes = Counter(code for _, code in seen.elements())
    # The fuzz reached every route and every kind of answer it is meant to provoke.
    assert {path for path, _ in seen} == {path for _, path in ROUTES}
    assert {200, 400, 403, 404, 405, 409, 413, 415, 422, 503} <= set(codes), codes
    assert ledger.accepted.total() > 0 and ledger.served.total() > 0
    round_trip(c)
