"""The database is the source of truth: every submission's state lives here, Redis is transport."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The states and which are final: the pipeline's table (workers.pipeline.states).
from workers.pipeline.states import FINAL_STATES as FINAL_STATES
from workers.pipeline.states import State as State


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every database (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # SQLAlchemy reads this class attribute.
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}  # noqa: RUF012


class Campaign(Base):
    """A campaign as loaded from its definition file; the letter template travels with it."""

    __tablename__ = "campaigns"

    slug: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    definition_sha256: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16), default="sandbox")
    # Paused by an operator: its letters wait, held, until `dearmp campaigns resume`.
    paused_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DirectoryVersion(Base):
    """One snapshot of constituencies and MPs, and the postcode set it uses; one is current.
    Postcodes are stored once per postcode import, shared by the MP refreshes built on them."""

    __tablename__ = "directory_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(200))
    is_current: Mapped[bool] = mapped_column(Boolean, default=False)
    # The version whose rows in ``postcodes`` this version uses (itself after a postcode import).
    postcodes_version_id: Mapped[int | None] = mapped_column(Integer)
    # Parliament dissolved for a general election: no seat has an MP until a new version.
    dissolved: Mapped[bool] = mapped_column(Boolean, default=False)
    # What changed from the version before (new MPs, vacancies, changed emails).
    changes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Constituency(Base):
    __tablename__ = "constituencies"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("directory_versions.id", ondelete="CASCADE"), primary_key=True
    )
    gss_code: Mapped[str] = mapped_column(String(9), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    country: Mapped[str] = mapped_column(String(40))
    member_id: Mapped[int | None] = mapped_column(Integer)


class Member(Base):
    __tablename__ = "members"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("directory_versions.id", ondelete="CASCADE"), primary_key=True
    )
    member_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    party: Mapped[str] = mapped_column(String(100), default="")
    email: Mapped[str | None] = mapped_column(String(254))
    phone: Mapped[str | None] = mapped_column(String(40))


class Postcode(Base):
    __tablename__ = "postcodes"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("directory_versions.id", ondelete="CASCADE"), primary_key=True
    )
    postcode: Mapped[str] = mapped_column(String(8), primary_key=True)
    gss_code: Mapped[str | None] = mapped_column(String(9))
    terminated: Mapped[bool] = mapped_column(Boolean, default=False)


class Submission(Base):
    """A supporter's submission and where it is in the pipeline."""

    __tablename__ = "submissions"
    __table_args__ = (
        UniqueConstraint("campaign_slug", "idempotency_key", name="uq_submissions_idempotency"),
        Index("ix_submissions_state_updated", "state", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    campaign_slug: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=State.RECEIVED)
    # What the front end posted (personal data). The raw client IP is never stored.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    client_ip_hash: Mapped[str | None] = mapped_column(String(64))
    # Keyed hash of the normalised email: finds a supporter's submissions for export and erasure.
    supporter_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    # Keyed hash of the body as posted: a reused idempotency key with another body is refused.
    body_hash: Mapped[str | None] = mapped_column(String(64))
    # Outcome details: per-field reasons for a rejection, an explanation for a failure.
    rejection: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    directory_version_id: Mapped[int | None] = mapped_column(Integer)
    constituency_code: Mapped[str | None] = mapped_column(String(9))
    member_id: Mapped[int | None] = mapped_column(Integer)
    # "local" (the directory version above) or "live" (postcodes.io and the Members API).
    resolved_via: Mapped[str | None] = mapped_column(String(16))
    # The MP as resolved (name, email, constituency): what rendering addresses the letter to.
    recipient: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    consent_logged_at: Mapped[datetime | None] = mapped_column()
    # Retention: letter body and postal address scrubbed; erasure: every personal detail removed.
    scrubbed_at: Mapped[datetime | None] = mapped_column()
    erased_at: Mapped[datetime | None] = mapped_column()
    # Sender confirmation (campaigns that ask for it): the click (the emails are in the outbox).
    confirmed_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Last time a stage message was sent for this submission: the reconciler's clock.
    dispatched_at: Mapped[datetime] = mapped_column(default=utcnow)

    events: Mapped[list[SubmissionEvent]] = relationship(
        order_by="SubmissionEvent.id", cascade="all, delete-orphan"
    )


class SubmissionEvent(Base):
    """The history of a submission's state transitions."""

    __tablename__ = "submission_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text)


class Letter(Base):
    """The rendered letter: written once, never changed."""

    __tablename__ = "letters"

    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), primary_key=True
    )
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    subject: Mapped[str] = mapped_column(String(300))
    body_text: Mapped[str | None] = mapped_column(Text)
    body_html: Mapped[str | None] = mapped_column(Text)
    from_name: Mapped[str] = mapped_column(String(300))
    from_email: Mapped[str] = mapped_column(String(254))
    reply_to: Mapped[str | None] = mapped_column(String(254))
    to_name: Mapped[str] = mapped_column(String(200))
    # Indexed: an MP address's recent bounces are counted by it (workers.mp.health).
    to_email: Mapped[str] = mapped_column(String(254), index=True)
    content_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The DKIM-Signature header, made once at rendering so every attempt sends the same bytes.
    dkim_signature: Mapped[str | None] = mapped_column(Text)
    # Headers an MP's office can sort on: the campaign (List-Id), the share in own words (%).
    list_id: Mapped[str | None] = mapped_column(Text)
    own_words: Mapped[int | None] = mapped_column(Integer)


class LetterPrint(Base):
    """A letter's fingerprint (:mod:`workers.stages.comparison`): its share of own words, its
    MinHash signature and the near-identical letters found. Deleted with the letter's text;
    a letter sent in a digest keeps its row without the signature, as the digest's record."""

    __tablename__ = "letter_prints"

    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), primary_key=True
    )
    campaign_slug: Mapped[str] = mapped_column(String(200), index=True)  # a campaign's report
    member_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    own_words: Mapped[float] = mapped_column(Float)
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)  # None once erased or scrubbed
    # Near-identical letters to the same MP within the comparison window, and the hold window.
    similar: Mapped[int] = mapped_column(Integer, default=0)
    similar_recent: Mapped[int] = mapped_column(Integer, default=0)
    decision: Mapped[str] = mapped_column(String(16))  # "send", "hold" or "digest"
    # The MP's daily digest that carries this letter (decision "digest"), once it is made.
    digest_id: Mapped[str | None] = mapped_column(String(36), index=True)


class PrintCount(Base):
    """How many letters to an MP had one signature in one hour: what the comparison stage counts
    near-identical letters with. Kept in step with the letters' fingerprints."""

    __tablename__ = "print_counts"
    __table_args__ = (Index("ix_print_counts_member_hour", "member_id", "hour"),)

    member_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    signature: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    hour: Mapped[datetime] = mapped_column(primary_key=True)  # the hour the letters were compared
    letters: Mapped[int] = mapped_column(Integer)


class Digest(Base):
    """One day's digest of a campaign's near-identical letters to one MP (its id is its outbox
    item's); composed from its letters' rows, it holds no personal data itself."""

    __tablename__ = "digests"
    __table_args__ = (
        Index("ix_digests_campaign_member_created", "campaign_slug", "member_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    campaign_slug: Mapped[str] = mapped_column(String(200))
    member_id: Mapped[int] = mapped_column(Integer)
    to_name: Mapped[str] = mapped_column(String(200))
    to_email: Mapped[str] = mapped_column(String(254))
    letters: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsentEvent(Base):
    """The consent ledger: append-only, each event chained to the one before by its hash. The
    supporter and client address are keyed hashes, so the proof outlives erasure."""

    __tablename__ = "consent_events"
    # Lookups by submission or supporter use these indexes' first columns: no index of their own
    # (random keys: each would be one more page written per event).
    __table_args__ = (
        UniqueConstraint("submission_id", "channel", name="uq_consent_submission"),
        Index("ix_consent_events_supporter_channel", "supporter_hash", "channel", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    submission_id: Mapped[str | None] = mapped_column(String(36))
    supporter_hash: Mapped[str] = mapped_column(String(64))
    # "preference" (a choice on a form), "mp_notice" (told their details go to the MP),
    # "withdrawal" (a later change of mind), "erasure" (their details were erased).
    event_type: Mapped[str] = mapped_column(String(16), default="preference")
    campaign_slug: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    choice: Mapped[str] = mapped_column(String(16))
    wording_version: Mapped[str] = mapped_column(String(64))
    wording: Mapped[str | None] = mapped_column(Text)
    wording_sha256: Mapped[str] = mapped_column(String(64))
    lawful_basis: Mapped[str] = mapped_column(String(40))
    privacy_notice_version: Mapped[str | None] = mapped_column(String(64))
    source_url: Mapped[str | None] = mapped_column(Text)
    user_agent: Mapped[str | None] = mapped_column(Text)
    ip_hash: Mapped[str | None] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64), unique=True)


class Failure(Base):
    """A message's last failed attempt in full, kept when it is dead-lettered (one row per
    dramatiq message id)."""

    __tablename__ = "failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    queue_name: Mapped[str] = mapped_column(String(100))
    actor_name: Mapped[str] = mapped_column(String(100), index=True)
    submission_id: Mapped[str | None] = mapped_column(String(64), index=True)
    exception_type: Mapped[str] = mapped_column(String(200))
    exception_message: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    first_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    dead_lettered_at: Mapped[datetime | None] = mapped_column(index=True)
    # When an operator put the dead letter back on its queue (it no longer needs attention).
    requeued_at: Mapped[datetime | None] = mapped_column()


class PurgedDeadLetter(Base):
    """A dead letter an operator deleted: what it was, and when."""

    __tablename__ = "purged_dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64), index=True)
    queue_name: Mapped[str] = mapped_column(String(100))
    actor_name: Mapped[str] = mapped_column(String(100))
    submission_id: Mapped[str | None] = mapped_column(String(64), index=True)
    reason: Mapped[str | None] = mapped_column(String(200))
    dead_at: Mapped[datetime] = mapped_column()
    purged_at: Mapped[datetime] = mapped_column(default=utcnow)


class LookupCache(Base):
    """Answers from live sources (postcodes.io, the Members API), kept for a time to live."""

    __tablename__ = "lookup_cache"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class InboundStatus(StrEnum):
    RECEIVED = "received"  # stored, waiting for the inbound actor
    DONE = "done"  # classified and acted on
    DROPPED = "dropped"  # recorded with a reason, acted on nothing
    HELD = "held"  # a reply not plausibly from the MP's office: kept for an operator
    FAILED = "failed"  # raised every time it was processed: given up, with the reason


class InboundMessage(Base):
    """Mail (or a provider's event) received for a letter's address, stored before ``250``. The
    raw message is kept only until acted on; the outcome stays, with nothing personal."""

    __tablename__ = "inbound_messages"
    __table_args__ = (Index("ix_inbound_messages_status_dispatched", "status", "dispatched_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # "smtp" (dearmp inbound) or "mailgun" (the webhook)
    source: Mapped[str] = mapped_column(String(16))
    # The provider's own id for an event: the same event posted twice is stored once.
    external_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    # The address of ours it came to (a letter's return or reply address).
    recipient: Mapped[str] = mapped_column(String(254))
    peer_hash: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer, default=0)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default=InboundStatus.RECEIVED)
    # What it was: bounce, delay, delivered, auto_reply, reply, or what was wrong with it.
    kind: Mapped[str | None] = mapped_column(String(24))
    submission_id: Mapped[str | None] = mapped_column(String(36), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime] = mapped_column(default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column()
    # Times processing it raised; at DEARMP_MAX_DEAD_LETTERS it is failed, its text kept.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class WebhookToken(Base):
    """A Mailgun signature's token, kept while its timestamp is accepted: seen again, a replay."""

    __tablename__ = "webhook_tokens"

    token: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class LetterEvent(Base):
    """What happened to a letter after it was sent (bounce, delay, auto-reply, reply, survey
    answer). No personal data: a diagnostic, a status code, an answer."""

    __tablename__ = "letter_events"
    __table_args__ = (
        # One survey answer per letter: a second answer updates it (the latest is kept).
        Index(
            "uq_letter_events_survey",
            "submission_id",
            unique=True,
            sqlite_where=text("kind = 'survey'"),
            postgresql_where=text("kind = 'survey'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(24))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    inbound_id: Mapped[str | None] = mapped_column(String(36))


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # no longer needed (a reply came first), or nobody to send it to


class OutboxItem(Base):
    """One thing DearMP sends (the letter, whose item has its submission's id; a notice; a
    webhook), at most once (:mod:`workers.outbox`): a key unique per submission, claimed first."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("submission_id", "key", name="uq_outbox_submission_key"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    submission_id: Mapped[str] = mapped_column(ForeignKey("submissions.id", ondelete="CASCADE"))
    # "letter", "confirm", "reminder", "bounce", "survey", "survey-reminder",
    # "forward:<reply's hash>", "webhook:<event>:<endpoint>"
    key: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(24))
    inbound_id: Mapped[str | None] = mapped_column(String(36))
    # A webhook (kind "webhook"): the endpoint it goes to (workers.webhooks).
    endpoint_id: Mapped[int | None] = mapped_column(Integer, index=True)
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims
    # Failed attempts: at DEARMP_OUTBOX_MAX_ATTEMPTS the item is failed, never resent.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # After a failed attempt: not tried again before this (exponential backoff).
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    claimed_at: Mapped[datetime | None] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column()
    response: Mapped[str | None] = mapped_column(Text)  # the server's answer when it took it
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    """Where a CRM hears of its events, signed with its secret (and the previous one until
    ``previous_until``)."""

    __tablename__ = "webhook_endpoints"
    # An id is never used again (items name their endpoint by it), on SQLite too.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(2000))
    campaign_slug: Mapped[str | None] = mapped_column(String(200))  # None: every campaign
    events: Mapped[str] = mapped_column(Text)  # event names, space-separated
    personal_data: Mapped[bool] = mapped_column(Boolean, default=False)
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_until: Mapped[datetime | None] = mapped_column()
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AddressHealth(Base):
    """An MP address that returned letters for good: while failing, new letters to it are held."""

    __tablename__ = "address_health"

    email: Mapped[str] = mapped_column(String(254), primary_key=True)  # lower case
    member_id: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # "failing" or "ok"
    bounces: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


def table(model: type[Base]) -> Table:
    """A mapped class's table, for Core statements (the stages' reads and writes)."""
    return cast(Table, model.__table__)


SUBMISSIONS = table(Submission)
EVENTS = table(SubmissionEvent)
CAMPAIGNS = table(Campaign)
LETTERS = table(Letter)
OUTBOX = table(OutboxItem)
CONSENT_EVENTS = table(ConsentEvent)
ADDRESS_HEALTH = table(AddressHealth)
LETTER_PRINTS = table(LetterPrint)
PRINT_COUNTS = table(PrintCount)
