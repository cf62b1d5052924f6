"""consent ledger: hash chain, append-only triggers, current preferences view; supporter rights

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 12:00:00
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.engine import Connection

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_POSTGRESQL = [
    """CREATE FUNCTION dearmp_consent_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'consent_events is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END $$""",
    """CREATE TRIGGER consent_events_append_only BEFORE UPDATE OR DELETE ON consent_events
    FOR EACH ROW EXECUTE FUNCTION dearmp_consent_append_only()""",
    """CREATE TRIGGER consent_events_no_truncate BEFORE TRUNCATE ON consent_events
    FOR EACH STATEMENT EXECUTE FUNCTION dearmp_consent_append_only()""",
]
APPEND_ONLY_SQLITE = [
    """CREATE TRIGGER consent_events_no_update BEFORE UPDATE ON consent_events
    BEGIN SELECT RAISE(ABORT, 'consent_events is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER consent_events_no_delete BEFORE DELETE ON consent_events
    BEGIN SELECT RAISE(ABORT, 'consent_events is append-only: DELETE refused'); END""",
]
# The current preference per supporter and channel: the latest event that asked (a form where
# the question was not asked changes nothing), served by ix_consent_events_supporter_channel.
CURRENT_VIEW = """CREATE VIEW consent_current AS
SELECT e.supporter_hash, e.channel, e.choice, e.recorded_at AS since, e.campaign_slug,
       e.wording_version, e.id AS event_id
FROM consent_events e
WHERE e.event_type IN ('preference', 'withdrawal') AND e.choice <> 'not_asked'
  AND NOT EXISTS (
    SELECT 1 FROM consent_events later
    WHERE later.supporter_hash = e.supporter_hash AND later.channel = e.channel
      AND later.event_type IN ('preference', 'withdrawal') AND later.choice <> 'not_asked'
      AND later.id > e.id)"""


def upgrade() -> None:
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "event_type", sa.String(length=16), nullable=False, server_default="preference"
            )
        )
        batch_op.add_column(sa.Column("wording", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("privacy_notice_version", sa.String(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
        batch_op.alter_column("submission_id", existing_type=sa.String(length=36), nullable=True)
        batch_op.create_unique_constraint(batch_op.f("uq_consent_events_hash"), ["hash"])
        batch_op.create_index(
            "ix_consent_events_supporter_channel", ["supporter_hash", "channel", "id"], unique=False
        )
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("supporter_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("scrubbed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_submissions_supporter_hash"), ["supporter_hash"], unique=False
        )

    _seal_unsealed(op.get_bind())
    dialect = op.get_bind().dialect.name
    for statement in APPEND_ONLY_POSTGRESQL if dialect == "postgresql" else APPEND_ONLY_SQLITE:
        op.execute(statement)
    op.execute(CURRENT_VIEW)


# The ledger's hash as it was when this migration was written, frozen here: a migration runs the
# same way whatever the application code becomes (workers.privacy.ledger computes the same).
GENESIS = "0" * 64
HASHED = (
    "submission_id",
    "supporter_hash",
    "event_type",
    "campaign_slug",
    "channel",
    "choice",
    "wording_version",
    "wording",
    "wording_sha256",
    "lawful_basis",
    "privacy_notice_version",
    "source_url",
    "user_agent",
    "ip_hash",
    "recorded_at",
)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):  # UTC, as the models give it (SQLite keeps no zone)
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return moment.isoformat()
    return value


def _event_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    body = json.dumps(
        {name: _plain(fields.get(name)) for name in sorted(HASHED)},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def _seal_unsealed(connection: Connection) -> None:
    """Chain the events written before the ledger had hashes, in id order."""
    table = sa.table(
        "consent_events",
        sa.column("id", sa.Integer()),
        sa.column("hash", sa.String()),
        sa.column("prev_hash", sa.String()),
        *(sa.column(name, sa.DateTime(timezone=True) if name == "recorded_at" else sa.String())
          for name in HASHED),
    )  # fmt: skip
    rows = connection.execute(
        sa.select(table.c.id, table.c.hash, *[table.c[name] for name in HASHED]).order_by(
            table.c.id
        )
    ).mappings()
    previous = GENESIS
    for row in list(rows):
        current = row["hash"]
        if current is None:
            fields = dict(row)
            fields["event_type"] = "mp_notice" if row["channel"] == "mp_notice" else "preference"
            current = _event_hash(previous, fields)
            connection.execute(
                sa.update(table)
                .where(table.c.id == row["id"])
                .values(event_type=fields["event_type"], prev_hash=previous, hash=current)
            )
        previous = current


def downgrade() -> None:
    op.execute("DROP VIEW consent_current")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER consent_events_no_truncate ON consent_events")
        op.execute("DROP TRIGGER consent_events_append_only ON consent_events")
        op.execute("DROP FUNCTION dearmp_consent_append_only()")
    else:
        op.execute("DROP TRIGGER consent_events_no_update")
        op.execute("DROP TRIGGER consent_events_no_delete")
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_submissions_supporter_hash"))
        batch_op.drop_column("erased_at")
        batch_op.drop_column("scrubbed_at")
        batch_op.drop_column("supporter_hash")
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        batch_op.drop_index("ix_consent_events_supporter_channel")
        batch_op.drop_constraint(batch_op.f("uq_consent_events_hash"), type_="unique")
        batch_op.alter_column("submission_id", existing_type=sa.String(length=36), nullable=False)
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("privacy_notice_version")
        batch_op.drop_column("wording")
        batch_op.drop_column("event_type")
