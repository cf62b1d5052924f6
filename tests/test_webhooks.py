"""Signed webhooks to a CRM, a kind of outbox item: emitted in the fact's transaction, sent on a
queue of their own to a real HTTP receiver on loopback that verifies every request with the
standardwebhooks library; retried, given up, replayed, rotated; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dramatiq
import jsonschema_rs
import pytest
from click.testing import CliRunner
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from schemas import JSON_SCHEMA_DIR
from schemas.webhooks import json_schemas
from tests import mail_samples as samples
from tests.conftest import drain, make_settings, serving
from tests.factories import submission
from tests.services import wait_for
from tests.test_after_sent import BOUNCES, REPLIES, bounce_of, deliver, letter_of, receive, relay
from tests.test_api_hardening import stored
from workers.cli import main as cli
from workers.database.engine import session_scope
from workers.database.models import OutboxItem, State, Submission, utcnow
from workers.outbox import sending as outbox
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App
from workers.pipeline.reconciler import find_after_sent
from workers.pipeline.runtime import state_counts, submit
from workers.privacy.rights import erase_supporter, export_supporter
from workers.stages import consent, survey
from workers.stages.stage import Deferred, Stage
from workers.webhooks import endpoints, events, payloads
from workers.webhooks.channel import GONE

SUPPORTER = "amira.haddad@example.com"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: set[str] = field(default_factory=set)  # the secrets it verifies with

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A CRM on loopback. ``/ok`` answers 200 (``/short`` too, its body cut short, and
    ``/trickle``, its body a byte every half second), ``/fail``
    500, ``/gone`` 404, ``/removed`` 410, ``/redirect`` 302 to ``/ok``, ``/busy`` 429 with
    ``retry_after``, ``/hang`` nothing until the test ends. Each request is checked against
    every secret in ``secrets`` with the standardwebhooks library."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.secrets: list[str] = []
        self.retry_after = "120"  # the Retry-After of /busy's 429
        self.done = threading.Event()
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = Request(self.path, dict(self.headers.items()), body)
                for secret in receiver.secrets:
                    try:
                        Webhook(secret).verify(body, request.headers)
                    except WebhookVerificationError:
                        continue
                    request.verified.add(secret)
                with receiver.changed:
                    receiver.requests.append(request)
                    receiver.changed.notify_all()
                path = self.path.split("?")[0]
                if path == "/hang":
                    receiver.done.wait(30)
                statuses = {
                    "/fail": 500,
                    "/gone": 404,
                    "/removed": 410,
                    "/redirect": 302,
                    "/busy": 429,
                }
                status = statuses.get(path, 200)
                self.send_response(status)
                if status == 429:
                    self.send_header("retry-after", receiver.retry_after)
                if status == 302:
                    self.send_header("location", receiver.url("/ok"))
                if path == "/trickle":  # a 200 whose body comes a byte at a time
                    self.send_header("content-length", "1024")
                    self.end_headers()
                    for _ in range(1024):
                        if receiver.done.wait(0.5):
                            return
                        self.wfile.write(b".")
                        self.wfile.flush()
                    return
                if path == "/short":  # a 200 whose body is cut short, then the connection reset
                    self.send_header("content-length", "100")
                    self.end_headers()
                    self.wfile.write(b"ok")
                    self.close_connection = True
                    return
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait(self, count: int, timeout: float = 20) -> list[Request]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.requests) >= count, timeout), (
                f"{len(self.requests)} of {count} webhooks arrived"
            )
            return list(self.requests)

    def close(self) -> None:
        self.done.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    crm = Receiver()
    yield crm
    crm.close()


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """The App with bounce and reply domains and a short webhook timeout."""
    settings = make_settings(
        tmp_path,
        database_url=db_url,
        bounce_domain=BOUNCES,
        reply_domain=REPLIES,
        webhook_timeout_seconds=2.0,
    )
    with serving(settings) as application:
        events.forget()
        yield application


def add(app: App, url: str, wanted: tuple[str, ...] = events.EVENTS, **options: Any) -> int:
    with session_scope(app.sessions) as session:
        return endpoints.add(session, url, wanted, **options).id


def items(app: App) -> list[OutboxItem]:
    with session_scope(app.sessions) as session:
        found = session.scalars(
            select(OutboxItem).where(OutboxItem.kind == "webhook").order_by(OutboxItem.created_at)
        ).all()
        session.expunge_all()
        return list(found)


def send(
    app: App, item_id: str, policy: outbox.OutboxPolicy | None = None, pause: float = 0
) -> None:
    """What the webhook stage does with one item (a deferral is the next attempt's wait); an
    endpoint that failed is not paused unless ``pause``."""
    every_kind, default = outbox_for(app)
    if pause == 0:
        every_kind = every_kind | {events.KIND: payloads.kind(2.0, pause=0)}
    with session_scope(app.sessions) as session:
        outbox.send(session, item_id, app.mailer, every_kind, policy or default)


def until_ended(app: App, item_id: str, policy: outbox.OutboxPolicy) -> OutboxItem:
    for _ in range(policy.max_attempts + 1):
        try:
            send(app, item_id, policy)
        except Deferred:
            continue
        break
    [found] = [i for i in items(app) if i.id == item_id]
    return found


SCHEMAS = {
    name.removeprefix("webhook.").removesuffix(".v1.schema.json"): jsonschema_rs.validator_for(
        json.loads((JSON_SCHEMA_DIR / name).read_text())
    )
    for name in json_schemas()
}


def test_the_committed_schemas_are_the_models_and_every_event_has_one() -> None:
    for name, text in json_schemas().items():
        assert (JSON_SCHEMA_DIR / name).read_text() == text, name
    assert set(SCHEMAS) == set(events.EVENTS)


def test_every_event_is_sent_once_signed_and_valid_without_personal_data(
    app: App, receiver: Receiver, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    endpoint_id = add(app, receiver.url("/ok"))
    with session_scope(app.sessions) as session:
        receiver.secrets = [endpoints.get(session, endpoint_id).secret]
    relay(app)
    replied, returned = deliver(app, stub_broker, stub_worker, n=2)
    submit(app, stub_broker, submission(supporter__email="not an email"))
    letter = letter_of(app, replied)
    assert letter.reply_to is not None
    reply = samples.human_reply(letter.message_id, letter.to_email, letter.reply_to)
    receive(app, stub_broker, stub_worker, letter.reply_to, reply)
    receive(app, stub_broker, stub_worker, letter.reply_to, reply)  # its relay's retry: one event
    receive(app, stub_broker, stub_worker, *bounce_of(app, returned))
    with session_scope(app.sessions) as session:
        token = survey.make_token(app.secret, replied, "yes")
        assert survey.answer(session, app.secret, token, "yes") == "recorded"
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
    drain(stub_broker, stub_worker)
    got = receiver.wait(len(items(app)))
    kinds = sorted(r.json["type"] for r in got)
    assert set(kinds) == set(events.EVENTS)
    assert kinds.count("supporter.erased") == 2 and kinds.count("letter.delivered") == 2
    assert kinds.count("reply.received") == 1
    for request in got:
        assert request.verified == set(receiver.secrets), request.path
        body = request.json
        SCHEMAS[body["type"]].validate(body)
        assert "supporter" not in body["data"] or body["data"]["supporter"] is None
        assert SUPPORTER not in request.body.decode()
    assert len({r.headers["webhook-id"] for r in got}) == len(got)  # each sent once
    assert {i.status for i in items(app)} == {"sent"}
    rejected = next(r.json for r in got if r.json["type"] == "submission.rejected")
    assert rejected["data"]["reasons"] == ["supporter.email"]


def test_each_change_of_survey_answer_is_one_webhook_and_the_same_answer_again_none(
    app: App,
) -> None:
    add(app, "https://crm.example/hook", ("survey.answered",))
    sid = stored(app, State.DELIVERED)
    for value in ("yes", "yes", "no", "yes", "yes"):
        token = survey.make_token(app.secret, sid, value)
        with session_scope(app.sessions) as session:
            assert survey.answer(session, app.secret, token, value) == "recorded"
    answers = []
    with session_scope(app.sessions) as session:
        for item in items(app):
            row = session.get(OutboxItem, item.id)
            assert row is not None
            request = payloads.compose(session, row)
            assert not isinstance(request, str), request
            body = json.loads(request.body)
            SCHEMAS["survey.answered"].validate(body)
            answers.append(body["data"]["answer"])
    assert answers == ["yes", "no", "yes"]  # the CRM ends with the supporter's last answer


def test_personal_data_only_with_the_endpoints_permission_the_consent_and_never_after_erasure(
    app: App, receiver: Receiver, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    wanted = ("letter.delivered",)
    allowed = add(app, receiver.url("/ok?crm=allowed"), wanted, personal_data=True)
    add(app, receiver.url("/ok?crm=not-allowed"), wanted)
    [agreed] = deliver(app, stub_broker, stub_worker)
    refused = {c: "refused" for c in ("email", "phone", "sms", "post")}
    deliver(
        app,
        stub_broker,
        stub_worker,
        supporter__email="b@example.com",
        **{f"contact_preferences__{c}": v for c, v in refused.items()},
    )
    got = receiver.wait(4)
    sent = {(r.path, r.json["data"]["submission_id"]): r.json["data"] for r in got}
    person = sent[("/ok?crm=allowed", agreed)]["supporter"]
    assert person["email"] == SUPPORTER and person["postcode"] == "DM1 1AA"
    assert person["contact_preferences"]["email"] == "granted"
    assert [key for key, data in sent.items() if data.get("supporter")] == [
        ("/ok?crm=allowed", agreed)
    ]
    # Their export says which CRM was told what, and whether it could hear their details.
    with session_scope(app.sessions) as session:
        export = export_supporter(session, app.secret, SUPPORTER)
    told = [n for s in export["submissions"] for n in s["notices"] if n["kind"] == "webhook"]
    assert sorted((n["event"], n["to"], n["personal_data_allowed"]) for n in told) == [
        ("letter.delivered", "127.0.0.1", False),
        ("letter.delivered", "127.0.0.1", True),
    ]
    # Erased, then replayed: the same webhook-id, written anew without the details.
    [first] = [r for r in got if r.path == "/ok?crm=allowed" and agreed in r.body.decode()]
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
        [item_id] = [
            i.id for i in items(app) if i.endpoint_id == allowed and i.submission_id == agreed
        ]
        assert endpoints.replay(session, [item_id]) == [item_id]
    send(app, item_id)
    again = receiver.wait(len(got) + 1)[-1]
    assert again.headers["webhook-id"] == first.headers["webhook-id"] == item_id
    assert again.json["data"]["supporter"] is None and SUPPORTER not in again.body.decode()


def test_personal_data_waits_for_the_consent_ledger_not_the_submissions_own_say(
    app: App, receiver: Receiver
) -> None:
    """Sent before its consent is logged (or for a submission rejected before it is), a
    webhook carries no details: the ledger is the proof. Replayed after, it does."""
    from tests.test_stages import step, store
    from workers.stages.validation import validate

    earlier = store(app, submission())  # they wrote before, agreeing: that is not this one's
    step(app, validate, earlier)
    with session_scope(app.sessions) as session:
        consent.log_consent(session, earlier, app.secret)
    add(app, receiver.url("/ok"), ("submission.accepted",), personal_data=True)
    sid = store(app, submission())
    step(app, validate, sid)  # accepted: the event; its consent is logged by the next stage
    [item] = items(app)
    send(app, item.id)
    assert receiver.wait(1)[0].json["data"]["supporter"] is None
    with session_scope(app.sessions) as session:
        consent.log_consent(session, sid, app.secret)
    with session_scope(app.sessions) as session:
        assert endpoints.replay(session, [item.id]) == [item.id]
    send(app, item.id)
    assert receiver.wait(2)[-1].json["data"]["supporter"]["email"] == SUPPORTER


def test_during_a_rotation_both_secrets_sign_and_after_it_only_the_new_one(
    app: App, receiver: Receiver
) -> None:
    endpoint_id = add(app, receiver.url("/ok"), ("supporter.erased",))
    with session_scope(app.sessions) as session:
        old = endpoints.get(session, endpoint_id).secret
        new = endpoints.rotate(session, endpoint_id, timedelta(hours=24))
    receiver.secrets = [old, new]
    sid = erased(app)
    [item] = items(app)
    send(app, item.id)
    [during] = receiver.wait(1)
    assert during.verified == {old, new}
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    with session_scope(app.sessions) as session:
        newest = endpoints.rotate(session, endpoint_id, timedelta(0))  # `new` expires at once
        endpoints.replay(session, [item.id])
    receiver.secrets = [new, newest]
    send(app, item.id)
    after = receiver.wait(2)[-1]
    assert after.verified == {newest} and " " not in after.headers["webhook-signature"]
    assert after.json["data"]["submission_id"] == sid


def erased(app: App) -> str:
    """A submission, stored and then erased: one supporter.erased per endpoint wanting it."""
    with session_scope(app.sessions) as session:
        from workers.pipeline.intake import accept

        sid = accept(session, submission(), app.secret).submission_id
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
    return sid


def test_a_failing_receiver_is_retried_then_given_up_with_the_reason_and_no_url_in_logs(
    app: App, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    add(app, receiver.url("/fail?token=s3cret"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    policy = replace(outbox_for(app)[1], first_backoff=0, max_attempts=3)
    ended = until_ended(app, item.id, policy)
    assert (ended.status, ended.failures) == ("failed", 3)
    assert ended.error is not None and "HTTP 500" in ended.error and "s3cret" not in ended.error
    got = receiver.wait(3)
    assert len(got) == 3 and {r.headers["webhook-id"] for r in got} == {item.id}
    logs = capsys.readouterr()
    assert "s3cret" not in logs.err + logs.out and SUPPORTER not in logs.err + logs.out


def test_an_endpoint_that_failed_is_paused_its_webhooks_neither_claimed_nor_counted(
    app: App, receiver: Receiver
) -> None:
    add(app, receiver.url("/fail"), ("supporter.erased",))
    erased(app)
    erased(app)
    first, second = items(app)
    every_kind = outbox_for(app)[0] | {events.KIND: payloads.kind(2.0, pause=60)}
    policy = replace(outbox_for(app)[1], first_backoff=0)
    for item_id in (first.id, second.id):
        with session_scope(app.sessions) as session, pytest.raises(Deferred):
            outbox.send(session, item_id, app.mailer, every_kind, policy)
    assert len(receiver.requests) == 1  # the second was not sent: the endpoint is paused
    held = {i.id: i for i in items(app)}[second.id]
    assert (held.status, held.attempts, held.failures, held.error) == ("pending", 0, 0, None)
    # Not due before the pause ends: the reconciler starts no other loop of messages for it,
    # even long after its last dispatch.
    assert held.next_attempt_at is not None and held.next_attempt_at > utcnow()
    with session_scope(app.sessions) as session:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == second.id)
            .values(dispatched_at=utcnow() - timedelta(hours=1))
        )
    with session_scope(app.sessions) as session:
        assert second.id not in [i for i, _ in find_after_sent(session, timedelta(minutes=2))]


def test_a_receivers_retry_after_pauses_its_endpoint_that_long_and_at_most_an_hour(
    app: App, receiver: Receiver
) -> None:
    endpoint_id = add(app, receiver.url("/busy"), ("supporter.erased",))
    for _ in range(3):
        erased(app)
    first, second, third = items(app)
    policy = replace(outbox_for(app)[1], first_backoff=0)

    def send_with(channel_kind: outbox.Kind, item_id: str) -> None:
        every_kind = outbox_for(app)[0] | {events.KIND: channel_kind}
        with session_scope(app.sessions) as session, pytest.raises(Deferred):
            outbox.send(session, item_id, app.mailer, every_kind, policy)

    kind = payloads.kind(2.0, pause=0)  # no pause of our own: only the receiver's
    send_with(kind, first.id)  # 429, Retry-After: 120
    assert kind.channel is not None and 119 < kind.channel.paused(endpoint_id) <= 120
    send_with(kind, second.id)  # not sent: it waits for the rest of the pause, unclaimed
    assert len(receiver.requests) == 1
    held = {i.id: i for i in items(app)}[second.id]
    assert held.attempts == 0 and held.next_attempt_at is not None
    assert held.next_attempt_at > utcnow() + timedelta(seconds=118)
    receiver.retry_after = format_datetime(utcnow() + timedelta(days=2), usegmt=True)
    kind = payloads.kind(2.0, pause=0)
    send_with(kind, third.id)  # an HTTP date two days away: an hour
    assert kind.channel is not None and 3599 < kind.channel.paused(endpoint_id) <= 3600
    assert [r.path for r in receiver.requests] == ["/busy", "/busy"]


@pytest.mark.parametrize("path", ["/gone", "/redirect"])
def test_a_refusal_or_a_redirect_is_given_up_at_once_and_a_redirect_is_not_followed(
    app: App, receiver: Receiver, path: str
) -> None:
    add(app, receiver.url(path), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    ended = until_ended(app, item.id, outbox_for(app)[1])
    assert (ended.status, ended.failures) == ("failed", 0)
    assert [r.path for r in receiver.requests] == [path]  # never /ok


def test_a_410_disables_its_endpoint_until_an_operator_enables_it(
    app: App, receiver: Receiver
) -> None:
    """Standard Webhooks: 410 Gone asks for nothing more; the endpoint is disabled, so later
    facts write no webhook for it, and ``webhooks enable`` turns it on again."""
    from workers.database.models import WebhookEndpoint

    endpoint_id = add(app, receiver.url("/removed"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    ended = until_ended(app, item.id, outbox_for(app)[1])
    assert (ended.status, ended.failures) == ("failed", 0)
    assert ended.error == f"endpoint {endpoint_id} {GONE}: the endpoint was disabled"
    with session_scope(app.sessions) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None and not endpoint.enabled
    erased(app)
    assert len(items(app)) == 1  # nothing written for the disabled endpoint
    enabled = CliRunner().invoke(cli, ["webhooks", "enable", str(endpoint_id)])
    assert enabled.exit_code == 0, enabled.output
    send(app, item.id)  # a late message about the item given up: the operator's enable stays
    with session_scope(app.sessions) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None and endpoint.enabled
    erased(app)
    assert len(items(app)) == 2
    assert [r.path for r in receiver.requests] == ["/removed"]


def test_a_200_with_its_body_cut_short_is_sent_once(app: App, receiver: Receiver) -> None:
    """The status is the answer: what becomes of the body after a 2xx changes nothing."""
    add(app, receiver.url("/short"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    ended = until_ended(app, item.id, outbox_for(app)[1])
    assert (ended.status, ended.failures) == ("sent", 0)
    assert [r.path for r in receiver.requests] == ["/short"]


def test_a_200_whose_body_trickles_is_sent_once_within_the_timeout(
    app: App, receiver: Receiver
) -> None:
    """The body is read for the timeout at most (2 s here), not until it is whole: waiting for it
    ran into the actor's time limit, the item left sending and taken over, sent a second time."""
    add(app, receiver.url("/trickle"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    began = time.monotonic()
    send(app, item.id)
    assert time.monotonic() - began < 10
    [ended] = items(app)
    assert (ended.status, ended.failures) == ("sent", 0)
    assert [r.path for r in receiver.requests] == ["/trickle"]


def test_a_receiver_that_never_answers_times_out_while_the_letter_goes(
    app: App, receiver: Receiver, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    # Long enough for the letter to go first even on a loaded machine.
    app.settings = app.settings.model_copy(update={"webhook_timeout_seconds": 8.0})
    add(app, receiver.url("/hang"), ("submission.accepted",))
    sid, _ = submit(app, stub_broker, submission())
    receiver.wait(1)
    assert wait_for(lambda: state_counts(app, [sid]) == {"delivered": 1}, 20)
    [item] = items(app)
    assert item.status == "sending"  # the webhook still waits for its receiver meanwhile
    assert wait_for(lambda: items(app)[0].failures == 1, 20)
    [late] = items(app)
    assert (late.status, late.error) == (
        "pending",
        "TransientDeliveryError: endpoint 1: no answer in time",
    )


def test_a_second_run_of_an_actor_or_a_send_adds_and_sends_nothing(
    app: App, receiver: Receiver, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    add(app, receiver.url("/ok"), ("consent.recorded",))
    [sid] = deliver(app, stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        assert consent.log_consent(session, sid, app.secret) == 0  # done: nothing written
    with session_scope(app.sessions) as session:
        events.emit(session, "consent.recorded", sid)  # the same fact again: the same key
    [item] = items(app)
    send(app, item.id)
    send(app, item.id)
    drain(stub_broker, stub_worker)
    assert len(receiver.requests) == 1 and items(app)[0].status == "sent"


def test_without_endpoints_nothing_is_written_and_an_event_costs_a_lookup(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    deliver(app, stub_broker, stub_worker, n=3)
    assert items(app) == []
    with session_scope(app.sessions) as session:
        events.wanting(session, "letter.delivered")  # read once, then kept
        start = time.perf_counter()
        for _ in range(10_000):
            events.emit(session, "letter.delivered", "x")
        each = (time.perf_counter() - start) / 10_000
    assert each < 50e-6, each  # measured about 1 µs


def test_the_reconciler_sends_a_webhook_due_to_the_webhook_queue(
    app: App, receiver: Receiver
) -> None:
    add(app, receiver.url("/ok"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).values(dispatched_at=utcnow() - timedelta(hours=1)))
    with session_scope(app.sessions) as session:
        assert find_after_sent(session, timedelta(minutes=5)) == [(item.id, Stage.WEBHOOK)]


def test_an_endpoint_for_one_campaign_hears_nothing_of_another(
    app: App, receiver: Receiver
) -> None:
    with session_scope(app.sessions) as session:
        from workers.database.models import Campaign

        other = session.scalars(select(Campaign.slug)).first()
    assert other is not None
    add(app, receiver.url("/ok"), ("supporter.erased",), campaign=other)
    with session_scope(app.sessions) as session:
        session.execute(update(Submission).values(campaign_slug="elsewhere"))
    erased(app)
    assert [i.submission_id for i in items(app)] == [
        sid for sid in submissions(app) if campaign_of(app, sid) == other
    ]


def submissions(app: App) -> list[str]:
    with session_scope(app.sessions) as session:
        return list(session.scalars(select(Submission.id)))


def campaign_of(app: App, sid: str) -> str:
    with session_scope(app.sessions) as session:
        return str(session.scalar(select(Submission.campaign_slug).where(Submission.id == sid)))


def test_the_cli_adds_shows_rotates_replays_and_removes_and_refuses_bad_configuration(
    app: App, receiver: Receiver
) -> None:
    runner = CliRunner()
    added = runner.invoke(
        cli, ["webhooks", "add", receiver.url("/ok?token=s3cret"), "--event", "supporter.erased"]
    )
    assert added.exit_code == 0, added.output
    secret = added.stdout.split("secret ")[1].strip()
    assert secret.startswith("whsec_")
    Webhook(secret)  # a valid Standard Webhooks secret
    listed = runner.invoke(cli, ["webhooks", "list"])
    assert "s3cret" not in listed.stdout and secret not in listed.stdout
    assert "/ok?[masked]" in listed.stdout
    erased(app)
    [item] = items(app)
    send(app, item.id)
    shown = runner.invoke(cli, ["webhooks", "show", "1"])
    assert shown.exit_code == 0 and secret not in shown.stdout and "s3cret" not in shown.stdout
    assert json.loads(shown.stdout)["deliveries"][0]["status"] == "sent"
    assert SUPPORTER not in shown.stdout
    rotated = runner.invoke(cli, ["webhooks", "rotate", "1"])
    assert rotated.exit_code == 0 and rotated.stdout.startswith("secret whsec_")
    replayed = runner.invoke(cli, ["webhooks", "replay", item.id])
    assert replayed.exit_code == 0 and "replayed 1" in replayed.stdout
    refused = {
        "ftp://crm.example/hook": "http:// or https://",
        "https://user:pw@crm.example/hook": "credentials",
        "/just/a/path": "http:// or https://",
        "https://crm.example/ho ok": "spaces or control characters",
        "https://crm.example/\x00hook": "spaces or control characters",
        "https://crm.example:99999/hook": "host and port",
        "https://crm.example:abc/hook": "host and port",
        "http://[::1/hook": "host and port",
        "https://crm.example:0/hook": "port must be from 1 to 65535",
        "http://169.254.169.254/latest/meta-data/": "no CRM has",
        "http://2852039166/latest/meta-data/": "no CRM has",
        "http://0xa9.254.169.254/": "no CRM has",
        "http://[::ffff:169.254.169.254]/": "no CRM has",
        "http://169.254.169.254./": "no CRM has",
        "http://[fd00:ec2::254]/": "no CRM has",
        "http://100.100.100.200/": "no CRM has",
        "http://[fe80::1]/hook": "no CRM has",
        "http://0.0.0.0:8080/hook": "no CRM has",
        "http://224.0.0.1/hook": "no CRM has",
        "http://169.254.169.254\\.crm.example/hook": "backslash",
    }
    for url, said in refused.items():
        bad = runner.invoke(cli, ["webhooks", "add", url, "--event", "letter.delivered"])
        assert bad.exit_code == 1 and said in bad.output and len(bad.output.splitlines()) == 1
    unknown = runner.invoke(
        cli, ["webhooks", "add", receiver.url("/ok"), "--event", "letter.eaten"]
    )
    assert unknown.exit_code == 1 and "unknown event letter.eaten" in unknown.output
    nowhere = runner.invoke(
        cli,
        [
            "webhooks",
            "add",
            receiver.url("/ok"),
            "--event",
            "letter.delivered",
            "--campaign",
            "nope",
        ],
    )
    assert nowhere.exit_code == 1 and "no campaign 'nope'" in nowhere.output
    removed = runner.invoke(cli, ["webhooks", "remove", "1", "--yes"])
    assert removed.exit_code == 0 and items(app) == []
    assert runner.invoke(cli, ["webhooks", "show", "1"]).exit_code == 1


def test_list_and_show_mask_what_may_be_a_token_in_an_endpoints_path_and_query(app: App) -> None:
    url = "https://crm.example:8443/hooks/abc123SECRETtoken/dearmp?key=xyz#k2"
    endpoint_id = add(app, url, ("survey.answered",))
    runner = CliRunner()
    for command in (["list"], ["show", str(endpoint_id)]):
        shown = runner.invoke(cli, ["webhooks", *command])
        assert shown.exit_code == 0, shown.output
        assert "SECRET" not in shown.stdout and "xyz" not in shown.stdout, shown.stdout
        assert "https://crm.example:8443/hooks/[masked]/dearmp?[masked]" in shown.stdout
    assert (
        endpoints.masked("https://crm.example/v1/Hooks/x")
        == "https://crm.example/[masked]/[masked]/x"
    )


def test_a_disabled_endpoint_gets_no_new_webhooks_and_its_pending_ones_wait_until_enabled(
    app: App, receiver: Receiver, stub_broker: Any
) -> None:
    endpoint_id = add(app, receiver.url("/ok"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    runner = CliRunner()
    disabled = runner.invoke(cli, ["webhooks", "disable", str(endpoint_id)])
    assert disabled.exit_code == 0 and "disabled" in disabled.stdout, disabled.output
    erased(app)  # an event while disabled: nothing written for it
    assert [i.id for i in items(app)] == [item.id]
    with pytest.raises(Deferred):
        send(app, item.id)
    [waiting] = items(app)
    assert (waiting.status, waiting.attempts, waiting.failures) == ("pending", 0, 0)
    assert waiting.next_attempt_at is not None and waiting.next_attempt_at > utcnow()
    assert receiver.requests == []
    for queue in stub_broker.queues.values():
        queue.queue.clear()
    enabled = runner.invoke(cli, ["webhooks", "enable", str(endpoint_id)])
    assert enabled.exit_code == 0 and "1 waiting webhook sent" in enabled.stdout, enabled.output
    assert stub_broker.queues[Stage.WEBHOOK.queue].qsize() == 1
    send(app, item.id)
    assert [r.headers["webhook-id"] for r in receiver.wait(1)] == [item.id]
    assert items(app)[0].status == "sent"
    for command in ("disable", "enable"):
        unknown = runner.invoke(cli, ["webhooks", command, "99"])
        assert unknown.exit_code == 1 and "no webhook endpoint 99" in unknown.output
        assert len(unknown.output.splitlines()) == 1


def test_a_group_writes_its_events_with_its_other_writes_once_per_submission(
    app: App, receiver: Receiver
) -> None:
    from workers.database.transitions import run_group
    from workers.pipeline.intake import accept
    from workers.stages import validation

    add(app, receiver.url("/ok"), ("submission.accepted", "submission.rejected"))
    with session_scope(app.sessions) as session:
        payloads_ = [submission(), submission(), submission(supporter__email="nope")]
        ids = [accept(session, p, app.secret).submission_id for p in payloads_]
    for _ in range(2):  # the second run finds them moved: nothing more
        run_group(app.sessions, ids, validation.plan)
    written = sorted((i.submission_id, i.key.split(":")[0]) for i in items(app))
    assert written == sorted(
        (sid, "submission.rejected" if n == 2 else "submission.accepted")
        for n, sid in enumerate(ids)
    )


def test_a_process_sends_one_endpoint_at_most_in_flight_webhooks_at_a_time(
    receiver: Receiver,
) -> None:
    from workers.letters.mail import TransientDeliveryError
    from workers.webhooks.channel import BUSY_WAIT, HttpChannel, Request

    channel = HttpChannel(timeout=5, in_flight=1)
    hanging = Request(7, receiver.url("/hang"), "w1", b"{}", (endpoints.new_secret(),))
    first = threading.Thread(target=channel.send, args=(hanging,))
    first.start()
    receiver.wait(1)
    # Asked before the claim: a moment while the one in flight has just begun; once it has
    # taken longer, what it may still take (its timeout, 5 s, from when it began).
    assert channel.paused(7) == BUSY_WAIT
    started = channel._sending[7][0]
    channel._sending[7][0] = started - 3
    assert 1.9 < channel.paused(7) <= 2.0
    channel._sending[7][0] = started
    with pytest.raises(TransientDeliveryError) as held:
        channel.send(replace(hanging, webhook_id="w2"))
    assert held.value.ours and len(receiver.requests) == 1  # given back uncounted, not sent
    assert held.value.retry_after == BUSY_WAIT
    receiver.done.set()  # the first is answered (200) and the endpoint is free again
    first.join(10)
    assert channel.send(replace(hanging, webhook_id="w3")) == 200


def test_an_operators_retry_sends_a_given_up_webhook_on_the_webhook_queue(
    app: App, receiver: Receiver, stub_broker: Any
) -> None:
    add(app, receiver.url("/gone"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    assert until_ended(app, item.id, outbox_for(app)[1]).status == "failed"  # 410: given up
    for queue in stub_broker.queues.values():
        queue.queue.clear()
    retried = CliRunner().invoke(cli, ["outbox", "retry", "--kind", "webhook", "--yes"])
    assert retried.exit_code == 0 and "retried 1" in retried.stdout, retried.output
    assert stub_broker.queues[Stage.WEBHOOK.queue].qsize() == 1
    assert stub_broker.queues.get(Stage.OUTBOX.queue) is None or not any(
        stub_broker.queues[Stage.OUTBOX.queue].queue
    )


def test_a_worker_runs_the_letters_and_emails_it_holds_before_its_webhooks(
    stub_broker: Any,
) -> None:
    webhook = stub_broker.get_actor(Stage.WEBHOOK.actor).priority
    assert all(
        webhook > stub_broker.get_actor(s.actor).priority for s in Stage if s != Stage.WEBHOOK
    )


def test_webhooks_written_before_a_savepoint_are_sent_after_the_transaction_commits(
    app: App, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Erasing a supporter with two submissions uses a savepoint between them: what the
    transaction wrote goes out when it commits, not when a savepoint is released."""
    from sqlalchemy import func

    import workers.pipeline.dispatch as dispatch
    from workers.pipeline.intake import accept

    add(app, receiver.url("/ok"), ("supporter.erased",))
    with session_scope(app.sessions) as session:
        for _ in range(2):
            accept(session, submission(), app.secret)
    seen: list[tuple[list[str], int]] = []

    def record(broker: Any, sends: Any) -> bool:
        for ids in sends.values():
            with session_scope(app.sessions) as other:  # what another worker would find
                found = select(func.count()).where(OutboxItem.id.in_(ids))
                seen.append((list(ids), int(other.scalar(found) or 0)))
        return True

    monkeypatch.setattr(events, "installed_broker", lambda: object())
    monkeypatch.setattr(dispatch, "dispatch_groups", record)
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
    assert sorted(i for ids, _ in seen for i in ids) == sorted(i.id for i in items(app))
    assert all(found == len(ids) for ids, found in seen)


def test_an_endpoint_id_is_never_used_again_and_an_item_goes_only_where_still_wanted(
    app: App, receiver: Receiver
) -> None:
    first = add(app, receiver.url("/ok"), ("supporter.erased",))
    erased(app)
    [item] = items(app)
    with session_scope(app.sessions) as session:
        endpoints.remove(session, first)
    second = add(app, receiver.url("/ok"), ("letter.delivered",))
    assert second != first
    with session_scope(app.sessions) as session:  # as a process whose list is stale writes it
        session.add(
            OutboxItem(
                submission_id=item.submission_id,
                key=f"supporter.erased:{second}",
                kind=item.kind,
                endpoint_id=second,
            )
        )
    [stale] = items(app)
    with session_scope(app.sessions) as session:
        row = session.get(OutboxItem, stale.id)
        assert row is not None
        assert payloads.compose(session, row) == "the endpoint no longer asks for it"


def test_endpoints_that_hang_hold_at_most_a_few_of_a_processs_threads(
    receiver: Receiver,
) -> None:
    from workers.letters.mail import TransientDeliveryError
    from workers.webhooks.channel import BUSY_WAIT, HttpChannel, Request

    channel = HttpChannel(timeout=5, in_flight=2, all_in_flight=2)
    secret = (endpoints.new_secret(),)
    hanging = [Request(n, receiver.url("/hang"), f"w{n}", b"{}", secret) for n in (1, 2)]
    threads = [threading.Thread(target=channel.send, args=(r,)) for r in hanging]
    for thread in threads:
        thread.start()
    receiver.wait(2)
    other = Request(3, receiver.url("/ok"), "w3", b"{}", secret)  # a third endpoint waits too
    assert channel.paused(3) == BUSY_WAIT
    with pytest.raises(TransientDeliveryError) as held:
        channel.send(other)
    assert held.value.ours and len(receiver.requests) == 2
    receiver.done.set()
    for thread in threads:
        thread.join(10)
    assert channel.send(other) == 200


@pytest.mark.parametrize(("threads", "at_once"), [(1, 1), (4, 2), (8, 4), (64, 32)])
def test_webhooks_at_once_are_half_of_a_processs_threads(threads: int, at_once: int) -> None:
    """With four threads, four hanging CRMs held every one and letters waited a minute."""
    channel = payloads.kind(5.0, threads).channel
    assert channel is not None and channel.all_in_flight == at_once


def test_the_moves_a_crm_hears_of_are_named_in_the_table_of_states() -> None:
    from workers.pipeline.states import STATES

    named = {state: row.event for state, row in STATES.items() if row.event}
    assert set(named.values()) <= set(events.EVENTS)
    assert named == {
        "validated": "submission.accepted",
        "rejected": "submission.rejected",
        "delivered": "letter.delivered",
        "bounced": "letter.bounced",
    }


def test_only_addresses_no_crm_has_are_unsafe_and_none_is_posted_to() -> None:
    """A CRM may be on this host or a private network; a cloud's metadata service is never one,
    in whatever form its address is written, nor is a host requests would read otherwise than
    urlsplit (a backslash ends it for urllib3). Names are not resolved here."""
    from workers.letters.mail import PermanentDeliveryError
    from workers.webhooks.channel import HttpChannel, Request, unsafe_host

    safe = ("127.0.0.1", "10.0.0.8", "192.168.1.20", "[::1]", "crm.example", "localhost:8080")
    for host in safe:
        assert not unsafe_host(f"https://{host}/hook"), host
    unsafe = ("169.254.169.254", "2852039166", "169.254.43518", "[fe80::1]", "0.0.0.0", "[::]")  # noqa: S104
    unsafe += ("169.254.169.254\\.crm.example", "0xa9fea9fe\\x", "[fd00:ec2::254]", "[bad")
    for host in unsafe:
        assert unsafe_host(f"http://{host}/hook"), host
    for url in ("http://169.254.169.254/latest/", "http://169.254.169.254\\.crm.example/"):
        metadata = Request(3, url, "w1", b"{}", (endpoints.new_secret(),))
        with pytest.raises(PermanentDeliveryError, match="no CRM has"):
            HttpChannel(timeout=0.01).send(metadata)
