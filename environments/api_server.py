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
- Every route: 413 past --max-body-mib (also once gzip-inflated); 403 for a Host that is not
  loopback, --host or --allowed-hosts, and for browser pages of another origin. POST /reset_data.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import zlib
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from environments import batching
from environments.batching import BatchingState, QueuedGroup
from environments.schemas import GROUP_LIST, EnvIdentifier, RegisterEnv, Registration, ScoredData

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MAX_BODY_MIB = 32.0
RETRY_AFTER_S = "1"


class SafeJSON(JSONResponse):
    """JSON that always encodes: ASCII escapes (an error may quote a client's odd string)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode()


def error(code: int, detail: Any, headers: dict | None = None, **extra: Any) -> SafeJSON:
    return SafeJSON({"detail": detail, **extra}, code, headers=headers)


# ---- the gate every request passes before routing -----------------------------------------------
class HostPolicy:
    """Which Host and Origin headers to serve: refuses DNS rebinding (a page of evil.example whose
    name now resolves to 127.0.0.1) and requests a browser makes for a page of another site."""

    def __init__(self, bind_host: str = "127.0.0.1", allowed: Sequence[str] = ()) -> None:
        self.names = {"localhost", bind_host.lower().strip("[]"), *(h.lower() for h in allowed)}
        self.any_host = "*" in self.names
        # Bound to every interface: clients may use any address of ours or our name. An IP
        # literal cannot be rebound, so only names need the list.
        self.any_ip = bind_host in ("0.0.0.0", "::", "")
        if self.any_ip:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def _host_ok(self, host: str) -> bool:
        if self.any_host or host in self.names:
            return True
        try:  # an IP literal, or a name
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return ip.is_loopback or self.any_ip

    def refusal(self, headers: Headers) -> str | None:
        host_header = headers.get("host", "").strip().lower()
        host = host_header.rstrip(".")
        if host.startswith("["):
            host = host[1:host.find("]")]
        elif host.count(":") == 1:
            host = host.split(":")[0]
        if host_header and not self._host_ok(host.rstrip(".")):
            return (f"Host {host_header!r} is not served (DNS rebinding protection): connect to "
                    "127.0.0.1 or localhost, or start the API with --allowed-hosts "
                    f"{host.rstrip('.') or '<name>'}")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in (f"http://{host_header}",
                                                         f"https://{host_header}"):
            return (f"cross-origin request from {origin!r} refused: the batching API serves no "
                    "web pages; call it from a program (no Origin header), not a browser")
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
            return (f"request from a {fetch_site} browser page refused: the batching API serves "
                    "no web pages; call it from a program")
        return None


class BodyTooLarge(Exception):
    pass


def inflate(body: bytes, limit: int) -> bytes:
    """gzip members, inflated without ever holding more than `limit` + 1 bytes."""
    out, data = bytearray(), body
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:  # invalid gzip is the client's error: a 400, not a 500
            out += inflater.decompress(data, limit - len(out) + 1)
        except zlib.error as e:
            raise ValueError(f"invalid gzip request body: {e}") from None
        if len(out) > limit:
            raise BodyTooLarge(f"gzip body inflates past {limit} bytes")
        if not inflater.eof:
            raise ValueError("invalid gzip request body: truncated")
        data = inflater.unused_data
    return bytes(out)


class RequestGate:
    """Host/Origin checks (403), the body cap (413), gzip request bodies (atroposlib 0.4's envs
    gzip payloads of 1 KiB and more) inflated under the same cap; for every route and method."""

    def __init__(self, app: ASGIApp, policy: HostPolicy, max_body_bytes: int) -> None:
        self.app, self.policy, self.limit = app, policy, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self.policy.refusal(headers)
        if refusal:
            log.warning("403 %s %s: %s", scope["method"], scope["path"], refusal)
            return await error(403, refusal)(scope, receive, send)
        declared = headers.get("content-length", "0")
        too_big = error(413, f"request body over the API's {self.limit} bytes "
                             "(--max-body-mib): send fewer or smaller groups per request")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)  # refused before reading a byte
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding == "gzip":
            try:  # both are the client's errors
                body = inflate(body, self.limit)
            except BodyTooLarge:
                return await too_big(scope, receive, send)
            except ValueError as e:
                return await error(400, str(e))(scope, receive, send)
        elif encoding not in ("identity", ""):
            return await error(415, f"Content-Encoding {encoding!r}: send gzip or plain JSON")(
                scope, receive, send)
        kept = [h for h in scope["headers"] if h[0] not in (b"content-encoding", b"content-length")]
        scope = {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode())]}
        first = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> dict[str, Any]:  # the body once, then the client's own messages
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)


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
async def batch(request: Request) -> Response:
    state = _state(request)
    if state.registration is None:
        msg = "trainer not registered: call POST /register first"
        return error(409, msg, status="error", message=msg)
    return _json(b'{"batch":' + (state.next_batch() or b"null") + b"}")


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
               allowed_hosts: Sequence[str] = (), env_id_base: int | None = None) -> FastAPI:
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
                     hosts)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
