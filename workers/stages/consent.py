"""Consent logging: one event per channel for every valid submission, whatever delivery does."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from sqlalchemy import bindparam, exists, select
from sqlalchemy.orm import Session

from schemas.submission import CHANNELS
from workers.database.models import EVENTS, SUBMISSIONS, State, utcnow
from workers.database.transitions import (
    Apply,
    current,
    done,
    guarded_update,
    one,
    submission_read,
    writes_of,
)
from workers.letters.definitions import get_definition
from workers.pipeline.states import reached_only_through
from workers.privacy.hashing import supporter_hash
from workers.privacy.ledger import append, hold
from workers.webhooks.events import emit

# The record that the supporter was told their details go to their MP.
MP_NOTICE = "mp_notice"


_WAS_VALIDATED = select(
    exists().where(
        EVENTS.c.submission_id == bindparam("id"), EVENTS.c.state == State.VALIDATED.value
    )
)
# States only a validated submission reaches (others, like rejected, may come before or after).
PAST_VALIDATION = reached_only_through(State.VALIDATED)
_MARK_LOGGED = guarded_update(
    SUBMISSIONS.c.consent_logged_at.is_(None), {"consent_logged_at": bindparam("v_at")}
)
_READ = submission_read("consent_logged_at", "payload", "client_ip_hash")


def page_of(url: str | None) -> str | None:
    """The page that asked, as the ledger keeps it: without the query, fragment or credentials,
    which can carry the supporter's address or an id (the ledger outlives erasure)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL one can read ("http://[x/p"): what comes before a query
        page = url.split("?", 1)[0].split("#", 1)[0]
        return None if "@" in page else page
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()


def log_consent(session: Session, submission_id: str, secret: bytes) -> int:
    """Record the submission's consent choices once; returns how many events were written."""
    return one(session, submission_id, lambda s, sid: plan(s, sid, secret))


def plan(session: Session, submission_id: str, secret: bytes) -> Apply[int]:
    """The submission's consent events, to be chained onto the ledger in the write transaction."""
    submission = current(session, submission_id, _READ)
    if submission is None or submission.consent_logged_at is not None or submission.payload is None:
        return done(0)
    if submission.state not in PAST_VALIDATION and not session.scalar(
        _WAS_VALIDATED, {"id": submission_id}
    ):
        return done(0)
    definition = get_definition(session, submission.campaign_slug, submission.definition_sha256)
    if definition is None:
        return done(0)
    payload = submission.payload
    prefs = payload["contact_preferences"]
    common = {
        "submission_id": submission_id,
        "supporter_hash": supporter_hash(secret, payload["supporter"]["email"]),
        "campaign_slug": submission.campaign_slug,
        "wording_version": prefs["wording_version"],
        "lawful_basis": definition.consent.lawful_basis,
        "privacy_notice_version": definition.privacy_notice_version,
        "source_url": page_of(payload.get("source_url")),
        "user_agent": payload.get("user_agent"),
        "ip_hash": submission.client_ip_hash,
        "recorded_at": utcnow(),
    }
    events = []
    for channel in CHANNELS:
        question = definition.consent.question(channel)
        assert question is not None  # checked when the campaign was loaded
        events.append(
            common
            | {
                "event_type": "preference",
                "channel": channel,
                "choice": prefs[channel],
                "wording": question.wording,
                "wording_sha256": question.sha256,
            }
        )
    notice = definition.consent.mp_notice
    events.append(
        common
        | {
            "lawful_basis": "legitimate_interests",
            "event_type": MP_NOTICE,
            "channel": MP_NOTICE,
            "choice": "informed",
            "wording": notice,
            "wording_sha256": hashlib.sha256(notice.encode()).hexdigest(),
        }
    )

    def write(session: Session) -> int:
        hold(session)  # the ledger's lock before any row lock (see workers.privacy.ledger.hold)
        # Then the guarded mark: of two workers logging at once, the second writes nothing.
        # Made with the group's other marks (one UPDATE) and events: they commit together.
        writes = writes_of(session)
        writes.guard(_MARK_LOGGED, {"b_id": submission_id, "v_at": writes.now})
        writes.collect(append, events)
        emit(session, "consent.recorded", submission_id, campaign=submission.campaign_slug,
             writes=writes)  # fmt: skip
        return len(events)

    return write
