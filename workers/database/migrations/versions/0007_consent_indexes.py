"""consent events: drop the indexes that the composite ones already cover

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 06:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (index, column): each column leads a composite index (uq_consent_submission and
# ix_consent_events_supporter_channel), which serves the same lookups.
COVERED = (
    ("ix_consent_events_submission_id", "submission_id"),
    ("ix_consent_events_supporter_hash", "supporter_hash"),
)


def upgrade() -> None:
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        for name, _column in COVERED:
            batch_op.drop_index(name)


def downgrade() -> None:
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        for name, column in COVERED:
            batch_op.create_index(name, [column], unique=False)
