"""Pure ASGI middleware for the intake: body size limit, CORS per campaign, security headers and
an access log with no personal data in it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.pipeline.failures import passing

access_log = structlog.get_logger("dearmp.access")
log = structlog.get_logger(__name__)

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"strict-transport-security", b"max-age=31536000; includeSubDomains"),
    (b"permissions-policy", b"geolocation=(), camera=(), microphone=()"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
PAGE_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# The pages an email's link opens: their stylesheet and a form posting back, nothing else.
LINK_CSP = (
    b"default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    b"base-uri 'none'"
)
# Paths that carry a token are logged cut after their prefix.
TOKEN_PATHS = ("/v1/confirm/", "/v1/replied/")


def _csp(path: str) -> bytes:
    if path.startswith((*TOKEN_PATHS, "/console")):  # no script: a stylesheet and forms
        return LINK_CSP
    return PAGE_CSP if path.startswith("/demo") else API_CSP


def _safe_path(path: str) -> str:
    prefix = next((p for p in TOKEN_PATHS if path.startswith(p)), None)
    return f"{prefix}[token]" if prefix else path[:200]


TOO_LARGE = b'{"errors":{"body":"The request is too large."}}'


# The intake's answer to passing trouble (the API's database_away says the same).
AGAIN = b'{"errors":{"body":"Please try again in a moment."}}'


async def _send_simple(send: Send, status: int, body: bytes, headers: list[Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _send_simple(send, 413, TOO_LARGE, [])
                return
        seen = 0
        too_large = False

        async def limited() -> Message:
            nonlocal seen, too_large
            message: Message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def unless_too_large(message: Message) -> None:
            if not too_large:  # the application's own answer to a body it could not read
                await send(message)

        try:
            await self.app(scope, limited, unless_too_large)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await _send_simple(send, 413, TOO_LARGE, [])


class BodyTooLarge(Exception):
    pass


class Cors:
    """CORS with the allow-list ``origins_for(path)`` gives (a campaign's origins, see
    :meth:`Intake.origins_for`). No list, no cross-origin access."""

    def __init__(self, app: ASGIApp, origins_for: Callable[[str], set[str]]) -> None:
        self.app, self.origins_for = app, origins_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_headers = scope["headers"] if scope["type"] == "http" else []
        origin = next((v for k, v in request_headers if k == b"origin"), None)
        if origin is None:
            await self.app(scope, receive, send)
            return
        try:
            allowed = origin.decode("latin-1") in self.origins_for(scope["path"])
        except Exception as exc:  # the campaigns' origins are read from the database
            if not passing(exc):
                raise
            log.warning("database_unavailable", error=type(exc).__name__)
            await _send_simple(send, 503, AGAIN, [(b"retry-after", b"1"), (b"vary", b"Origin")])
            return
        if scope["method"] == "OPTIONS":
            headers = [(b"vary", b"Origin")]
            if allowed:
                headers += [
                    (b"access-control-allow-origin", origin),
                    (b"access-control-allow-methods", b"GET, POST"),
                    (b"access-control-allow-headers", b"Content-Type, Idempotency-Key"),
                    (b"access-control-max-age", b"600"),
                ]
            await _send_simple(send, 204 if allowed else 403, b"", headers)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start" and allowed:
                message["headers"] = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin),
                    (b"vary", b"Origin"),
                ]
            await send(message)

        await self.app(scope, receive, with_cors)


class SecurityHeadersAndAccessLog:
    """Security headers on every response; one access-log event per request, without the query
    string, bodies, client address or tokens."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        csp = (b"content-security-policy", _csp(scope["path"]))

        async def decorated(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), *SECURITY_HEADERS, csp]
                if scope["path"].startswith("/v1/"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, decorated)
        finally:
            access_log.info(
                "http_request",
                method=scope["method"],
                path=_safe_path(scope["path"]),
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
