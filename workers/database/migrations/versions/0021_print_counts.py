"""print_counts: letters per MP, signature and hour, for the comparison stage's read (instead
of letter_prints' index by MP and time)

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "print_counts",
        sa.Column("member_id", sa.Integer(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("letters", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("member_id", "signature", "hour", name="pk_print_counts"),
    )
    op.create_index("ix_print_counts_member_hour", "print_counts", ["member_id", "hour"])
    # The stage read the fingerprints by MP and time; it reads the counts now.
    op.drop_index("ix_letter_prints_member_created", table_name="letter_prints")
    # The letters compared before: counted by the hour they were compared in.
    prints = sa.table(
        "letter_prints",
        sa.column("member_id", sa.Integer()),
        sa.column("signature", sa.LargeBinary()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    if op.get_bind().dialect.name == "postgresql":  # UTC hours, whatever the session's zone
        utc = sa.func.timezone("UTC", prints.c.created_at)
        hour = sa.func.timezone("UTC", sa.func.date_trunc("hour", utc))
    else:
        hour = sa.func.strftime("%Y-%m-%d %H:00:00.000000", prints.c.created_at)
    counts = sa.table(
        "print_counts",
        *(sa.column(name) for name in ("member_id", "signature", "hour", "letters")),
    )
    op.execute(
        counts.insert().from_select(
            ["member_id", "signature", "hour", "letters"],
            sa.select(prints.c.member_id, prints.c.signature, hour, sa.func.count())
            .where(prints.c.member_id.is_not(None))
            .group_by(prints.c.member_id, prints.c.signature, hour),
        )
    )


def downgrade() -> None:
    op.create_index("ix_letter_prints_member_created", "letter_prints", ["member_id", "created_at"])
    op.drop_index("ix_print_counts_member_hour", table_name="print_counts")
    op.drop_table("print_counts")
