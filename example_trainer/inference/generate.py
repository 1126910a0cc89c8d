"""POST /generate: Atropos' VLLMServer format ({"text", "finish_reasons", "logprobs", ...}) on
vLLM's engine, with the body parsed at the door (inference/requests.py) and vLLM's own refusals
answered as 400s."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from example_trainer.inference import compat, door
from example_trainer.inference.engine import BAD_REQUEST_ERRORS, EngineGenerateError, client_error
from example_trainer.inference.requests import GenerateRequest
from example_trainer.inference.state import state_of


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
        return state_of(request).active_lora
    models = request.app.state.openai_serving_models
    if models.is_base_model(name):
        return None
    if name not in models.lora_requests:
        raise HTTPException(404, f"unknown model or LoRA adapter {name!r}; load it with /lora/load")
    return models.lora_requests[name]


def _refused(exc: BaseException) -> HTTPException:  # vLLM refused what passed our checks
    return HTTPException(400, f"/generate: vLLM refused the request: {str(exc)[:1000]}")


def _sampling_params(req: GenerateRequest) -> SamplingParams:
    kwargs = req.sampling_kwargs()
    if req.structured_outputs is not None:
        kwargs["structured_outputs"] = compat.StructuredOutputsParams(
            **req.structured_outputs.vllm_kwargs())
    try:
        return SamplingParams(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY)
    except BAD_REQUEST_ERRORS as e:  # combinations vLLM refuses (stop without detokenize)
        raise _refused(e) from e


async def generate(raw_request: Request) -> Any:
    # with_cancellation (abort on client disconnect) consumes the request stream: read it first.
    limits = state_of(raw_request).limits
    req = door.parse(GenerateRequest, await raw_request.body(), "/generate", limits)
    return await _generate(req, raw_request)


@compat.with_cancellation
async def _generate(req: GenerateRequest, raw_request: Request) -> JSONResponse:
    if req.stream:
        raise HTTPException(400, "/generate does not stream; use /v1/completions for streaming")
    state = state_of(raw_request)
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
    prompt = req.prompt_for_vllm()
    version = state.fence_version() if state.fence_version is not None else None
    if version is not None:
        # Prefix-cache blocks are keyed by the salt: a request that starts after a fenced
        # write never reuses blocks computed with the weights before it.
        prompt = {**prompt, "cache_salt": f"w{version}"} if isinstance(prompt, dict) else {
            "prompt": prompt, "cache_salt": f"w{version}"}
    try:
        async with state.pause.admit():
            async for out in engine.generate(prompt, params,
                                             f"gen-{uuid.uuid4().hex}", lora_request=lora):
                final = out
    except compat.EngineDeadError as e:
        raise HTTPException(503, "vLLM's engine core died: restart the server") from e
    except (EngineGenerateError, *BAD_REQUEST_ERRORS) as e:
        if client_error(e) is None:
            raise  # the server's fault: vLLM's handler answers 500 and logs it
        raise _refused(client_error(e)) from e
    assert final is not None, "vLLM returned no output"
    body = _format_output(final, params)
    if state.weight_version is not None:  # the trainer step whose weights served it
        body["weight_version"] = state.weight_version
    return JSONResponse(body)

