"""Probes for a load balancer or an orchestrator: ``/healthz`` (the process answers) and
``/readyz`` (the database and Redis answer). Neither needs a campaign, an origin or a rate limit,
and neither names a host or a password."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from workers.database.engine import schema_problem, unwritable
from workers.database.models import utcnow
from workers.pipeline.app import App
from workers.web.dependencies import AppDep, IntakeDep

PATHS = frozenset({"/healthz", "/readyz"})
# A check that has not answered by then counts as down: a probe must not hang with its service.
CHECK_SECONDS = 2.0
router = APIRouter()


@router.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)
async def healthz() -> dict[str, str]:
    """Alive: answered on the event loop, touching nothing."""
    return {"status": "ok", "time": utcnow().isoformat()}


@router.api_route("/readyz", methods=["GET", "HEAD"], include_in_schema=False)
async def readyz(app: AppDep, intake: IntakeDep) -> JSONResponse:
    """Ready: 200 when the database and Redis (when the API uses it) answer, else 503 naming
    what does not; each check is ``ok``, ``not used`` or why it failed."""
    redis_client = intake.redis_client()
    checks = {
        "database": await _check(lambda: _database(app)),
        "redis": await _check(redis_client.ping) if redis_client is not None else "not used",
    }
    ready = all(result in ("ok", "not used") for result in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
        headers={"Cache-Control": "no-store"},
    )


def _database(app: App) -> str | None:
    """Why the database cannot serve, or None: its migration (a table read: ``SELECT 1`` would
    not open SQLite's file), or SQLite's disk full. Not SQLite's write lock: a probe waiting
    for it beside the intake's own writers under load would lose and take a busy intake out of
    service (`dearmp health` asks for it)."""
    return schema_problem(app.engine) or unwritable(app.engine, None)


async def _check(probe: Callable[[], Any]) -> str:
    """``ok``, what the probe said is wrong (a line naming no host), or the failure by its
    exception's name only (its text may hold a URL)."""
    try:
        with anyio.fail_after(CHECK_SECONDS):
            said = await anyio.to_thread.run_sync(probe, abandon_on_cancel=True)
    except TimeoutError:
        return f"no answer within {CHECK_SECONDS:g} s"
    except Exception as exc:  # any failure is the answer, not an error of the probe's own
        return f"unreachable ({type(exc).__name__})"
    return said if isinstance(said, str) else "ok"
