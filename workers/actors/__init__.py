"""The pipeline actors: five stages and the sender-confirmation email. Import to declare them.

``dramatiq workers.actors`` (or ``dearmp worker``) runs them; the broker module is imported first
so every actor is declared on the configured broker.
"""

from workers.actors.consent import log_submission_consent
from workers.actors.delivery import deliver_submission
from workers.actors.notify import notify_submission
from workers.actors.rendering import render_submission
from workers.actors.resolution import resolve_submission
from workers.actors.validation import validate_submission
from workers.broker import broker

__all__ = [
    "broker",
    "deliver_submission",
    "log_submission_consent",
    "notify_submission",
    "render_submission",
    "resolve_submission",
    "validate_submission",
]
