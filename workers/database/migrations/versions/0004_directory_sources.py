"""directory postcode sets, dissolution, change reports, live lookup cache

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("directory_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("postcodes_version_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("dissolved", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("changes", sa.JSON(), nullable=True))
    op.execute("UPDATE directory_versions SET postcodes_version_id = id")
    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phone", sa.String(length=40), nullable=True))
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resolved_via", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("recipient", sa.JSON(), nullable=True))
    op.create_table(
        "lookup_cache",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("value", sa.JSON(), nullable=True),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_lookup_cache")),
    )
    with op.batch_alter_table("lookup_cache", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_lookup_cache_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("lookup_cache", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lookup_cache_expires_at"))
    op.drop_table("lookup_cache")
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_column("recipient")
        batch_op.drop_column("resolved_via")
    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.drop_column("phone")
    with op.batch_alter_table("directory_versions", schema=None) as batch_op:
        batch_op.drop_column("changes")
        batch_op.drop_column("dissolved")
        batch_op.drop_column("postcodes_version_id")
