"""letter_prints.signature nullable: an erased letter's fingerprint is deleted, while its row
stays as the record of the digest it went in (a bounce of the digest returns its letters)

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07 08:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("letter_prints") as batch:
        batch.alter_column("signature", existing_type=sa.LargeBinary(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM letter_prints WHERE signature IS NULL")
    with op.batch_alter_table("letter_prints") as batch:
        batch.alter_column("signature", existing_type=sa.LargeBinary(), nullable=False)
