"""Campaigns are data: definition files are loaded, checked and kept in the database."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from schemas.campaign import CampaignDefinition
from workers.database.models import CAMPAIGNS, Campaign


def load_definitions(directory: Path) -> list[CampaignDefinition]:
    """Every ``*.toml`` campaign in ``directory``, validated; a bad file fails loudly."""
    definitions = []
    for path in sorted(directory.glob("*.toml")):
        with path.open("rb") as fh:
            definition = CampaignDefinition.model_validate(tomllib.load(fh))
        definition.check_channels()
        definitions.append(definition)
    return definitions


def definition_sha256(definition: CampaignDefinition) -> str:
    canonical = json.dumps(definition.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sync_campaigns(session: Session, definitions: list[CampaignDefinition]) -> list[str]:
    """Insert or update campaign rows from their definitions; returns the slugs that changed.
    Files set ``mode`` only on creation: an operator's switch in the database is kept."""
    changed = []
    for definition in definitions:
        digest = definition_sha256(definition)
        row = session.get(Campaign, definition.slug)
        if row is None:
            row = Campaign(slug=definition.slug, mode=definition.mode)
            session.add(row)
        elif row.definition_sha256 == digest:
            continue
        row.title = definition.title
        row.definition = definition.model_dump(mode="json")
        row.definition_sha256 = digest
        changed.append(definition.slug)
    return changed


def update_definition(session: Session, slug: str, **changes: Any) -> CampaignDefinition:
    """Change a stored campaign's definition (validated), as a file edit and sync would."""
    row = session.get(Campaign, slug)
    if row is None:
        raise KeyError(slug)
    changed = CampaignDefinition.model_validate(row.definition | changes)
    row.definition = changed.model_dump(mode="json")
    row.definition_sha256 = definition_sha256(changed)
    return changed


_DIGEST = select(CAMPAIGNS.c.definition_sha256).where(CAMPAIGNS.c.slug == bindparam("slug"))
_DEFINITION = select(CAMPAIGNS.c.definition, CAMPAIGNS.c.definition_sha256).where(
    CAMPAIGNS.c.slug == bindparam("slug")
)


def get_definition(
    session: Session, slug: str, digest: str | None = None
) -> CampaignDefinition | None:
    """The campaign's current definition, parsed once per version; ``digest``: its
    ``definition_sha256`` if the caller read it already."""
    if digest is None:
        digest = session.execute(_DIGEST, {"slug": slug}).scalar()
    if digest is None:
        return None
    cached = _parsed.get(digest)
    if cached is None:
        # Cached under the hash read with it, in case it changed since the first read.
        stored, digest = session.execute(_DEFINITION, {"slug": slug}).one()
        cached = _parsed[digest] = CampaignDefinition.model_validate(stored)
    return cached


# Parsed definitions by content hash: a changed campaign has a new hash, so nothing goes stale.
_parsed: dict[str, CampaignDefinition] = {}
