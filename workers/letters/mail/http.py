"""Mailgun's raw-MIME API: the same signed bytes go as they are; 429 and 5xx are worth trying
again (after Retry-After); 401, 403 and 404 refuse our key or domain, and a redirect (never
followed) says EMAIL_API_URL is wrong: either pauses delivery as a relay's refusal of our login
does (:class:`RelayPause`); any other refusal is the letter's. Its answer is read capped
(:func:`read_capped`): a 2xx is sent, whatever its body (sending again could send twice)."""

from __future__ import annotations

import threading
import time
from email.utils import parsedate_to_datetime

import requests
import urllib3

from config.settings import Settings
from workers.database.models import utcnow
from workers.letters.mail.mailer import (
    Mailer,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from workers.letters.mail.relay import Alarm, RelayPause, answer_text

# Answers about our account (a wrong key, a domain it does not hold), not the letter.
REFUSING_US = {401, 403, 404}
ANSWER_CAP = 8 * 1024  # bytes of the API's answer read: its answers are a few hundred
ANSWER_PIECE = 16 * 1024  # bytes decoded at a time
# A server's Retry-After is honoured up to this (years left a letter pending, never overdue).
LONGEST_RETRY_AFTER = 3600.0


class ThreadSessions(threading.local):
    """A ``requests`` session for each thread that uses it (one is not safe to share)."""

    def __init__(
        self, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.session = requests.Session()
        self.session.auth = auth
        self.session.headers.update(headers or {})


class HttpMailer(Mailer):
    """Mailgun's ``messages.mime`` API, a ``requests`` session per thread."""

    name = "http"

    def __init__(self, settings: Settings, alarm: Alarm | None = None) -> None:
        if not settings.email_api_key or not settings.email_api_domain:
            raise ValueError("the http mail backend needs EMAIL_API_KEY and EMAIL_API_DOMAIN")
        api, domain = settings.email_api_url.rstrip("/"), settings.email_api_domain
        self.url = f"{api}/v3/{domain}/messages.mime"
        self.timeout = (min(5.0, settings.email_api_timeout), settings.email_api_timeout)
        self.sessions = ThreadSessions(auth=("api", settings.email_api_key.get_secret_value()))
        self.relay = RelayPause(settings.smtp_pause, alarm=alarm)

    def waiting(self) -> float:
        return self.relay.waiting()

    def probe(self) -> str | None:
        """Why no letter could go (the API unreachable, or refusing our key or domain); None
        when it accepts us. Asked with an empty POST to the endpoint letters go to, which sends
        nothing (a 400 for the missing message: the key and domain were accepted); a domain
        sending key may do nothing else."""
        try:
            with self.sessions.session.post(
                self.url, timeout=self.timeout, stream=True, allow_redirects=False
            ) as answer:
                status = answer.status_code  # the answer's body is not read
        except requests.RequestException as exc:
            return f"cannot reach the email API ({type(exc).__name__})"
        if status in REFUSING_US:
            return f"the email API refuses our key or domain (HTTP {status}): check EMAIL_API_*"
        if status in (400, 429) or status < 300:  # the missing message, or busy: it took us
            return None
        return f"the email API answered HTTP {status}: check EMAIL_API_URL"

    def send(self, mail: Outgoing) -> str:
        self.relay.check()
        try:
            response = self.sessions.session.post(
                self.url,
                data={"to": mail.recipients},
                files={"message": ("message.eml", mail.data, "message/rfc822")},
                timeout=self.timeout,
                stream=True,
                allow_redirects=False,  # a 302 made a GET of it, a 307 sent it elsewhere
            )
        except requests.RequestException as exc:
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc
        start, unread = read_capped(response, ANSWER_CAP, self.timeout[1])
        answer = f"{response.status_code} {answer_text(start.decode(errors='replace')[:500])}"
        if response.status_code < 300:  # its status is the answer: the API took the letter
            self.relay.accepted()
            return answer if unread is None else f"{answer.rstrip()} ({unread})"
        if response.status_code in REFUSING_US or response.status_code < 400:
            status = f"HTTP {response.status_code}"
            why = f"the email API refuses our key or domain ({status}): check EMAIL_API_KEY and "
            why += "EMAIL_API_DOMAIN"
            if response.status_code < 400:  # a redirect: the same for every letter
                answer = f"{answer.rstrip()} (redirects are not followed: check EMAIL_API_URL)"
                why = f"the email API redirects us ({status}, not followed): check EMAIL_API_URL"
            wait = self.relay.refused_once(why, lasting=True)
            raise TransientDeliveryError(answer, retry_after=wait, ours=True)
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientDeliveryError(answer, retry_after=retry_after(response))
        raise PermanentDeliveryError(answer)


def read_capped(response: requests.Response, cap: int, seconds: float) -> tuple[bytes, str | None]:
    """A streamed answer's body, decoded as its Content-Encoding says, at most ``cap`` bytes of
    it, and why it was not read whole if it was not: longer than ``cap`` (a decompression bomb
    is decoded a piece at a time, never past the cap), not over ``seconds`` after the call (a
    body trickling in holds a thread no longer, a read's own wait aside), or cut short. The
    response is closed, whatever is left of it unread."""
    deadline = time.monotonic() + seconds
    body, unread = bytearray(), None
    with response:
        try:
            # read1: what has come (iter_content would wait for a whole piece)
            while piece := response.raw.read1(ANSWER_PIECE, decode_content=True):
                body += piece
                if len(body) > cap:
                    unread = f"an answer longer than {cap:,} bytes"
                    break
                if time.monotonic() > deadline:
                    unread = f"an answer not over in {seconds:g} s"
                    break
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            unread = f"an answer cut short ({type(exc).__name__})"
    return bytes(body[:cap]), unread


def retry_after(answer: requests.Response | str | None) -> float | None:
    """Seconds from a Retry-After header (of a response, or its value), given as seconds or as
    an HTTP date, at most :data:`LONGEST_RETRY_AFTER`; None if there is none or it cannot be
    read."""
    value = answer.headers.get("Retry-After") if isinstance(answer, requests.Response) else answer
    if not value:
        return None
    if value.strip().isascii() and value.strip().isdigit():  # "²" is a digit float() refuses
        return min(float(value), LONGEST_RETRY_AFTER)
    try:
        seconds = (parsedate_to_datetime(value) - utcnow()).total_seconds()
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(0.0, seconds), LONGEST_RETRY_AFTER)
