"""Logs: structlog JSON with ids bound, and personal data masked even if a caller slips."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from workers.logging import answer_logged, bound, configure_logging, mask_text


@pytest.fixture(autouse=True)
def _logging_to_stderr_after() -> Iterator[None]:
    """A test here points the logs at a stream of its own, and may close it: the tests that
    run after it in the same process log to stderr again."""
    yield
    configure_logging()


def test_events_are_json_with_bound_context_and_masked_personal_data() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    structlog.contextvars.bind_contextvars(submission_id="abc")
    try:
        structlog.get_logger("t").info("oops", detail="from jo.bloggs@example.com at SW1A 1AA")
    finally:
        structlog.contextvars.clear_contextvars()
    event = json.loads(out.getvalue().splitlines()[-1])
    assert event["event"] == "oops" and event["submission_id"] == "abc"
    assert event["detail"] == "from [email] at [postcode]"


def test_bound_ids_are_in_the_block_s_events_and_what_was_bound_before_comes_back() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    log = structlog.get_logger("t")
    structlog.contextvars.bind_contextvars(stage="render", submission_id="the message's")
    try:
        with bound(submission_id="one"):
            log.info("inside")
            try:
                with bound(submission_id="two", extra=1):
                    raise ValueError
            except ValueError:
                pass
            log.info("after_an_error")
        log.info("outside")
    finally:
        structlog.contextvars.clear_contextvars()
    events = [json.loads(line) for line in out.getvalue().splitlines()[-3:]]
    assert [(e["event"], e["submission_id"], e["stage"]) for e in events] == [
        ("inside", "one", "render"),
        ("after_an_error", "one", "render"),
        ("outside", "the message's", "render"),
    ]
    assert all("extra" not in e for e in events)


class Writes(io.StringIO):
    """A stream that keeps each write call: what reaches a pipe in one system call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_record_is_written_whole_in_one_call() -> None:
    """A worker process's log goes through a pipe to dramatiq's parent, which copies what it
    reads from every child to one stream: a record written in two calls (its text, then its
    line end) can meet another child's record in between."""
    import logging

    out = Writes()
    configure_logging("INFO", stream=out)
    structlog.get_logger("t").warning("ours", padding="x" * 200)
    logging.getLogger("dramatiq.worker").warning("theirs %s", "y" * 200)
    assert len(out.calls) == 2
    for call in out.calls:
        assert call.endswith("\n") and call.count("\n") == 1
        json.loads(call)


def test_concurrent_records_from_structlog_and_the_standard_library_keep_a_line_each(
    tmp_path: Path,
) -> None:
    import logging
    import threading

    path = tmp_path / "log.jsonl"
    out = path.open("a", buffering=1)  # as `dearmp demo` and `run` write their log
    configure_logging("INFO", stream=out)
    start = threading.Barrier(8)

    def ours() -> None:
        start.wait()
        for i in range(100):
            structlog.get_logger("t").warning("ours", i=i, padding="x" * 200)

    def theirs() -> None:
        start.wait()
        for i in range(100):
            logging.getLogger("dramatiq.worker").warning("theirs %d %s", i, "y" * 200)

    threads = [threading.Thread(target=f) for f in (ours, theirs) * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 8 * 100
    events = [json.loads(line) for line in lines]  # each line one whole record
    assert {e["event"].split()[0] for e in events} == {"ours", "theirs"}


def test_a_long_value_keeps_its_start_and_its_end() -> None:
    """A traceback longer than what is logged keeps its last line: what happened."""
    trace = "Traceback (most recent call last):\n" + "  frame\n" * 1000 + "ValueError: the end"
    logged = mask_text(trace)
    assert logged.startswith("Traceback") and logged.endswith("ValueError: the end")
    assert "[...]" in logged and len(logged) < 2_100


def test_a_postcode_after_an_escaped_line_break_is_masked_too() -> None:
    """A repr'd letter in an exception's text has ``\\n`` before each line of the address."""
    assert mask_text(repr("Millbrook\nDM1 1AA\nsw1a1aa")) == "'Millbrook\\n[postcode]\\n[postcode]'"
    assert mask_text("in DM10 ONE, DM1 1AAB") == "in DM10 ONE, DM1 1AAB"  # not postcodes


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        ("451 4.3.0 Message from Amira Haddad deferred", "451 4.3.0"),
        ("TransientDeliveryError: 550-5.7.1 'Dear Sir' looks like spam", "550 5.7.1"),
        ("PermanentDeliveryError: 400 {'from': 'Amira Haddad'}", "400"),
        ("TransientDeliveryError: endpoint 3 answered HTTP 503", "503"),
        ("TransientDeliveryError: endpoint 3: no answer in time", None),
        ("TransientDeliveryError: ConnectionRefusedError: [Errno 111] to relay:465", None),
    ],
)
def test_a_servers_answer_is_logged_as_its_status_never_its_words(
    error: str, logged: str | None
) -> None:
    """An answer can quote the letter's sender or words; without a status it is no answer but
    a failed connection, in our words or a library's, and is logged as it is."""
    assert answer_logged(error) == (logged or error)


def test_a_failed_message_is_logged_by_its_exceptions_type_and_place_not_its_text() -> None:
    """dramatiq logs a message that failed with its traceback, whose last line can quote the
    submission; the failures table keeps that, the log its type and where it was raised."""
    import logging

    import dramatiq

    stream = io.StringIO()
    configure_logging(stream=stream)
    message = dramatiq.Message("dearmp.render", "render_submission", ("sid-1",), {}, {})
    try:
        raise RuntimeError("Dear Ms Smith, I live at 1 High Street")
    except RuntimeError:
        logging.getLogger("dramatiq.worker.WorkerThread").error(
            "Failed to process message %s with unhandled exception.", message, exc_info=True
        )
    [event] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert event["event"].startswith(f"Failed to process message message {message.message_id}")
    assert "(RuntimeError at test_logging.py:" in event["event"]
    assert "High Street" not in stream.getvalue() and "exception" not in event


def test_at_debug_the_smtp_receiver_does_not_log_the_lines_it_receives() -> None:
    import logging

    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    logging.getLogger("mail.log").debug("DATA readline: %r", b"7 Marmalade Cottages\r\n")
    logging.getLogger("mail.log").info("%r >> %r", ("127.0.0.1", 1), b"RCPT TO:<b-x@example.org>")
    logging.getLogger("mail.log").warning("%r too many bogus commands", ("127.0.0.1", 1))
    logged = stream.getvalue()
    assert "Marmalade" not in logged and "RCPT" not in logged and "bogus" in logged


def test_a_failed_message_keeps_a_databases_own_words_and_no_one_elses() -> None:
    """A database's or a connection's error says what failed without what it carried: its
    first line is kept (PostgreSQL's DETAIL line after it can quote a row); any other's text,
    a mail server's included, is not."""
    import logging

    import dramatiq
    from sqlalchemy.exc import OperationalError

    stream = io.StringIO()
    configure_logging(stream=stream)
    message = dramatiq.Message("dearmp.render", "render_submission", ("sid-1",), {}, {})
    import smtplib

    locked = OperationalError("UPDATE x", {}, Exception("database is locked"))
    row = OperationalError("INSERT", {}, Exception("not null\nDETAIL:  Failing row (Amira)"))
    refused = smtplib.SMTPDataError(554, b"Message from Amira refused")  # an OSError too
    for error in (
        locked,
        ConnectionRefusedError(111, "Connection refused"),
        KeyError("Amira"),
        row,
        refused,
    ):
        try:
            raise error
        except Exception:
            logging.getLogger("dramatiq.worker.WorkerThread").error(
                "Failed to process message %s.", message, exc_info=True
            )
    said = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert "(OperationalError at test_logging.py:" in said[0] and "database is locked" in said[0]
    assert "Connection refused" in said[1]
    assert "(KeyError at test_logging.py:" in said[2] and "Amira" not in said[2]
    assert "not null" in said[3] and "Amira" not in said[3]  # PostgreSQL's DETAIL: values
    assert "(SMTPDataError at test_logging.py:" in said[4] and "Amira" not in said[4]
