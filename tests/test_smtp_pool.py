"""The process's sessions to its relay: bounded, recycled by age, letters and idleness, ended
with QUIT, and never reused after an error."""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.services import SmtpSink, wait_for
from tests.test_smtp import mailer as smtp_mailer
from workers.letters.mail import Outgoing, SmtpMailer, TransientDeliveryError
from workers.letters.mail.smtp import SmtpPool

pytestmark = pytest.mark.smtp
MAIL = Outgoing(
    "a@example.org",
    ["b@example.org"],
    b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nhello\r\n",
    "<1@example.org>",
)


def mailer(tmp_path: Path, sink: SmtpSink, **values: Any) -> SmtpMailer:
    return smtp_mailer(tmp_path, sink, smtp_timeout=10, **values)


def test_threads_share_at_most_the_configured_number_of_sessions(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    smtp = mailer(tmp_path, smtp_sink, smtp_max_connections=2)
    smtp_sink.delay = 0.05  # each letter holds its session for a moment
    start = threading.Barrier(8)

    def send() -> None:
        start.wait()
        for _ in range(3):
            smtp.send(MAIL)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert smtp_sink.received.count() == 24
    assert smtp_sink.most_sessions == 2 and len(set(smtp_sink.sessions)) == 2


def test_a_session_carries_at_most_so_many_letters_and_ends_with_quit(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    smtp = mailer(tmp_path, smtp_sink, smtp_connection_max_letters=2)
    for _ in range(5):
        smtp.send(MAIL)
    assert smtp.pool.opened == 3  # 2 + 2 + 1
    assert [
        len([s for s in smtp_sink.sessions if s == x]) for x in dict.fromkeys(smtp_sink.sessions)
    ] == [2, 2, 1]
    assert wait_for(lambda: smtp_sink.open_sessions == 1, 5)  # the spent ones are closed
    smtp.close()
    assert wait_for(lambda: smtp_sink.open_sessions == 0, 5)


def test_sessions_are_recycled_by_age_and_closed_when_idle(tmp_path: Path) -> None:
    now = [0.0]
    opened: list[FakeConn] = []

    def connect() -> Any:
        opened.append(FakeConn())
        return opened[-1]

    pool = SmtpPool(
        connect, size=2, max_age=60, max_letters=100, idle=5, wait=1, clock=lambda: now[0]
    )
    with pool.session():
        pass
    now[0] = 0.5
    with pool.session():  # reused
        pass
    assert len(opened) == 1
    now[0] = 61  # too old: closed, and a new one opened
    with pool.session():
        pass
    assert len(opened) == 2 and opened[0].quit_sent and opened[0].closed
    now[0] = 61.2
    with pool.session():
        pass
    now[0] = 70  # idle for over 5 s: the next use closes it first
    with pool.session():
        pass
    assert len(opened) == 3 and opened[1].closed


def test_a_spent_session_is_closed_after_its_letter_not_on_the_way_back() -> None:
    """A session's QUIT is no round trip between the server's answer and the caller's record of
    the letter as sent: the next use closes a spent session first, or the idle sweep does."""
    opened: list[FakeConn] = []

    def connect() -> Any:
        opened.append(FakeConn())
        return opened[-1]

    pool = SmtpPool(connect, size=1, max_age=60, max_letters=1, idle=0.2, wait=1)
    with pool.session():
        pass
    assert not opened[0].quit_sent  # back to the caller with its answer, still open
    with pool.session() as conn:
        assert opened[0].quit_sent and opened[0].closed and conn is opened[1]
    assert wait_for(lambda: opened[1].closed, 5) and opened[1].quit_sent  # the idle sweep
    assert pool.open == 0


def test_a_session_that_met_an_error_is_not_reused(tmp_path: Path) -> None:
    opened: list[FakeConn] = []

    def connect() -> Any:
        opened.append(FakeConn())
        return opened[-1]

    pool = SmtpPool(connect, size=1, max_age=60, max_letters=100, idle=5, wait=1)
    with pytest.raises(UnicodeEncodeError), pool.session():
        raise UnicodeEncodeError("ascii", "é", 0, 1, "no")
    assert opened[0].closed
    with pool.session() as conn:
        assert conn is opened[1]


def test_a_thread_that_finds_every_session_busy_waits_then_gives_up_in_time() -> None:
    pool = SmtpPool(FakeConn, size=1, max_age=60, max_letters=100, idle=5, wait=0.2)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with pool.session():
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    with pytest.raises(TransientDeliveryError, match="busy"), pool.session():
        pass
    release.set()
    holder.join()


def test_a_relay_that_allows_fewer_connections_gets_the_ones_we_have_reused() -> None:
    """The relay answers a third connection "421 too many connections": the thread waits for
    one of the two sessions the pool has, and its letter is not deferred for it."""
    opened: list[FakeConn] = []

    def connect() -> Any:
        if sum(not c.closed for c in opened) >= 2:
            raise smtplib.SMTPConnectError(421, b"4.7.0 Error: too many connections")
        opened.append(FakeConn())
        return opened[-1]

    pool = SmtpPool(connect, size=4, max_age=60, max_letters=100, idle=60, wait=5)
    got: list[Any] = []

    def send() -> None:
        with pool.session() as conn:
            got.append(conn)

    with contextlib.ExitStack() as held:
        ours = [held.enter_context(pool.session()) for _ in range(2)]
        waiter = threading.Thread(target=send)
        waiter.start()
        assert wait_for(lambda: pool.ceiling == 2, 5)  # refused a third: it waits for ours
        assert got == []
    waiter.join(5)
    assert len(got) == 1 and got[0] in ours and len(opened) == 2
    with pool.session() as conn:  # within SMTP_CONNECTION_MAX_AGE, still at most two
        assert conn in ours


def test_a_421_with_no_session_of_ours_open_holds_the_process_not_each_letter() -> None:
    """Other processes hold every connection the relay allows: the first 421 holds every
    thread of this one (doubling holds), then one thread tries. Letters that wait too long are
    deferred as ours (no attempt counted); the relay sees a few refused connections, not one
    per letter."""
    tries: list[float] = []
    allowed = threading.Event()

    def connect() -> Any:
        tries.append(time.monotonic())
        if not allowed.is_set():
            raise smtplib.SMTPConnectError(421, b"4.7.0 Error: too many connections")
        return FakeConn()

    pool = SmtpPool(connect, size=4, max_age=60, max_letters=100, idle=5, wait=1)
    pool.HOLD_FIRST = 0.2
    deferred: list[TransientDeliveryError] = []

    def send() -> None:
        try:
            with pool.session():
                pass
        except TransientDeliveryError as exc:
            deferred.append(exc)

    def letters(n: int) -> None:
        threads = [threading.Thread(target=send) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    letters(8)
    assert len(deferred) == 8 and all(exc.ours and exc.retry_after for exc in deferred)
    assert 1 < len(tries) <= 4  # at 0, 0.2, 0.6 s: one thread at a time, not one per letter
    assert pool.open == 0
    allowed.set()  # another process's sessions closed
    pool.wait = 5
    letters(8)
    assert len(deferred) == 8  # none more: they waited for the hold, then for one session
    assert pool.opened == 1


def test_a_session_left_idle_is_closed_with_no_traffic_to_close_it() -> None:
    conn = FakeConn()
    pool = SmtpPool(lambda: conn, size=1, max_age=60, max_letters=100, idle=0.2, wait=1)
    with pool.session():
        pass
    assert wait_for(lambda: conn.closed, 5) and conn.quit_sent
    assert pool.open == 0 and pool.idle == []


class FakeConn:
    def __init__(self) -> None:
        self.sock: Any = object()
        self.quit_sent = self.closed = False

    def noop(self) -> tuple[int, bytes]:
        return 250, b"ok"

    def quit(self) -> None:
        self.quit_sent = True

    def close(self) -> None:
        self.closed = True
        self.sock = None


class RefusingDataConn(FakeConn):
    """A session whose server refuses the DATA command itself (smtplib raises for that)."""

    def mail(self, sender: str) -> tuple[int, bytes]:
        return 250, b"2.1.0 Ok"

    def rcpt(self, recipient: str) -> tuple[int, bytes]:
        return 250, b"2.1.5 Ok"

    def data(self, data: bytes) -> tuple[int, bytes]:
        raise smtplib.SMTPDataError(554, b"5.5.1 Error: no valid recipients")

    def rset(self) -> tuple[int, bytes]:
        return 250, b"2.0.0 Ok"


def test_a_refusal_of_the_data_command_is_the_letters_and_keeps_the_session(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    from workers.letters.mail import PermanentDeliveryError

    smtp = mailer(tmp_path, smtp_sink)
    opened: list[RefusingDataConn] = []
    smtp.pool.connect = lambda: opened.append(RefusingDataConn()) or opened[-1]
    for _ in range(2):
        with pytest.raises(PermanentDeliveryError, match="no valid recipients"):
            smtp.send(MAIL)
    assert smtp.waiting() == 0 and len(opened) == 1  # no pause; one session for both
