"""survey answers: one per letter, the latest kept

A partial unique index on ``letter_events (submission_id) WHERE kind = 'survey'``: a second
answer to a letter's survey updates its row instead of adding one. Answers already stored more
than once are reduced to the latest first.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SURVEY = sa.text("kind = 'survey'")


def upgrade() -> None:
    op.execute(
        "DELETE FROM letter_events WHERE kind = 'survey' AND id NOT IN "
        "(SELECT MAX(id) FROM letter_events WHERE kind = 'survey' GROUP BY submission_id)"
    )
    op.create_index(
        "uq_letter_events_survey",
        "letter_events",
        ["submission_id"],
        unique=True,
        sqlite_where=SURVEY,
        postgresql_where=SURVEY,
    )


def downgrade() -> None:
    op.drop_index("uq_letter_events_survey", table_name="letter_events")
