"""Prometheus metrics for what dramatiq does not measure: queues, dead letters, outcomes, the
outbox. Collected on each scrape from Redis and the database, so one ``dearmp metrics`` process
answers for every worker; dramatiq's per-actor metrics come from its Prometheus middleware
(``DEARMP_WORKER_METRICS=true``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from workers.database.engine import session_scope
from workers.database.models import (
    InboundMessage,
    InboundStatus,
    LetterEvent,
    OutboxItem,
    OutboxStatus,
    Submission,
)
from workers.mp import health
from workers.outbox import sending as outbox
from workers.outbox.kinds import KINDS
from workers.pipeline.dead_letters import dead_counts, mail_pause, queue_depths
from workers.pipeline.states import STATES


class DearmpCollector(Collector):
    def __init__(
        self, client: redis.Redis, namespace: str, sessions: sessionmaker[Session]
    ) -> None:
        self.client, self.namespace, self.sessions = client, namespace, sessions

    def collect(self) -> Iterator[Metric]:
        queues = GaugeMetricFamily(
            "dearmp_queue_messages", "Messages per queue and status", labels=["queue", "status"]
        )
        depths = queue_depths(self.client, self.namespace, dead_counts(self.sessions))
        for depth in depths:
            for status in ("waiting", "delayed", "in_progress", "dead"):
                queues.add_metric([depth.queue, status], getattr(depth, status))
        yield queues
        yield GaugeMetricFamily(
            "dearmp_mail_paused",
            "1 while the relay's refusal of us pauses delivery",
            value=1 if mail_pause(self.client, self.namespace) else 0,
        )

        with session_scope(self.sessions) as session:
            by_state: Any = session.execute(
                select(Submission.state, func.count()).group_by(Submission.state)
            ).all()
            letters: Any = session.execute(
                select(Submission.campaign_slug, OutboxItem.status, func.count())
                .join(OutboxItem, OutboxItem.id == Submission.id)
                .where(OutboxItem.status.in_(["sent", "failed"]))
                .group_by(Submission.campaign_slug, OutboxItem.status)
            ).all()
            after: Any = session.execute(
                select(Submission.campaign_slug, LetterEvent.kind, func.count())
                .join(Submission, Submission.id == LetterEvent.submission_id)
                .group_by(Submission.campaign_slug, LetterEvent.kind)
            ).all()
            failing = health.failing_count(session)
            emails = outbox.counts(session)
            held = session.scalar(
                select(func.count())
                .select_from(InboundMessage)
                .where(InboundMessage.status == InboundStatus.HELD)
            )
        states = GaugeMetricFamily("dearmp_submissions", "Submissions per state", labels=["state"])
        counts = dict(by_state)
        for state in STATES:  # every state of the table, 0 when none is in it
            states.add_metric([state.value], counts.get(state.value, 0))
        yield states
        sent = CounterMetricFamily(
            "dearmp_letters", "Letters sent and failed per campaign", labels=["campaign", "outcome"]
        )
        for campaign, status, count in letters:
            sent.add_metric([campaign, status], count)
        yield sent
        returned = CounterMetricFamily(
            "dearmp_letter_events",
            "What came back to letters per campaign: bounce, delay, delivered, auto_reply, "
            "reply, survey",
            labels=["campaign", "event"],
        )
        for campaign, kind, count in after:
            returned.add_metric([campaign, kind], count)
        yield returned
        sending = GaugeMetricFamily(
            "dearmp_outbox",
            "Emails to supporters per kind and status (every kind, 0 when none)",
            labels=["kind", "status"],
        )
        for kind in KINDS:
            for status in OutboxStatus:
                sending.add_metric([kind, status.value], emails.get((kind, status.value), 0))
        yield sending
        yield GaugeMetricFamily(
            "dearmp_failing_addresses",
            "MP addresses marked failing (their letters are held)",
            value=failing,
        )
        yield GaugeMetricFamily(
            "dearmp_held_replies",
            "Replies held for an operator: not plausibly from the MP's office",
            value=held or 0,
        )
