"""What every mail backend is: a :class:`Mailer` sends an :class:`Outgoing` or raises one of
the two delivery errors, which say whether trying again can help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class TransientDeliveryError(Exception):
    """Worth trying again later: connection trouble, a timeout, SMTP 4xx, HTTP 429 or 5xx.
    ``ours``: the refusal is about our side (too many sessions, our login paused), not the
    letter, so it does not count as one of the letter's attempts."""

    def __init__(self, message: str, retry_after: float | None = None, ours: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.ours = ours


class PermanentDeliveryError(Exception):
    """Trying again will not help: SMTP 5xx, HTTP 4xx. Recorded, then left for an operator."""


@dataclass(frozen=True)
class Outgoing:
    """One letter ready for the wire: envelope and the exact bytes to send."""

    sender: str
    recipients: list[str]
    data: bytes
    message_id: str


class Mailer(Protocol):
    """A backend; one that subclasses it never waits and holds nothing open by default."""

    name: str

    def send(self, mail: Outgoing) -> str:
        """Hand the letter over; return the server's answer. Raises a *DeliveryError."""
        ...

    def waiting(self) -> float:
        """Seconds before letters should be handed over again (0: now)."""
        return 0.0

    def close(self) -> None:
        """End what the backend holds open (a worker shutting down)."""
        return None
