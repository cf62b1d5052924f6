"""sender confirmation

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 23:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("confirmation_sent_at", "reminder_sent_at", "confirmed_at")


def upgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
