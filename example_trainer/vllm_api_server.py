"""Inference server: vLLM's own OpenAI server plus the routes Atropos and our bridges call.

    python -m example_trainer.vllm_api_server --model M --port 9001 [any vLLM serve flag]
    python example_trainer/vllm_api_server.py --model M --port 9001

Every vLLM flag passes through (vLLM's parser, app builder and state init are reused). Defaults
that differ: --host 127.0.0.1, --port 9001 (Atropos' convention), and on a CPU platform
--gpu-memory-utilization 0.3 when not given (there vLLM's default share of the NUMA node's RAM
fails at start).

Our routes (vLLM's /health, /v1/* and friends stay as they are):
  POST /generate      Atropos' VLLMServer format: {"text", "finish_reasons", "logprobs", ...}
  POST /lora/load     {"adapter_path", "adapter_name"?} -> served to requests that name no model
  POST /lora/unload   back to the base model;  GET /lora/status
  POST /pause?mode=wait|abort|keep, POST /resume, GET /is_paused
  GET  /bridge/info   where vllm_bridge_config.json is (written by vllm_patching in the worker)
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:
    # NOTE: `python example_trainer/vllm_api_server.py` puts example_trainer/, not the repo
    # root, on sys.path; add the root so the package import below works in both launch modes.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402

from example_trainer import vllm_compat as compat  # noqa: E402
from example_trainer.machine import resolve_dtype  # noqa: E402
from vllm_patching import bridge_config, worker_ext  # noqa: E402 - shared_vllm weight export

log = logging.getLogger("example_trainer.vllm_api_server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9001
CPU_GPU_MEMORY_UTILIZATION = 0.3


@dataclass
class ServerState:
    """What our routes add to vLLM's app state (app.state.grpo)."""

    pause: compat.GenerationPause
    lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active_lora: LoRARequest | None = None
    lora_load_count: int = 0


def _state(request: Request) -> ServerState:
    return request.app.state.grpo


# ----------------------------------------------------------------------------- /generate
def _position(token_id: int, candidates: Any) -> list[dict[str, float]]:
    """One position as Atropos reads it: [{"<sampled id>": lp, "<alt id>": lp, ...}], sampled first.

    vLLM's dict holds the sampled token and the top-k, in an order we do not rely on.
    """
    entry = {str(token_id): candidates[token_id].logprob}
    entry.update((str(t), lp.logprob) for t, lp in candidates.items() if t != token_id)
    return [entry]


def _format_output(final: Any, params: SamplingParams) -> dict[str, Any]:
    outputs = final.outputs
    ret: dict[str, Any] = {
        "text": [o.text for o in outputs],
        "finish_reasons": [o.finish_reason for o in outputs],
        "prompt_token_ids": list(final.prompt_token_ids or []),
        "token_ids": [list(o.token_ids) for o in outputs],
    }
    if params.logprobs is not None:
        ret["logprobs"] = [
            [_position(t, pos) for t, pos in zip(o.token_ids, o.logprobs, strict=True)]
            for o in outputs
        ]
    if params.prompt_logprobs is not None and final.prompt_logprobs is not None:
        # The first prompt token has no logprob (nothing precedes it): None there.
        ret["prompt_logprobs"] = [
            None if pos is None else _position(t, pos)
            for t, pos in zip(final.prompt_token_ids, final.prompt_logprobs, strict=True)
        ]
    return ret


def _pick_lora(request: Request, name: str | None) -> LoRARequest | None:
    """An explicit "model"/"lora" name wins (base model name -> no adapter); else the active one."""
    if not name:
        return _state(request).active_lora
    models = request.app.state.openai_serving_models
    if models.is_base_model(name):
        return None
    if name not in models.lora_requests:
        raise HTTPException(404, f"unknown model or LoRA adapter {name!r}; load it with /lora/load")
    return models.lora_requests[name]


async def generate(raw_request: Request) -> Any:
    # with_cancellation (abort on client disconnect) consumes the request stream: read it first.
    body = await raw_request.json()
    return await _generate(body, raw_request)


@compat.with_cancellation
async def _generate(body: dict[str, Any], raw_request: Request) -> JSONResponse:
    prompt = body.pop("prompt", None) if isinstance(body, dict) else None
    is_ids = isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list)
    if not (isinstance(prompt, str) or is_ids):
        raise HTTPException(400, 'need "prompt": a string or {"prompt_token_ids": [int, ...]}')
    if body.pop("stream", False):
        raise HTTPException(400, "/generate does not stream; use /v1/completions for streaming")
    names = body.pop("lora", None), body.pop("model", None)
    lora = _pick_lora(raw_request, names[0] or names[1])
    try:
        params = SamplingParams(**body, output_kind=RequestOutputKind.FINAL_ONLY)
    except (TypeError, ValueError) as e:  # unknown key or invalid value: the client's error
        raise HTTPException(400, f"invalid sampling parameters: {e}") from e
    engine = raw_request.app.state.engine_client
    if (params.prompt_logprobs is not None and engine.vllm_config.lora_config is not None
            and compat.prompt_logprobs_break_lora_engine()):
        raise HTTPException(400, "prompt_logprobs would crash this vLLM build's engine when "
                                 "it runs with --enable-lora: restart without it to get them")
    final = None
    async with _state(raw_request).pause.admit():
        async for out in engine.generate(prompt, params, f"gen-{uuid.uuid4().hex}",
                                         lora_request=lora):
            final = out
    assert final is not None, "vLLM returned no output"
    return JSONResponse(_format_output(final, params))


# ----------------------------------------------------------------------------- LoRA
def _check_adapter(request: Request, path: Path) -> None:
    """Fail with a 4xx that names the fix before vLLM fails with a 500 deep in the engine."""
    lora_config = request.app.state.engine_client.vllm_config.lora_config
    if lora_config is None:
        raise HTTPException(400, "this server runs without LoRA support: restart it with "
                                 "--enable-lora --max-lora-rank R (R >= the adapter's rank)")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise HTTPException(404, f"no peft adapter at {str(path)!r} (adapter_config.json missing)")
    rank = json.loads(cfg_file.read_text()).get("r")
    if rank is not None and rank > lora_config.max_lora_rank:
        raise HTTPException(400, f"adapter rank {rank} > --max-lora-rank "
                                 f"{lora_config.max_lora_rank}: restart with a larger rank")


async def _unregister(request: Request, name: str) -> None:
    models = request.app.state.openai_serving_models
    await models.unload_lora_adapter(compat.UnloadLoRAAdapterRequest(lora_name=name))


async def lora_load(request: Request) -> JSONResponse:
    body = await request.json()
    if not isinstance(body, dict) or not body.get("adapter_path"):
        raise HTTPException(400, 'body must be {"adapter_path": ..., "adapter_name"?: ...}')
    path = Path(body["adapter_path"]).expanduser().resolve()
    _check_adapter(request, path)
    state = _state(request)
    models = request.app.state.openai_serving_models
    async with state.lora_lock:
        name = body.get("adapter_name") or f"adapter_{state.lora_load_count + 1}"
        start = time.perf_counter()
        # Re-registering frees the name, so vLLM hands out a fresh int id: its LoRA cache is
        # keyed by id, and reusing one would keep serving the previous weights.
        if name in models.lora_requests:
            await _unregister(request, name)
        resp = await models.load_lora_adapter(
            compat.LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path))
        )
        if not isinstance(resp, str):  # vLLM's ErrorResponse; a 500 there is a bad adapter too
            return JSONResponse(resp.model_dump(), status_code=min(resp.error.code, 422))
        previous = state.active_lora
        if previous is not None and previous.lora_name != name:
            # One adapter is served at a time; vLLM's LRU cache evicts the old weights itself.
            await _unregister(request, previous.lora_name)
        state.active_lora = models.lora_requests[name]
        state.lora_load_count += 1
        seconds = time.perf_counter() - start
    log.info("LoRA %s loaded from %s in %.3f s (id %d)", name, path, seconds,
             state.active_lora.lora_int_id)
    return JSONResponse({"status": "ok", "adapter_name": name, "adapter_path": str(path),
                         "adapter_id": state.active_lora.lora_int_id, "load_seconds": seconds,
                         "load_count": state.lora_load_count})


async def lora_unload(request: Request) -> JSONResponse:
    state = _state(request)
    async with state.lora_lock:
        previous, state.active_lora = state.active_lora, None
        if previous is not None:
            await _unregister(request, previous.lora_name)
    return JSONResponse({"status": "ok", "previous_adapter": previous and previous.lora_name})


def _lora_status(request: Request) -> dict[str, Any]:
    state = _state(request)
    active = state.active_lora
    return {
        "lora_enabled": request.app.state.engine_client.vllm_config.lora_config is not None,
        "active_adapter_name": active.lora_name if active else None,
        "active_adapter_path": active.lora_path if active else None,
        "active_adapter_id": active.lora_int_id if active else None,
        "load_count": state.lora_load_count,
    }


async def lora_status(request: Request) -> JSONResponse:
    return JSONResponse(_lora_status(request))


# ----------------------------------------------------------------------------- pause / resume
async def pause(request: Request, mode: str = Query("wait", pattern="^(wait|abort|keep)$"),
                clear_cache: bool = True) -> JSONResponse:
    """New requests wait; mode=wait lets in-flight ones finish (vLLM's own default: abort).

    clear_cache (prefix/KV cache) defaults to True: a pause usually precedes a weight update."""
    await _state(request).pause.pause(mode, clear_cache)
    return JSONResponse({"status": "paused", "mode": mode})


async def resume(request: Request) -> JSONResponse:
    await _state(request).pause.resume()
    return JSONResponse({"status": "resumed"})


async def is_paused(request: Request) -> JSONResponse:
    pause_ = _state(request).pause
    return JSONResponse({"is_paused": await pause_.is_paused(),
                         "generate_inflight": pause_.inflight})


# ----------------------------------------------------------------------------- bridge info
async def bridge_info(request: Request) -> JSONResponse:
    # DESIGN.md's search order ($VLLM_BRIDGE_CONFIG_PATH, $LOGDIR, ./, /tmp/atropos_bridge),
    # the same list the trainer reads; whether the writer is still alive is the trainer's check.
    candidates = bridge_config.candidate_paths()
    found = next((p for p in candidates if p.is_file()), None)
    return JSONResponse({
        "bridge_config_path": str(found) if found else None,
        "exists": found is not None,
        "searched": [str(p) for p in candidates],
        "model": request.app.state.args.model,
        "vllm_version": compat.VLLM_VERSION,
        "paused": await _state(request).pause.is_paused(),
        "lora": _lora_status(request),
    })


# ----------------------------------------------------------------------------- app and CLI
def attach_routes(app: FastAPI) -> None:
    """Add our routes to vLLM's app, ahead of vLLM's own so ours win on a shared path.

    With VLLM_SERVER_DEV_MODE=1 vLLM also serves /pause (default mode abort) and /is_paused.
    """
    router = APIRouter()
    for method, path, handler in (
        ("POST", "/generate", generate), ("POST", "/lora/load", lora_load),
        ("POST", "/lora/unload", lora_unload), ("GET", "/lora/status", lora_status),
        ("POST", "/pause", pause), ("POST", "/resume", resume),
        ("GET", "/is_paused", is_paused), ("GET", "/bridge/info", bridge_info),
    ):
        router.add_api_route(path, handler, methods=[method])
    app.include_router(router)
    routes = app.router.routes
    n = len(router.routes)
    routes[:] = routes[-n:] + routes[:-n]


async def run_server(args: Namespace) -> None:
    """vLLM's run_server, with our routes added between its app build and serving."""

    def _interrupt_init(*_: Any) -> None:
        # As vLLM does: a SIGTERM during the long engine start stops us cleanly.
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = compat.setup_server(args, reuse_port=False)
    async with compat.build_async_engine_client(args) as engine_client:
        await worker_ext.export_from_server(engine_client, args)  # before /health answers
        tasks = await engine_client.get_supported_tasks()
        app = compat.build_app(args, tasks, engine_client.model_config)
        await compat.init_app_state(engine_client, app.state, args, tasks)
        app.state.grpo = ServerState(pause=compat.GenerationPause(engine_client))
        attach_routes(app)
        log.info("serving on %s (vLLM %s)", listen_address, compat.VLLM_VERSION)
        shutdown_task = await compat.serve_http(app, sock, **compat.serve_http_kwargs(args))
    # As in vLLM: wait for the HTTP server only once the engine context has exited.
    try:
        await shutdown_task
    finally:
        sock.close()


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = compat.make_arg_parser(
        compat.FlexibleArgumentParser(description=__doc__.split("\n\n")[0])
    )
    vllm_gpu_mem_default = parser.get_default("gpu_memory_utilization")
    # None marks "not given", so the platform-dependent default below is never a silent override.
    parser.set_defaults(host=DEFAULT_HOST, port=DEFAULT_PORT, gpu_memory_utilization=None)
    args = parser.parse_args(argv)
    worker_ext.configure_server_args(args)
    if args.dtype == "auto":
        # NOTE: vLLM's auto is the checkpoint's dtype (bf16 for most models), which a CPU without
        # AVX512-BF16/AMX emulates ~90x slower; ours is the machine's, as the trainer's is.
        args.dtype = resolve_dtype("auto")
    if args.gpu_memory_utilization is None:
        if compat.is_cpu_platform():
            args.gpu_memory_utilization = CPU_GPU_MEMORY_UTILIZATION
            log.warning("CPU platform: --gpu-memory-utilization not given, using %.1f (vLLM's "
                        "default %.2f of the node's RAM fails at start)",
                        CPU_GPU_MEMORY_UTILIZATION, vllm_gpu_mem_default)
        else:
            args.gpu_memory_utilization = vllm_gpu_mem_default
    compat.configure_logging(args)
    compat.validate_parsed_serve_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    compat.cli_env_setup()
    uvloop.run(run_server(parse_args(argv)))


if __name__ == "__main__":
    main()
