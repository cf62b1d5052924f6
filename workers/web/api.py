"""The HTTP intake for campaign front ends (FastAPI on uvicorn): ``dearmp api``. Errors a page
can show next to a field come as ``{"errors": {"<field path>": "<message>"}}`` with status 422."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import dramatiq
import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from schemas.submission import error_message
from workers.pipeline.app import Apps
from workers.pipeline.failures import passing
from workers.web import preview, probes, replies, submissions, supporter_pages
from workers.web.bodies import problem
from workers.web.console import views as console
from workers.web.dependencies import Intake
from workers.web.guards import BodyLimit, Cors, SecurityHeadersAndAccessLog

log = structlog.get_logger(__name__)
# Request threads (sync endpoints); the database pool matches it.
API_THREADS = 16


def create_app(app_getter: Apps, broker: dramatiq.Broker) -> FastAPI:
    """The ASGI application on the process's App (``app_getter()``), sending stage messages on
    ``broker``; both built by the composition root (:mod:`workers.web.asgi`, or a test)."""
    intake = Intake(app_getter, broker)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        intake.batcher.start()
        # What start-up built lives as long as the process: full collections need not walk it.
        gc.collect()
        gc.freeze()
        yield
        await intake.batcher.stop()
        gc.unfreeze()

    api = FastAPI(
        title="DearMP intake",
        version="1",
        description="Post supporters' letters to their MPs. Errors come as a message per field.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        dependencies=[Depends(utf8_json)],
        # No redirect to the path without its "/": it is built from the Host header, so a link's
        # token could be sent to another host.
        redirect_slashes=False,
    )
    api.state.intake = intake
    for module in (probes, preview, submissions, supporter_pages, replies, console):
        api.include_router(module.router)
    _handle_errors(api)
    for error in (console.Refused, console.Redirect):  # the console's answers are pages
        api.add_exception_handler(error, console.refused)

    def origins_for(path: str) -> set[str]:
        # None for the probes, which must answer with the database (which holds them) down.
        return set() if path in probes.PATHS else intake.origins_for(path)

    limit = app_getter().settings.api_max_body_bytes
    wrapped: Any = SecurityHeadersAndAccessLog(Cors(BodyLimit(api, limit), origins_for))
    wrapped.fastapi = api
    return wrapped  # type: ignore[no-any-return]


def allowed_methods(api: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this request's path, asked of the router."""
    return [
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in api.router.routes
        )
    ]


async def utf8_json(request: Request) -> None:
    """A JSON body must be UTF-8 (RFC 8259); Python's json would read UTF-16 and UTF-32 too."""
    if "json" not in request.headers.get("content-type", ""):
        return
    body = await request.body()
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        body = b"\x00"
    if b"\x00" in body:  # UTF-16 without a byte-order mark decodes, NULs and all
        raise StarletteHTTPException(400)


def _handle_errors(api: FastAPI) -> None:
    """Every error in the API's one shape: a message per field."""

    @api.exception_handler(SQLAlchemyError)
    async def database_away(request: Request, exc: SQLAlchemyError) -> Response:
        # Passing trouble (away, failing over, its pool full) as the workers read it; the
        # rest is our fault, a 500.
        if not passing(exc):
            raise exc
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        log.warning("database_unavailable", error=type(cause).__name__)
        return problem(503, {"body": "Please try again in a moment."}, {"Retry-After": "1"})

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Starlette's own answers in the same shape; an unreadable body is a 422 like bad JSON.
        if exc.status_code == 400:
            return problem(422, {"body": "The request body is not valid JSON in UTF-8."})
        detail = exc.detail if isinstance(exc.detail, str) else "This request cannot be served."
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first route's methods only
            headers["Allow"] = ", ".join(allowed_methods(api, request))
        return problem(exc.status_code, {"request": detail}, headers)

    @api.exception_handler(RedisError)
    async def redis_away(request: Request, exc: RedisError) -> Response:
        # The rate limits live in Redis: without them nothing is accepted.
        log.warning("redis_unavailable", error=type(exc).__name__)
        return problem(503, {"body": "Please try again in a moment."}, {"Retry-After": "5"})

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors: dict[str, str] = {}
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # its place is a byte offset, not a field
                errors.setdefault("body", "The body is not valid JSON.")
                continue
            loc = [str(p) for p in err.get("loc", ())]
            loc = loc[1:] if loc[:1] == ["body"] else loc
            errors.setdefault(".".join(loc) or "body", error_message(err, loc))
        return problem(422, errors)
