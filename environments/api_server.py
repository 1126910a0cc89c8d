"""Batching API: environments POST scored groups, the trainer GETs fixed-size batches.

Wire-compatible with atroposlib 0.4's `run-api` (atroposlib/api/server.py): same routes, bodies
and answers. Where we differ, on purpose:
- A batch is whole groups totalling exactly `batch_size` sequences (environments/batching.py);
  {"batch": null} until some set of queued groups fits exactly. One batch per GET /batch.
- Bodies are validated at the door (environments/schemas.py): a 4xx naming the field, nothing
  unvalidated queued; token ids checked against /register's optional `vocab_size` (ours),
  lengths against its max_token_len.
- A full queue (--max-queue-sequences, default 16 batches; --max-queue-mib) answers 503 with
  Retry-After, the one deliberate 5xx: atroposlib's envs drop data on a 4xx and retry a 5xx.
- 409: GET /batch before POST /register; a second /register changing batch_size, max_token_len
  or vocab_size; an env_id this process never issued (it restarted: register again).
- POST /register-env answers {"status": "wait for trainer to start"} until the trainer's first
  GET /batch, as atroposlib (--no-wait-for-trainer to turn off).
- GET /batch?order=freshest (ours; --batch-order sets the default, fifo as atroposlib) offers
  each env's groups newest weight version first; atroposlib's run-api ignores the parameter.
- Every route: 413 past --max-body-mib (also once gzip-inflated); 403 for a Host that is not
  loopback, --host or --allowed-hosts, and for browser pages of another origin. POST /reset_data.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from environments import batching
from environments.batch_plan import BATCH_ORDERS
from environments.batching import BatchingState, QueuedGroup
from environments.http_gate import MIB, HostPolicy, RequestGate, SafeJSON, error
from environments.schemas import GROUP_LIST, EnvIdentifier, RegisterEnv, Registration, ScoredData

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_MIB = 32.0
BatchOrder = Literal[tuple(BATCH_ORDERS)]  # ?order= of GET /batch: a 422 lists the choices
RETRY_AFTER_S = "1"


# ---- routes -------------------------------------------------------------------------------------
router = APIRouter()


def _state(request: Request) -> BatchingState:
    return request.app.state.batching


def _body_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _queued(body: bytes, many: bool) -> list[QueuedGroup]:
    """Validate and encode groups; runs in a worker thread (a 32 MiB body takes ~1 s)."""
    groups = GROUP_LIST.validate_json(body) if many else [ScoredData.model_validate_json(body)]
    return [QueuedGroup.from_scored(g) for g in groups]


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    return model.model_validate_json(await request.body())


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


@router.get("/")
async def root() -> dict:
    return {"message": "AtroposLib API"}


@router.post("/register", openapi_extra=_body_doc(Registration.model_json_schema()))
async def register(request: Request) -> dict:
    return _state(request).register(await _parse(request, Registration))


@router.post("/register-env", openapi_extra=_body_doc(RegisterEnv.model_json_schema()))
async def register_env(request: Request) -> dict:
    return _state(request).register_env(await _parse(request, RegisterEnv))


@router.post("/disconnect-env", openapi_extra=_body_doc(EnvIdentifier.model_json_schema()))
async def disconnect_env(request: Request) -> dict:
    env_id, state = (await _parse(request, EnvIdentifier)).env_id, _state(request)
    if env_id not in state.envs:  # atroposlib's answer: a 200 with a failure status
        return {"status": "failure", "error": f"unknown env_id {env_id}"}
    state.envs[env_id].connected = False
    log.info("env %d disconnected", env_id)
    return {"status": "success"}


@router.get("/wandb_info")
async def wandb_info(request: Request) -> dict:
    reg = _state(request).registration
    return {"group": reg and reg.wandb_group, "project": reg and reg.wandb_project}


@router.get("/info")
async def info(request: Request) -> dict:
    reg = _state(request).registration
    return {"batch_size": reg.batch_size if reg else -1,
            "max_token_len": reg.max_token_len if reg else -1}


@router.get("/batch")
async def batch(request: Request, order: BatchOrder | None = None) -> Response:
    state = _state(request)
    if state.registration is None:
        msg = "trainer not registered: call POST /register first"
        return error(409, msg, status="error", message=msg)
    body = state.next_batch(order or request.app.state.batch_order)
    return _json(b'{"batch":' + (body or b"null") + b"}")


@router.get("/latest_example")
async def latest_example(request: Request) -> Response:
    empty = {k: [] for k in ("tokens", "masks", "scores", "advantages", "ref_logprobs",
                             "generation_params", "inference_logprobs", "messages", "images")}
    return _json(_state(request).latest or json.dumps(empty).encode())


@router.post("/scored_data", openapi_extra=_body_doc(ScoredData.model_json_schema()))
async def scored_data(request: Request) -> dict:
    _state(request).enqueue(await run_in_threadpool(_queued, await request.body(), False))
    return {"status": "received"}


@router.post("/scored_data_list", openapi_extra=_body_doc(GROUP_LIST.json_schema()))
async def scored_data_list(request: Request) -> dict:
    groups = await run_in_threadpool(_queued, await request.body(), True)
    _state(request).enqueue(groups)
    return {"status": "received", "groups_processed": len(groups)}


@router.get("/status")
async def status(request: Request) -> dict:
    return _state(request).status()


@router.get("/status-env")
async def status_env(request: Request, env_id: int | None = None) -> dict:
    # atroposlib's envs send {"env_id": n} as the JSON body of this GET; ?env_id=n works too.
    if env_id is None and not await request.body():
        raise batching.Rejected("send env_id as a JSON body {\"env_id\": n} or as ?env_id=n")
    ident = (EnvIdentifier(env_id=env_id) if env_id is not None
             else await _parse(request, EnvIdentifier))
    return _state(request).status_env(ident.env_id)


@router.post("/reset_data")
async def reset_data(request: Request) -> PlainTextResponse:
    _state(request).reset()
    log.info("state reset")
    return PlainTextResponse("Reset successful")


# What the state's refusals look like on the wire: (status code, "status" field).
REFUSALS: dict[type[Exception], tuple[int, str]] = {
    batching.UnknownEnv: (409, "unknown env_id"),
    batching.RegistrationConflict: (409, "registration conflict"),
    batching.QueueFull: (503, "queue full"),  # Retry-After: atroposlib's envs retry 5xx only
    batching.Rejected: (422, "rejected"),
}


def _details(errors: Sequence[Any], prefix: tuple) -> list[dict]:
    """Where and why, never the input itself (FastAPI echoes it: megabytes for a big group)."""
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]


async def _invalid(_: Request, exc: Exception) -> SafeJSON:
    if isinstance(exc, RequestValidationError):
        return error(422, _details(exc.errors(), ()))
    assert isinstance(exc, ValidationError)
    return error(422, _details(exc.errors(include_url=False, include_input=False), ("body",)))


async def _refused(_: Request, exc: Exception) -> SafeJSON:
    code, label = REFUSALS[type(exc)]
    log.info("%d %s: %s", code, label, exc)
    headers = {"Retry-After": RETRY_AFTER_S} if code == 503 else None
    return error(code, str(exc), headers, status=label)


def create_app(max_queue_sequences: int | None = None, seed: int = 0,
               wait_for_trainer: bool = True, max_body_bytes: int = int(DEFAULT_MAX_BODY_MIB * MIB),
               max_queue_bytes: int = batching.DEFAULT_QUEUE_BYTES, bind_host: str = "127.0.0.1",
               allowed_hosts: Sequence[str] = (), env_id_base: int | None = None,
               batch_order: str = "fifo") -> FastAPI:
    """The API over one fresh BatchingState (kept on `app.state.batching`)."""
    app = FastAPI(title="Batching API (Atropos-compatible)", default_response_class=SafeJSON)
    app.include_router(router)
    for exc_type in (ValidationError, RequestValidationError):
        app.add_exception_handler(exc_type, _invalid)
    for exc_type in REFUSALS:
        app.add_exception_handler(exc_type, _refused)
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    app.add_middleware(RequestGate, policy=HostPolicy(bind_host, allowed_hosts),
                       max_body_bytes=max_body_bytes)
    app.state.batching = BatchingState(max_queue_sequences, max_queue_bytes, seed,
                                       wait_for_trainer, env_id_base)
    app.state.batch_order = batch_order  # for GET /batch without ?order=
    return app


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m environments.api_server",
        description="Atropos-compatible batching API: envs POST /scored_data, the trainer GETs "
                    "/batch.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (atroposlib binds 0.0.0.0; default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--max-queue-sequences", type=int, default=None, metavar="N",
                   help=f"bound on queued sequences; POST /scored_data answers 503 + Retry-After "
                        f"past it (default: {batching.QUEUE_BATCHES} x batch_size, "
                        f"{batching.UNREGISTERED_QUEUE_SEQUENCES} until the trainer registers)")
    p.add_argument("--max-queue-mib", type=float, default=batching.DEFAULT_QUEUE_BYTES / MIB,
                   help="bound on the queue's bytes, 503 past it (default: %(default)g)")
    p.add_argument("--max-body-mib", type=float, default=DEFAULT_MAX_BODY_MIB,
                   help="largest request body, also after gzip inflation; 413 past it "
                        "(default: %(default)g)")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME[,NAME]",
                   help="Host names served besides loopback and --host ('*': any; only behind "
                        "a proxy that checks Host itself)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weighted draw between envs (default: %(default)s)")
    p.add_argument("--wait-for-trainer", action=argparse.BooleanOptionalAction, default=True,
                   help="answer POST /register-env 'wait for trainer to start' until the first "
                        "GET /batch, as atroposlib does (default: on)")
    p.add_argument("--batch-order", choices=sorted(BATCH_ORDERS), default="fifo",
                   help="which of an env's queued groups GET /batch takes first when the request "
                        "has no ?order=: fifo (oldest, as atroposlib) or freshest (newest weight "
                        "version, then newest arrival); default: %(default)s")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="%(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_queue_sequences is not None and args.max_queue_sequences <= 0:
        parser.error("--max-queue-sequences must be positive")
    if not 0 < args.max_body_mib <= args.max_queue_mib:
        parser.error("--max-body-mib must be positive and at most --max-queue-mib")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hosts = [h.strip() for arg in args.allowed_hosts for h in arg.split(",") if h.strip()]
    app = create_app(args.max_queue_sequences, args.seed, args.wait_for_trainer,
                     int(args.max_body_mib * MIB), int(args.max_queue_mib * MIB), args.host,
                     hosts, batch_order=args.batch_order)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
