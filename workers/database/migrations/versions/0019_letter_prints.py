"""letter_prints: each letter's own-words share and near-duplicate fingerprint (the comparison
stage); letters: List-Id and own-words headers

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06 14:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "letter_prints",
        sa.Column("submission_id", sa.String(length=36), nullable=False),
        sa.Column("campaign_slug", sa.String(length=200), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("own_words", sa.Float(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("similar", sa.Integer(), nullable=False),
        sa.Column("similar_recent", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["submissions.id"],
            name="fk_letter_prints_submission_id_submissions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("submission_id", name="pk_letter_prints"),
    )
    op.create_index("ix_letter_prints_member_created", "letter_prints", ["member_id", "created_at"])
    op.create_index("ix_letter_prints_campaign_slug", "letter_prints", ["campaign_slug"])
    with op.batch_alter_table("letters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("list_id", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("own_words", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("letters", schema=None) as batch_op:
        batch_op.drop_column("own_words")
        batch_op.drop_column("list_id")
    op.drop_index("ix_letter_prints_campaign_slug", table_name="letter_prints")
    op.drop_index("ix_letter_prints_member_created", table_name="letter_prints")
    op.drop_table("letter_prints")
