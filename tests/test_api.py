"""The HTTP intake in process (FastAPI's test client over the real app, database and StubBroker):
campaign, preview, submissions, status, abuse limits, CORS, headers, and sender confirmation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, update
from structlog.testing import capture_logs

from schemas.messages import parse_stage_message
from tests.conftest import ApiClient, drain
from tests.factories import submission
from tests.services import HttpStub, wait_for
from tests.test_stages import get
from workers.database.engine import session_scope
from workers.database.models import Constituency, State, Submission, utcnow
from workers.letters.definitions import update_definition
from workers.letters.rate_limits import RedisLimiter
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch
from workers.pipeline.reconciler import find_stalled
from workers.stages.stage import Deferred, Stage
from workers.web.api import create_app

SLUG = "political-prisoners"
ORIGIN = "https://campaign.example.org"


@pytest.fixture
def client(app: App, stub_broker: Any) -> Iterator[TestClient]:
    peer = ("203.0.113.9", 50_000)
    with ApiClient(create_app(lambda: app, stub_broker), client=peer) as test_client:
        yield test_client


def posted(**changes: Any) -> dict[str, Any]:
    payload = submission(**changes)
    payload.pop("client_ip")  # the API takes it from the connection
    return payload


def count(app: App) -> int:
    with session_scope(app.sessions) as session:
        return int(session.scalar(select(func.count()).select_from(Submission)) or 0)


def test_campaign_gives_a_page_what_it_needs(client: TestClient) -> None:
    data = client.get(f"/v1/campaigns/{SLUG}").json()
    assert data["title"] == "Stand with Palestinian political prisoners"
    assert data["consent_version"] == "2024-03-contact-v2"
    assert [q["channel"] for q in data["consent_questions"]] == ["email", "phone", "sms", "post"]
    assert data["draft_body"].startswith("As your constituent")
    assert data["privacy_notice_url"] == "https://campaign.example.org/privacy"
    missing = client.get("/v1/campaigns/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["errors"]["campaign"]


def test_preview_finds_the_mp_and_the_draft(client: TestClient) -> None:
    reply = client.post(f"/v1/campaigns/{SLUG}/preview", json={"name": "A", "postcode": " dm11aa"})
    data = reply.json()
    assert reply.status_code == 200 and data["postcode"] == "DM1 1AA"
    assert data["mp"] == {
        "name": "Alex Rivers",
        "constituency": "Millbrook and Eastvale",
        "party": "Independent",
    }
    assert data["letter"]["salutation"] == "Dear Alex Rivers,"
    assert data["own_words"] == 0.0  # the draft as it is


def test_preview_says_how_much_of_an_edited_letter_is_the_supporters_own_words(
    client: TestClient,
) -> None:
    draft = client.get(f"/v1/campaigns/{SLUG}").json()["draft_body"]
    own = "My brother has been held for eleven months without any charge or any trial at all."
    for body, low, high in [(draft, 0.0, 0.0), (f"{draft}\n\n{own}", 0.1, 0.25), (own, 1, 1)]:
        reply = client.post(
            f"/v1/campaigns/{SLUG}/preview", json={"name": "A", "postcode": "dm11aa", "body": body}
        )
        assert reply.status_code == 200 and low <= reply.json()["own_words"] <= high, body
    too_long = {"name": "A", "postcode": "dm11aa", "body": "x" * 10_001}
    assert client.post(f"/v1/campaigns/{SLUG}/preview", json=too_long).status_code == 422


@pytest.mark.parametrize(
    ("postcode", "field", "fragment", "status"),
    [
        ("hello", "postcode", "not a UK postcode", 422),
        ("DM9 9XX", "postcode", "could not find", 404),
        ("DM1 9ZZ", "postcode", "no longer in use", 422),
        ("JE2 4WD", "postcode", "Crown dependency", 422),
        ("DM6 1AA", "member", "vacant", 422),
    ],
)
def test_preview_explains_a_postcode_with_no_mp_to_write_to(
    app: App, client: TestClient, postcode: str, field: str, fragment: str, status: int
) -> None:
    with session_scope(app.sessions) as session:
        session.execute(
            update(Constituency).where(Constituency.gss_code == "N05900006").values(member_id=None)
        )
    reply = client.post(f"/v1/campaigns/{SLUG}/preview", json={"name": "A", "postcode": postcode})
    assert reply.status_code == status
    assert fragment in reply.json()["errors"][field]


def test_a_submission_is_stored_before_202_and_goes_all_the_way(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    payload = posted()
    reply = client.post("/v1/submissions", json=payload)
    assert reply.status_code == 202
    data = reply.json()
    assert data["status_url"] == f"/v1/submissions/{data['id']}" == reply.headers["location"]
    assert get(app, data["id"]).state in {s.value for s in State}  # it is in the database
    again = client.post("/v1/submissions", json=payload).json()
    assert (again["id"], again["duplicate"]) == (data["id"], True)
    drain(stub_broker, stub_worker)
    status = client.get(data["status_url"]).json()
    assert (status["state"], status["final"]) == ("delivered", True)
    assert status["mp"] == {"name": "Alex Rivers", "constituency": "Millbrook and Eastvale"}
    text = json.dumps(status)
    for detail in ("Amira", "amira", "Mill Lane", "DM1 1AA", "I ask you to stand"):
        assert detail not in text  # no personal data in the status
    assert (app.settings.resolved_outbox_dir / f"{data['id']}.eml").exists()
    assert get(app, data["id"]).client_ip_hash is not None  # taken from the connection
    assert client.get("/v1/submissions/nope").status_code == 404


def test_every_invalid_field_gets_its_own_message(client: TestClient, app: App) -> None:
    reply = client.post(
        "/v1/submissions",
        json=posted(
            supporter__email="nope",
            supporter__postcode="GIR 0AA",
            letter__body="",
            contact_preferences__sms="maybe",
        ),
    )
    assert reply.status_code == 422
    errors = reply.json()["errors"]
    assert errors["supporter.email"].startswith("This is not a valid email address")
    assert "PO box" in errors["supporter.postcode"]
    assert errors["letter.body"] == "Your letter is empty. Please write something to your MP."
    assert errors["contact_preferences.sms"] == "Choose one of: granted, refused, not_asked."
    short = client.post("/v1/submissions", json=posted(letter__body="Too short"))
    assert "too short" in short.json()["errors"]["letter.body"]
    assert client.post("/v1/submissions", content=b"{not json").status_code == 422
    assert count(app) == 0


def test_a_postcode_with_no_mp_is_accepted_and_rejected_with_the_reason(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """The door checks the postcode's shape; whether it has an MP is resolution's to say (the
    preview says it before the letter is written)."""
    reply = client.post("/v1/submissions", json=posted(supporter__postcode="je2 4wd"))
    assert reply.status_code == 202
    drain(stub_broker, stub_worker)
    sub = get(app, reply.json()["id"])
    assert sub.state == State.REJECTED and sub.rejection is not None
    assert "Crown dependency" in sub.rejection["supporter.postcode"]


def test_body_size_limit_honeypot_and_security_headers(client: TestClient, app: App) -> None:
    big = posted(letter__body="x" * 70_000)
    assert client.post("/v1/submissions", json=big).status_code == 413
    trapped = client.post("/v1/submissions", json={**posted(), "website": "http://spam"})
    assert trapped.status_code == 202 and count(app) == 0  # looks accepted, keeps nothing
    headers = client.get(f"/v1/campaigns/{SLUG}").headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    page = client.get(f"/demo/{SLUG}")
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_access_log_has_no_personal_data(client: TestClient) -> None:
    with capture_logs() as logs:
        client.post("/v1/submissions", json=posted())
        client.get("/v1/confirm/abc.123.secret-token")
    access = [e for e in logs if e["event"] == "http_request"]
    assert {e["path"] for e in access} == {"/v1/submissions", "/v1/confirm/[token]"}
    text = json.dumps(logs)
    for detail in ("amira", "Mill Lane", "DM1", "203.0.113.9", "secret-token"):
        assert detail not in text


def test_rate_limits_per_hashed_ip_and_per_email(app: App, client: TestClient) -> None:
    app.settings.api_ip_limit, app.settings.api_email_limit = 3, 2
    assert client.post("/v1/submissions", json=posted()).status_code == 202
    assert client.post("/v1/submissions", json=posted()).status_code == 202
    same_email = client.post("/v1/submissions", json=posted())
    assert same_email.status_code == 429 and int(same_email.headers["retry-after"]) >= 1
    other = client.post("/v1/submissions", json=posted(supporter__email="bob@example.com"))
    assert other.status_code == 429  # the fourth from this address
    assert "Too many" in other.json()["errors"]["body"]


def test_a_page_posting_again_gets_its_submission_back_over_the_limit(
    app: App, client: TestClient
) -> None:
    """A page that timed out posts the same body again: over the limit it is still answered
    with what was stored (a refusal would tell the supporter their letter was not taken)."""
    app.settings.api_ip_limit = 1
    first = posted()
    stored = client.post("/v1/submissions", json=first)
    assert stored.status_code == 202
    again = client.post("/v1/submissions", json=first)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    assert again.json()["id"] == stored.json()["id"]
    assert client.post("/v1/submissions", json=posted()).status_code == 429  # a new one is not


def test_previews_are_counted_apart_from_submissions(app: App, client: TestClient) -> None:
    """A supporter editing their letter previews it again and again: that does not use up
    what they may submit."""
    app.settings.api_ip_limit = 1
    for _ in range(4):
        shown = client.post(
            f"/v1/campaigns/{SLUG}/preview", json={"name": "A", "postcode": "DM1 1AA"}
        )
        assert shown.status_code == 200
    assert (
        client.post(
            f"/v1/campaigns/{SLUG}/preview", json={"name": "A", "postcode": "DM1 1AA"}
        ).status_code
        == 429
    )
    assert client.post("/v1/submissions", json=posted()).status_code == 202


@pytest.mark.redis
def test_rate_limits_hold_across_processes_through_redis(
    app: App, client: TestClient, redis_server: Any
) -> None:
    app.limiter = RedisLimiter(redis.Redis.from_url(redis_server.url))
    app.settings.api_email_limit = 1
    assert client.post("/v1/submissions", json=posted()).status_code == 202
    # Another API process shares the limit through Redis.
    other_process = ApiClient(create_app(lambda: app, None))
    assert other_process.post("/v1/submissions", json=posted()).status_code == 429


def test_cors_allows_only_each_campaigns_origins(app: App, client: TestClient) -> None:
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, allowed_origins=[ORIGIN])
    fresh = ApiClient(create_app(lambda: app, None))
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    ok = fresh.options("/v1/submissions", headers=preflight)
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == ORIGIN
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert fresh.options("/v1/submissions", headers=evil).status_code == 403
    reply = fresh.post("/v1/submissions", json=posted(), headers={"Origin": ORIGIN})
    assert reply.status_code == 202 and reply.headers["access-control-allow-origin"] == ORIGIN
    refused = fresh.post(
        "/v1/submissions", json=posted(), headers={"Origin": "https://evil.example"}
    )
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def confirmation_link(app: App, sid: str, kind: str = "confirm") -> str:
    raw = (app.settings.resolved_outbox_dir / f"{kind}-{sid}.eml").read_bytes()
    body = message_from_bytes(raw).get_payload(decode=True).decode()  # type: ignore[union-attr]
    match = re.search(r"http://\S+/v1/confirm/\S+", body)
    assert match is not None
    return match.group(0).split("8000", 1)[1]


def test_sender_confirmation_before_the_letter_goes(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, confirmation=True)
    sid = client.post("/v1/submissions", json=posted()).json()["id"]
    drain(stub_broker, stub_worker)
    assert get(app, sid).state == State.UNCONFIRMED  # nothing goes before the click
    assert not (app.settings.resolved_outbox_dir / f"{sid}.eml").exists()
    link = confirmation_link(app, sid)
    # Opening the link (as a mail scanner does) shows a button and changes nothing.
    page = client.get(link)
    assert page.status_code == 200 and '<form method="post">' in page.text
    drain(stub_broker, stub_worker)
    assert get(app, sid).state == State.UNCONFIRMED
    clicked = client.post(link)
    assert clicked.status_code == 200 and "on its way" in clicked.text
    drain(stub_broker, stub_worker)
    assert get(app, sid).state == State.DELIVERED
    assert "already" in client.get(link).text
    assert "already" in client.post(link).text
    assert client.get(link[:-3] + "AAA").status_code == 404  # forged
    assert client.post(link[:-3] + "AAA").status_code == 404


@pytest.mark.parametrize(
    "token", ["%C2%B2", "x.%C2%B2.y", "x.1.%C3%A9", "x.%EF%BC%91.y", "a" * 400, "...", "x.1.y"]
)
def test_a_confirmation_link_of_any_shape_is_never_a_server_error(
    client: TestClient, token: str
) -> None:
    for method in (client.get, client.post):
        reply = method(f"/v1/confirm/{token}")
        assert reply.status_code == 404 and "not valid" in reply.text


def test_one_reminder_after_a_day_and_expiry_after_seven(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, confirmation=True)
    sid = client.post("/v1/submissions", json=posted()).json()["id"]
    drain(stub_broker, stub_worker)

    def travel(hours: float) -> list[tuple[str, Stage]]:
        with session_scope(app.sessions) as session:
            session.execute(
                update(Submission)
                .where(Submission.id == sid)
                .values(
                    created_at=utcnow() - timedelta(hours=hours),
                    dispatched_at=utcnow() - timedelta(hours=1),
                )
            )
        with session_scope(app.sessions) as session:
            return find_stalled(session, timedelta(minutes=2))

    # A repeated message before the reminder is due sends nothing more.
    dispatch(stub_broker, [Stage.NOTIFY], sid)
    drain(stub_broker, stub_worker)
    assert not (app.settings.resolved_outbox_dir / f"reminder-{sid}.eml").exists()
    due = travel(25)
    assert (sid, Stage.NOTIFY) in due
    for found, stage in due:
        dispatch(stub_broker, [stage], found)
    drain(stub_broker, stub_worker)
    assert (app.settings.resolved_outbox_dir / f"reminder-{sid}.eml").exists()
    assert (sid, Stage.NOTIFY) not in travel(30)  # one reminder only
    link = confirmation_link(app, sid, "reminder")
    travel(24 * 7 + 1)
    assert get(app, sid).state == State.EXPIRED
    assert client.get(link).status_code == 410
    assert client.post(link).status_code == 410


def test_group_commit_stores_each_once_even_with_repeats_in_one_batch(app: App) -> None:
    from workers.pipeline.intake import accept_many

    first, second = posted(), posted()
    items = [(first, State.RECEIVED), (second, State.RECEIVED), (dict(first), State.RECEIVED)]
    with session_scope(app.sessions) as session:
        results = accept_many(session, items, app.secret)
    assert [r.created for r in results] == [True, True, False]
    assert results[2].submission_id == results[0].submission_id
    with session_scope(app.sessions) as session:
        again = accept_many(session, [(second, State.RECEIVED)], app.secret)
    assert again[0].submission_id == results[1].submission_id and not again[0].created
    assert count(app) == 2


def test_a_batch_of_any_size_is_one_insert_a_table_from_a_cached_compilation(app: App) -> None:
    from workers.pipeline.intake import accept_many

    def store(n: int) -> None:
        with session_scope(app.sessions) as session:
            accept_many(session, [(posted(), State.RECEIVED) for _ in range(n)], app.secret)

    seen: list[tuple[str, bool]] = []

    def see(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _: Any) -> None:
        if statement.startswith("INSERT"):
            seen.append(
                (statement.split(" (", 1)[0], context.cache_hit == context.dialect.CACHE_HIT)
            )

    store(3)  # the statements' first use
    event.listen(app.engine, "before_cursor_execute", see)
    try:
        store(5)
    finally:
        event.remove(app.engine, "before_cursor_execute", see)
    assert seen == [("INSERT INTO submissions", True), ("INSERT INTO submission_events", True)]
    assert count(app) == 8


def test_concurrent_posts_are_batched_and_every_202_is_stored(
    app: App, client: TestClient, stub_broker: Any
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    app.settings.api_ip_limit = app.settings.api_email_limit = 0
    payloads = [posted(supporter__email=f"s{i}@example.com") for i in range(40)]
    payloads += payloads[:10]  # the same submissions again: the same ids
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: client.post("/v1/submissions", json=p), payloads))
    assert {r.status_code for r in replies} == {202}
    ids = [r.json()["id"] for r in replies]
    assert len(set(ids)) == 40 and ids[40:] == ids[:10]
    assert count(app) == 40

    # Each new submission went to validation once, in its batch's message (sent after the 202s).
    def sent() -> list[str]:
        queue = list(stub_broker.queues[Stage.VALIDATE.queue].queue)
        messages = [dramatiq.Message.decode(raw) for raw in queue]
        return sorted(i for m in messages for i in parse_stage_message(m.args[0]).ids)

    assert wait_for(lambda: len(sent()) >= 40, 10)
    assert sent() == sorted(set(ids))


def test_the_confirmation_email_goes_with_no_lock_held_and_a_failed_send_goes_again(
    app: App,
) -> None:
    from tests.test_outbox import no_wait, send_item
    from workers.database.engine import make_engine
    from workers.database.models import OutboxItem
    from workers.letters.mail import Outgoing, TransientDeliveryError
    from workers.pipeline.intake import accept
    from workers.stages.confirmation import ConfirmationPolicy, notify

    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, confirmation=True)
        sid = accept(session, posted(), app.secret, state=State.UNCONFIRMED).submission_id
    other = make_engine(app.settings.resolved_database_url)

    class Mailer:
        name = "outbox"

        def __init__(self) -> None:
            self.sent: list[Outgoing] = []
            self.fail_next = True

        def waiting(self) -> float:
            return 0.0

        def close(self) -> None:
            pass

        def send(self, mail: Outgoing) -> str:
            # Another connection writes the same row while the mail server "answers": it would
            # wait (and fail after half a second) if notify held a lock.
            with other.connect() as conn:
                if conn.dialect.name == "sqlite":
                    conn.exec_driver_sql("PRAGMA busy_timeout=500")
                else:
                    conn.exec_driver_sql("SET lock_timeout = '500ms'")
                conn.execute(
                    update(Submission).where(Submission.id == sid).values(updated_at=utcnow())
                )
                conn.execute(update(OutboxItem).values(dispatched_at=utcnow()))
                conn.commit()
            if self.fail_next:
                self.fail_next = False
                raise TransientDeliveryError("421 try again later")
            self.sent.append(mail)
            return "250 ok"

    def status() -> str:
        with session_scope(app.sessions) as session:
            return session.scalars(
                select(OutboxItem.status).where(OutboxItem.kind != "letter")
            ).one()

    mailer, policy = Mailer(), ConfirmationPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:
        [item_id] = notify(session, sid, policy)
    with pytest.raises(Deferred) as waits:  # tried again when due, costing no retry
        send_item(app, item_id, mailer, no_wait(app))
    assert isinstance(waits.value.__cause__, TransientDeliveryError)
    assert status() == "pending"  # not marked: the retry sends it
    for _ in range(2):  # the retry sends; a repeat before the reminder is due does not
        with session_scope(app.sessions) as session:
            queued = notify(session, sid, policy)
        for item_id in queued:
            send_item(app, item_id, mailer, no_wait(app))
    assert len(mailer.sent) == 1 and status() == "sent"
    other.dispose()


def test_what_start_up_built_is_kept_out_of_the_collectors_walks_while_the_api_runs(
    app: App, stub_broker: Any
) -> None:
    import gc

    with ApiClient(create_app(lambda: app, stub_broker)) as running:
        assert gc.get_freeze_count() > 0
        assert running.post("/v1/submissions", json=posted()).status_code == 202
    assert gc.get_freeze_count() == 0  # given back when it stops


@pytest.fixture
def live_sources(app: App, shared_data: Path) -> Iterator[tuple[HttpStub, HttpStub]]:
    """The live sources on loopback (postcodes.io's recorded answers, a Members API), asked
    for postcodes the local directory lacks."""
    from tests.test_sources import FakeParliament, recorded_postcodes_io, sources

    postcodes = recorded_postcodes_io(shared_data)
    members = HttpStub(FakeParliament(shared_data).route).start()
    app.settings.resolution_order = "local,live"
    app.live_sources = sources(postcodes.url, members.url)
    yield postcodes, members
    postcodes.stop()
    members.stop()


def preview_of(client: TestClient, postcode: str) -> Any:
    return client.post(f"/v1/campaigns/{SLUG}/preview", json={"name": "A", "postcode": postcode})


def test_a_preview_asks_the_live_sources_with_no_database_connection_held(
    app: App, client: TestClient, live_sources: tuple[HttpStub, HttpStub]
) -> None:
    """16 previews waiting on a slow postcodes.io, each inside its transaction, held every
    connection of the pool: /readyz said 503 and supporters' submissions timed out."""
    held: list[int] = []
    for stub in live_sources:

        def watching(path: str, route: Any = stub.route) -> Any:
            held.append(app.engine.pool.checkedout())  # type: ignore[attr-defined]
            return route(path)

        stub.route = watching
    reply = preview_of(client, "AB10 1AB")
    assert reply.status_code == 200, reply.text
    assert reply.json()["mp"]["name"] == "Douglas Lumsden"
    assert held == [0, 0, 0]  # postcodes.io, the member search, the contact details


def test_a_preview_asks_a_live_source_once_and_says_when_it_cannot(
    app: App, client: TestClient, live_sources: tuple[HttpStub, HttpStub]
) -> None:
    """A supporter waiting on a page does not wait for three tries; the pipeline keeps them."""
    postcodes, _ = live_sources
    postcodes.script.append((503, {}, {"error": "busy"}))
    reply = preview_of(client, "AB10 1AB")
    assert reply.status_code == 503 and reply.headers["Retry-After"]
    assert "cannot look up your MP just now" in reply.json()["errors"]["member"]
    assert len(postcodes.requests) == 1
    assert app.live_sources is not None and app.live_sources.postcodes.api.attempts == 3
    assert preview_of(client, "AB10 1AB").status_code == 200  # answered: found


@pytest.mark.parametrize("member_id", [b"Infinity", b"100000000000000000000"])
def test_a_preview_of_a_live_answer_in_a_shape_not_documented_is_the_sources_outage(
    client: TestClient, live_sources: tuple[HttpStub, HttpStub], member_id: bytes
) -> None:
    """An OverflowError once escaped the shape guard: the preview answered 500."""
    _, members = live_sources
    item = {"value": {"id": 5450, "nameDisplayAs": "Douglas Lumsden"}}
    answer = json.dumps({"items": [item], "totalResults": 1}).encode()
    members.script.append((200, {}, answer.replace(b'"id": 5450', b'"id": ' + member_id)))
    reply = preview_of(client, "AB10 1AB")
    assert reply.status_code == 503, reply.text
    assert "cannot look up your MP just now" in reply.json()["errors"]["member"]
