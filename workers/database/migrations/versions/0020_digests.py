"""digests: a day's near-identical letters to one MP in one email; letter_prints.digest_id

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "digests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("campaign_slug", sa.String(length=200), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=False),
        sa.Column("to_name", sa.String(length=200), nullable=False),
        sa.Column("to_email", sa.String(length=254), nullable=False),
        sa.Column("letters", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_digests"),
    )
    op.create_index(
        "ix_digests_campaign_member_created",
        "digests",
        ["campaign_slug", "member_id", "created_at"],
    )
    with op.batch_alter_table("letter_prints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("digest_id", sa.String(length=36), nullable=True))
        batch_op.create_index("ix_letter_prints_digest_id", ["digest_id"])


def downgrade() -> None:
    with op.batch_alter_table("letter_prints", schema=None) as batch_op:
        batch_op.drop_index("ix_letter_prints_digest_id")
        batch_op.drop_column("digest_id")
    op.drop_index("ix_digests_campaign_member_created", table_name="digests")
    op.drop_table("digests")
