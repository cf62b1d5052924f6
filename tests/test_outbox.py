"""The outbox: every email to a supporter (confirmations and their reminders, bounce notices,
forwarded replies, surveys and their reminders) claimed, sent once, retried with backoff, given
up with its reason masked, and taken over after the lease, one way for every kind; on SQLite
and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

from workers.database.engine import session_scope
from workers.letters.mail import Mailer
from workers.outbox import sending as outbox
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App


def no_wait(app: App) -> outbox.OutboxPolicy:
    """The App's outbox policy without the backoff: each attempt due at once."""
    return replace(outbox_for(app)[1], first_backoff=0)


def send_item(
    app: App, item_id: str, mailer: Mailer | None = None, policy: outbox.OutboxPolicy | None = None
) -> None:
    """What the outbox stage does with one item."""
    every_kind, default = outbox_for(app)
    with session_scope(app.sessions) as session:
        outbox.send(session, item_id, mailer or app.mailer, every_kind, policy or default)
