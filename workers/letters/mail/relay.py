"""Relay policy: what an SMTP answer says about whom it refuses, and what follows. An answer
that refuses us (our login, our set-up, our sender: a relay's words for them, or a policy
answer at RCPT) pauses delivery for the whole process (:class:`RelayPause`), so that a mistake
in configuration costs no letter an attempt and no account a lock-out; one that refuses the
letter is the letter's, to try again (4xx) or not (5xx); one about the session's state is
neither (:func:`classify`). Kept apart from the SMTP transport, which only reports answers."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator

import structlog

from workers.letters.mail.mailer import PermanentDeliveryError, TransientDeliveryError
from workers.logging import mask_text


class RelayPause:
    """When the relay refuses us rather than a letter (our login; its certificate failing our
    TLS verification; our HELO name, sender address or right to relay: an answer to EHLO or
    MAIL FROM, or one to RCPT in a relay's words for our set-up or of policy), no thread of the
    process tries again for a while: ``first`` seconds (``SMTP_PAUSE_SECONDS``, 30 by default),
    doubling with each refusal in a row up to 15 minutes. Letters wait meanwhile
    (:meth:`waiting`), costing none of their attempts; the first letter after the pause is the
    probe, and its success ends the pause. A wrong password tried by every thread
    for every letter is the burst that gets an account locked; a sender refusal would fail every
    letter for a mistake in configuration. ``alarm`` is told of each pause and of its end (the
    deployment's operators see it in ``dearmp health`` and the metrics), with the relay's
    answer as its reason, email addresses and postcodes masked: an answer quoting a recipient
    would otherwise show a supporter's or an MP's address to everyone who runs ``health``."""

    LONGEST = 900.0

    def __init__(
        self,
        first: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        alarm: Callable[[str | None, float], None] | None = None,
    ) -> None:
        self.first, self.clock, self.alarm = first, clock, alarm
        self.lock = threading.Lock()
        self.one_at_a_time = threading.Lock()
        self.refusals = 0
        self.closed_until = 0.0
        self.reason: str | None = None
        self.letters_accepted = 0
        # recipient -> letters_accepted when a policy answer last refused it (see refused_rcpt)
        self.refused_recipients: dict[str, int] = {}

    def waiting(self) -> float:
        """Seconds until the relay may be tried again (0: now)."""
        with self.lock:
            return max(0.0, self.closed_until - self.clock())

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
        """One login at a time in the process, and none while paused: the threads that wanted
        to log in with the first refusal do not each try the same password."""
        with self.one_at_a_time:
            self.check()
            yield

    def refused(self, reason: str) -> float:
        """The relay refused us: pause, and return for how long."""
        with self.lock:
            self.refusals += 1
            pause: float = min(self.LONGEST, self.first * 2.0 ** (self.refusals - 1))
            self.closed_until = self.clock() + pause
            self.reason = mask_text(reason)[:200]
        structlog.get_logger("workers").error(
            "mail_delivery_paused",
            reason=self.reason,
            pause_seconds=pause,
            refusals_in_a_row=self.refusals,
        )
        if self.alarm is not None:
            self.alarm(self.reason, pause)
        return pause

    def refused_rcpt(self, recipient: str, reason: str) -> float | None:
        """A policy answer (5.7.x) to RCPT, or one in a relay's words for our set-up there
        ("Sender address rejected", "Helo command rejected", which a relay's rule for one
        recipient can give too): it may refuse us (our right to relay, our sender) or this
        recipient ("Recipient address rejected: Access denied"), and its words do not say
        which. The first time it is taken as ours: pause, and return for how long. When the
        same recipient is refused again after the relay accepted other letters, the recipient
        is the cause: None (the letter's own permanent failure, with no pause)."""
        with self.lock:
            seen = self.refused_recipients.get(recipient)
            if seen is not None and seen < self.letters_accepted:
                return None
            if len(self.refused_recipients) >= 10_000:
                self.refused_recipients.clear()
            self.refused_recipients[recipient] = self.letters_accepted
        return self.refused(reason)

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
    """The error for a refusal of ``command`` (MAIL, RCPT, DATA, or SESSION for the
    session's set-up).

    - 421 and 503 answer the session's state, not the letter: it waits, then a new session.
    - Any other answer at DATA judges the letter (its content, its authentication: "5.7.26
      Unauthenticated email", "5.7.515 ... authentication level", spam): the letter's own,
      whatever its words.
    - A refusal of us pauses delivery (:class:`RelayPause`): the authentication answers
      and any refusal of setting up the session (EHLO, STARTTLS) or of our MAIL FROM.
    - At RCPT, an answer in a relay's words about our own set-up (:data:`ABOUT_US`, read
      with the addresses it quotes taken out: Postfix's "Helo command rejected" comes at
      RCPT) or a 5.7.x (security or policy: relaying, authorization) may refuse us or this
      recipient: it pauses delivery unless the relay has shown that it refuses only this
      recipient (:meth:`RelayPause.refused_rcpt`).
    - Otherwise 4xx is worth trying again and 5xx is the letter's permanent failure
      ("550 5.1.1 no such mailbox")."""
    text = answer_text(answer)
    message = f"{code} {text}"
    if code in OUT_OF_STEP:
        return TransientDeliveryError(message, retry_after=OUT_OF_STEP_WAIT, ours=True)
    permanent = 500 <= code < 600
    if command != "DATA" and (code in AUTH_PROBLEMS or command in ("MAIL", "SESSION")):
        return TransientDeliveryError(message, retry_after=relay.refused(message), ours=True)
    words = _unquoted(text)
    if command == "RCPT" and (
        ABOUT_US.search(words) or (permanent and words.lstrip().startswith("5.7."))
    ):
        pause = relay.refused_rcpt(recipient, message)
        if pause is not None:
            return TransientDeliveryError(message, retry_after=pause, ours=True)
    if 400 <= code < 500:
        return TransientDeliveryError(message)
    return PermanentDeliveryError(message)


# 421: the server is closing the connection. 503: "bad sequence of commands", an answer to the
# state of the conversation (which we caused), not to the letter: the letter is tried again on a
# new connection.
OUT_OF_STEP = {421, 503}
# Seconds a letter waits after such an answer before it is tried again on a new session.
OUT_OF_STEP_WAIT = 10.0


# Authentication answers: our configuration is wrong, not the letter.
AUTH_PROBLEMS = {530, 534, 535, 538}
# A relay's words for a refusal of our own set-up rather than of the letter, as whole phrases
# (never single words, which a quoted address can hold: "<helo@example.com>", "<a@tls.example>").
# Postfix's smtpd writes "<%s>: Helo command rejected: ...", "<%s>: Sender address rejected:
# ...", "Client host rejected: cannot find your hostname, [%s]", "<%s>: Relay access denied"
# and "530 5.7.0 Must issue a STARTTLS command first" (Gmail's and Exim's words too); Gmail and
# Exchange answer "Authentication required". Read in an answer to RCPT only (see
# classify), with the addresses it quotes taken out (_unquoted).
ABOUT_US = re.compile(
    r"helo command rejected|sender address rejected|client host rejected|relay access denied"
    r"|must issue a starttls command first|authentication required",
    re.IGNORECASE,
)
# What an answer quotes of the envelope: <...> (its inside may hold a quoted local part, with
# spaces, ">" or "<"), a quoted string, and a bare word holding an "@".
QUOTED = re.compile(r'<(?:"(?:[^"\\]|\\.)*+"|[^<>"])*+>|"(?:[^"\\]|\\.)*+"|(?<!\S)[^\s@]*+@\S*+')


def _unquoted(text: str) -> str:
    """An SMTP answer without the addresses it quotes: the relay's own words."""
    return QUOTED.sub(" ", text)


def answer_text(answer: bytes | str) -> str:
    return answer.decode(errors="replace") if isinstance(answer, bytes) else answer
