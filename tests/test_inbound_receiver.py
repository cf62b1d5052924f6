"""`dearmp inbound`'s SMTP receiver, on loopback: only its own addresses, size and peer limits,
and 250 only once the message is stored."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select

from tests.services import free_port
from workers.database.engine import make_engine, make_sessionmaker, migrate, session_scope
from workers.database.models import InboundMessage
from workers.privacy.hashing import ip_hash
from workers.receiving.addresses import ReturnAddresses
from workers.receiving.receiver import InboundHandler, server_options

pytestmark = pytest.mark.smtp

RETURNS = ReturnAddresses(b"s" * 32, "bounces.example.org", "replies.example.org")
SID = "3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a"
MESSAGE = b"From: a@b.example\r\nSubject: hello\r\n\r\nhello\r\n"


class Receiver:
    def __init__(self, url: str, per_minute: int = 600, max_bytes: int = 10_000_000) -> None:
        self.sessions = make_sessionmaker(make_engine(url))
        self.sent_on: list[str] = []
        self.handler = InboundHandler(
            self.sessions, RETURNS, self.sent_on.extend, partial(ip_hash, b"k"), per_minute
        )
        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=free_port(),
            **server_options(max_bytes),
        )

    def __enter__(self) -> Receiver:
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()
        self.sessions.kw["bind"].dispose()

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.controller.port, timeout=30)

    def stored(self) -> int:
        with session_scope(self.sessions) as session:
            return int(session.scalar(select(func.count()).select_from(InboundMessage)) or 0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'inbound.sqlite3'}"
    migrate(url)
    return url


@pytest.fixture
def receiver(db: str) -> Iterator[Receiver]:
    with Receiver(db) as running:
        yield running


def test_a_letters_address_is_taken_and_stored_before_250(receiver: Receiver) -> None:
    bounce, reply = RETURNS.bounce(SID), RETURNS.reply(SID)
    assert bounce and reply
    with receiver.client() as smtp:
        refused = smtp.sendmail("<>", [bounce, reply], MESSAGE)
    assert refused == {}
    assert receiver.stored() == 2 and len(receiver.sent_on) == 2
    with session_scope(receiver.sessions) as session:
        rows = session.scalars(select(InboundMessage)).all()
        assert {r.recipient for r in rows} == {bounce, reply}
        assert all(r.raw == MESSAGE and r.status == "received" and r.peer_hash for r in rows)


@pytest.mark.parametrize(
    "rcpt",
    [
        "someone@gmail.com",  # never an open relay
        "postmaster@elsewhere.example",  # ours only (ours: tests/test_inbound_receiving.py)
        "b-" + "a" * 42 + "@bounces.example.org",  # a token's shape, not a genuine one
        "b-" + "a" * 42 + "@bounces.example.org.evil.example",
    ],
)
def test_anything_but_a_genuine_address_of_ours_is_refused_at_rcpt(
    receiver: Receiver, rcpt: str
) -> None:
    with receiver.client() as smtp:
        smtp.ehlo()
        smtp.mail("<>")
        code, _ = smtp.rcpt(rcpt)
        assert code == 550
        code, _ = smtp.docmd("DATA")
        assert code == 503  # no recipients: nothing is taken
    assert receiver.stored() == 0


def test_a_50_mb_message_is_refused_and_nothing_is_stored(receiver: Receiver) -> None:
    bounce = RETURNS.bounce(SID)
    assert bounce
    huge = MESSAGE + (b"x" * 998 + b"\r\n") * 50_000
    with receiver.client() as smtp, pytest.raises(smtplib.SMTPSenderRefused) as told:
        smtp.sendmail("<>", [bounce], huge)  # it says its size at MAIL: refused there
    assert told.value.smtp_code == 552
    with receiver.client() as smtp:  # a client that does not say: refused after the data
        smtp.ehlo()
        smtp.mail("<>")
        smtp.rcpt(bounce)
        code, _ = smtp.data(huge)
    assert code == 552
    assert receiver.stored() == 0


def test_a_thousand_messages_from_one_peer_are_taken_up_to_its_limit(db: str) -> None:
    bounce = RETURNS.bounce(SID)
    assert bounce
    codes: list[int] = []
    with Receiver(db, per_minute=100) as receiver, receiver.client() as smtp:
        smtp.ehlo()
        for _ in range(1000):
            code, _ = smtp.mail("<>")
            codes.append(code)
            if code == 250:
                smtp.rcpt(bounce)
                smtp.data(MESSAGE)
            else:
                smtp.rset()
        assert receiver.stored() == 100
    assert codes.count(250) == 100 and codes.count(450) == 900


def test_a_database_that_cannot_store_it_gets_451_so_the_sender_keeps_it(
    tmp_path: Path,
) -> None:
    bounce = RETURNS.bounce(SID)
    assert bounce
    with Receiver(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.sqlite3'}") as receiver:
        with receiver.client() as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("<>", [bounce], MESSAGE)
        assert refused.value.smtp_code == 451
        assert receiver.sent_on == []


def test_a_port_already_taken_is_one_line_naming_the_setting(app: Any, stub_broker: Any) -> None:
    """Another receiver on the port (or one not ours to bind): `dearmp run` and `inbound` say so
    in one line instead of an uncaught traceback."""
    import socket

    from config.settings import ConfigurationError
    from workers.pipeline.runtime import start_receiver

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError) as refused:
            start_receiver(app, stub_broker, "127.0.0.1", port)
    [line] = refused.value.problems
    assert line.startswith(
        f"DEARMP_INBOUND_HOST/DEARMP_INBOUND_PORT: cannot listen on 127.0.0.1:{port}"
    )
