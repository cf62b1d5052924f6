"""A resend is the same email: every kind the outbox sends, composed again later (a worker that
died between the server's 250 and the sent mark, its claim taken over after the lease), is the
same bytes under the same Message-ID, its DKIM signature included; and an MP's digest whose
text changed after an attempt (a constituent erased, the campaign edited) is not sent again
under that Message-ID. On SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dkim
import dramatiq
import pytest
from sqlalchemy import select, update

from schemas.campaign import SimilarLetters
from tests.conftest import make_settings, serving
from tests.factories import submission
from tests.services import dkim_dns, dkim_keys
from tests.test_after_sent import BOUNCES, REPLIES
from tests.test_outbox import Recorder, compose, every_kind, item
from tests.test_stages import get, step, store
from workers.database.engine import session_scope
from workers.database.models import LetterPrint, OutboxItem, Submission, utcnow
from workers.letters.definitions import update_definition
from workers.letters.mail import DkimSigner, Outgoing
from workers.letters.mail.dkim import SIGNED_HEADERS
from workers.letters.mail.messages import Draft, write
from workers.outbox import sending as outbox
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App
from workers.privacy.rights import erase_supporter
from workers.stages import delivery, digests
from workers.stages.comparison import compare
from workers.stages.rendering import render
from workers.stages.resolution import resolve
from workers.stages.validation import validate

SLUG = "political-prisoners"
LATER = 400  # seconds: past the 300-second lease, a takeover's clock


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """A deployment that signs (a DKIM key), with a bounce and a reply domain."""
    with serving(
        make_settings(
            tmp_path,
            database_url=db_url,
            bounce_domain=BOUNCES,
            reply_domain=REPLIES,
            dkim_private_key=dkim_keys()[0].decode(),
            dkim_selector="dearmp",
            delivery_lease_seconds=60,
        )
    ) as application:
        yield application


class Dying(Recorder):
    """A mail server that takes the email (it is delivered), then the worker dies before the
    sent mark."""

    def send(self, mail: Outgoing) -> str:
        self.sent.append(mail)
        raise Killed


class Killed(BaseException):
    """The worker process dies."""


def later(monkeypatch: pytest.MonkeyPatch, seconds: float = LATER) -> None:
    """The clock (what dkimpy signed with) ``seconds`` ahead."""
    now = time.time
    monkeypatch.setattr(time, "time", lambda: now() + seconds)


def lapse(app: App, item_id: str) -> None:
    """The dead worker's claim lapses."""
    with session_scope(app.sessions) as session:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == item_id)
            .values(claimed_at=utcnow() - timedelta(seconds=61))
        )


def send(app: App, item_id: str, mailer: Recorder) -> None:
    """What the outbox stage does with one item, every kind through ``mailer`` (letters and
    digests too: their kinds have the mailer as their channel)."""
    every_kind, policy = outbox_for(app)
    mail = (mailer, app.delivery_policy, app.limiter, app.signer, app.returns)
    kinds = every_kind | {delivery.KIND: delivery.kind(*mail), digests.KIND: digests.kind(*mail)}
    with session_scope(app.sessions) as session:
        outbox.send(session, item_id, mailer, kinds, policy)


def composed(app: App, item_id: str) -> Outgoing:
    """The item as its kind writes it (a letter's and a digest's with their rate limits)."""
    mail: object = compose(app, item_id)
    if isinstance(mail, delivery.LetterMail):
        mail = mail.mail
    assert isinstance(mail, Outgoing)
    return mail


def a_letter(app: App, signed: bool) -> str:
    """A rendered letter waiting to go: signed when rendered (its signature stored), or not
    (signed when it goes)."""
    sid = store(app, submission())
    for stage in (validate, resolve, compare):
        step(app, stage, sid)
    signer = app.signer if signed else None
    step(app, render, sid, app.settings.sandbox_address, signer, app.returns)
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).where(OutboxItem.id == sid).values(next_attempt_at=None))
    return sid


def a_digest(app: App, n: int = 3) -> tuple[str, list[str]]:
    """``n`` near-identical letters, the last ``n - 1`` (on a fresh database) in the MP's
    digest: the digest (made, not sent) and its letters."""
    rules = SimilarLetters(policy="digest", hold_after=0)
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, confirmation=False, similar_letters=rules)
    for i in range(n):  # each near-identical to the letters before it
        sid = store(app, submission(supporter__email=f"digest{i}@example.com"))
        for stage in (validate, resolve, compare):
            step(app, stage, sid)
        step(app, render, sid, app.settings.sandbox_address, app.signer, app.returns)
    with session_scope(app.sessions) as session:
        [made] = digests.build_due(session, force=True)
        ids = session.scalars(
            select(LetterPrint.submission_id)
            .where(LetterPrint.digest_id == made)
            .order_by(LetterPrint.created_at)
        ).all()
    return made, list(ids)


def email_of(app: App, sid: str) -> str:
    address: str = get(app, sid).payload["supporter"]["email"]
    return address


def every_item(app: App, broker: Any, worker: dramatiq.Worker) -> dict[str, str]:
    """One item of each kind of email, not sent: {name: item id}."""
    items = every_kind(app, broker, worker)  # confirm, reminder, bounce, forward, surveys
    with session_scope(app.sessions) as session:  # the reminder is due (its Date is then)
        confirm = session.get(OutboxItem, items["reminder"])
        waiting = session.get(Submission, confirm.submission_id if confirm else None)
        assert waiting is not None
        waiting.created_at -= timedelta(hours=app.settings.confirm_reminder_hours, minutes=1)
    items["letter"] = a_letter(app, signed=True)
    items["letter signed when sent"] = a_letter(app, signed=False)
    items["digest"], _ = a_digest(app)
    return items


def notices_of_a_sent_digest(app: App) -> list[str]:
    """The supporters' notices that their letter went in the MP's digest (a digest sent)."""
    made, _ = a_digest(app)
    send(app, made, Recorder())
    with session_scope(app.sessions) as session:
        return list(session.scalars(select(OutboxItem.id).where(OutboxItem.kind == digests.NOTICE)))


def test_every_kind_composed_again_later_is_the_same_signed_bytes(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = every_item(app, stub_broker, stub_worker)
    [digested, *_] = notices_of_a_sent_digest(app)
    items["digested"] = digested
    assert {item(app, i).kind for i in items.values()} == {
        "confirm", "bounce", "forward", "survey", "letter", "digest", "digested"
    }  # fmt: skip
    first = {name: composed(app, item_id) for name, item_id in items.items()}
    later(monkeypatch)
    for name, item_id in items.items():
        again = composed(app, item_id)
        assert again.message_id == first[name].message_id, name
        assert again.data == first[name].data, name
        assert again.data.startswith(b"DKIM-Signature:"), name
        assert dkim.verify(again.data, dnsfunc=dkim_dns), name


def test_a_worker_killed_after_the_servers_250_is_followed_by_the_same_bytes(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = every_item(app, stub_broker, stub_worker)
    items["digested"] = notices_of_a_sent_digest(app)[0]
    for name, item_id in items.items():
        dying, mailer = Dying(), Recorder()
        with pytest.raises(Killed):
            send(app, item_id, dying)
        lapse(app, item_id)
        with monkeypatch.context() as clock:
            later(clock)
            send(app, item_id, mailer)
        [delivered], [again] = dying.sent, mailer.sent
        assert (again.message_id, again.data) == (delivered.message_id, delivered.data), name
        taken = item(app, item_id)
        assert (taken.status, taken.attempts) == ("sent", 2), name


def test_the_signature_is_dkimpys_at_the_emails_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """The signer makes what ``dkim.sign`` makes, with the draft's Date for the clock."""
    pem = dkim_keys()[0]
    date = datetime(2026, 11, 30, 15, 30, 7, tzinfo=UTC)
    draft = Draft("Org", "letters@campaign.example.org", "mp@example.org", "Hi", date, "<a@b>", "x")
    data = write(draft)
    ours = DkimSigner("dearmp", pem).signature(data, "campaign.example.org", date)
    monkeypatch.setattr(time, "time", lambda: date.timestamp())
    theirs = dkim.sign(
        data,
        b"dearmp",
        b"campaign.example.org",
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=SIGNED_HEADERS,
    )
    assert ours == theirs and f"t={int(date.timestamp())};".encode() in ours
    naive = DkimSigner("dearmp", pem).signature(
        data, "campaign.example.org", date.replace(tzinfo=None)
    )
    assert naive == ours  # a naive time is UTC, as the Date header writes it


def test_a_constituent_erased_before_the_first_attempt_is_left_out_and_the_resend_matches(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    made, [gone, kept] = a_digest(app)
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, email_of(app, gone), outbox_for(app)[0])
    dying, mailer = Dying(), Recorder()
    with pytest.raises(Killed):
        send(app, made, dying)
    lapse(app, made)
    later(monkeypatch)
    send(app, made, mailer)
    [delivered], [again] = dying.sent, mailer.sent
    assert again.data == delivered.data
    assert b"1 constituent wrote to you" in again.data
    assert get(app, kept).state == "delivered"
