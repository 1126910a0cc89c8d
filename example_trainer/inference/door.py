"""The door of every route but /generate's sampling fields: JSON bodies and queries parsed into
strict models with 422s that name the problem, bodies capped (413) before any route reads them,
and /lora/load's adapter directory checked before vLLM sees it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from example_trainer.inference.requests import STRICT, ModelLimits, problem

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
ADAPTER_CONFIG = "adapter_config.json"
MAX_ADAPTER_CONFIG_BYTES = 1 << 20  # peft writes ~1 KB
LEASE_S_DEFAULT, LEASE_S_MAX = 120.0, 3600.0


class LoraLoadRequest(BaseModel):
    """POST /lora/load."""

    model_config = STRICT
    adapter_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)
    adapter_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")] | None \
        = None

    @field_validator("adapter_path")
    @classmethod
    def _no_nul(cls, v: str) -> str:
        if "\x00" in v:
            raise problem("adapter_path contains a NUL character")
        return v


def _quote(sent: str) -> str:
    return repr(sent if len(sent) <= 200 else sent[:200] + "...")


def _stat(path: Path, sent: str, what: str) -> os.stat_result:
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise HTTPException(404, f"adapter_path {_quote(sent)}: {what} not found (a peft "
                                 f"adapter is a directory holding {ADAPTER_CONFIG})") from None
    except OSError as e:  # permission, name too long, symlink loop ...
        raise HTTPException(400, f"adapter_path {_quote(sent)}: {what}: {e.strerror}") from None


def adapter_dir(sent: str, max_lora_rank: int) -> Path:
    """The adapter directory `sent` names (absolute, symlinks kept), once its adapter_config.json
    is a JSON object whose rank (r) fits the server.

    Messages quote the path as the client sent it, never what it resolves to on this machine.
    """
    path = Path(os.path.abspath(os.path.expanduser(sent)))
    if not stat.S_ISDIR(_stat(path, sent, "directory").st_mode):
        raise HTTPException(400, f"adapter_path {_quote(sent)} is not a directory (a peft "
                                   f"adapter is a directory holding {ADAPTER_CONFIG})")
    cfg = _stat(path / ADAPTER_CONFIG, sent, ADAPTER_CONFIG)
    if not stat.S_ISREG(cfg.st_mode) or cfg.st_size > MAX_ADAPTER_CONFIG_BYTES:
        raise HTTPException(400, f"adapter_path {_quote(sent)}: {ADAPTER_CONFIG} is not a "
                                   f"regular file of at most {MAX_ADAPTER_CONFIG_BYTES} bytes")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8/JSON, too deep
        raise HTTPException(400, f"adapter_path {_quote(sent)}: {ADAPTER_CONFIG} is not readable "
                                   f"JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise HTTPException(400, f"adapter_path {_quote(sent)}: {ADAPTER_CONFIG} must be a JSON "
                                   f"object, not {type(config).__name__}")
    rank = config.get("r")
    if rank is not None and (type(rank) is not int or rank < 1):
        raise HTTPException(400, f"{ADAPTER_CONFIG}: r must be a positive integer, got "
                                   f"{type(rank).__name__} {str(rank)[:20]}")
    if rank is not None and rank > max_lora_rank:
        raise HTTPException(400, f"adapter rank {rank} > --max-lora-rank {max_lora_rank}: "
                                   "restart with a larger rank")
    return path


class NotifyUpdate(BaseModel):
    """POST /bridge/notify_update, the reference bridge module's body."""

    model_config = STRICT
    update_count: int = Field(ge=0, le=2**62)
    trainer_rank: int = Field(0, ge=0, le=1 << 20)
    timestamp: float | None = Field(None, allow_inf_nan=False)


class PauseQuery(BaseModel):
    """POST /pause?mode=...&clear_cache=...&lease_s=... (query strings: lax parsing)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["wait", "abort", "keep"] = "wait"
    clear_cache: bool = True
    lease_s: float = Field(LEASE_S_DEFAULT, gt=0.0, le=LEASE_S_MAX, allow_inf_nan=False)


# ----------------------------------------------------------------------------- parsing
def _where(loc: tuple[Any, ...]) -> str:
    """A field path without pydantic's union-branch markers (prompt.ids.x -> prompt.x)."""
    parts = [str(x) for x in loc if not (str(x) in _BRANCHES or "[" in str(x)
                                         or str(x).startswith("constrained-"))]
    return ".".join(parts)


_BRANCHES = frozenset({"ids", "text", "str", "int", "float", "bool", "list", "dict", "none"})


def describe(error: ValidationError, model: type[BaseModel], route: str) -> str:
    """One line naming every problem: unknown keys with what is accepted, else field: reason."""
    errors = error.errors(include_url=False, include_context=False)
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"
               and len(e["loc"]) == 1]
    if unknown:
        accepted = ", ".join(f.alias or name for name, f in model.model_fields.items())
        return f"{route}: unknown key(s) {unknown[:10]}; accepted: {accepted}"
    parts = []
    for e in errors[:8]:
        where = _where(e["loc"])
        got = f" (got {type(e['input']).__name__})" if e["type"].endswith("_type") else ""
        parts.append(f"{where + ': ' if where else ''}{e['msg']}{got}")
    more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
    return f"{route}: " + "; ".join(dict.fromkeys(parts)) + more


def parse(model: type[BaseModel], raw: bytes | dict[str, Any], route: str,
          limits: ModelLimits | None = None) -> Any:
    """`model` from a JSON body (bytes) or query dict; HTTPException(422) naming the problems."""
    try:
        if isinstance(raw, bytes):
            return model.model_validate_json(raw or b"null", context=limits)
        return model.model_validate(raw, context=limits)
    except ValidationError as e:
        raise HTTPException(422, describe(e, model, route)) from None


def require_no_body(raw: bytes, route: str) -> None:
    """Routes that take no body accept none, or an empty JSON object (what most clients send)."""
    if b"".join(raw.split()) not in (b"", b"{}"):
        raise HTTPException(422, f"{route} takes no body (its options, if any, are query "
                                   "parameters)")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, declared (Content-Length) or streamed,
    before any route reads it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await JSONResponse({"error": {"message": self._message(), "type": "Content Too Large",
                                          "code": 413}}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def receive_capped() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # chunked upload: the route's exception handler answers
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, receive_capped, send)

    def _message(self) -> str:
        return (f"request body over {self.max_bytes} bytes (the server's --max-request-bytes)")
