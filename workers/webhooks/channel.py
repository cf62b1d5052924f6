"""The webhook channel: sign a body (Standard Webhooks, with every secret valid now) and POST it.

2xx is sent; 408, 429, 5xx, a timeout or a connection error is a passing failure (the outbox
retries it with backoff and gives up after its limit); anything else, a redirect included (never
followed), is permanent. Reasons name the endpoint by id: a URL may carry a token in its path,
and the receiver's exception texts carry the URL.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from standardwebhooks.webhooks import Webhook

from workers.letters.mail import PermanentDeliveryError, TransientDeliveryError

ANSWER_CAP = 1024  # bytes of an answer read, at most: nobody reads it
PASSING = frozenset({408, 429})
# A webhook held back by others just sent waits this long (they are likely answered by then).
BUSY_WAIT = 1.0


@dataclass(frozen=True)
class Request:
    """One webhook ready to send; ``webhook_id`` is the outbox item's id, the same on every
    attempt and every replay, so a receiver can drop what it has seen."""

    endpoint_id: int
    url: str
    webhook_id: str
    body: bytes
    secrets: tuple[str, ...]


def signed_headers(request: Request, at: datetime) -> dict[str, str]:
    signatures = " ".join(
        Webhook(s).sign(request.webhook_id, at, request.body) for s in request.secrets
    )
    return {
        "content-type": "application/json",
        "user-agent": "DearMP-Webhooks/1",
        "webhook-id": request.webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
    }


class HttpChannel:
    """POSTs webhooks with a ``requests.Session`` per thread (dramatiq runs threads).

    Worker threads serve every queue, so an endpoint that hangs must not hold many of them: a
    process sends at most ``in_flight`` webhooks to one endpoint at a time, and after a passing
    failure sends it nothing for ``pause`` seconds. A webhook held back meanwhile is a refusal
    of our side (``ours``): given back uncounted, it waits (the relay's pause, for email)."""

    def __init__(
        self, timeout: float, in_flight: int = 2, pause: float = 30.0, all_in_flight: int = 4
    ) -> None:
        self.timeout = (min(timeout, 5.0), timeout)  # (connect, each read)
        self.in_flight, self.pause = in_flight, pause
        # Across every endpoint: endpoints that hang hold at most this many of a process's
        # threads (8 by default), the rest stay for letters and emails.
        self.all_in_flight = all_in_flight
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sending: dict[int, list[float]] = {}  # endpoint: when each webhook to it began
        self._until: dict[int, float] = {}  # endpoint: nothing sent to it before this

    def waiting(self) -> float:
        return 0.0  # each endpoint answers for itself: nothing pauses the others

    def paused(self, endpoint: int) -> float:
        """Seconds before ``endpoint`` is sent anything again (0: now): the rest of its pause
        after a failure, or, while too many webhooks are unanswered (``in_flight`` to it,
        ``all_in_flight`` to all), a moment if they began just now, else the time the oldest
        may still take (asked sooner, a webhook would only wait again)."""
        with self._lock:
            return self._wait(endpoint)

    def _wait(self, endpoint: int) -> float:
        """(Called with the lock held.)"""
        now = time.monotonic()
        wait = self._until.get(endpoint, 0.0) - now
        if wait > 0:
            return wait
        mine = self._sending.get(endpoint, [])
        every = [began for began_all in self._sending.values() for began in began_all]
        busy = mine if len(mine) >= self.in_flight else every
        if len(mine) < self.in_flight and len(every) < self.all_in_flight:
            return 0.0
        waited = now - min(busy)
        return BUSY_WAIT if waited < BUSY_WAIT else max(self.timeout[1] - waited, BUSY_WAIT)

    def send(self, request: Request, /) -> int:
        """The receiver's status; raises a *DeliveryError for any other answer."""
        endpoint = request.endpoint_id
        with self._lock:
            wait = self._wait(endpoint)
            if wait > 0:
                raise TransientDeliveryError("endpoint held back", wait, ours=True)
            began = time.monotonic()
            self._sending.setdefault(endpoint, []).append(began)
        try:
            return self._post(request)
        except PermanentDeliveryError:
            raise  # this webhook's own answer
        except BaseException:  # a passing failure, or the actor's time limit (a receiver that
            self._pause(endpoint)  # answers a byte at a time outlasts each read's timeout)
            raise
        finally:
            with self._lock:
                self._sending[endpoint].remove(began)

    def _pause(self, endpoint: int) -> None:
        with self._lock:
            self._until[endpoint] = time.monotonic() + self.pause

    def _post(self, request: Request) -> int:
        http: requests.Session | None = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = requests.Session()
        headers = signed_headers(request, datetime.now(UTC))
        where = f"endpoint {request.endpoint_id}"
        try:
            with http.post(
                request.url,
                data=request.body,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            ) as answer:
                next(answer.iter_content(ANSWER_CAP), b"")  # a little of it, then closed
                status = answer.status_code
        except requests.Timeout:
            raise TransientDeliveryError(f"{where}: no answer in time") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as exc:
            raise PermanentDeliveryError(f"{where}: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise TransientDeliveryError(f"{where}: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return status
        if status in PASSING or status >= 500:
            raise TransientDeliveryError(f"{where} answered HTTP {status}")
        followed = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise PermanentDeliveryError(f"{where} answered HTTP {status}{followed}")
