"""Bounces made by a real MTA: letters go through Debian's Postfix to a destination that refuses
some MPs' addresses; Postfix itself writes the bounces and delivers them, by its transport
table, to `dearmp inbound`, which stores them for the inbound stage. Worker processes, Redis,
PostgreSQL and the receiver are real processes; nothing is mocked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select

from tests.conftest import make_settings
from tests.factories import submission
from tests.postfix import Postfix
from tests.services import SmtpSink, free_port, wait_for
from tests.test_e2e_redis import Stack
from workers.database.engine import session_scope
from workers.database.models import AddressHealth, InboundMessage, LetterEvent, Submission
from workers.mp.lookup import Found, lookup_local
from workers.pipeline.app import App
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.runtime import prepare, state_counts, submit

pytestmark = [
    pytest.mark.redis,
    pytest.mark.smtp,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

BOUNCES = "bounces.campaign.example.org"
REPLIES = "replies.campaign.example.org"
GOOD = ["DM1 1AA", "DM2 1AA", "DM3 1AA"]
DEAD = "DM4 1AA"  # its MP's address is refused by the MPs' mail server


@pytest.fixture
def destination() -> Iterator[SmtpSink]:
    """The MPs' (and supporters') mail server, beyond the relay."""
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def relay(destination: SmtpSink) -> Iterator[tuple[Postfix, int]]:
    inbound_port = free_port()
    postfix = Postfix(senders=("letters@campaign.example.org", f"@{BOUNCES}"))
    (postfix.base / "transport").write_text(
        f"{BOUNCES} smtp:[127.0.0.1]:{inbound_port}\n{REPLIES} smtp:[127.0.0.1]:{inbound_port}\n"
    )
    postfix.start(
        relayhost=f"[127.0.0.1]:{destination.port}",
        transport_maps=f"texthash:{postfix.base / 'transport'}",
    )
    yield postfix, inbound_port
    postfix.stop()


def test_postfix_bounces_reach_dearmp_inbound_and_return_the_letters(
    tmp_path: Path,
    db_url: str,
    redis_server: EmbeddedRedis,
    relay: tuple[Postfix, int],
    destination: SmtpSink,
) -> None:
    postfix, inbound_port = relay
    app = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(app)
    with session_scope(app.sessions) as session:
        found = lookup_local(session, DEAD)
        assert isinstance(found, Found) and found.member.email
        dead_address = found.member.email
    destination.refuse[dead_address] = (
        f"550 5.1.1 <{dead_address}>: Recipient address rejected: User unknown"
    )
    stack = Stack(
        tmp_path,
        db_url,
        redis_server.url,
        **postfix.environment(
            DEARMP_BOUNCE_DOMAIN=BOUNCES,
            DEARMP_REPLY_DOMAIN=REPLIES,
            DEARMP_INBOUND_PORT=str(inbound_port),
        ),
    )
    broker = RedisBroker(url=redis_server.url, namespace="dearmp")
    try:
        stack.start("worker", "--processes", "1", "--threads", "4")
        stack.start("reconcile")
        stack.start("inbound")
        good = [
            submit(app, broker, submission(supporter__postcode=GOOD[i % 3]))[0] for i in range(6)
        ]
        dead = [submit(app, broker, submission(supporter__postcode=DEAD))[0] for _ in range(3)]
        expected = {"delivered": 6, "bounced": 3}
        assert wait_for(lambda: state_counts(app, good + dead) == expected, 120), (
            f"{postfix.log()[-3000:]}\n{stack.log_text()[-3000:]}"
        )

        def told() -> list[str]:
            return [
                str(m["To"])
                for m in destination.received.messages
                if "was returned" in str(m["Subject"])
            ]

        assert wait_for(lambda: len(told()) == 3, 60), stack.log_text()[-3000:]
        with session_scope(app.sessions) as session:
            bounced = session.scalars(select(LetterEvent).where(LetterEvent.kind == "bounce")).all()
            assert sorted(e.submission_id for e in bounced) == sorted(dead)
            assert {e.status for e in bounced} == {"5.1.1"}
            assert all("User unknown" in (e.detail or "") for e in bounced)
            assert all(dead_address not in (e.detail or "") for e in bounced)
            rows = session.scalars(select(InboundMessage)).all()
            assert len(rows) == 3 and {r.source for r in rows} == {"smtp"}
            assert all(r.status == "done" and r.raw is None for r in rows)
            health = session.get(AddressHealth, dead_address.lower())
            assert health is not None and health.status == "failing"
            states = session.scalars(select(Submission.state).where(Submission.id.in_(good)))
            assert set(states) == {"delivered"}
        # Every letter reached the destination once; each bounced letter's supporter told once.
        letters = Counter(
            str(m["Message-ID"])
            for m in destination.received.messages
            if "notice-" not in str(m["Message-ID"])
        )
        assert sorted(letters) == sorted(f"<{sid}@campaign.example.org>" for sid in good)
        assert set(letters.values()) == {1}
        # A new letter to the failing address is held, not sent.
        held = submit(app, broker, submission(supporter__postcode=DEAD))[0]
        assert wait_for(lambda: state_counts(app, [held]) == {"held": 1}, 60)
    finally:
        stack.stop()
        app.engine.dispose()
