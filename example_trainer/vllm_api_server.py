"""Inference server: vLLM's own OpenAI server plus the routes Atropos and our bridges call.

    python -m example_trainer.vllm_api_server --model M --port 9001 [any vLLM serve flag]
    python example_trainer/vllm_api_server.py --model M --port 9001

Every vLLM flag passes through (vLLM's parser, app builder and state init are reused). Defaults
that differ: --host 127.0.0.1, --port 9001 (Atropos' convention), and on a CPU platform
--gpu-memory-utilization 0.3 when not given (there vLLM's default share of the NUMA node's RAM
fails at start).

Our routes (vLLM's /v1/* and friends stay as they are):
  POST /generate      Atropos' VLLMServer format: {"text", "finish_reasons", "logprobs", ...}
  POST /lora/load     {"adapter_path", "adapter_name"?} -> served to requests that name no model
  POST /lora/unload   back to the base model;  GET /lora/status
  POST /pause?mode=wait|abort|keep&clear_cache=true|false&lease_s=120, POST /resume,
  GET  /is_paused     a pause not renewed (POST /pause again) within lease_s ends by itself
  GET  /bridge/info   where vllm_bridge_config.json is (written by vllm_patching in the worker)
  GET  /health        200 only while the engine core answers (vLLM's checks only that it lives)

Every body and query is validated at the door (example_trainer/server_requests.py): 422 names
the problem (and, for unknown keys, what is accepted); what vLLM itself still refuses is a 400;
a body over --max-request-bytes is a 413; a dead or silent engine is a 503.
"""

from __future__ import annotations

import asyncio
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

from fastapi import APIRouter, FastAPI, HTTPException, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402

from example_trainer import server_requests as door  # noqa: E402
from example_trainer import vllm_compat as compat  # noqa: E402
from example_trainer.machine import resolve_dtype  # noqa: E402
from vllm_patching import bridge_config, plugin, worker_ext  # noqa: E402 - shared_vllm export

log = logging.getLogger("example_trainer.vllm_api_server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9001
CPU_GPU_MEMORY_UTILIZATION = 0.3
MAX_REQUEST_BYTES = 16 << 20  # --max-request-bytes default: a 128k-token prompt is ~1 MB


@dataclass
class ServerState:
    """What our routes add to vLLM's app state (app.state.grpo)."""

    pause: compat.GenerationPause
    probe: compat.EngineProbe
    limits: door.ModelLimits
    lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active_lora: LoRARequest | None = None
    active_lora_sent_path: str | None = None  # as the client sent it (never resolved here)
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


def _refused(exc: BaseException) -> HTTPException:  # vLLM refused what passed our checks
    return HTTPException(400, f"/generate: vLLM refused the request: {str(exc)[:1000]}")


def _sampling_params(req: door.GenerateRequest) -> SamplingParams:
    kwargs = req.sampling_kwargs()
    if req.structured_outputs is not None:
        kwargs["structured_outputs"] = compat.StructuredOutputsParams(
            **req.structured_outputs.vllm_kwargs())
    try:
        return SamplingParams(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY)
    except compat.BAD_REQUEST_ERRORS as e:  # combinations vLLM refuses (stop without detokenize)
        raise _refused(e) from e


async def generate(raw_request: Request) -> Any:
    # with_cancellation (abort on client disconnect) consumes the request stream: read it first.
    limits = _state(raw_request).limits
    req = door.parse(door.GenerateRequest, await raw_request.body(), "/generate", limits)
    return await _generate(req, raw_request)


@compat.with_cancellation
async def _generate(req: door.GenerateRequest, raw_request: Request) -> JSONResponse:
    if req.stream:
        raise HTTPException(400, "/generate does not stream; use /v1/completions for streaming")
    state = _state(raw_request)
    lora = _pick_lora(raw_request, req.lora or req.model)
    params = _sampling_params(req)
    engine = raw_request.app.state.engine_client
    if (params.prompt_logprobs is not None and engine.vllm_config.lora_config is not None
            and compat.prompt_logprobs_break_lora_engine()):
        raise HTTPException(400, "prompt_logprobs would crash this vLLM build's engine when "
                                 "it runs with --enable-lora: restart without it to get them")
    if state.probe.unresponsive():
        raise HTTPException(503, "vLLM's engine core is dead or not answering: restart the server")
    final = None
    try:
        async with state.pause.admit():
            async for out in engine.generate(req.prompt_for_vllm(), params,
                                             f"gen-{uuid.uuid4().hex}", lora_request=lora):
                final = out
    except compat.EngineDeadError as e:
        raise HTTPException(503, "vLLM's engine core died: restart the server") from e
    except (compat.EngineGenerateError, *compat.BAD_REQUEST_ERRORS) as e:
        if compat.client_error(e) is None:
            raise  # the server's fault: vLLM's handler answers 500 and logs it
        raise _refused(compat.client_error(e)) from e
    assert final is not None, "vLLM returned no output"
    return JSONResponse(_format_output(final, params))


# ----------------------------------------------------------------------------- LoRA
async def _unregister(request: Request, name: str) -> None:
    models = request.app.state.openai_serving_models
    await models.unload_lora_adapter(compat.UnloadLoRAAdapterRequest(lora_name=name))


def _adapter_dir(request: Request, req: door.LoraLoadRequest) -> Path:
    """Fail with a 4xx that names the fix before vLLM fails with a 500 deep in the engine."""
    lora_config = request.app.state.engine_client.vllm_config.lora_config
    if lora_config is None:
        raise HTTPException(400, "this server runs without LoRA support: restart it with "
                                 "--enable-lora --max-lora-rank R (R >= the adapter's rank)")
    if req.adapter_name and request.app.state.openai_serving_models.is_base_model(
            req.adapter_name):
        raise HTTPException(400, f"adapter_name {req.adapter_name!r} is the base model's name")
    return door.adapter_dir(req.adapter_path, lora_config.max_lora_rank)


async def lora_load(request: Request) -> JSONResponse:
    req = door.parse(door.LoraLoadRequest, await request.body(), "/lora/load")
    path = _adapter_dir(request, req)
    state = _state(request)
    models = request.app.state.openai_serving_models
    async with state.lora_lock:
        name = req.adapter_name or f"adapter_{state.lora_load_count + 1}"
        start = time.perf_counter()
        # Re-registering frees the name, so vLLM hands out a fresh int id: its LoRA cache is
        # keyed by id, and reusing one would keep serving the previous weights.
        if name in models.lora_requests:
            await _unregister(request, name)
        resp = await models.load_lora_adapter(
            compat.LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path))
        )
        if not isinstance(resp, str):  # vLLM's ErrorResponse; a 500 there is a bad adapter too
            # Its message quotes the absolute path we gave vLLM: show the client's own instead.
            resp.error.message = resp.error.message.replace(str(path), req.adapter_path)
            return JSONResponse(resp.model_dump(), status_code=min(resp.error.code, 422))
        previous = state.active_lora
        if previous is not None and previous.lora_name != name:
            # One adapter is served at a time; vLLM's LRU cache evicts the old weights itself.
            await _unregister(request, previous.lora_name)
        state.active_lora = models.lora_requests[name]
        state.active_lora_sent_path = req.adapter_path
        state.lora_load_count += 1
        seconds = time.perf_counter() - start
    log.info("LoRA %s loaded from %s in %.3f s (id %d)", name, path, seconds,
             state.active_lora.lora_int_id)
    return JSONResponse({"status": "ok", "adapter_name": name, "adapter_path": req.adapter_path,
                         "adapter_id": state.active_lora.lora_int_id, "load_seconds": seconds,
                         "load_count": state.lora_load_count})


async def lora_unload(request: Request) -> JSONResponse:
    door.require_no_body(await request.body(), "/lora/unload")
    state = _state(request)
    async with state.lora_lock:
        previous, state.active_lora = state.active_lora, None
        state.active_lora_sent_path = None
        if previous is not None:
            await _unregister(request, previous.lora_name)
    return JSONResponse({"status": "ok", "previous_adapter": previous and previous.lora_name})


def _lora_status(request: Request) -> dict[str, Any]:
    state = _state(request)
    active = state.active_lora
    return {
        "lora_enabled": request.app.state.engine_client.vllm_config.lora_config is not None,
        "active_adapter_name": active.lora_name if active else None,
        "active_adapter_path": state.active_lora_sent_path if active else None,
        "active_adapter_id": active.lora_int_id if active else None,
        "load_count": state.lora_load_count,
    }


async def lora_status(request: Request) -> JSONResponse:
    return JSONResponse(_lora_status(request))


# ----------------------------------------------------------------------------- pause / resume
async def pause(request: Request) -> JSONResponse:
    """New requests wait; mode=wait lets in-flight ones finish (vLLM's own default: abort),
    mode=keep freezes them. clear_cache (prefix/KV cache) defaults to True: a pause usually
    precedes a weight update. The pause ends by itself after lease_s seconds (default 120)
    unless renewed by another POST /pause: a client that dies while holding it cannot stall
    generation for good."""
    door.require_no_body(await request.body(), "/pause")
    query = door.parse(door.PauseQuery, dict(request.query_params), "/pause")
    await _state(request).pause.pause(query.mode, query.clear_cache, query.lease_s)
    return JSONResponse({"status": "paused", "mode": query.mode, "lease_s": query.lease_s})


async def resume(request: Request) -> JSONResponse:
    door.require_no_body(await request.body(), "/resume")
    await _state(request).pause.resume()
    return JSONResponse({"status": "resumed"})


async def is_paused(request: Request) -> JSONResponse:
    pause_ = _state(request).pause
    return JSONResponse({"is_paused": await pause_.is_paused(),
                         "generate_inflight": pause_.inflight,
                         "lease_s": pause_.lease_s,
                         "lease_remaining_s": pause_.lease_remaining_s(),
                         "lease_expirations": pause_.lease_expirations})


async def health(request: Request) -> Response:
    """200 while the engine core answers; 503 once it died or stopped answering (vLLM's own
    /health would keep answering 200 for a core whose input thread died)."""
    if await _state(request).probe.alive():
        return Response(status_code=200)
    return Response(status_code=503, content="vLLM's engine core is dead or not answering")


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

    With VLLM_SERVER_DEV_MODE=1 vLLM also serves /pause (default mode abort) and /is_paused;
    ours shadow them, and our /health shadows vLLM's.
    """
    router = APIRouter()
    for method, path, handler in (
        ("POST", "/generate", generate), ("POST", "/lora/load", lora_load),
        ("POST", "/lora/unload", lora_unload), ("GET", "/lora/status", lora_status),
        ("POST", "/pause", pause), ("POST", "/resume", resume),
        ("GET", "/is_paused", is_paused), ("GET", "/bridge/info", bridge_info),
        ("GET", "/health", health),
    ):
        router.add_api_route(path, handler, methods=[method])
    app.include_router(router)
    routes = app.router.routes
    n = len(router.routes)
    routes[:] = routes[-n:] + routes[:-n]
    # Outermost, so that no route (vLLM's included) reads more than the cap. vLLM 0.32 has
    # built the middleware stack by now (add_middleware refuses): wrap it instead.
    stack = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = door.BodySizeLimit(stack, max_bytes=app.state.args.max_request_bytes)


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
        app.state.grpo = ServerState(pause=compat.GenerationPause(engine_client),
                                     probe=compat.EngineProbe(engine_client),
                                     limits=compat.model_limits(engine_client))
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
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help="[grpo] 413 for a request body over this many bytes (any route)")
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

    compat.keep_our_logs("example_trainer", "vllm_patching")
    compat.cli_env_setup()
    plugin.enable_in_vllm_processes()  # before vLLM reads VLLM_PLUGINS; children inherit it
    uvloop.run(run_server(parse_args(argv)))


if __name__ == "__main__":
    main()
