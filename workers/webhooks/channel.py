"""The webhook channel: sign a body (Standard Webhooks, with every secret valid now) and POST it.
2xx is sent; 408, 429, 5xx, a timeout or a connection error is a passing failure (the endpoint is
then paused, as long as its Retry-After asks if longer, up to an hour as :func:`retry_after` reads
it); anything else, a redirect included (never followed), is permanent; a 410 also disables the
endpoint (Standard Webhooks).
Reasons name the endpoint by id, never by its URL, which may carry a token. No webhook goes to an
address written in the URL that no CRM has (:func:`unsafe_host`)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from standardwebhooks.webhooks import Webhook
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from workers.letters.mail import PermanentDeliveryError, TransientDeliveryError
from workers.letters.mail.http import ThreadSessions, retry_after

BUSY_WAIT = 1.0  # a webhook held back by others just sent waits this long
GONE = "answered HTTP 410 (gone)"
# Clouds' metadata services outside the link-local ranges (AWS's IPv6 one, Alibaba's).
METADATA = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))
UNSAFE = "its host is an address no CRM has (link-local, a cloud's metadata, multicast, reserved)"


def unsafe_host(url: str) -> bool:
    """Whether ``url``'s host, read as requests connects to it (urllib3's reading, where a
    backslash ends the host), is an address no CRM has: link-local (169.254.169.254), a cloud's
    metadata service, multicast, unspecified or reserved, in any form the resolver reads
    (``2852039166``, ``0xa9.254.169.254``, ``::ffff:169.254.169.254``, a trailing dot). Loopback
    and private addresses are a CRM's; a name is not resolved. An unreadable URL is unsafe."""
    try:
        host = (parse_url(url).host or "").strip("[]").rstrip(".")
    except LocationParseError:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address in METADATA or (
        not address.is_loopback
        and (
            address.is_link_local
            or address.is_multicast
            or address.is_unspecified
            or address.is_reserved
        )
    )


@dataclass(frozen=True)
class Request:
    """One webhook; ``webhook_id`` is the outbox item's id, the same on every attempt and
    replay, so a receiver can drop what it has seen."""

    endpoint_id: int
    url: str
    webhook_id: str
    body: bytes
    secrets: tuple[str, ...]


class HttpChannel:
    """POSTs webhooks, a ``requests.Session`` per thread. Worker threads serve every queue, so a
    process sends at most ``in_flight`` webhooks to one endpoint and ``all_in_flight`` to all at
    a time, and nothing to an endpoint for ``pause`` seconds after a passing failure. A webhook
    held back is a refusal of our side (``ours``): given back uncounted, it waits."""

    def __init__(
        self, timeout: float, in_flight: int = 2, pause: float = 30.0, all_in_flight: int = 4
    ) -> None:
        self.timeout = (min(timeout, 5.0), timeout)  # (connect, each read)
        self.in_flight, self.all_in_flight, self.pause = in_flight, all_in_flight, pause
        self.sessions = ThreadSessions()
        self._lock = threading.RLock()
        self._sending: dict[int, list[float]] = {}  # endpoint: when each webhook to it began
        self._until: dict[int, float] = {}  # endpoint: nothing sent to it before this

    def waiting(self) -> float:
        return 0.0  # each endpoint answers for itself: nothing pauses the others

    def paused(self, endpoint: int) -> float:
        """Seconds before ``endpoint`` is sent anything (0: now): the rest of its pause, or, while
        too many webhooks are in flight, what the oldest may still take (a moment if it just
        began: asked sooner, a webhook would only wait again)."""
        now = time.monotonic()
        with self._lock:
            if (wait := self._until.get(endpoint, 0.0) - now) > 0:
                return wait
            mine = self._sending.get(endpoint, [])
            every = [began for all_began in self._sending.values() for began in all_began]
            if len(mine) < self.in_flight and len(every) < self.all_in_flight:
                return 0.0
            waited = now - min(mine if len(mine) >= self.in_flight else every)
        return BUSY_WAIT if waited < BUSY_WAIT else max(self.timeout[1] - waited, BUSY_WAIT)

    def send(self, request: Request, /) -> int:
        """The receiver's status; raises a *DeliveryError for any other answer."""
        endpoint = request.endpoint_id
        with self._lock:
            if (wait := self.paused(endpoint)) > 0:
                raise TransientDeliveryError("endpoint held back", wait, ours=True)
            began = time.monotonic()
            self._sending.setdefault(endpoint, []).append(began)
        try:
            return self._post(request)
        except PermanentDeliveryError:
            raise  # this webhook's own answer
        except BaseException as exc:  # passing, or the actor's time limit (a trickling receiver)
            asked = getattr(exc, "retry_after", None) or 0.0
            with self._lock:
                self._until[endpoint] = time.monotonic() + max(self.pause, asked)
            raise
        finally:
            with self._lock:
                self._sending[endpoint].remove(began)

    def _post(self, request: Request) -> int:
        at, where = datetime.now(UTC), f"endpoint {request.endpoint_id}"
        if unsafe_host(request.url):
            raise PermanentDeliveryError(f"{where}: {UNSAFE}")
        signed = (Webhook(s).sign(request.webhook_id, at, request.body) for s in request.secrets)
        headers = {
            "content-type": "application/json",
            "user-agent": "DearMP-Webhooks/1",
            "webhook-id": request.webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": " ".join(signed),
        }
        try:
            with self.sessions.session.post(
                request.url,
                data=request.body,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            ) as answer:
                # The status is the answer: the body is not read (closed unread, a body cut
                # short, trickling or reset after it changes nothing and holds no thread).
                status, asked = answer.status_code, retry_after(answer)
        except requests.Timeout:
            raise TransientDeliveryError(f"{where}: no answer in time") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as exc:
            raise PermanentDeliveryError(f"{where}: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise TransientDeliveryError(f"{where}: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return status
        if status in (408, 429) or status >= 500:
            raise TransientDeliveryError(f"{where} answered HTTP {status}", retry_after=asked)
        if status == 410:
            raise PermanentDeliveryError(f"{where} {GONE}")
        followed = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise PermanentDeliveryError(f"{where} answered HTTP {status}{followed}")
