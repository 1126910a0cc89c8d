"""Fuzz every route of the batching API with hostile requests; count the answers; check that
nothing gets a 5xx (but 503 "queue full" for valid groups), nothing hangs and nothing is lost.

    python benchmarks/fuzz_api.py [--payloads 5000] [--seed 0]

Starts one real API process (environments/api_server.py, a 1 MiB body cap so that oversize
bodies stay cheap), registers a trainer (batch 8, vocab_size 1000, max_token_len 64) and two
envs, then sends seeded payloads over every route: valid groups (some of which meet a full
queue), groups poisoned with NaN, inf, 1e39, -1e39 logprobs, 10**400, lone surrogates, empty
sequences, wrong masks, token ids past the vocabulary, too long sequences or unknown env_ids;
deep nesting, random JSON and raw bytes; oversize and chunked bodies, gzip bombs and broken
gzip; wrong methods; foreign Host, Origin and Sec-Fetch-Site headers; conflicting /register.
GET /batch drains along the way; every batch must be exact and every accepted group must come
out once, as posted. Writes benchmarks/results/fuzz_api.json (payload and status-code counts
per path, per method and path, and per kind of payload; every 5xx, hang and loss; machine
info); exit code 1 on any of them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from example_trainer.machine import machine_info  # noqa: E402
from example_trainer.process import ManagedProcess, free_port, raise_on_sigterm  # noqa: E402

log = logging.getLogger("fuzz_api")
TIMEOUT = 30.0  # seconds per request: more is a hang
BODY_CAP = 1 << 20
SERVER_ARGS = ["--max-queue-sequences", "16", "--max-body-mib", "1", "--log-level", "warning"]
REGISTRATION = {"wandb_group": "fuzz", "wandb_project": "fuzz", "batch_size": 8,
                "max_token_len": 64, "checkpoint_dir": "/tmp/fuzz", "save_checkpoint_interval": -1,
                "starting_step": 0, "num_steps": 1000, "vocab_size": 1000}
ENV = {"max_token_length": 64, "desired_name": "fuzz", "weight": 1.0, "group_size": 2}
GROUP_KEYS = ("tokens", "masks", "scores", "advantages", "ref_logprobs", "messages",
              "generation_params", "inference_logprobs", "overrides", "group_overrides", "images",
              "env_id", "distill_token_ids", "distill_logprobs")
ROUTES = [("GET", "/"), ("POST", "/register"), ("POST", "/register-env"),
          ("POST", "/disconnect-env"), ("GET", "/wandb_info"), ("GET", "/info"), ("GET", "/batch"),
          ("GET", "/latest_example"), ("POST", "/scored_data"), ("POST", "/scored_data_list"),
          ("GET", "/status"), ("GET", "/status-env"), ("POST", "/reset_data"),
          ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/nowhere")]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
POISON = {  # JSON text spliced into an otherwise valid group
    "nan_score": ('"scores": [0.0, 1.0]', '"scores": [NaN, 1.0]'),
    "inf_param": ('"generation_params": {}', '"generation_params": {"t": Infinity}'),
    "huge_score": ('"scores": [0.0, 1.0]', '"scores": [1e39, 1.0]'),
    "huge_logprob": ('"inference_logprobs": [[1.0, -0.5', '"inference_logprobs": [[1.0, -1e39'),
    "int_400_digits": ('"generation_params": {}', '"generation_params": {"n": 1' + "0" * 400 + "}"),
    "surrogate": ('"generation_params": {}', '"generation_params": {"s": "\\ud800x"}'),
    "surrogate_key": ('"generation_params": {}', '"generation_params": {"\\udc00": 1}'),
    "deep_param": ('"generation_params": {}', '"generation_params": ' + "[" * 40 + "]" * 40),
}


def group(rng: random.Random, env_id: int | None, tag: int) -> dict[str, Any]:
    n, length = rng.choice([1, 2, 4]), rng.randint(2, 12)
    tokens = [[tag % 1000] + [rng.randrange(1000) for _ in range(length - 1)] for _ in range(n)]
    return {"tokens": tokens, "masks": [[-100] + seq[1:] for seq in tokens],
            "scores": [float(rng.random() < 0.5) for _ in range(n)],
            "inference_logprobs": [[1.0] + [-0.5] * (length - 1) for _ in range(n)],
            "generation_params": {}, "env_id": env_id}


def bad_group(rng: random.Random, env_ids: list[int]) -> tuple[str, bytes]:
    """(kind, body) of a group that is valid but for one poison."""
    g: dict[str, Any] = {"tokens": [[1, 7, 8, 9]] * 2, "masks": [[-100, 7, 8, 9]] * 2,
                         "scores": [0.0, 1.0], "inference_logprobs": [[1.0, -0.5, -0.5, -0.5]] * 2,
                         "generation_params": {}, "env_id": rng.choice(env_ids)}
    kind = rng.choice([*POISON, "mask", "vocab", "too_long", "unknown_env", "string_token",
                       "empty_sequences", "too_many_sequences"])
    if kind in POISON:
        old, new = POISON[kind]
        return kind, json.dumps(g).replace(old, new, 1).encode()
    change = {
        "mask": {"masks": [[-100, 7, 8, 5]] * 2},
        "vocab": {"tokens": [[1, 7, 8, 1000]] * 2, "masks": [[-100, 7, 8, 1000]] * 2},
        "too_long": {"tokens": [[1] * 65] * 2, "masks": [[1] * 65] * 2,
                     "inference_logprobs": None},
        "unknown_env": {"env_id": rng.choice([max(env_ids) + 1, 5, 2**31 - 1])},
        "string_token": {"tokens": [["1", 7, 8, 9]] * 2},
        "empty_sequences": {"tokens": [[], []], "masks": [[], []], "inference_logprobs": None},
        "too_many_sequences": {"tokens": [[1, 2]] * 9, "masks": [[1, 2]] * 9, "scores": [0.0] * 9,
                               "inference_logprobs": None},  # more than a batch of 8
    }[kind]
    return kind, json.dumps({**g, **change}).encode()


def random_json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 4 else 6)
    leaves = [None, True, rng.randint(-2**70, 2**70), rng.uniform(-1e6, 1e6),
              rng.choice([float("nan"), float("inf"), 1e308]), "".join(
                  chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(6)))]
    if pick < 6:
        return leaves[pick]
    if pick < 8:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(rng.randrange(99)): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


class Fuzzer:
    """Draws one hostile request at a time; keeps what was accepted to check what comes out."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.url, self.rng = url, rng
        self.env_ids: list[int] = []
        self.tag = 0
        self.accepted: Counter[str] = Counter()  # since the last reset
        self.served: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()  # over the whole run
        self.bad_batches: list[str] = []

    def body_for(self, method: str, path: str) -> tuple[str, bytes, dict[str, str]]:
        """(kind, body, headers) for one request on (method, path)."""
        rng, headers = self.rng, {"content-type": "application/json"}
        roll = rng.random()
        if path in ("/scored_data", "/scored_data_list") and roll < 0.45:
            if roll < 0.3:
                self.tag += 1
                groups = [group(rng, rng.choice([None, *self.env_ids]), self.tag)
                          for _ in range(rng.randint(1, 3))]
                body = groups[0] if path == "/scored_data" else groups
                return "valid", json.dumps(body).encode(), headers
            kind, body = bad_group(rng, self.env_ids)
            return kind, (body if path == "/scored_data" else b"[" + body + b"]"), headers
        if path == "/register" and roll < 0.3:
            field = rng.choice(["batch_size", "max_token_len", "vocab_size", "starting_step"])
            value = rng.choice([REGISTRATION[field], 16, 10**400, -5, 8.0, None])
            return f"register_{field}", json.dumps({**REGISTRATION, field: value}).encode(), headers
        if path == "/register-env" and roll < 0.3:
            return "register_env", json.dumps({**ENV, "weight": rng.choice([0.5, 1.0, 2.0])}
                                              ).encode(), headers
        if path in ("/status-env", "/disconnect-env") and roll < 0.3:
            env_id = rng.choice([*self.env_ids, 0, 10**12, -1])
            return "env_id", json.dumps({"env_id": env_id}).encode(), headers
        return self.hostile(headers)

    def hostile(self, headers: dict[str, str]) -> tuple[str, bytes, dict[str, str]]:
        rng = self.rng
        kind = rng.choice(["json", "bytes", "deep", "oversize", "oversize_chunked", "bomb",
                           "bad_gzip", "host", "origin", "fetch", "gzip_json", "empty"])
        body = json.dumps(random_json(rng)).encode()
        if kind == "bytes":
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        elif kind == "deep":
            body = b'{"env_id": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        elif kind.startswith("oversize"):
            body = b"[" + b"1," * (BODY_CAP // 2) + b"1]"
        elif kind == "bomb":  # 1 MiB of body inflating to 64 MiB
            body, headers["content-encoding"] = BOMB, "gzip"
        elif kind == "bad_gzip":
            headers["content-encoding"] = "gzip"
        elif kind == "gzip_json":
            body, headers["content-encoding"] = gzip.compress(body), "gzip"
        elif kind == "empty":
            body = b""
        elif kind in ("host", "origin", "fetch"):
            headers[{"host": "host", "origin": "origin", "fetch": "sec-fetch-site"}[kind]] = {
                "host": "rebound.example", "origin": "http://evil.example",
                "fetch": "cross-site"}[kind]
        return kind, body, headers

    def note(self, method: str, path: str, body: bytes, headers: dict,
             resp: requests.Response) -> None:
        """Remember accepted groups and check served batches."""
        if resp.status_code != 200:
            return
        if method == "POST" and path.startswith("/scored_data"):  # whatever it took, any kind
            posted = json.loads(gzip.decompress(body) if "content-encoding" in headers else body)
            posted = posted if isinstance(posted, list) else [posted]
            self.accepted.update(canon(g) for g in posted)
            self.totals["groups_accepted"] += len(posted)
        elif (method, path) == ("GET", "/batch") and (batch := resp.json()["batch"]):
            if sum(len(g["tokens"]) for g in batch) != REGISTRATION["batch_size"]:
                self.bad_batches.append(f"batch of {sum(len(g['tokens']) for g in batch)}")
            self.served.update(canon(g) for g in batch)
            self.totals["batches_served"] += 1
            self.totals["groups_served"] += len(batch)


BOMB = gzip.compress(b" " * (64 << 20), compresslevel=9)


def canon(g: dict) -> str:
    """A group as comparable text (we post floats as floats: no int/float ambiguity)."""
    return json.dumps({k: g.get(k) for k in GROUP_KEYS}, sort_keys=True)


def start_run(url: str, fuzzer: Fuzzer) -> None:
    """The trainer registers and polls once; two envs register (what a reset undoes)."""
    requests.post(f"{url}/register", json=REGISTRATION, timeout=TIMEOUT).raise_for_status()
    requests.get(f"{url}/batch", timeout=TIMEOUT).raise_for_status()
    fuzzer.env_ids = [requests.post(f"{url}/register-env", json=ENV, timeout=TIMEOUT).json()[
        "env_id"] for _ in range(2)]


def sequences(groups: Counter[str]) -> int:
    return sum(len(json.loads(g)["tokens"]) * n for g, n in groups.items() if n > 0)


def close_and_drain(url: str, fuzzer: Fuzzer) -> None:
    """What stays queued is under a batch (sizes 1, 2, 4 always pack): closing groups of one
    sequence fill it, then everything drains."""
    left = requests.get(f"{url}/status", timeout=TIMEOUT).json()["queue_sequences"]
    for _ in range((-left) % REGISTRATION["batch_size"]):
        fuzzer.tag += 1
        g = {**group(fuzzer.rng, None, fuzzer.tag), "tokens": [[1, 2]], "masks": [[-100, 2]],
             "scores": [1.0], "inference_logprobs": [[1.0, -0.5]]}
        requests.post(f"{url}/scored_data", json=g, timeout=TIMEOUT).raise_for_status()
        fuzzer.accepted[canon(g)] += 1
        fuzzer.totals["groups_accepted"] += 1
    while batch := requests.get(f"{url}/batch", timeout=TIMEOUT).json()["batch"]:
        fuzzer.served.update(canon(g) for g in batch)
        fuzzer.totals.update(batches_served=1, groups_served=len(batch))


def send(url: str, method: str, path: str, body: bytes, headers: dict, kind: str
         ) -> requests.Response:
    data: Any = body
    if kind.startswith("oversize_chunked"):  # no Content-Length: the cap counts what arrives
        data = (body[i:i + 65536] for i in range(0, len(body), 65536))
    return requests.request(method, url + path, data=data, headers=headers, timeout=TIMEOUT)


def is_5xx_fault(path: str, resp: requests.Response) -> bool:
    if resp.status_code < 500:
        return False
    queue_full = resp.status_code == 503 and path.startswith("/scored_data") and (
        resp.json().get("status") == "queue full")
    return not queue_full


def run(args: argparse.Namespace, url: str, proc: ManagedProcess) -> dict[str, Any]:
    rng = random.Random(args.seed)
    fuzzer = Fuzzer(url, rng)
    start_run(url, fuzzer)
    weighted = [*ROUTES, *[r for r in ROUTES if r[1] in ("/scored_data", "/scored_data_list",
                                                         "/batch")] * 4]
    by_route: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    faults: dict[str, list] = {"five_xx": [], "hangs": [], "connection_errors": [],
                               "lost_before_reset": []}
    resets = 0
    for i in range(args.payloads):
        method, path = rng.choice(weighted)
        kind, body, headers = fuzzer.body_for(method, path)
        if rng.random() < 0.08:
            method, kind = rng.choice(METHODS), f"{kind}+method"
        reset = (method, path) == ("POST", "/reset_data")
        if reset:  # nothing lost so far: the queue holds exactly what went in and not out
            queued = requests.get(f"{url}/status", timeout=TIMEOUT).json()["queue_sequences"]
            if queued != sequences(fuzzer.accepted - fuzzer.served):
                faults["lost_before_reset"].append({"i": i, "queued": queued})
        where = {"i": i, "route": f"{method} {path}", "kind": kind, "body": body[:200].decode(
            "utf-8", "replace")}
        try:
            resp = send(url, method, path, body, headers, kind)
        except requests.Timeout:
            faults["hangs"].append(where)
            continue
        except requests.ConnectionError as e:
            faults["connection_errors"].append({**where, "error": str(e)[:200]})
            continue
        by_route[f"{method} {path}"][resp.status_code] += 1
        by_kind[kind.split("+")[0]][resp.status_code] += 1
        if is_5xx_fault(path, resp):
            faults["five_xx"].append({**where, "status": resp.status_code,
                                      "answer": resp.text[:300]})
        fuzzer.note(method, path, body, headers, resp)
        if reset and resp.status_code == 200:
            resets += 1
            fuzzer.totals["groups_dropped_by_resets"] += (fuzzer.accepted - fuzzer.served).total()
            fuzzer.accepted = Counter(fuzzer.served)  # the queue was dropped on purpose
            start_run(url, fuzzer)  # the trainer and the envs come back
        if i % 100 == 99:
            assert proc.alive(), proc.log_tail()
            requests.get(f"{url}/status", timeout=5).raise_for_status()  # still answering
    close_and_drain(url, fuzzer)
    lost = fuzzer.accepted - fuzzer.served
    doubled = fuzzer.served - fuzzer.accepted
    by_path: dict[str, Counter] = defaultdict(Counter)
    for route, codes in by_route.items():
        by_path[route.split(" ", 1)[1]].update(codes)
    return {"payloads": args.payloads, "resets": resets, **fuzzer.totals,
            "groups_lost": lost.total(), "groups_doubled": doubled.total(),
            "bad_batches": fuzzer.bad_batches,
            "paths": {p: {"payloads": sum(c.values()), "status": dict(sorted(c.items()))}
                      for p, c in sorted(by_path.items())},
            "routes": {r: {"payloads": sum(c.values()), "status": dict(sorted(c.items()))}
                       for r, c in sorted(by_route.items())},
            "kinds": {k: dict(sorted(c.items())) for k, c in sorted(by_kind.items())}, **faults}


def round_trip(url: str) -> bool:
    """After all that, a normal reset/register/post/batch gives back exactly what was posted."""
    fuzzer = Fuzzer(url, random.Random(1))
    requests.post(f"{url}/reset_data", timeout=TIMEOUT).raise_for_status()
    start_run(url, fuzzer)
    posted = [{"tokens": [[1, t, t]] * 4, "masks": [[-100, t, t]] * 4, "scores": [0.5] * 4,
               "generation_params": {"temperature": 0.7}, "env_id": fuzzer.env_ids[0]}
              for t in (5, 6)]
    for g in posted:
        requests.post(f"{url}/scored_data", json=g, timeout=TIMEOUT).raise_for_status()
    batch = requests.get(f"{url}/batch", timeout=TIMEOUT).json()["batch"]
    return [canon(g) for g in batch] == [canon(g) for g in posted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payloads", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "fuzz_api.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    raise_on_sigterm()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = Path(tempfile.mkdtemp(prefix="fuzz_api_"))
    proc = ManagedProcess.python("api", ["-m", "environments.api_server", "--port", str(port),
                                         *SERVER_ARGS], log_dir / "api.log", cwd=ROOT)
    try:
        proc.wait_healthy(f"{url}/status", 60)
        t0 = time.monotonic()
        result = run(args, url, proc)
        result["round_trip_after"] = round_trip(url)
        result["seconds"] = round(time.monotonic() - t0, 1)
        result["server_alive"] = proc.alive()
    finally:
        proc.stop()
    ok = (not result["five_xx"] and not result["hangs"] and not result["groups_lost"]
          and not result["lost_before_reset"]
          and not result["groups_doubled"] and not result["bad_batches"]
          and result["round_trip_after"] and result["server_alive"])
    out = {"benchmark": "fuzz_api", "ok": ok, "server_args": SERVER_ARGS, **result,
           "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    log.info("%d payloads in %.0f s: %d 5xx, %d hangs, %d lost, %d doubled; wrote %s",
             result["payloads"], result["seconds"], len(result["five_xx"]),
             len(result["hangs"]), result["groups_lost"], result["groups_doubled"], args.out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
