"""Relay policy: what an SMTP answer says about whom it refuses. A refusal of us (our login,
set-up or sender) pauses delivery for the whole process, so that a configuration mistake costs
no letter an attempt and no account a lock-out; one of the letter is the letter's (4xx: try
again; 5xx: no). Why: docs/design.md, "Delivery: sessions, refusals and limits"."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator

import structlog

from workers.letters.mail.mailer import PermanentDeliveryError, TransientDeliveryError
from workers.logging import mask_text, status_of
from workers.wording import one_line

# Told of a pause (its reason, seconds, whether it lasts until someone acts) and of its end
# (None, 0).
Alarm = Callable[..., None]


class RelayPause:
    """When the relay refuses us, no thread of the process tries again for ``first`` seconds,
    doubling with each refusal in a row up to ``LONGEST``; the first letter after is the probe.
    ``alarm`` is told of each pause (its reason, and whether it lasts until someone acts) and of
    its end."""

    LONGEST = 900.0
    RESUME_LOOK = 2.0  # seconds between looks for an operator's `dearmp deliveries resume`

    def __init__(
        self,
        first: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        alarm: Alarm | None = None,
    ) -> None:
        self.first, self.clock, self.alarm = first, clock, alarm
        self.resumed: Callable[[float], bool] | None = getattr(alarm, "resumed", None)
        self.paused_at = 0.0  # wall clock, for the resume
        self.next_look = 0.0
        self.lock = threading.Lock()
        self.one_at_a_time = threading.Lock()
        self.refusing = threading.Lock()
        self.refusals = 0
        self.closed_until = 0.0
        self.reason: str | None = None
        self.letters_accepted = 0
        # recipient -> letters_accepted when a policy answer last refused it (see refused_rcpt)
        self.refused_recipients: dict[str, int] = {}

    def waiting(self) -> float:
        """Seconds until the relay may be tried again (0: now, or an operator resumed)."""
        with self.lock:
            now = self.clock()
            wait = max(0.0, self.closed_until - now)
            if wait <= 0 or self.resumed is None or now < self.next_look:
                return wait
            self.next_look, since = now + self.RESUME_LOOK, self.paused_at
        if not self.resumed(since):  # (outside the lock: a Redis read)
            return wait
        with self.lock:
            self.refusals, self.closed_until, self.reason = 0, 0.0, None
        structlog.get_logger("workers").warning("mail_delivery_resumed", by="operator")
        return 0.0

    def check(self) -> None:
        wait = self.waiting()
        if wait > 0:
            raise TransientDeliveryError(
                f"delivery paused: {self.reason}; next try in {wait:.0f} s",
                retry_after=wait,
                ours=True,
            )

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """One login at a time in the process, and none while paused."""
        with self.one_at_a_time:
            self.check()
            yield

    def refused(self, reason: str, lasting: bool) -> float:
        """The relay refused us: pause, and return for how long. ``lasting``: it will answer the
        same until someone acts (a 5xx to our login or sender, our certificate, our key).
        ``reason`` is logged and kept in Redis, where erasing a supporter does not reach: our
        own words, a server's answer in it only as its :func:`status`."""
        with self.lock:
            self.refusals += 1
            pause: float = min(self.LONGEST, self.first * 2.0 ** (self.refusals - 1))
            self.closed_until = self.clock() + pause
            self.paused_at = time.time()
            self.reason = one_line(mask_text(reason), 200)
        structlog.get_logger("workers").error(
            "mail_delivery_paused",
            reason=self.reason,
            pause_seconds=pause,
            refusals_in_a_row=self.refusals,
        )
        if self.alarm is not None:
            self.alarm(self.reason, pause, lasting)
        return pause

    def refused_once(self, reason: str, lasting: bool) -> float:
        """:meth:`refused`, unless a pause is in force already: threads refused at once are one
        refusal, not one doubling each."""
        with self.refusing:
            return self.waiting() or self.refused(reason, lasting)

    def refused_rcpt(self, recipient: str, reason: str, lasting: bool) -> float | None:
        """A policy answer to RCPT, which may refuse us or this recipient: the first time it is
        taken as ours (pause, and return for how long); refused again after the relay accepted
        other letters, the recipient is the cause (None: the letter's permanent failure)."""
        with self.lock:
            seen = self.refused_recipients.get(recipient)
            if seen is not None and seen < self.letters_accepted:
                return None
            if len(self.refused_recipients) >= 10_000:
                self.refused_recipients.clear()
            self.refused_recipients[recipient] = self.letters_accepted
        return self.refused(reason, lasting)

    def accepted(self) -> None:
        with self.lock:
            self.letters_accepted += 1
            if not self.refusals:
                return
            self.refusals, self.closed_until, self.reason = 0, 0.0, None
        structlog.get_logger("workers").warning("mail_delivery_resumed")
        if self.alarm is not None:
            self.alarm(None, 0.0)


def classify(
    relay: RelayPause, command: str, code: int, answer: bytes | str, recipient: str = ""
) -> Exception:
    """The error for a refusal of ``command`` (MAIL, RCPT, DATA, or SESSION for its set-up):
    421 and 503 wait for a new session; authentication answers and refusals of the session or
    of MAIL FROM pause delivery; at RCPT, :data:`ABOUT_US` words or a 5.7.x may be ours or the
    recipient's (:meth:`RelayPause.refused_rcpt`); otherwise 4xx is transient, 5xx permanent.
    Any other code (a 999, a second 354) refuses nothing: the server is out of protocol, and
    the attempt failed (tried again later)."""
    text = answer_text(answer)
    message = f"{code} {text}"
    if code not in REFUSALS:
        return TransientDeliveryError(f"an answer out of protocol to {command}: {message}")
    if code in OUT_OF_STEP:
        return TransientDeliveryError(message, retry_after=OUT_OF_STEP_WAIT, ours=True)
    permanent = 500 <= code < 600
    words = _unquoted(text)
    about_us = ABOUT_US.search(words)
    # Of the answer, its status and which of our phrases it holds: no words that may quote one.
    reason = f"the mail server refused {REFUSED.get(command, command)}: {status(code, text)}"
    reason += f" ({about_us[0]})" if about_us else ""
    if command != "DATA" and (code in AUTH_PROBLEMS or command in ("MAIL", "SESSION")):
        wait = relay.refused(reason, lasting=permanent)
        return TransientDeliveryError(message, retry_after=wait, ours=True)
    if command == "RCPT" and (about_us or (permanent and words.lstrip().startswith("5.7."))):
        # A 5.7.x without those words may be about the recipient: not lasting until it repeats.
        lasting = permanent and about_us is not None
        pause = relay.refused_rcpt(recipient, reason, lasting)
        if pause is not None:
            return TransientDeliveryError(message, retry_after=pause, ours=True)
    if 400 <= code < 500:
        return TransientDeliveryError(message)
    return PermanentDeliveryError(message)


# The codes that refuse (RFC 5321 4.2.1): 4xx for now, 5xx for good.
REFUSALS = range(400, 600)
# 421 (closing the connection) and 503 (bad sequence of commands) answer the conversation's state.
OUT_OF_STEP = {421, 503}
# Seconds a letter waits after such an answer before it is tried again on a new session.
OUT_OF_STEP_WAIT = 10.0


# What a pause's reason says the relay refused, by the command it answered.
REFUSED = {"SESSION": "our session", "MAIL": "our sender (MAIL FROM)", "RCPT": "us at RCPT TO"}
# Authentication answers: our configuration is wrong, not the letter.
AUTH_PROBLEMS = {530, 534, 535, 538}
# Relays' words (Postfix, Exim, Gmail, Exchange) for a refusal of our own set-up, as whole
# phrases (a quoted address can hold single words), read with quoted addresses taken out.
ABOUT_US = re.compile(
    r"helo command rejected|sender address rejected|client host rejected|relay access denied"
    r"|must issue a starttls command first|authentication required",
    re.IGNORECASE,
)
# What an answer quotes of the envelope: <...>, a quoted string, a bare word holding an "@".
QUOTED = re.compile(r'<(?:"(?:[^"\\]|\\.)*+"|[^<>"])*+>|"(?:[^"\\]|\\.)*+"|(?<!\S)[^\s@]*+@\S*+')


def _unquoted(text: str) -> str:
    """An SMTP answer without the addresses it quotes: the relay's own words."""
    return QUOTED.sub(" ", text)


def status(code: int, answer: bytes | str) -> str:
    """What a pause's reason keeps of a server's answer: its status ("535 5.7.8"), never its
    words, which may quote the letter (the letter keeps them, and is erased with them)."""
    return status_of(f"{code} {answer_text(answer)}") or str(code)


def answer_text(answer: bytes | str) -> str:
    """A server's answer as we keep and show it: outside text, on one line (:func:`one_line`)."""
    return one_line(answer.decode(errors="replace") if isinstance(answer, bytes) else answer, 500)
