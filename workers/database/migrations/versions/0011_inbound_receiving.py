"""inbound: the Mailgun webhook's signature tokens, remembered so a replayed signature is refused

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_tokens",
        sa.Column("token", sa.String(200), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_webhook_tokens")),
    )
    op.create_index(op.f("ix_webhook_tokens_seen_at"), "webhook_tokens", ["seen_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_tokens_seen_at"), table_name="webhook_tokens")
    op.drop_table("webhook_tokens")
