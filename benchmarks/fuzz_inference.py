"""Fuzz every route of our inference server with hostile requests; count answers; check for wedges.

    python benchmarks/fuzz_inference.py [--payloads 1500] [--chunk 100] [--seed 0]

Starts one real server (example_trainer/vllm_api_server.py on the tiny random Llama, LoRA on),
sends the issue-10 examples and then seeded random payloads over our routes (/generate,
/lora/load, /lora/unload, /lora/status, /pause, /resume, /is_paused, /bridge/info, /health) in
chunks, and after every chunk checks that the engine is not wedged: a normal /generate returns
tokens within a deadline, /health is 200 and the server is not left paused. Writes
benchmarks/results/fuzz_inference.json: payload and status-code counts per route, every 5xx (with
its payload), wedges, and machine info. A 5xx or a wedge makes the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

from example_trainer.machine import machine_info, resolve_dtype  # noqa: E402
from example_trainer.models import tiny_llama_path  # noqa: E402
from example_trainer.process import ManagedProcess, free_port, raise_on_sigterm  # noqa: E402

log = logging.getLogger("fuzz_inference")
IDS = [1, 504, 3458, 282, 4649, 314, 216]
TIMEOUT = 30.0  # seconds per request; the valid ones here generate at most 4 x 8 tokens
SERVER_ARGS = ["--gpu-memory-utilization", "0.1", "--max-model-len", "1024", "--enforce-eager",
               "--enable-lora", "--max-lora-rank", "8"]
# The issue's examples, sent first (the prompt is valid; one field is not).
ISSUE_EXAMPLES = [{"max_tokens": 1.5}, {"seed": "7"}, {"seed": 2**70}, {"logit_bias": [1, 2]},
                  {"ignore_eos": "yes"}, {"detokenize": 1}, {"stop": [1]}, {"stop": {"a": 1}},
                  {"logit_bias": {"x": 1}}, {"structured_outputs": "json"},
                  {"structured_outputs": {"regex": 5}}, {"prompt": {"prompt_token_ids": ["1"]}},
                  {"prompt": {"prompt_token_ids": [1.5]}}, {"prompt": {"prompt_token_ids": [None]}},
                  {"prompt": {"prompt_token_ids": [[1]]}}]
SAMPLING_KEYS = ["n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
                 "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "logprobs",
                 "prompt_logprobs", "logit_bias", "allowed_token_ids", "bad_words", "detokenize",
                 "skip_special_tokens", "spaces_between_special_tokens", "structured_outputs",
                 "model", "lora", "stream", "output_kind", "extra_args", "best_of",
                 "use_beam_search", "truncate_prompt_tokens", "guided_json",
                 "prompt_logprob_token_ids", "nonsense"]


# ----------------------------------------------------------------------------- payloads
def scalar(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, 1, -1, 2, 7, 1.0, 1.5, -0.5, 2.5, 1e-9, 1e308, float("nan"),
        float("inf"), -float("inf"), 2**31, 2**63, 2**64, 2**70, -(2**63) - 1, 49151, 49152, 10**6,
        "", "a", "7", "\n", "\x00", "\ud800", "é" * 3, " " * 200, "1e3", "true", "null", "[]"])


def value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth >= 3 or roll < 0.6:
        return scalar(rng)
    if roll < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(scalar(rng))[:8]: value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def prompt(rng: random.Random) -> Any:
    return rng.choice([
        lambda: {"prompt_token_ids": IDS},
        lambda: {"prompt_token_ids": [rng.choice([1, 5, scalar(rng)]) for _ in range(4)]},
        lambda: {"prompt_token_ids": list(range(1, rng.choice([1000, 1023, 1024, 3000])))},
        lambda: {"prompt_token_ids": []},
        lambda: {"prompt_token_ids": IDS, "type": "tokens"},
        lambda: rng.choice(["Hello", "", "\ud800", "x" * 70_000, "1 + 1 ="]),
        lambda: value(rng),
    ])()


def field_value(rng: random.Random, key: str) -> Any:
    """Mostly hostile; sometimes a small valid value, so that some requests do generate."""
    small_valid = {"n": rng.randint(1, 4), "max_tokens": rng.randint(1, 8),
                   "temperature": rng.choice([0.0, 0.7, 1.0]), "logprobs": rng.randint(0, 5),
                   "stop": ["\n"], "logit_bias": {"5": -100.0}, "seed": rng.randint(0, 99),
                   "structured_outputs": rng.choice([{"regex": "[ab]{1,4}"},
                                                     {"choice": ["yes", "no"]}])}
    if key in small_valid and rng.random() < 0.3:
        return small_valid[key]
    return value(rng)


# Values our schema accepts that vLLM may still refuse (a 400) or find costly: its own paths.
EDGES: dict[str, list[Any]] = {
    "prompt": [{"prompt_token_ids": list(range(1, 1024))}, {"prompt_token_ids": [49151] * 8},
               "x" * 60_000, "\x00\x01", "<s></s>" * 50, "\u00e9\u4e2d" * 100],
    "max_tokens": [1, 8, None], "min_tokens": [8], "n": [1, 8], "temperature": [0.0, 1e-9, 2.0],
    "top_p": [1e-9, 1.0], "top_k": [-1, 0, 1, 49152], "min_p": [0.0, 1.0],
    "seed": [-(2**63), 2**63 - 1, -1, 0], "presence_penalty": [-2.0, 2.0],
    "repetition_penalty": [1e-9, 10.0], "stop": ["a" * 512, ["\n"] * 64, "</s>"],
    "stop_token_ids": [[0, 1, 2], [49151]], "logprobs": [0, 20, -1], "prompt_logprobs": [0, 20],
    "logit_bias": [{"0": 100.0, "49151": -100.0}, {str(i): 1.0 for i in range(0, 4096, 4)}],
    "allowed_token_ids": [[5], list(range(49152))], "bad_words": [["a"], ["\n", "the"]],
    "detokenize": [False], "skip_special_tokens": [False], "ignore_eos": [True],
    "include_stop_str_in_output": [True],
    "structured_outputs": [{"regex": "("}, {"regex": ""}, {"grammar": "root ::= x"},
                           {"json": {"type": "nonsense"}}, {"json": "{"}, {"json_object": True},
                           {"choice": ["a", "a"]}, {"json": {"type": "string", "pattern": "("}},
                           {"regex": "[0-9]{3}", "disable_any_whitespace": True}],
}


def edge_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": {"prompt_token_ids": IDS}, "max_tokens": 4}
    for key in rng.sample(sorted(EDGES), rng.randint(1, 3)):
        body[key] = rng.choice(EDGES[key])
    return body


def generate_body(rng: random.Random) -> Any:
    if rng.random() < 0.05:
        return value(rng)  # not even an object
    if rng.random() < 0.3:
        return edge_body(rng)
    body = {"prompt": prompt(rng)}
    for key in rng.sample(SAMPLING_KEYS, rng.randint(0, 5)):
        body[key] = field_value(rng, key)
    return body


def make_odd_adapters(root: Path) -> list[str]:
    """Directories that look like adapters to a careless server."""
    contents = {"list": b"[1]", "string": b'"x"', "not_json": b"{r: 4", "binary": b"\xff\xfe",
                "deep": b"[" * 100_000, "r_str": b'{"r": "8"}', "r_float": b'{"r": 4.5}',
                "r_big": b'{"r": 1e400}', "r_16": b'{"r": 16}', "no_weights": b'{"r": 4}',
                "modules_int": b'{"r": 4, "target_modules": 5}', "null": b"null"}
    for name, data in contents.items():
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_bytes(data)
    (root / "cfg_dir" / "adapter_config.json").mkdir(parents=True)
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "adapter_config.json")
    (root / "loop").symlink_to(root / "loop")
    dirs = [str(root / n) for n in [*contents, "cfg_dir", "fifo", "loop"]]
    return dirs + [dirs[0] + "/adapter_config.json", "", ".", "/", "~", "/dev/zero", "/proc/self",
                   "a" * 5000, "x/" * 2100, "/tmp/\x00", "relative/dir", "\ud800", "/etc"]


def lora_body(rng: random.Random, paths: list[str]) -> Any:
    roll = rng.random()
    if roll < 0.1:
        return value(rng)
    body: dict[str, Any] = {"adapter_path": rng.choice(paths) if roll < 0.8 else value(rng)}
    if rng.random() < 0.4:
        body["adapter_name"] = rng.choice(["pol", "", "a" * 300, "../x", value(rng)])
    if rng.random() < 0.1:
        body[str(scalar(rng))] = value(rng)
    return body


def query(rng: random.Random) -> dict[str, str]:
    keys = rng.sample(["mode", "clear_cache", "lease_s", "lease", "x"], rng.randint(0, 3))
    pool = ["keep", "wait", "abort", "true", "false", "nan", "inf", "-1", "0", "1e9", "0.5", "60",
            "", "\x00", "é"]
    return {k: rng.choice(pool) for k in keys}


def next_request(rng: random.Random, paths: list[str]) -> tuple[str, str, dict[str, Any]]:
    """(method, route, requests kwargs) for one random payload."""
    route = rng.choices(["/generate", "/lora/load", "/pause", "/resume", "/lora/unload",
                         "/is_paused", "/lora/status", "/bridge/info", "/health"],
                        weights=[50, 16, 10, 4, 4, 4, 4, 4, 4])[0]
    if route == "/generate":
        return "POST", route, {"data": dumps(generate_body(rng))}
    if route == "/lora/load":
        return "POST", route, {"data": dumps(lora_body(rng, paths))}
    method = "POST" if route in ("/pause", "/resume", "/lora/unload") else "GET"
    body = rng.choice([None, None, "{}", dumps(value(rng))])
    return method, route, {"params": query(rng), "data": body}


def dumps(body: Any) -> str:
    return json.dumps(body)  # NaN/Infinity as JS literals: hostile on purpose


# ----------------------------------------------------------------------------- run
class Server:
    """Our server on the tiny model; restarted after a wedge so that the count goes on."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.proc, self.url, self.starts = log_dir, None, "", 0

    def start(self) -> None:
        port = free_port()
        self.proc = ManagedProcess.python(
            "vllm_api_server", ["-m", "example_trainer.vllm_api_server", "--model",
                                str(tiny_llama_path()), "--port", str(port), "--dtype",
                                resolve_dtype("auto", quiet=True), *SERVER_ARGS],
            self.log_dir / f"vllm_fuzz_{self.starts}.log",
            env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, cwd=ROOT)
        self.url = f"http://127.0.0.1:{port}"
        self.starts += 1
        self.proc.wait_healthy(f"{self.url}/health", timeout_s=600)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def wedge_check(url: str) -> str | None:
    """None if the server still serves; else what is wrong."""
    try:
        requests.post(f"{url}/resume", timeout=TIMEOUT)
        r = requests.post(f"{url}/generate", json={"prompt": {"prompt_token_ids": IDS},
                                                   "max_tokens": 4, "logprobs": 0},
                          timeout=TIMEOUT)
        if r.status_code != 200 or not r.json()["token_ids"][0]:
            return f"/generate answered {r.status_code}: {r.text[:200]}"
        if requests.get(f"{url}/health", timeout=TIMEOUT).status_code != 200:
            return "/health is not 200"
        if requests.get(f"{url}/is_paused", timeout=TIMEOUT).json()["is_paused"]:
            return "left paused"
    except requests.RequestException as e:
        return f"{type(e).__name__}: {e}"
    return None


def send(url: str, method: str, route: str, kw: dict[str, Any]) -> str:
    try:
        r = requests.request(method, f"{url}{route}", timeout=TIMEOUT,
                             headers={"Content-Type": "application/json"}, **kw)
    except requests.RequestException as e:  # a hang or a dropped connection is a finding too
        return type(e).__name__
    if route == "/pause" and r.status_code == 200:
        requests.post(f"{url}/resume", timeout=TIMEOUT)  # keep the barrage going
    return str(r.status_code)


def run(args: argparse.Namespace, server: Server, paths: list[str]) -> dict[str, Any]:
    rng = random.Random(args.seed)
    counts: dict[str, Counter] = defaultdict(Counter)
    bad: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    planned = [("POST", "/generate", {"data": dumps({"prompt": {"prompt_token_ids": IDS}, **e})})
               for e in ISSUE_EXAMPLES]
    for i in range(args.payloads):
        method, route, kw = planned[i] if i < len(planned) else next_request(rng, paths)
        status = send(server.url, method, route, kw)
        counts[route][status] += 1
        if not status.isdigit() or int(status) >= 500:
            bad.append({"route": route, "status": status, "request": str(kw)[:500]})
        # A request left unanswered hints at a wedge: check now rather than hang on every
        # later one until the chunk ends.
        if (i + 1) % args.chunk == 0 or i + 1 == args.payloads or not status.isdigit():
            problem = wedge_check(server.url)
            chunks.append({"end": i + 1, "wedged": problem})
            log.info("%d/%d payloads, 5xx or no answer so far: %d, wedge check: %s", i + 1,
                     args.payloads, len(bad), problem or "ok")
            if problem and i + 1 < args.payloads:
                server.stop()  # a wedged engine never recovers: count it, start afresh
                server.start()
    return {"per_route": {r: {"payloads": sum(c.values()), "status": dict(sorted(c.items()))}
                          for r, c in sorted(counts.items())},
            "five_xx_or_no_answer": bad, "chunks": chunks,
            "wedges": sum(1 for c in chunks if c["wedged"])}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payloads", type=int, default=1500)
    parser.add_argument("--chunk", type=int, default=100, help="payloads between wedge checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, help="keep the server logs here")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "fuzz_inference.json")
    args = parser.parse_args()
    raise_on_sigterm()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_odd_adapters(Path(tmp))
        server = Server(Path(args.log_dir or tmp))
        t0 = time.monotonic()
        try:
            server.start()
            start_s = time.monotonic() - t0
            t1 = time.monotonic()
            result = run(args, server, paths)
            fuzz_s = time.monotonic() - t1
        finally:
            server.stop()
    total = sum(r["payloads"] for r in result["per_route"].values())
    out = {"payloads": total, "seed": args.seed, "chunk": args.chunk, "server_args": SERVER_ARGS,
           "model": "tiny random Llama (example_trainer.models.tiny_llama_path)",
           "server_start_s": round(start_s, 1), "fuzz_s": round(fuzz_s, 1),
           "server_starts": server.starts,
           **result, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    log.info("%d payloads, %d 5xx or unanswered, %d wedges -> %s", total,
             len(result["five_xx_or_no_answer"]), result["wedges"], args.out)
    sys.exit(1 if result["five_xx_or_no_answer"] or result["wedges"] else 0)


if __name__ == "__main__":
    main()
