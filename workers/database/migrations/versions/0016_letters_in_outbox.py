"""letters in the outbox: every letter to an MP is an outbox item, as everything else sent is

Each ``deliveries`` row becomes an outbox item of kind "letter" and key "letter", whose id is
its submission's; ``outbox.response`` keeps the server's answer. ``deliveries`` goes.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("response", sa.Text(), nullable=True))
    # A letter's failed attempts were counted as claims: those not sent count as failures.
    op.execute(
        "INSERT INTO outbox (id, submission_id, key, kind, status, attempts, failures, "
        "claimed_at, sent_at, response, error, created_at, dispatched_at) "
        "SELECT d.submission_id, d.submission_id, 'letter', 'letter', d.status, d.attempts, "
        "CASE WHEN d.status = 'sent' THEN 0 ELSE d.attempts END, d.claimed_at, d.sent_at, "
        "d.response, d.error, l.created_at, l.created_at "
        "FROM deliveries d JOIN letters l ON l.submission_id = d.submission_id "
        # A returned letter on its way to a corrected address: rendering writes its item.
        "JOIN submissions s ON s.id = d.submission_id WHERE s.state <> 'resolved'"
    )
    op.drop_table("deliveries")


def downgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("submission_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_at", WHEN, nullable=True),
        sa.Column("sent_at", WHEN, nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["letters.submission_id"],
            name=op.f("fk_deliveries_submission_id_letters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("submission_id", name=op.f("pk_deliveries")),
    )
    op.execute(
        "INSERT INTO deliveries (submission_id, status, backend, attempts, claimed_at, sent_at, "
        "response, error) SELECT o.submission_id, CASE WHEN o.status = 'skipped' THEN 'failed' "
        "ELSE o.status END, 'smtp', o.attempts, o.claimed_at, o.sent_at, o.response, o.error "
        "FROM outbox o JOIN letters l ON l.submission_id = o.submission_id "
        "WHERE o.kind = 'letter'"
    )
    op.execute("DELETE FROM outbox WHERE kind = 'letter'")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("response")
