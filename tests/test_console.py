"""The operators' web console (/console) through the real application on SQLite: off until
accounts are configured, a login and CSRF on every form, every page rendering what the pipeline
table and the outbox say, personal data masked unless one record is revealed (and that logged),
and its actions changing the database as the command line's do."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from sqlalchemy import select, update
from structlog.testing import capture_logs

from config.settings import Settings, problems_of
from tests.conftest import ApiClient, drain
from tests.factories import submission
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import (
    AddressHealth,
    Campaign,
    Failure,
    LetterEvent,
    OutboxItem,
    State,
    Submission,
    utcnow,
)
from workers.mp import health
from workers.pipeline.app import App
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.runtime import submit
from workers.web.api import create_app
from workers.web.console import auth

PASSWORD = "correct horse battery staple"
ACCOUNTS = f"ada:{auth.hash_password(PASSWORD)}"
SLUG = "political-prisoners"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
PAGES = (
    "/console/",
    "/console/dead-letters",
    "/console/waiting",
    "/console/pauses",
    "/console/campaigns",
    f"/console/campaigns/{SLUG}",
)


def client_for(app: App, broker: dramatiq.Broker) -> TestClient:
    return ApiClient(create_app(lambda: app, broker), raise_server_exceptions=False)


@pytest.fixture
def console(app: App, stub_broker: dramatiq.Broker) -> Iterator[TestClient]:
    """A client of the console with one account configured, not yet logged in."""
    app.settings.console_accounts = SecretStr(ACCOUNTS)
    with client_for(app, stub_broker) as client:
        yield client


def csrf_of(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found is not None, html
    return found.group(1)


def log_in(client: TestClient, password: str = PASSWORD) -> Any:
    token = csrf_of(client.get("/console/login").text)
    return client.post(
        "/console/login",
        data={"csrf": token, "name": "ada", "password": password},
        follow_redirects=False,
    )


@pytest.fixture
def operator(console: TestClient) -> TestClient:
    assert log_in(console).status_code == 303
    return console


def post(client: TestClient, path: str, page: str = "/console/", **fields: str) -> Any:
    """A form of ``page`` posted as the browser would, with the session's CSRF token."""
    token = csrf_of(client.get(page).text)
    return client.post(path, data={"csrf": token, **fields}, follow_redirects=False)


def delivered(app: App, broker: dramatiq.Broker, worker: dramatiq.Worker, n: int = 2) -> list[str]:
    """``n`` submissions through the whole pipeline: delivered, their letters in the outbox."""
    ids = [submit(app, broker, submission())[0] for _ in range(n)]
    drain(broker, worker)
    return ids


def dead_letter(app: App, submission_id: str, reason: str = "RuntimeError", text: str = "") -> str:
    """A dead letter of the render stage, as the failure recorder leaves it in the database."""
    message_id = str(uuid.uuid4())
    with session_scope(app.sessions) as session:
        session.add(
            Failure(
                message_id=message_id,
                queue_name="dearmp.render",
                actor_name="render_submission",
                submission_id=submission_id,
                exception_type=reason,
                exception_message=text or "renderer exploded",
                traceback="Traceback: ...",
                dead_lettered_at=utcnow(),
            )
        )
    return message_id


# Off until configured


def test_the_console_is_not_there_until_an_account_is_configured(
    app: App, stub_broker: dramatiq.Broker
) -> None:
    with client_for(app, stub_broker) as client:
        for path in (*PAGES, "/console/login", "/console/static/console.css"):
            assert client.get(path).status_code == 404, path
        assert client.post("/console/login", data={"name": "ada"}).status_code == 404


def test_an_account_that_is_not_name_and_hash_is_refused_at_start_naming_no_secret() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(console_accounts="ada:hunter2hunter2")
    [problem] = problems_of(caught.value)  # what a process that cannot start says
    assert problem.startswith("DEARMP_CONSOLE_ACCOUNTS: entry 1 is not name:hash")
    assert "hunter2" not in problem
    with pytest.raises(ValidationError):
        Settings(console_accounts=f"{ACCOUNTS},{ACCOUNTS}")  # a name twice


def test_hash_password_makes_an_entry_the_settings_take() -> None:
    result = CliRunner().invoke(
        main, ["console", "hash-password", "grace"], input=f"{PASSWORD}\n{PASSWORD}\n"
    )
    assert result.exit_code == 0, result.output
    entry = result.output.strip().splitlines()[-1]
    assert entry.startswith("grace:scrypt$") and PASSWORD not in entry
    settings = Settings(console_accounts=entry)
    assert settings.console_accounts is not None
    hashed = entry.partition(":")[2]
    assert auth.verify_password(PASSWORD, hashed) and not auth.verify_password("wrong", hashed)


# Logging in


def test_every_page_asks_for_a_login_first(console: TestClient) -> None:
    for path in (*PAGES, "/console/submissions/" + str(uuid.uuid4())):
        reply = console.get(path, follow_redirects=False)
        assert reply.status_code == 303 and reply.headers["location"] == "/console/login", path


def test_the_console_answers_at_its_address_without_the_slash(operator: TestClient) -> None:
    """/console, as the README gives it, is the overview (the intake redirects no slash)."""
    assert "Log out ada" in operator.get("/console", follow_redirects=False).text


def test_a_good_password_logs_in_with_a_strict_http_only_cookie(console: TestClient) -> None:
    reply = log_in(console)
    assert reply.status_code == 303 and reply.headers["location"] == "/console/"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # the public address is http here; https sets it
    assert "Log out ada" in console.get("/console/").text


def test_a_wrong_password_is_refused_and_five_lock_the_name(console: TestClient) -> None:
    for _ in range(auth.FAILURES_ALLOWED):
        reply = log_in(console, "wrong password")
        assert reply.status_code == 401 and "Wrong name or password" in reply.text
    assert log_in(console).status_code == 401  # locked, even with the right password
    assert console.get("/console/", follow_redirects=False).status_code == 303


def test_an_unknown_name_is_refused_like_a_wrong_password(console: TestClient) -> None:
    token = csrf_of(console.get("/console/login").text)
    reply = console.post(
        "/console/login", data={"csrf": token, "name": "mallory", "password": PASSWORD}
    )
    assert reply.status_code == 401


def test_an_invented_name_is_counted_as_a_real_one_and_its_lock_tells_nothing() -> None:
    """Were only real names counted and locked, a lock (or its absence) would say which exist."""
    throttle, accounts = auth.Throttle(), {"ada": auth.hash_password(PASSWORD)}
    for name in ("mallory", "ada"):
        for _ in range(auth.FAILURES_ALLOWED):
            assert throttle.check_login(accounts, name, "wrong", "attacker") is None
    assert {k for k in throttle.failures if k[1] == "attacker"} == {
        ("mallory", "attacker"),
        ("ada", "attacker"),
    }
    assert throttle.check_login(accounts, "ada", PASSWORD, "attacker") is None  # locked alike


def test_a_name_locked_from_one_client_still_logs_in_from_another() -> None:
    """Anyone can fail five times for an operator's name: that locks it for them only."""
    throttle, accounts = auth.Throttle(), {"ada": auth.hash_password(PASSWORD)}
    for _ in range(auth.FAILURES_ALLOWED + 2):
        assert throttle.check_login(accounts, "ada", "wrong", "attacker") is None
    assert throttle.check_login(accounts, "ada", PASSWORD, "attacker") is None
    assert throttle.check_login(accounts, "ada", PASSWORD, "operator") == "ada"


def test_logins_checked_at_once_are_capped_and_the_rest_refused_at_once() -> None:
    """scrypt costs 50 ms and 16 MiB: a flood of logins must not hold the intake's threads."""
    throttle, accounts = auth.Throttle(), {"ada": auth.hash_password(PASSWORD)}
    for _ in range(auth.CHECKED_AT_ONCE):  # others being checked now
        assert throttle.turns.acquire(blocking=False)
    with pytest.raises(auth.Busy):
        throttle.check_login(accounts, "ada", PASSWORD)
    throttle.turns.release()
    assert throttle.check_login(accounts, "ada", PASSWORD) == "ada"


def test_failures_for_one_name_from_many_clients_lock_out_strangers_not_its_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many addresses guessing one operator's password: past the limit, the name is refused to
    every client but those that logged in as it lately (so no stranger locks its operator out)."""
    monkeypatch.setattr(auth, "FAILURES_PER_NAME", 3)
    throttle, accounts = auth.Throttle(), {"ada": auth.hash_password(PASSWORD)}
    assert throttle.check_login(accounts, "ada", PASSWORD, "ada's laptop") == "ada"
    for client in ("a", "b", "c"):
        assert throttle.check_login(accounts, "ada", "wrong", client) is None
    assert throttle.check_login(accounts, "ada", PASSWORD, "a new client") is None
    assert throttle.check_login(accounts, "ada", PASSWORD, "ada's laptop") == "ada"


def test_failed_logins_of_clients_gone_are_swept_and_a_flood_keeps_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Invented names and clients cost memory now (a lock must tell nothing of who exists): what
    lapsed is forgotten, and a flood keeps half the room, its newest failures."""
    import time

    monkeypatch.setattr(auth, "KEPT_CLIENTS", 4)
    throttle, now = auth.Throttle(), time.monotonic()
    throttle.failures = {("ada", "gone"): [now - auth.LOCKED_SECONDS - 1]}
    throttle.failures |= {
        ("x", str(i)): [now - 10 + i] for i in range(5)
    }  # a flood, the last newest
    throttle.known = {("ada", "laptop"): now - auth.KNOWN_SECONDS - 1, ("ada", "phone"): now}
    throttle._sweep(now)
    assert sorted(throttle.failures) == [("x", "3"), ("x", "4")]
    assert list(throttle.known) == [("ada", "phone")]


class RedisAway:
    def reserve(self, *_: Any) -> float:
        raise redis.ConnectionError("Error 111 connecting")


def test_an_operator_logs_in_while_redis_is_away(app: App, console: TestClient) -> None:
    """The per-client count is in Redis; an operator logs in to see why Redis is away."""
    app.limiter = RedisAway()  # type: ignore[assignment]
    assert log_in(console).status_code == 303


def test_logins_from_one_client_are_limited(
    console: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "LOGINS_PER_CLIENT", 2)
    assert [log_in(console, "wrong password").status_code for _ in range(2)] == [401, 401]
    refused = log_in(console)
    assert refused.status_code == 429 and "Too many logins from here" in refused.text


def test_a_forged_or_tampered_cookie_is_no_session(console: TestClient) -> None:
    log_in(console)
    value = console.cookies[auth.COOKIE]
    console.cookies.clear()
    console.cookies.set(auth.COOKIE, value[:-2] + "00", path="/console")
    assert console.get("/console/", follow_redirects=False).status_code == 303


def test_logging_out_ends_the_session(operator: TestClient) -> None:
    reply = post(operator, "/console/logout")
    assert reply.status_code == 303 and reply.headers["location"] == "/console/login"
    assert operator.get("/console/", follow_redirects=False).status_code == 303


# CSRF


@pytest.mark.parametrize("token", [None, "", "0" * 64, "not-a-token"])
def test_a_form_without_the_session_s_csrf_token_is_refused(
    app: App, operator: TestClient, token: str | None
) -> None:
    data = {"csrf": token} if token is not None else {}
    for path in (
        f"/console/campaigns/{SLUG}/pause",
        "/console/waiting/retry",
        "/console/logout",
    ):
        assert operator.post(path, data=data).status_code == 403, path
    with session_scope(app.sessions) as session:
        assert session.get(Campaign, SLUG).paused_at is None  # type: ignore[union-attr]


def test_another_session_s_token_is_refused(
    app: App, stub_broker: Any, operator: TestClient
) -> None:
    with client_for(app, stub_broker) as other:
        assert log_in(other).status_code == 303
        theirs = csrf_of(other.get("/console/").text)
    reply = operator.post(f"/console/campaigns/{SLUG}/pause", data={"csrf": theirs})
    assert reply.status_code == 403


def test_the_login_form_needs_its_token_too(console: TestClient) -> None:
    console.get("/console/login")
    reply = console.post("/console/login", data={"name": "ada", "password": PASSWORD})
    assert reply.status_code == 403


# Pages


def test_every_page_renders_from_the_pipeline_and_the_outbox(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    ids = delivered(app, stub_broker, stub_worker)
    dead_letter(app, ids[0])
    for path in (*PAGES, f"/console/submissions/{ids[0]}"):
        reply = operator.get(path)
        assert reply.status_code == 200, (path, reply.text)
        assert reply.headers["cache-control"] == "no-store"
        assert reply.headers["content-type"].startswith("text/html")
    overview = operator.get("/console/").text
    assert "redis" in overview and "StubBroker" in overview  # what `dearmp health` says
    assert "RuntimeError: 1" in operator.get("/console/dead-letters").text


def test_a_campaign_page_has_its_figures_per_state_constituency_day_and_source(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    ids = delivered(app, stub_broker, stub_worker, 3)
    with session_scope(app.sessions) as session:
        session.add(LetterEvent(submission_id=ids[0], kind="reply"))
        session.add(LetterEvent(submission_id=ids[1], kind="survey", detail="yes"))
        session.execute(
            update(Submission).where(Submission.id == ids[2]).values(state=State.BOUNCED)
        )
    html = operator.get(f"/console/campaigns/{SLUG}").text
    # Every state of the pipeline table, with its outcome.
    for state in State:
        assert f"<td>{state.value}</td>" in html
    assert "Delivered to your MP." in html
    seat = re.search(r"<td>Millbrook and Eastvale</td>(.*?)</tr>", html, re.S)
    assert seat is not None
    figures = re.findall(r'<td class="n">(\d+)</td>', seat.group(1))
    # submissions, delivered (the bounced one was sent), bounced, replied, yes, not yet, no
    assert figures == ["3", "3", "1", "1", "1", "0", "0"]
    assert html.count('<rect class="received"') == 30 and "3 received" in html
    assert "3 sent" in html
    assert "campaign.example.org/political-prisoners" in html


def test_a_day_of_the_chart_is_the_utc_day_whatever_the_databases_time_zone(
    app: App, stub_broker: Any
) -> None:
    """PostgreSQL's date of a time with zone is in the session's TimeZone: a server in Tokyo
    counted yesterday evening's submission today."""
    from sqlalchemy import text

    from workers.database.models import utcnow
    from workers.web.console.queries import per_day

    sid = submit(app, stub_broker, submission())[0]
    evening = (utcnow() - timedelta(days=1)).replace(hour=20, minute=0)
    with session_scope(app.sessions) as session:
        session.execute(update(Submission).where(Submission.id == sid).values(created_at=evening))
        if session.get_bind().dialect.name != "sqlite":
            session.execute(text("SET LOCAL TIME ZONE 'Asia/Tokyo'"))
        days = {day.day: day.received for day in per_day(session, SLUG)}
    assert days[evening.date()] == 1 and sum(days.values()) == 1


def test_console_pages_may_load_their_own_stylesheet_and_post_back_only(
    operator: TestClient,
) -> None:
    policy = operator.get("/console/").headers["content-security-policy"]
    assert "style-src 'self'" in policy and "form-action 'self'" in policy
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    css = operator.get("/console/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_the_overview_says_redis_is_not_used_with_the_stub_broker(operator: TestClient) -> None:
    html = operator.get("/console/").text
    assert "down" in html and "StubBroker" in html


# Masking and the reveal


def test_personal_data_is_masked_until_revealed_and_the_reveal_is_logged(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    sid = delivered(app, stub_broker, stub_worker, 1)[0]
    page = f"/console/submissions/{sid}"
    masked = operator.get(page).text
    for detail in ("Amira", "amira.haddad@example.com", "DM1 1AA", "Mill Lane", "7946"):
        assert detail not in masked, detail
    assert "[hidden]" in masked
    with capture_logs() as logs:
        shown = post(operator, f"{page}/reveal", page=page)
    assert shown.status_code == 200
    for detail in ("Amira Haddad", "amira.haddad@example.com", "DM1 1AA", "12 Mill Lane"):
        assert detail in shown.text, detail
    revealed = [e for e in logs if e["event"] == "console_record_revealed"]
    assert revealed == [
        {
            "event": "console_record_revealed",
            "operator": "ada",
            "submission_id": sid,
            "log_level": "warning",
        }
    ]


@pytest.mark.parametrize(
    "url", ["/write?name=Jane+Doe", "camp.org/write?street=1+Acacia+Road#Jane", "http://[x/p?Jane"]
)
def test_the_page_that_asked_is_shown_without_its_query_as_the_ledger_keeps_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient, url: str
) -> None:
    sid = delivered(app, stub_broker, stub_worker, 1)[0]
    with session_scope(app.sessions) as session:
        row = session.get(Submission, sid)
        assert row is not None
        row.payload = {**row.payload, "source_url": url}
    masked = operator.get(f"/console/submissions/{sid}").text
    assert "Jane" not in masked and "Acacia" not in masked


def test_a_reveal_needs_the_csrf_token_and_logs_nothing_without_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    sid = delivered(app, stub_broker, stub_worker, 1)[0]
    with capture_logs() as logs:
        reply = operator.post(f"/console/submissions/{sid}/reveal", data={"csrf": "x"})
    assert reply.status_code == 403 and "Amira" not in reply.text
    assert not [e for e in logs if e["event"] == "console_record_revealed"]


def test_an_unknown_or_malformed_submission_is_a_404_page(operator: TestClient) -> None:
    for sid in (str(uuid.uuid4()), "../../etc/passwd", "x" * 5000):
        reply = operator.get(f"/console/submissions/{sid}")
        assert reply.status_code == 404, sid


# Actions


def test_replaying_a_dead_letter_requeues_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    sid = delivered(app, stub_broker, stub_worker, 1)[0]
    message_id = dead_letter(app, sid)
    reply = post(operator, "/console/dead-letters/replay", message_id=message_id)
    assert reply.status_code == 303
    page = operator.get(reply.headers["location"]).text
    assert "Dead letters put back on their queues: 1." in page
    with session_scope(app.sessions) as session:
        failure = session.scalar(select(Failure).where(Failure.message_id == message_id))
        assert failure is not None and failure.requeued_at is not None
    drain(stub_broker, stub_worker)  # the requeued message ran (and found its work done)
    assert "No dead letter needs attention" in operator.get("/console/dead-letters").text


def test_replaying_a_reason_requeues_every_dead_letter_of_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    ids = delivered(app, stub_broker, stub_worker, 2)
    kept = dead_letter(app, ids[0], reason="KeyError")
    for sid in ids:
        dead_letter(app, sid)
    reply = post(operator, "/console/dead-letters/replay", reason="RuntimeError")
    assert reply.status_code == 303 and "n=2" in reply.headers["location"]
    html = operator.get("/console/dead-letters").text
    assert "KeyError: 1" in html and kept in html and "RuntimeError" not in html


def test_a_letter_refused_for_good_is_not_replayed_but_pointed_to_reopen(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    sid = delivered(app, stub_broker, stub_worker, 1)[0]
    message_id = dead_letter(app, sid, reason="workers.stages.delivery.PermanentDeliveryError")
    reply = post(operator, "/console/dead-letters/replay", message_id=message_id)
    assert reply.status_code == 409 and "deliveries reopen" in reply.text
    with session_scope(app.sessions) as session:
        failure = session.scalar(select(Failure).where(Failure.message_id == message_id))
        assert failure is not None and failure.requeued_at is None


def test_retry_now_makes_waiting_letters_due_and_sends_them(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    sid = delivered(app, stub_broker, stub_worker, 1)[0]
    later = utcnow() + timedelta(hours=1)
    with session_scope(app.sessions) as session:  # a letter waiting for its next attempt
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == sid)
            .values(status="pending", failures=1, next_attempt_at=later, error="451 try later")
        )
        session.execute(update(Submission).where(Submission.id == sid).values(state="rendered"))
    assert "451 try later" in operator.get("/console/waiting").text
    reply = post(operator, "/console/waiting/retry", page="/console/waiting")
    assert reply.status_code == 303 and "n=1" in reply.headers["location"]
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        assert session.get(Submission, sid).state == State.DELIVERED  # type: ignore[union-attr]
    assert "No letter is waiting" in operator.get("/console/waiting").text
    with session_scope(app.sessions) as session:  # taken by a worker: with its server, not due
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == sid)
            .values(status="sending", claimed_at=later)
        )
    assert f"with its server since {later.isoformat()}" in operator.get("/console/waiting").text


def test_pausing_and_resuming_a_campaign(app: App, operator: TestClient) -> None:
    page = f"/console/campaigns/{SLUG}"
    reply = post(operator, f"{page}/pause", page=page)
    assert reply.status_code == 303
    assert "Paused" in operator.get(reply.headers["location"]).text
    with session_scope(app.sessions) as session:
        assert session.get(Campaign, SLUG).paused_at is not None  # type: ignore[union-attr]
    assert SLUG in operator.get("/console/pauses").text
    assert (
        post(operator, f"{page}/pause", page=page)
        .headers["location"]
        .endswith("done=already-paused&n=0")
    )
    reply = post(operator, f"{page}/resume", page=page)
    assert reply.status_code == 303 and "done=resumed" in reply.headers["location"]
    with session_scope(app.sessions) as session:
        assert session.get(Campaign, SLUG).paused_at is None  # type: ignore[union-attr]
    assert post(operator, f"{page}/resume", page=page).status_code == 409  # not paused
    assert post(operator, "/console/campaigns/nothing-here/pause").status_code == 404


def test_pausing_and_resuming_an_mp_address(operator: TestClient) -> None:
    address = "alex.rivers.mp@mp.example.org"
    reply = post(operator, "/console/pauses/address", address=address, reason="office closed")
    assert reply.status_code == 303
    html = operator.get("/console/pauses").text
    assert address in html and "office closed" in html
    reply = post(operator, "/console/pauses/address/resume", address=address)
    assert reply.status_code == 303
    assert "Nothing is paused" in operator.get("/console/pauses").text
    assert post(operator, "/console/pauses/address/resume", address=address).status_code == 409
    assert post(operator, "/console/pauses/address", address="no at sign").status_code == 422


def test_an_address_marked_failing_is_not_paused_over_its_mark(
    app: App, operator: TestClient
) -> None:
    failing = "bounced.mp@mp.example.org"
    with session_scope(app.sessions) as session:
        session.add(AddressHealth(email=health.key(failing), status=health.FAILING, reason="x"))
    reply = post(operator, "/console/pauses/address", address=failing)
    assert reply.status_code == 409 and "marked failing" in reply.text
    with session_scope(app.sessions) as session:
        row = session.get(AddressHealth, health.key(failing))
        assert row is not None and row.status == health.FAILING


def test_resuming_the_mail_pause_needs_redis(operator: TestClient) -> None:
    assert post(operator, "/console/mail/resume").status_code == 503


# Hostile input


def test_a_hostile_campaign_title_and_dead_letter_reason_are_escaped(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, operator: TestClient
) -> None:
    sid = delivered(app, stub_broker, stub_worker, 1)[0]
    script = "<script>alert(1)</script>"
    with session_scope(app.sessions) as session:
        session.execute(update(Campaign).where(Campaign.slug == SLUG).values(title=script))
        session.add(
            Campaign(
                slug=script,
                title=script,
                definition={},
                definition_sha256="0" * 64,
                paused_at=utcnow(),
            )
        )
    dead_letter(app, sid, reason=script, text=f"{script} for amira.haddad@example.com")
    for path in (
        "/console/campaigns",
        f"/console/campaigns/{SLUG}",
        "/console/dead-letters",
        "/console/pauses",
    ):
        html = operator.get(path).text
        assert script not in html, path
        assert "&lt;script&gt;" in html, path
    assert "amira.haddad@example.com" not in operator.get("/console/dead-letters").text


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"csrf=x&" + b"a=" + b"x" * 10_000, "application/x-www-form-urlencoded", 413),
        (b"csrf=x&reason=" + b"y" * 600, "application/x-www-form-urlencoded", 422),
        (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded", 400),
        (b"&".join(b"f%d=1" % n for n in range(50)), "application/x-www-form-urlencoded", 400),
        (b'{"csrf": "x"}', "application/json", 415),
        (b"csrf=a&csrf=b", "application/x-www-form-urlencoded", 422),
    ],
)
def test_garbage_forms_are_answered_with_a_4xx_page_not_a_500(
    operator: TestClient, body: bytes, content_type: str, status: int
) -> None:
    reply = operator.post(
        "/console/dead-letters/replay", content=body, headers={"content-type": content_type}
    )
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("text/html")


def test_a_hostile_path_is_a_404_not_a_500(operator: TestClient) -> None:
    for path in ("/console/campaigns/%3Cscript%3E", "/console/campaigns/" + "x" * 3000):
        reply = operator.get(path)
        assert reply.status_code == 404 and "<script>" not in reply.text


# With a real Redis


@pytest.mark.redis
def test_with_redis_the_overview_has_queues_and_the_mail_pause_can_be_ended(
    app: App, operator: TestClient, redis_server: EmbeddedRedis
) -> None:
    import redis

    from workers.pipeline.dead_letters import MailPauseAlarm

    app.settings.broker, app.settings.redis_url = "redis", redis_server.url
    client = redis.Redis.from_url(redis_server.url)
    MailPauseAlarm(client, app.settings.redis_namespace)("535 authentication failed", 60)
    html = operator.get("/console/").text
    assert "dearmp.deliver" in html and "No worker process is alive" in html
    assert "535 authentication failed" in operator.get("/console/pauses").text
    reply = post(operator, "/console/mail/resume", page="/console/pauses")
    assert reply.status_code == 303 and "done=mail-resumed" in reply.headers["location"]
    assert "No mail pause reported" in operator.get("/console/pauses").text
