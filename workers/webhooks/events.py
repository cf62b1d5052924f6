"""Webhook events: an outbox item per endpoint that wants one, written in the fact's transaction
and sent on after its commit (one not sent, the reconciler finds). An item's key,
``<event>:<endpoint>[:<discriminator>]``, is unique per submission, so a second run of an actor
adds nothing. The enabled endpoints are kept per database for :data:`REFRESH` seconds: with none,
an event (every state move) costs a lookup and no statement."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from schemas.webhooks import DATA
from workers.database.engine import dialect_insert
from workers.database.models import OUTBOX, State, Submission, WebhookEndpoint, new_id
from workers.pipeline import dispatch
from workers.pipeline.dramatiq_private import installed_broker
from workers.pipeline.states import STATES
from workers.stages.stage import Stage

KIND = "webhook"  # outbox.kind of every webhook
EVENTS = tuple(DATA)  # every event's name, in the order of schemas.webhooks
# A letter returned and sent again is delivered (or returned) again: each move is its own event.
RECURRING = ("letter.delivered", "letter.bounced")
REFRESH = 5.0  # seconds an emitting process keeps its list of endpoints
_QUEUED = "workers.webhooks.queued"  # session.info: the items this transaction wrote


class Wanted(NamedTuple):
    endpoint_id: int
    campaign: str | None
    events: frozenset[str]


_endpoints: WeakKeyDictionary[Engine, tuple[float, tuple[Wanted, ...]]] = WeakKeyDictionary()
_lock = threading.Lock()


def forget() -> None:
    """Read the endpoints again at the next event (``dearmp webhooks`` changed them)."""
    with _lock:
        _endpoints.clear()


def wanting(session: Session, event_name: str) -> list[Wanted]:
    """The enabled endpoints that want ``event_name`` (of any campaign)."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    kept, now = _endpoints.get(engine), time.monotonic()
    if kept is None or now - kept[0] > REFRESH:
        columns = (WebhookEndpoint.id, WebhookEndpoint.campaign_slug, WebhookEndpoint.events)
        rows = session.execute(select(*columns).where(WebhookEndpoint.enabled.is_(True)))
        kept = (now, tuple(Wanted(i, c, frozenset(e.split())) for i, c, e in rows))
        with _lock:
            _endpoints[engine] = kept
    return [wanted for wanted in kept[1] if event_name in wanted.events]


def on_move(
    session: Session, submission: Any, to_state: State, at: datetime, writes: Any = None
) -> None:
    """The event a state move is, if the table of states names one (``advance`` calls this)."""
    name = STATES[to_state].event
    if name is not None:
        key = str(int(at.timestamp() * 1000)) if name in RECURRING else ""
        campaign = getattr(submission, "campaign_slug", None)
        emit(session, name, submission.id, key, campaign=campaign, writes=writes)


def emit(
    session: Session,
    event_name: str,
    submission_id: str,
    discriminator: str = "",
    *,
    campaign: str | None = None,
    inbound_id: str | None = None,
    writes: Any = None,
) -> None:
    """Write the event's item for each endpoint that wants it, in ``session``'s transaction (or
    with a group's ``writes``: :class:`workers.database.transitions.GroupWrites`)."""
    wanted = wanting(session, event_name)
    if not wanted:
        return
    if campaign is None and any(w.campaign for w in wanted):
        campaign = session.scalar(
            select(Submission.campaign_slug).where(Submission.id == submission_id)
        )
    rows = [  # the other columns are their defaults (pending, due now)
        {
            "id": new_id(),
            "submission_id": submission_id,
            "key": ":".join(filter(None, (event_name, str(w.endpoint_id), discriminator))),
            "kind": KIND,
            "inbound_id": inbound_id,
            "endpoint_id": w.endpoint_id,
        }
        for w in wanted
        if w.campaign in (None, campaign)
    ]
    if not rows:
        return
    statement = _insert(session.get_bind().dialect.name)
    if writes is None:
        session.execute(statement, rows)
    else:
        for row in rows:
            writes.insert(statement, row)
    session.info.setdefault(_QUEUED, []).extend(row["id"] for row in rows)


@cache
def _insert(dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING into the outbox: one per dialect, so a group batches it."""
    insert = dialect_insert(dialect, OUTBOX)
    return insert.on_conflict_do_nothing(index_elements=["submission_id", "key"])


@event.listens_for(Session, "after_commit")
def _send_after_commit(session: Session) -> None:
    """The items the transaction wrote, to the webhook queue (one a conflict left unwritten is
    found missing by its actor, which does nothing). Not at a savepoint's release."""
    ids = None if session.get_nested_transaction() else session.info.pop(_QUEUED, None)
    broker = installed_broker()
    if ids and broker is not None:  # no broker in this process: the reconciler sends them
        dispatch.dispatch_groups(broker, {Stage.WEBHOOK: ids})


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    if session.get_nested_transaction() is None:  # a savepoint's: the rest is still to be sent
        session.info.pop(_QUEUED, None)
