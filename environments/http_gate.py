"""The gate every request to the batching API passes before routing: a Host/Origin check against
cross-site requests, and a body cap that also holds once a gzip body is inflated."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import zlib
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("environments.api_server")

MIB = 1 << 20


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


