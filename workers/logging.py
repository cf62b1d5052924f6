"""structlog JSON events, with the submission id bound per message and personal data kept out.

Code logs fixed event names with ids and counts only. As a second line of defence, a processor
masks anything shaped like an email address or a UK postcode in any logged value.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

# Linear time on any input: a local part is matched only from the start of a run of its
# characters (the lookbehind), and possessively, so no run is scanned twice.
EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]++@[\w-]++(?:\.[\w-]++)+")
# A postcode begins a word, or follows an escaped line break in repr'd text ("...\\nDM1 1AA").
POSTCODE_RE = re.compile(
    r"(?:(?<=\\[nrt])|\b)[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}\b", re.IGNORECASE
)
# A server's status where its answer begins (the text's start, or after ": ", "; ", "HTTP " or
# a DSN's status): SMTP's code and enhanced code, or HTTP's.
STATUS_RE = re.compile(
    r"(?:^|[:;] |\bHTTP |\b[245]\.\d{1,3}\.\d{1,3} )"
    r"([245]\d\d)\b(?:[ -]([245]\.\d{1,3}\.\d{1,3})\b)?"
)
# Longer values are cut before masking: nothing the code logs is this long.
MAX_LOGGED = 2_000


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) > MAX_LOGGED:  # a traceback's last line says what happened: kept
            value = value[: MAX_LOGGED // 2] + "[...]" + value[-MAX_LOGGED // 2 :]
        return POSTCODE_RE.sub("[postcode]", EMAIL_RE.sub("[email]", value))
    return value


class MessageIdsOnly(logging.Filter):
    """dramatiq's own log lines about a message show its arguments: show its id instead, and
    its exception by its type and where it was raised, not its text, which can quote a
    submission (the failures table keeps the whole traceback: ``dearmp dlq show``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.args, tuple) or not any(_is_message(a) for a in record.args):
            return True
        record.args = tuple(
            f"message {getattr(a, 'message_id', '')}" if _is_message(a) else a for a in record.args
        )
        if record.exc_info and record.exc_info[0]:
            kind, error, trace = record.exc_info
            frames = traceback.extract_tb(trace) if trace is not None else []
            ours = [f for f in frames if f"{os.sep}workers{os.sep}" in f.filename] or frames
            where = "".join(
                f" at {Path(f.filename).name}:{f.lineno} in {f.name}" for f in ours[-1:]
            )
            # The database's or the network's own words say what failed, and quote no one (the
            # engine hides statements' parameters).
            plumbing = kind.__module__.split(".")[0] in PLUMBING or (
                issubclass(kind, OSError) and kind.__module__ == "builtins"
            )  # (smtplib's and requests' errors are OSErrors too: a server's words)
            # Its first line: PostgreSQL's DETAIL (a key's, a failing row's values) comes after.
            said = f": {str(error).splitlines()[0][:300]}" if plumbing and str(error) else ""
            record.msg = f"{record.getMessage()} ({kind.__qualname__}{where}{said})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


# Whose exceptions' first line is logged (and the builtin OSErrors'): databases and connections,
# which say what failed without what they carried. Not a mail server's: it can quote the letter.
PLUMBING = frozenset({"sqlalchemy", "psycopg", "sqlite3", "redis"})


def _is_message(value: Any) -> bool:
    return hasattr(value, "message_id") and hasattr(value, "actor_name")


def answer_logged(text: str) -> str:
    """What logs carry of an error a server answered: its status ("451 4.7.1"; "503" for "HTTP
    503"), never its words, which may quote a supporter's name or letter (the database keeps
    them, erased with the supporter). Text with no status is no server's answer but a failed
    connection's, in our words or a library's: carried as it is, masked."""
    return status_of(text) or mask_text(text)[:200]


def status_of(text: str) -> str | None:
    """The status a server's answer in ``text`` gives ("550 5.1.1"), if it gives one."""
    found = STATUS_RE.search(text)
    return " ".join(filter(None, found.groups())) if found else None


def mask_text(text: str) -> str:
    """Emails and postcodes replaced by placeholders."""
    return str(_mask(text))


def mask_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        event_dict[key] = _mask(value)
    return event_dict


SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class Lines:
    """The one writer of a process's log records, ours and the libraries', each written whole
    under one lock (two writers on one stream let records share a line). Without a stream of
    its own it writes to ``sys.stderr`` as it is at each record (a test runner swaps it)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, record: str) -> None:
        stream = self.stream or sys.stderr
        with self.lock:
            stream.write(record + "\n")
            stream.flush()

    # structlog calls the method named for the level with the rendered record.
    def msg(self, message: str) -> None:
        self.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Bind ``values`` to every log event of this block, then put back what was bound before
    (structlog's ``bound_contextvars``, without its copy of the whole context: a hot path)."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """JSON lines on stderr (or ``stream``) for our events, the libraries' logs, warnings, and
    exceptions nobody caught."""
    lines = Lines(stream)
    rendered: list[Any] = [
        structlog.processors.format_exc_info,
        mask_personal_data,
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=[*SHARED_PROCESSORS, *rendered],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=lambda *_: lines,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(lines)  # the standard library's records, through Lines
    handler.terminator = ""  # Lines ends each record
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*SHARED_PROCESSORS, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendered],
        )
    )
    handler.addFilter(MessageIdsOnly())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if level == "INFO" else level)
    # The SMTP receiver's lines below a warning quote every line received, letters included.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # the warnings module's lines too
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread


def _uncaught(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    """An exception nobody caught, as one JSON event instead of a printed traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    structlog.get_logger("workers").critical("uncaught_exception", exc_info=(kind, error, trace))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    structlog.get_logger("workers").critical(
        "uncaught_exception",
        thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
