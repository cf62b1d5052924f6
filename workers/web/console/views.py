"""The console's pages and actions under ``/console``: thin views over :mod:`.queries` and the
operations the command line uses. Every page needs a login; every POST a CSRF token tied to the
session. An action redirects to its page (which says what was done), or shows why nothing was."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

import redis
import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from config.settings import console_accounts
from schemas.messages import is_submission_id
from workers.outbox.sending import due_now, listing
from workers.pipeline import dead_letters
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch_groups
from workers.stages import pauses
from workers.stages.digests import TO_MPS
from workers.stages.stage import Stage
from workers.web.clients import client_ip, client_key, over_limit
from workers.web.console import auth, queries
from workers.web.dependencies import Intake
from workers.web.supporter_pages import environment

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 8_192
MAX_FIELD = 500
log = structlog.get_logger("workers")

templates = environment(HERE / "templates")

# What a redirect after an action says on the page (a fixed text: the URL only names it).
DONE = {
    "replayed": "Dead letters put back on their queues: {n}.",
    "retried": "Letters being tried now: {n}.",
    "paused": "Paused: letters wait until it is resumed.",
    "already-paused": "It was paused already.",
    "resumed": "Resumed; waiting letters queued to go: {n}.",
    "mail-resumed": "The workers try the mail server again within seconds.",
    "no-mail-pause": "No mail pause was reported; the workers are told to try anyway.",
}


class Refused(Exception):
    """An answer instead of the page: a status and a sentence for the operator."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Redirect(Exception):
    def __init__(self, to: str) -> None:
        self.to = to


async def refused(request: Request, exc: Exception) -> Response:
    """:class:`Refused` as a page and :class:`Redirect` as a redirect, from a view or a
    dependency (the API's own handlers answer in JSON)."""
    if isinstance(exc, Redirect):
        return RedirectResponse(exc.to, status_code=303)
    assert isinstance(exc, Refused)
    return page(request, "message.html.j2", exc.status, message=exc.message)


router = APIRouter(prefix="/console", include_in_schema=False)


@dataclass
class Console:
    """What the console needs of the settings, built once per application."""

    app: App
    intake: Intake
    accounts: dict[str, str]
    signer: auth.Signer
    throttle: auth.Throttle
    secure: bool  # cookies only over https when the public address is https

    def deliver(self, ids: list[str]) -> None:
        """After the commit, letters due now go to delivery (else the reconciler sends them)."""
        if ids:
            dispatch_groups(self.intake.broker, {Stage.DELIVER: ids})

    def redis(self) -> tuple[redis.Redis | None, str]:
        """The Redis client, or None and why not (a stub broker uses none; Redis may be away)."""
        client = self.intake.redis_client()
        if client is None:
            return None, "not used: the broker is dramatiq's StubBroker (DEARMP_BROKER=stub)"
        try:
            client.ping()
        except redis.RedisError as exc:
            return None, f"cannot reach Redis ({type(exc).__name__})"
        return client, "reachable"

    @property
    def namespace(self) -> str:
        return self.app.settings.redis_namespace


async def _console(request: Request) -> Console:
    """The console, or 404 while no account is configured: it is never open."""
    console: Console | None = getattr(request.app.state, "console", None)
    if console is None:
        intake: Intake = request.app.state.intake
        app = intake.app_getter()
        settings = app.settings
        if settings.console_accounts is None:
            raise HTTPException(404)
        console = Console(
            app=app,
            intake=intake,
            accounts=console_accounts(settings.console_accounts.get_secret_value()),
            signer=auth.Signer(app.secret),
            throttle=auth.Throttle(),
            secure=settings.public_url.startswith("https://"),
        )
        request.app.state.console = console
    return console


ConsoleDep = Annotated[Console, Depends(_console)]


async def _session(request: Request, console: ConsoleDep) -> auth.Session | None:
    return console.signer.load(request.cookies.get(auth.COOKIE))


SessionDep = Annotated[auth.Session | None, Depends(_session)]


async def _operator(session: SessionDep) -> auth.Session:
    if session is None or not session.operator:
        raise Redirect("/console/login")
    return session


OperatorDep = Annotated[auth.Session, Depends(_operator)]


async def _form(request: Request, console: ConsoleDep, session: SessionDep) -> dict[str, str]:
    """A POSTed form (URL-encoded, small), its CSRF token checked against the session."""
    body = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and kind != "application/x-www-form-urlencoded":
        raise Refused(415, "This form must be sent by the page.")
    if len(body) > MAX_FORM_BYTES:
        raise Refused(413, "This form is too large.")
    try:
        pairs = parse_qsl(
            body.decode("ascii"), keep_blank_values=True, strict_parsing=False, max_num_fields=20
        )
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "This form could not be read.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if len(value) > MAX_FIELD or name in form:
            raise Refused(422, "A field of this form is too long, or given twice.")
        form[name] = value
    if session is None or not console.signer.csrf_ok(session, form.get("csrf", "")):
        raise Refused(403, "This form has expired: go back, reload the page and try again.")
    return form


FormDep = Annotated[dict[str, str], Depends(_form)]


def page(
    request: Request,
    name: str,
    status: int = 200,
    session: auth.Session | None = None,
    **context: Any,
) -> HTMLResponse:
    """A template rendered for the session's operator (with its CSRF token; ``session``: the
    request's cookie's unless given), never cached."""
    console: Console | None = getattr(request.app.state, "console", None)
    if session is None and console is not None:
        session = console.signer.load(request.cookies.get(auth.COOKIE))
    said = DONE.get(request.query_params.get("done", ""), "")
    count = request.query_params.get("n", "0")
    html = templates.get_template(name).render(
        operator=session.operator if session else "",
        csrf=console.signer.csrf(session) if console and session else "",
        done=said.format(n=int(count) if count.isdigit() and len(count) < 7 else 0),
        **context,
    )
    return HTMLResponse(html, status, headers={"Cache-Control": "no-store"})


def done(path: str, what: str, n: int = 0) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode({'done': what, 'n': n})}", status_code=303)


def _set_cookie(response: Response, console: Console, session: auth.Session) -> None:
    response.set_cookie(
        auth.COOKIE,
        console.signer.dump(session),
        max_age=int(session.expires - time.time()),
        path="/console",
        secure=console.secure,
        httponly=True,
        samesite="strict",
    )


# Logging in and out.


@router.get("/static/console.css")
def stylesheet(console: ConsoleDep) -> FileResponse:
    return FileResponse(HERE / "static" / "console.css", media_type="text/css")


@router.get("/login")
def login_form(request: Request, console: ConsoleDep, session: SessionDep) -> Response:
    """The login form, with a session of its own to tie its CSRF token to."""
    if session is not None and session.operator:
        return RedirectResponse("/console/", status_code=303)
    fresh = session or auth.Session.new("", auth.ANONYMOUS_SECONDS)
    response = page(request, "login.html.j2", session=fresh)
    _set_cookie(response, console, fresh)
    return response


@router.post("/login")
def login(request: Request, console: ConsoleDep, form: FormDep) -> Response:
    name, password = form.get("name", ""), form.get("password", "")
    app = console.app
    client = client_key(app, client_ip(request))
    try:
        many = over_limit(app, ("login", client, auth.LOGINS_PER_CLIENT, auth.LOGIN_WINDOW))
    except redis.RedisError:  # an operator logs in to see why Redis is away: the cap still holds
        many = 0.0
    if many:
        raise Refused(429, "Too many logins from here: wait a few minutes.")
    try:
        operator = console.throttle.check_login(console.accounts, name, password, client)
    except auth.Busy:
        raise Refused(429, "Too many logins at once: try again in a moment.") from None
    if operator is None:
        log.warning("console_login_failed")
        raise Refused(401, "Wrong name or password (or too many tries: wait a while).")
    log.info("console_login", operator=operator)
    response = RedirectResponse("/console/", status_code=303)
    # A new nonce: a session known before the login is not the operator's.
    seconds = console.app.settings.console_session_hours * 3600
    _set_cookie(response, console, auth.Session.new(operator, seconds))
    return response


@router.post("/logout")
def logout(console: ConsoleDep, form: FormDep, session: OperatorDep) -> Response:
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(auth.COOKIE, path="/console", secure=console.secure, httponly=True)
    return response


# Pages.


@router.get("")  # the address the README gives, without a redirect (it would use the Host)
@router.get("/")
def home(request: Request, console: ConsoleDep, session: OperatorDep) -> HTMLResponse:
    client, why = console.redis()
    found = queries.overview(console.app, client, console.namespace, why)
    return page(request, "overview.html.j2", overview=found, redis_said=why)


@router.get("/dead-letters")
def dead(request: Request, console: ConsoleDep, session: OperatorDep) -> HTMLResponse:
    client, why = console.redis()
    found = dead_letters.find_dead(client, console.namespace, console.app.sessions)
    groups = dead_letters.by_reason(found)
    return page(request, "dead_letters.html.j2", groups=groups, redis_said=why, redis=client)


@router.get("/waiting")
def waiting(request: Request, console: ConsoleDep, session: OperatorDep) -> HTMLResponse:
    lease = console.app.settings.delivery_lease_seconds
    rows = console.intake.read(listing, ("pending", "sending"), 100, TO_MPS, lease)
    return page(request, "waiting.html.j2", rows=rows)


@router.get("/pauses")
def paused(request: Request, console: ConsoleDep, session: OperatorDep) -> HTMLResponse:
    client, _ = console.redis()
    mail = dead_letters.mail_pause(client, console.namespace) if client else None
    found = console.intake.read(pauses.paused)
    return page(request, "pauses.html.j2", pauses=found, mail=mail, redis=client)


@router.get("/campaigns")
def campaign_list(request: Request, console: ConsoleDep, session: OperatorDep) -> HTMLResponse:
    return page(request, "campaigns.html.j2", campaigns=console.intake.read(queries.campaigns))


@router.get("/campaigns/{slug}")
def campaign(
    request: Request, slug: str, console: ConsoleDep, session: OperatorDep
) -> HTMLResponse:
    found = console.intake.read(queries.campaign_page, slug)
    if found is None:
        raise Refused(404, "There is no such campaign.")
    return page(request, "campaign.html.j2", **found)


@router.get("/submissions/{submission_id}")
def submission(
    request: Request, submission_id: str, console: ConsoleDep, session: OperatorDep
) -> HTMLResponse:
    return page(request, "submission.html.j2", record=_record(console, submission_id, False))


@router.post("/submissions/{submission_id}/reveal")
def reveal(
    request: Request,
    submission_id: str,
    console: ConsoleDep,
    form: FormDep,
    session: OperatorDep,
) -> HTMLResponse:
    """One submission unmasked, at an operator's explicit request; logged with who and which
    (nothing personal in the log line)."""
    found = _record(console, submission_id, True)
    log.warning("console_record_revealed", operator=session.operator, submission_id=submission_id)
    return page(request, "submission.html.j2", record=found)


def _record(console: Console, submission_id: str, reveal: bool) -> dict[str, Any]:
    valid = is_submission_id(submission_id)
    found = console.intake.read(queries.record, submission_id, reveal) if valid else None
    if found is None:
        raise Refused(404, "There is no such submission.")
    return found


# Actions.


@router.post("/dead-letters/replay")
def replay(console: ConsoleDep, form: FormDep, session: OperatorDep) -> Response:
    """Requeue one dead letter (``message_id``) or every one of a reason (``reason``)."""
    client, _ = console.redis()
    found = dead_letters.find_dead(client, console.namespace, console.app.sessions)
    message_id, reason = form.get("message_id"), form.get("reason")
    chosen = [
        f
        for f in found
        if (message_id and f.message_id == message_id) or (reason and f.reason == reason)
    ]
    if not chosen:
        raise Refused(
            404, "No such dead letter needs attention (another operator may have replayed it)."
        )
    refused = []
    for one in chosen:
        try:
            dead_letters.replay(
                client, console.intake.broker, console.namespace, console.app.sessions, one
            )
        except ValueError as exc:
            refused.append(f"{one.message_id}: {exc}")
    log.info("console_dead_letters_replayed", operator=session.operator, count=len(chosen))
    if refused:
        raise Refused(409, "Not requeued: " + "; ".join(refused))
    return done("/console/dead-letters", "replayed", len(chosen))


@router.post("/waiting/retry")
def retry_now(console: ConsoleDep, form: FormDep, session: OperatorDep) -> Response:
    """Every letter waiting for a later attempt, due now (`dearmp deliveries flush`)."""
    ids = console.intake.read(due_now, TO_MPS)
    console.deliver(ids)
    log.info("console_retry_now", operator=session.operator, count=len(ids))
    return done("/console/waiting", "retried", len(ids))


@router.post("/campaigns/{slug}/pause")
def pause_campaign(slug: str, console: ConsoleDep, form: FormDep, session: OperatorDep) -> Response:
    try:
        changed = console.intake.read(pauses.pause_campaign, slug[:200])
    except LookupError:
        raise Refused(404, "There is no such campaign.") from None
    log.info("console_campaign_paused", operator=session.operator, campaign=slug)
    return done(f"/console/campaigns/{slug}", "paused" if changed else "already-paused")


@router.post("/campaigns/{slug}/resume")
def resume_campaign(
    slug: str, console: ConsoleDep, form: FormDep, session: OperatorDep
) -> Response:
    try:
        ids = console.intake.read(pauses.resume_campaign, slug[:200])
    except LookupError as exc:
        raise Refused(409, f"Not resumed: {exc}.") from None
    console.deliver(ids)
    log.info("console_campaign_resumed", operator=session.operator, campaign=slug)
    return done(f"/console/campaigns/{slug}", "resumed", len(ids))


@router.post("/pauses/address")
def pause_address(console: ConsoleDep, form: FormDep, session: OperatorDep) -> Response:
    address, reason = form.get("address", "").strip(), form.get("reason", "").strip()
    if "@" not in address or len(address) > 254:
        raise Refused(422, "Give the MP's email address.")
    try:
        changed = console.intake.read(
            pauses.pause_address, address, reason or "paused by an operator"
        )
    except LookupError:  # marked failing: its letters are held already, and its mark must stay
        raise Refused(409, "Not paused: that address is marked failing.") from None
    log.info("console_address_paused", operator=session.operator)
    return done("/console/pauses", "paused" if changed else "already-paused")


@router.post("/pauses/address/resume")
def resume_address(console: ConsoleDep, form: FormDep, session: OperatorDep) -> Response:
    try:
        ids = console.intake.read(pauses.resume_address, form.get("address", ""))
    except LookupError:
        raise Refused(409, "Not resumed: that address is not paused.") from None
    console.deliver(ids)
    log.info("console_address_resumed", operator=session.operator)
    return done("/console/pauses", "resumed", len(ids))


@router.post("/mail/resume")
def resume_mail(console: ConsoleDep, form: FormDep, session: OperatorDep) -> Response:
    """End the mail pause (`dearmp deliveries resume`)."""
    client, why = console.redis()
    if client is None:
        raise Refused(503, f"Redis: {why}.")
    ended = dead_letters.resume_mail(client, console.namespace)
    log.info("console_mail_resumed", operator=session.operator)
    return done("/console/pauses", "mail-resumed" if ended else "no-mail-pause")
