"""the outbox: every email to a supporter in one table, confirmations included

``notices`` becomes ``outbox`` (rows copied), with ``next_attempt_at`` for the backoff after a
failed attempt. A confirmation email and its reminder become outbox items ("confirm" and
"reminder" of kind "confirm"): those already sent are copied from
``submissions.confirmation_sent_at`` / ``reminder_sent_at``, which go.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 07:00:00
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)
COMMON = (
    "id, submission_id, key, kind, inbound_id, status, attempts, failures, claimed_at, "
    "sent_at, error, created_at, dispatched_at"
)
SENT_COLUMNS = (("confirmation_sent_at", "confirm"), ("reminder_sent_at", "reminder"))


def _table(name: str, with_backoff: bool) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("submission_id", sa.String(36), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("inbound_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        *([sa.Column("next_attempt_at", WHEN, nullable=True)] if with_backoff else []),
        sa.Column("claimed_at", WHEN, nullable=True),
        sa.Column("sent_at", WHEN, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("dispatched_at", WHEN, nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["submissions.id"],
            name=op.f(f"fk_{name}_submission_id_submissions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{name}")),
        sa.UniqueConstraint("submission_id", "key", name=f"uq_{name}_submission_key"),
    )
    op.create_index(op.f(f"ix_{name}_status"), name, ["status"])


def upgrade() -> None:
    _table("outbox", with_backoff=True)
    op.execute(f"INSERT INTO outbox ({COMMON}) SELECT {COMMON} FROM notices")  # noqa: S608
    op.drop_index(op.f("ix_notices_status"), table_name="notices")
    op.drop_table("notices")
    outbox = sa.table(
        "outbox",
        *(sa.column(name) for name in COMMON.split(", ")),
    )
    conn = op.get_bind()
    for column, key in SENT_COLUMNS:
        sent = conn.execute(
            sa.text(f"SELECT id, {column} FROM submissions WHERE {column} IS NOT NULL")  # noqa: S608
        ).all()
        for submission_id, at in sent:
            conn.execute(
                outbox.insert().values(
                    id=str(uuid.uuid4()),
                    submission_id=submission_id,
                    key=key,
                    kind="confirm",
                    status="sent",
                    attempts=1,
                    failures=0,
                    sent_at=at,
                    created_at=at,
                    dispatched_at=at,
                )
            )
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        for column, _ in reversed(SENT_COLUMNS):
            batch_op.drop_column(column)


def downgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        for column, _ in SENT_COLUMNS:
            batch_op.add_column(sa.Column(column, WHEN, nullable=True))
    for column, key in SENT_COLUMNS:  # the column names are this module's constants
        op.get_bind().execute(
            sa.text(
                f"UPDATE submissions SET {column} = (SELECT MAX(sent_at) FROM outbox "  # noqa: S608
                "WHERE outbox.submission_id = submissions.id AND outbox.key = :key "
                "AND outbox.kind = 'confirm' AND outbox.status = 'sent')"
            ),
            {"key": key},
        )
    _table("notices", with_backoff=False)
    op.execute(
        f"INSERT INTO notices ({COMMON}) SELECT {COMMON} FROM outbox WHERE kind <> 'confirm'"  # noqa: S608
    )
    op.drop_index(op.f("ix_outbox_status"), table_name="outbox")
    op.drop_table("outbox")
