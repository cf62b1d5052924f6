"""webhooks to a CRM: endpoints as data, their deliveries as outbox items

``webhook_endpoints`` holds each endpoint (its URL, campaign, events, whether personal data may
be sent, its secret and the previous one during a rotation); ``outbox.endpoint_id`` names the
endpoint of a webhook item (kind "webhook").

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("campaign_slug", sa.String(200), nullable=True),
        sa.Column("events", sa.Text(), nullable=False),
        sa.Column("personal_data", sa.Boolean(), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("previous_secret", sa.String(128), nullable=True),
        sa.Column("previous_until", WHEN, nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
        sqlite_autoincrement=True,  # an id is never used again: items name their endpoint by it
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("endpoint_id", sa.Integer(), nullable=True))
        batch_op.create_index(op.f("ix_outbox_endpoint_id"), ["endpoint_id"])


def downgrade() -> None:
    op.execute("DELETE FROM outbox WHERE kind = 'webhook'")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(op.f("ix_outbox_endpoint_id"))
        batch_op.drop_column("endpoint_id")
    op.drop_table("webhook_endpoints")
