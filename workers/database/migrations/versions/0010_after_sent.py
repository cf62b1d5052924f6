"""after a letter is sent: inbound mail, letter events, notices to supporters, address health,
and letters indexed by the MP address they went to

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 00:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("external_id", sa.String(200), nullable=True),
        sa.Column("recipient", sa.String(254), nullable=False),
        sa.Column("peer_hash", sa.String(64), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(24), nullable=True),
        sa.Column("submission_id", sa.String(36), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("received_at", WHEN, nullable=False),
        sa.Column("dispatched_at", WHEN, nullable=False),
        sa.Column("processed_at", WHEN, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_messages")),
        sa.UniqueConstraint("external_id", name=op.f("uq_inbound_messages_external_id")),
    )
    op.create_index(
        "ix_inbound_messages_status_dispatched",
        "inbound_messages",
        ["status", "dispatched_at"],
    )
    op.create_index(
        op.f("ix_inbound_messages_submission_id"), "inbound_messages", ["submission_id"]
    )
    op.create_table(
        "letter_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("submission_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("inbound_id", sa.String(36), nullable=True),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["submissions.id"],
            name=op.f("fk_letter_events_submission_id_submissions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_letter_events")),
    )
    op.create_index(op.f("ix_letter_events_submission_id"), "letter_events", ["submission_id"])
    op.create_table(
        "notices",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("submission_id", sa.String(36), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("inbound_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_at", WHEN, nullable=True),
        sa.Column("sent_at", WHEN, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("dispatched_at", WHEN, nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["submissions.id"],
            name=op.f("fk_notices_submission_id_submissions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notices")),
        sa.UniqueConstraint("submission_id", "key", name="uq_notices_submission_key"),
    )
    op.create_index(op.f("ix_notices_status"), "notices", ["status"])
    op.create_table(
        "address_health",
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("bounces", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("changed_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("email", name=op.f("pk_address_health")),
    )
    op.create_index(op.f("ix_letters_to_email"), "letters", ["to_email"])


def downgrade() -> None:
    op.drop_index(op.f("ix_letters_to_email"), table_name="letters")
    op.drop_table("address_health")
    op.drop_index(op.f("ix_notices_status"), table_name="notices")
    op.drop_table("notices")
    op.drop_index(op.f("ix_letter_events_submission_id"), table_name="letter_events")
    op.drop_table("letter_events")
    op.drop_index(op.f("ix_inbound_messages_submission_id"), table_name="inbound_messages")
    op.drop_index("ix_inbound_messages_status_dispatched", table_name="inbound_messages")
    op.drop_table("inbound_messages")
