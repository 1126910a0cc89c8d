"""The control routes: LoRA hot-swap, pause/resume with a lease, /health that asks the engine
core, and where the shared_vllm bridge config is."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from example_trainer.inference import compat, door
from example_trainer.inference.state import state_of
from vllm_patching import bridge_config

log = logging.getLogger(__name__)


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
    state = state_of(request)
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
    state = state_of(request)
    async with state.lora_lock:
        previous, state.active_lora = state.active_lora, None
        state.active_lora_sent_path = None
        if previous is not None:
            await _unregister(request, previous.lora_name)
    return JSONResponse({"status": "ok", "previous_adapter": previous and previous.lora_name})


def _lora_status(request: Request) -> dict[str, Any]:
    state = state_of(request)
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
    await state_of(request).pause.pause(query.mode, query.clear_cache, query.lease_s)
    return JSONResponse({"status": "paused", "mode": query.mode, "lease_s": query.lease_s})


async def resume(request: Request) -> JSONResponse:
    door.require_no_body(await request.body(), "/resume")
    await state_of(request).pause.resume()
    return JSONResponse({"status": "resumed"})


async def is_paused(request: Request) -> JSONResponse:
    pause_ = state_of(request).pause
    return JSONResponse({"is_paused": await pause_.is_paused(),
                         "generate_inflight": pause_.inflight,
                         "lease_s": pause_.lease_s,
                         "lease_remaining_s": pause_.lease_remaining_s(),
                         "lease_expirations": pause_.lease_expirations})


async def health(request: Request) -> Response:
    """200 while the engine core answers; 503 once it died or stopped answering (vLLM's own
    /health would keep answering 200 for a core whose input thread died)."""
    if await state_of(request).probe.alive():
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
        "paused": await state_of(request).pause.is_paused(),
        "lora": _lora_status(request),
        "weight_version": state_of(request).weight_version,
    })


async def notify_update(request: Request) -> JSONResponse:
    """The trainer's word on which step's weights are served now (after each sync)."""
    req = door.parse(door.NotifyUpdate, await request.body(), "/bridge/notify_update")
    state_of(request).weight_version = req.update_count
    return JSONResponse({"status": "ok", "weight_version": req.update_count})

