"""The HTTP intake for campaign front ends (FastAPI on uvicorn): ``dearmp api``.

Every answer a page can show next to a field comes as ``{"errors": {"<field path>": "<message>"}}``
with status 422. A ``202`` means the submission is committed to the database; the stage message
is sent after the commit, and the reconciler resends it if that send fails.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import structlog
from fastapi import Body, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.campaign import CampaignDefinition
from schemas.postcode import PostcodeProblem, check_format
from schemas.submission import SubmissionV1, error_message, single_line
from workers.database.engine import session_scope
from workers.database.models import Campaign, State, Submission, utcnow
from workers.letters.campaigns import get_definition
from workers.letters.rate_limits import Limit
from workers.mp.directory import example_postcode
from workers.mp.lookup import Found, find
from workers.pipeline.actors import get_broker
from workers.pipeline.app import App, get_app
from workers.pipeline.dispatch import dispatch
from workers.privacy.hashing import ip_hash, limiter_email, limiter_network, supporter_hash
from workers.stages.confirmation import check_token, confirm
from workers.stages.rendering import campaign_template, choose_subject
from workers.stages.resolution import MEMBER_FIELD, POSTCODE_FIELD, Refuse, decide
from workers.stages.stage import Stage
from workers.stages.validation import campaign_errors
from workers.web.batcher import IntakeBatcher
from workers.web.honeypot import fake_submission_id, honeypot_campaign
from workers.web.middleware import BodyLimit, Cors, SecurityHeadersAndAccessLog

log = structlog.get_logger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
HONEYPOT = "website"
# Request threads (sync endpoints); the database pool matches it.
API_THREADS = 16


class Errors(BaseModel):
    errors: dict[str, str] = Field(
        description="One message per field, keyed by its path (e.g. 'supporter.postcode')."
    )


class ConsentQuestionOut(BaseModel):
    channel: str
    wording: str
    sha256: str


class CampaignOut(BaseModel):
    slug: str
    title: str
    organisation: str
    introduction: str
    subject_variants: list[str]
    draft_body: str
    editable: list[str]
    body_min_chars: int
    body_max_chars: int
    consent_version: str
    consent_questions: list[ConsentQuestionOut]
    mp_notice: str
    privacy_notice_url: str
    privacy_notice_version: str
    confirmation_required: bool
    honeypot_field: str = Field(description="Leave this field empty; it is a trap for robots.")
    example_postcode: str | None = Field(
        default=None, description="A postcode the directory knows, for the form's hint."
    )


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, single_line("Full name", 100), Field(min_length=1, max_length=100)]
    postcode: Annotated[str, single_line("Postcode", 16), Field(min_length=1, max_length=16)]
    address_lines: Annotated[
        list[Annotated[str, single_line("Address line", 100, min_len=0), Field(max_length=100)]],
        Field(max_length=5),
    ] = []


class MpOut(BaseModel):
    name: str
    constituency: str
    party: str


class DraftOut(BaseModel):
    subject: str
    salutation: str
    body: str
    sign_off: str


class PreviewOut(BaseModel):
    postcode: str
    mp: MpOut
    letter: DraftOut


class SubmissionIn(SubmissionV1):
    """A submission as the page posts it: the v1 schema plus the honeypot field."""

    model_config = ConfigDict(extra="forbid", title="Submission request")

    website: str | None = Field(
        default=None, max_length=200, description="Must be empty (a trap for robots)."
    )


class AcceptedOut(BaseModel):
    id: str
    state: str
    status_url: str
    duplicate: bool = False


class StatusOut(BaseModel):
    id: str
    campaign: str
    state: str
    final: bool
    received_at: str
    updated_at: str
    mp: dict[str, str] | None = None
    errors: dict[str, str] | None = None
    outcome: str


OUTCOMES = {
    State.UNCONFIRMED: "Waiting for you to confirm by email.",
    State.EXPIRED: "Never confirmed, so it was not sent.",
    State.RECEIVED: "Received.",
    State.VALIDATED: "Checked; finding your MP.",
    State.HELD: "Waiting until your constituency has an MP.",
    State.RESOLVED: "Your MP is found; preparing the letter.",
    State.RENDERED: "On its way to your MP.",
    State.DELIVERED: "Delivered to your MP.",
    State.REJECTED: "Not sent: see the reasons.",
    State.FAILED: "We could not deliver it. The campaign team has been told.",
    State.WITHDRAWN: "Withdrawn at your request.",
}


def problem(
    status: int, errors: dict[str, str], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"errors": errors}, status_code=status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Errors, "description": "No such campaign, submission or postcode."},
    413: {"model": Errors, "description": "The request body is over the size limit."},
    422: {"model": Errors, "description": "A message per invalid field."},
    429: {"model": Errors, "description": "Too many requests; see Retry-After."},
    503: {
        "model": Errors,
        "description": "The database or Redis cannot be reached just now; see Retry-After.",
    },
}
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {"model": Errors, "description": "The X-DearMP-Key header holds no valid key."},
    403: {"model": Errors, "description": "This page's origin may not post to the campaign."},
    409: {
        "model": Errors,
        "description": "The consent wording has changed since the page was loaded: reload it.",
    },
}
_PAGE = {"text/html": {"schema": {"type": "string"}}}
CONFIRM_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "A page: the link is not valid.", "content": _PAGE},
    410: {"description": "A page: the link has expired.", "content": _PAGE},
    422: {"model": Errors, "description": "The path is not a token."},
    503: {"model": Errors, "description": "The database cannot be reached just now."},
}
# The header a server-side front end authenticates with (DEARMP_API_KEYS).
KEY_HEADER = "X-DearMP-Key"


class CampaignOrigins:
    """Allowed origins per campaign, re-read from the database at most every 30 s."""

    def __init__(self, app_getter: Any) -> None:
        self.app_getter = app_getter
        self.loaded_at = -1e9
        self.by_slug: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def _load(self) -> dict[str, set[str]]:
        now = time.monotonic()
        with self.lock:
            if now - self.loaded_at > 30:
                app: App = self.app_getter()
                with session_scope(app.sessions) as session:
                    slugs = session.scalars(select(Campaign.slug)).all()
                    self.by_slug = {
                        slug: set(d.allowed_origins)
                        for slug in slugs
                        if (d := get_definition(session, slug)) is not None
                    }
                self.loaded_at = now
            return self.by_slug

    def for_path(self, path: str) -> set[str]:
        by_slug = self._load()
        parts = path.split("/")
        if len(parts) > 3 and parts[1:3] == ["v1", "campaigns"]:
            return by_slug.get(parts[3], set())
        return set().union(*by_slug.values()) if by_slug else set()

    def slugs(self) -> list[str]:
        return list(self._load())

    def allows(self, slug: str, origin: str) -> bool:
        return origin in self._load().get(slug, set())


def _client_ip(request: Request) -> str | None:
    """The peer's address (uvicorn applies X-Forwarded-For from trusted proxies), if it is one."""
    host = request.client.host if request.client else ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _user_agent(request: Request) -> str | None:
    """The request's User-Agent as consent evidence: printable, at most 512 characters (what
    the submission schema accepts, so validation never refuses what the API stored)."""
    value = request.headers.get("user-agent")
    if not value:
        return None
    text = "".join(ch for ch in value if ch.isprintable()).strip()[:512]
    return text or None


def _authenticated(app: App, key: str | None) -> bool | None:
    """None without a key; True or False for a key checked against DEARMP_API_KEYS."""
    if key is None:
        return None
    configured = app.settings.api_keys
    keys = configured.get_secret_value().split(",") if configured else []
    given = key.encode("utf-8", "replace")
    return any(k.strip() and hmac.compare_digest(given, k.strip().encode()) for k in keys)


def _over_limit(app: App, kind: str, who: str, limit: int, window: float) -> float:
    if limit <= 0:
        return 0.0
    rule = Limit(f"api:{kind}:{who}", limit, window)
    return app.limiter.reserve(uuid.uuid4().hex, [rule])


_DEFINITIONS: dict[tuple[int, str], tuple[float, CampaignDefinition | None]] = {}
DEFINITION_TTL = 5.0  # seconds a campaign edit takes to reach the API


MISSING: Any = object()


def _cached_definition(app: App, slug: str) -> CampaignDefinition | Any | None:
    """The cached definition while fresh, else ``MISSING`` (no database access here)."""
    cached = _DEFINITIONS.get((id(app), slug[:64]))
    if cached is not None and time.monotonic() - cached[0] < DEFINITION_TTL:
        return cached[1]
    return MISSING


def _definition(app: App, slug: str) -> CampaignDefinition | None:
    """The campaign's definition, read from the database at most every few seconds."""
    cached = _cached_definition(app, slug)
    if cached is not MISSING:
        return cached
    with session_scope(app.sessions) as session:
        definition = get_definition(session, slug)
    if len(_DEFINITIONS) > 1000:
        _DEFINITIONS.clear()
    _DEFINITIONS[(id(app), slug[:64])] = (time.monotonic(), definition)
    return definition


_EXAMPLES: dict[int, tuple[float, str | None]] = {}


def _example_postcode(app: App) -> str | None:
    """A postcode the directory knows, for the page's hint: read at most every few seconds, as
    campaign definitions are."""
    cached = _EXAMPLES.get(id(app))
    if cached is not None and time.monotonic() - cached[0] < DEFINITION_TTL:
        return cached[1]
    with session_scope(app.sessions) as session:
        example = example_postcode(session)
    _EXAMPLES[id(app)] = (time.monotonic(), example)
    return example


def create_app(app_getter: Any = get_app, broker: Any = None) -> FastAPI:
    """The ASGI application. ``broker``: where stage messages go (default: the configured one)."""
    if broker is None:
        broker = get_broker()
    batcher = IntakeBatcher(app_getter, broker)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        batcher.start()
        yield
        await batcher.stop()

    api = FastAPI(
        title="DearMP intake",
        version="1",
        description="Post supporters' letters to their MPs. Errors come as a message per field.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    origins = CampaignOrigins(app_getter)

    @api.exception_handler(OperationalError)
    async def database_away(request: Request, exc: OperationalError) -> Response:
        log.warning("database_unavailable", error=type(exc.orig).__name__)
        return problem(503, {"body": "Please try again in a moment."}, {"Retry-After": "1"})

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Starlette's own answers (a body that is not UTF-8 JSON, an unknown path or method)
        # in the same shape as every other error; a body it cannot read is a 422 like bad JSON.
        if exc.status_code == 400:
            return problem(422, {"body": "The request body is not valid JSON in UTF-8."})
        detail = exc.detail if isinstance(exc.detail, str) else "This request cannot be served."
        return problem(exc.status_code, {"request": detail}, dict(exc.headers or {}))

    @api.exception_handler(RedisError)
    async def redis_away(request: Request, exc: RedisError) -> Response:
        # The rate limits live in Redis: without them nothing is accepted.
        log.warning("redis_unavailable", error=type(exc).__name__)
        return problem(503, {"body": "Please try again in a moment."}, {"Retry-After": "5"})

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors: dict[str, str] = {}
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            loc = loc[1:] if loc[:1] == ["body"] else loc
            errors.setdefault(".".join(loc) or "body", error_message(err, loc))
        return problem(422, errors)

    @api.get("/v1/campaigns/{slug}", response_model=CampaignOut, responses=ERROR_RESPONSES)
    def campaign(slug: str) -> Any:
        """What a page needs to draw the form."""
        app = app_getter()
        definition = _definition(app, slug)
        if definition is None:
            return problem(404, {"campaign": f"There is no campaign called '{slug[:64]}'."})
        return CampaignOut(
            slug=definition.slug,
            title=definition.title,
            organisation=definition.organisation,
            introduction=definition.introduction.strip(),
            subject_variants=definition.subject_variants,
            draft_body=definition.draft_body.strip(),
            editable=list(definition.editable),
            body_min_chars=definition.body_min_chars,
            body_max_chars=definition.body_max_chars,
            consent_version=definition.consent.version,
            consent_questions=[
                ConsentQuestionOut(channel=q.channel, wording=q.wording, sha256=q.sha256)
                for q in definition.consent.questions
            ],
            mp_notice=definition.consent.mp_notice,
            privacy_notice_url=definition.privacy_notice_url,
            privacy_notice_version=definition.privacy_notice_version,
            confirmation_required=definition.confirmation,
            honeypot_field=HONEYPOT,
            example_postcode=_example_postcode(app),
        )

    @api.post("/v1/campaigns/{slug}/preview", response_model=PreviewOut, responses=ERROR_RESPONSES)
    def preview(slug: str, body: PreviewIn, request: Request) -> Any:
        """The supporter's MP and the draft letter to edit (the page's second step)."""
        app = app_getter()
        definition = _definition(app, slug)
        if definition is None:
            return problem(404, {"campaign": f"There is no campaign called '{slug[:64]}'."})
        network = limiter_network(_client_ip(request) or "unknown", app.settings.api_ipv6_prefix)
        wait = _over_limit(
            app,
            "ip",
            ip_hash(app.secret, network),
            app.settings.api_ip_limit * 4,
            app.settings.api_ip_window,
        )
        if wait > 0:
            return problem(429, {"body": "Too many requests. Please wait a moment."}, _retry(wait))
        postcode, bad = check_format(body.postcode)
        if bad is not None:
            return problem(422, {"postcode": bad.message})
        with session_scope(app.sessions) as session:
            answer = find(session, postcode, app.settings.resolution_order, app.live_sources)
            # A preview tells the supporter now what a held letter would wait for.
            targets = definition.targets.model_copy(
                update={"vacant_seat": "reject", "no_email": "reject"}
            )
            outcome = decide(targets, postcode, answer)
        if isinstance(outcome, Refuse):
            field = "postcode" if outcome.field == POSTCODE_FIELD else MEMBER_FIELD
            # A postcode the directory does not know is not found; the rest are refusals.
            unknown = outcome.code == f"postcode:{PostcodeProblem.UNKNOWN}"
            return problem(404 if unknown else 422, {field: outcome.message})
        if not isinstance(outcome, Found):
            return problem(
                422,
                {MEMBER_FIELD: "We cannot find an MP to write to for this postcode just now."},
            )
        context = {
            "mp": {"name": outcome.member.name, "constituency": outcome.seat.name},
            "campaign": {"title": definition.title, "organisation": definition.organisation},
        }
        return PreviewOut(
            postcode=postcode,
            mp=MpOut(
                name=outcome.member.name,
                constituency=outcome.seat.name,
                party=outcome.member.party,
            ),
            letter=DraftOut(
                subject=choose_subject(definition, secrets.token_hex(8), ""),
                salutation=campaign_template(definition.salutation).render(context),
                body=definition.draft_body.strip(),
                sign_off=definition.sign_off,
            ),
        )

    @api.post(
        "/v1/submissions",
        status_code=202,
        response_model=AcceptedOut,
        responses=SUBMIT_RESPONSES,
    )
    async def submit(
        request: Request,
        body: Annotated[SubmissionIn, Body()],
        origin: Annotated[str | None, Header()] = None,
        x_dearmp_key: Annotated[
            str | None,
            Header(
                description="A server-side front end's key (DEARMP_API_KEYS): only then are "
                "the body's client_ip and user_agent taken as the consent evidence."
            ),
        ] = None,
    ) -> Any:
        """Store a supporter's final submission; 202 once it is in the database."""
        app = app_getter()
        authenticated = _authenticated(app, x_dearmp_key)
        if authenticated is False:
            return problem(401, {KEY_HEADER: "This key is not valid for this deployment."})
        if body.website and body.website.strip():  # a robot filled the trap: keep nothing
            log.info("honeypot_filled")
            fake = fake_submission_id(app.secret, body.campaign)
            return _accepted(fake, "received", duplicate=False)
        definition = _cached_definition(app, body.campaign)
        if definition is MISSING:
            definition = await anyio.to_thread.run_sync(_definition, app, body.campaign)
        if not isinstance(definition, CampaignDefinition):
            return problem(404, {"campaign": f"There is no campaign called '{body.campaign}'."})
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin and origin != own and not origins.allows(body.campaign, origin):
            return problem(403, {"origin": "This page may not post to this campaign."})
        errors = campaign_errors(definition, body)
        if errors:
            # The page's consent wording is out of date: a conflict with the campaign as it is
            # now, which reloading resolves; anything else is the letter's.
            stale = set(errors) == {"contact_preferences.wording_version"}
            return problem(409 if stale else 422, errors)
        client_ip = _client_ip(request)
        for kind, who, limit, window in (
            (
                "ip",
                ip_hash(
                    app.secret,
                    limiter_network(client_ip or "unknown", app.settings.api_ipv6_prefix),
                ),
                app.settings.api_ip_limit,
                app.settings.api_ip_window,
            ),
            (
                "email",
                supporter_hash(app.secret, limiter_email(body.supporter.email)),
                app.settings.api_email_limit,
                app.settings.api_email_window,
            ),
        ):
            if limit <= 0:
                continue
            wait = await anyio.to_thread.run_sync(_over_limit, app, kind, who, limit, window)
            if wait > 0:
                message = "Too many letters from here. Please try again later."
                return problem(429, {"body": message}, _retry(wait))
        payload = body.model_dump(mode="json", exclude={HONEYPOT})
        # The consent evidence: the request's own, unless an authenticated server-side front
        # end passes its supporter's (anyone else could opt any address in or out).
        if authenticated:
            payload["client_ip"] = payload.get("client_ip") or client_ip
            payload["user_agent"] = payload.get("user_agent") or _user_agent(request)
        else:
            payload["client_ip"], payload["user_agent"] = client_ip, _user_agent(request)
        # Stored (with others that arrived meanwhile) and committed before the 202; the stage
        # message follows the commit.
        accepted = await batcher.submit(
            payload, State.UNCONFIRMED if definition.confirmation else State.RECEIVED
        )
        state = "unconfirmed" if definition.confirmation else "received"
        return _accepted(accepted.submission_id, state, duplicate=not accepted.created)

    @api.get("/v1/submissions/{submission_id}", response_model=StatusOut, responses=ERROR_RESPONSES)
    def status(submission_id: str) -> Any:
        """A submission's state, without personal data."""
        app = app_getter()
        with session_scope(app.sessions) as session:
            sub = session.get(Submission, submission_id[:64])
            if sub is None:
                slug = honeypot_campaign(app.secret, submission_id, origins.slugs())
                if slug is not None:  # answered like a submission that has just arrived
                    now = utcnow().isoformat()
                    return StatusOut(
                        id=submission_id,
                        campaign=slug,
                        state=State.RECEIVED.value,
                        final=False,
                        received_at=now,
                        updated_at=now,
                        outcome=OUTCOMES[State.RECEIVED],
                    )
                return problem(404, {"submission": "There is no such submission."})
            recipient = sub.recipient or {}
            state = State(sub.state)
            return StatusOut(
                id=sub.id,
                campaign=sub.campaign_slug,
                state=state.value,
                final=state.is_final,
                received_at=sub.created_at.isoformat(),
                updated_at=sub.updated_at.isoformat(),
                mp={"name": recipient["name"], "constituency": recipient["constituency"]}
                if recipient.get("name")
                else None,
                errors=sub.rejection if state == State.REJECTED else None,
                outcome=OUTCOMES[state],
            )

    @api.get("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
    def confirm_page(token: str) -> Any:
        """The link in the confirmation email: a page whose button confirms. Opening the link
        changes nothing, so mail scanners that fetch links cannot confirm for the supporter."""
        app = app_getter()
        with session_scope(app.sessions) as session:
            result = check_token(session, app.secret, token[:300])
        if result != "ready":
            return _confirm_page(result)
        return _confirm_page(
            "ready",
            '<form method="post"><button type="submit">Send my letter to my MP</button></form>',
        )

    @api.post("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
    def confirm_link(token: str) -> Any:
        """The confirmation page's button."""
        app = app_getter()
        with session_scope(app.sessions) as session:
            result, sid = confirm(session, app.secret, token[:300])
        if result == "confirmed" and sid is not None:
            dispatch(broker, [Stage.VALIDATE], sid)
        return _confirm_page(result)

    @api.get("/demo/{slug}", response_class=HTMLResponse, include_in_schema=False)
    def demo_page(slug: str) -> Any:
        return FileResponse(STATIC / "demo.html", media_type="text/html")

    @api.get("/static/{name}", include_in_schema=False)
    def static(name: Literal["demo.js", "demo.css"]) -> Any:
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return FileResponse(STATIC / name, media_type=media)

    @api.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "time": utcnow().isoformat()}

    wrapped: Any = SecurityHeadersAndAccessLog(
        Cors(BodyLimit(api, app_getter().settings.api_max_body_bytes), origins.for_path)
    )
    wrapped.fastapi = api
    return wrapped  # type: ignore[no-any-return]


CONFIRM_TEXTS: dict[str, tuple[int, str]] = {
    "ready": (200, "Please confirm that you wrote this letter to your MP."),
    "confirmed": (200, "Thank you: your letter is on its way to your MP."),
    "already": (200, "This letter was already confirmed."),
    "expired": (410, "This link has expired, so the letter was not sent."),
    "invalid": (404, "This link is not valid."),
}


def _confirm_page(result: str, form: str = "") -> HTMLResponse:
    code, text = CONFIRM_TEXTS[result]
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>DearMP</title></head><body><main><h1>{text}</h1>{form}</main></body></html>"
    )
    return HTMLResponse(page, status_code=code)


def _accepted(submission_id: str, state: str, duplicate: bool) -> JSONResponse:
    """The 202 for a stored submission, and the same for a robot's (nothing tells them apart)."""
    status_url = f"/v1/submissions/{submission_id}"
    return JSONResponse(
        AcceptedOut(
            id=submission_id, state=state, status_url=status_url, duplicate=duplicate
        ).model_dump(),
        status_code=202,
        headers={"Location": status_url},
    )


def _retry(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, int(wait + 0.999)))}
