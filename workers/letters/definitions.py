"""Campaigns are data: definition files are loaded, checked and kept in the database."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from config.settings import ConfigurationError
from schemas.campaign import LOADING, CampaignDefinition
from schemas.submission import CHANNELS, SLUG_RE
from workers.database.models import CAMPAIGNS, Campaign, ConsentEvent
from workers.letters.mail.messages import wire_address
from workers.wording import one_line


def load_definitions(directory: Path) -> list[CampaignDefinition]:
    """Every ``*.toml`` campaign in ``directory``, validated, or :class:`ConfigurationError`
    with one line per problem in any of them, each naming the file, the campaign and the field
    (before anything is synced: a bad file changes nothing)."""
    definitions, problems, files = [], [], dict[str, str]()
    for path in sorted(directory.glob("*.toml")):
        try:
            definition = _load(path)
        except ConfigurationError as exc:
            problems += exc.problems
            continue
        if (first := files.setdefault(definition.slug, path.name)) != path.name:
            where = _printable(path.name)
            problems.append(f"{where}: campaign {definition.slug} is in {_printable(first)} too")
        definitions.append(definition)
    if problems:
        raise ConfigurationError(problems)
    return definitions


def _load(path: Path) -> CampaignDefinition:
    where = _printable(path.name)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError([f"{where}: not a TOML file: {one_line(str(exc))}"]) from None
    except RecursionError:
        raise ConfigurationError([f"{where}: not a TOML file: nested too deeply"]) from None
    except OSError as exc:
        raise ConfigurationError([f"{where}: cannot be read: {exc.strerror or exc}"]) from None
    slug = data.get("slug")
    if isinstance(slug, str) and SLUG_RE.fullmatch(slug):
        where = f"{where}: campaign {slug}"
    try:
        definition = CampaignDefinition.model_validate(data, context=LOADING)
        definition.check_channels()  # its message names the campaign
        _sendable(definition.from_email)
    except ValidationError as exc:
        raise ConfigurationError([f"{where}: {problem}" for problem in _problems(exc)]) from None
    except ValueError as exc:
        raise ConfigurationError([f"{_printable(path.name)}: {one_line(str(exc))}"]) from None
    return definition


def _sendable(from_email: str) -> None:
    """The From address as the mail writer will write it (it refuses what a letter cannot carry,
    such as a non-ASCII local part)."""
    try:
        wire_address(from_email)
    except ValueError as exc:
        raise ValueError(f"from_email: {exc}") from None


def _problems(error: ValidationError) -> list[str]:
    """One line per problem, each naming its field ("subject_variants[0]: ..."; a check of the
    whole definition names the field in its message)."""
    problems = []
    for e in error.errors(include_url=False):
        message = one_line(str(e["msg"]).removeprefix("Value error, "))
        field = ""
        for part in e["loc"]:
            field += f"[{part}]" if isinstance(part, int) else f".{part}" if field else str(part)
        problems.append(f"{field}: {message}" if field else message)
    return problems


def _printable(name: str) -> str:
    """A file's name as it is, or as a Python literal if it holds a line break or control."""
    return name if name.isprintable() else ascii(name)


def definition_sha256(definition: CampaignDefinition) -> str:
    return _sha256(json.dumps(definition.model_dump(mode="json"), sort_keys=True))


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
        else:
            _same_version_same_words(session, row.definition.get("consent") or {}, definition)
        row.title = definition.title
        row.definition = definition.model_dump(mode="json")
        row.definition_sha256 = digest
        changed.append(definition.slug)
    return changed


def _same_version_same_words(
    session: Session, before: dict[str, Any], definition: CampaignDefinition
) -> None:
    """The ledger records each consent by its wording's version: new words under a version the
    ledger (or the campaign as loaded) holds already would make its proof say two things.
    Refused with one line naming the channels."""
    consent = definition.consent
    words: dict[str, str] = {q.channel: q.sha256 for q in consent.questions}
    words["mp_notice"] = _sha256(consent.mp_notice)
    recorded: list[tuple[str, str]] = [
        (channel, sha)
        for channel, sha in session.execute(
            select(ConsentEvent.channel, ConsentEvent.wording_sha256)
            .where(
                ConsentEvent.campaign_slug == definition.slug,
                ConsentEvent.wording_version == consent.version,
            )
            .distinct()
        )
    ]
    words["lawful basis"] = consent.lawful_basis  # of the channels' events (the notice's is ours)
    recorded += [
        ("lawful basis", basis)
        for basis in session.scalars(
            select(ConsentEvent.lawful_basis)
            .where(
                ConsentEvent.campaign_slug == definition.slug,
                ConsentEvent.wording_version == consent.version,
                ConsentEvent.channel.in_(CHANNELS),
            )
            .distinct()
        )
    ]
    if before.get("version") == consent.version:
        recorded += [(q["channel"], _sha256(q["wording"])) for q in before.get("questions", [])]
        recorded.append(("mp_notice", _sha256(before.get("mp_notice", ""))))
        recorded.append(("lawful basis", before.get("lawful_basis", "consent")))
    changed = sorted({ch for ch, sha in recorded if words.get(ch) not in (None, sha)})
    if changed:
        raise ConfigurationError(
            [
                f"campaign {definition.slug}: its consent wording for {', '.join(changed)} "
                f"changed but its version ({consent.version}) did not: give the new wording a "
                "new [consent] version"
            ]
        )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def update_definition(session: Session, slug: str, **changes: Any) -> CampaignDefinition:
    """Change a stored campaign's definition (validated), as a file edit and sync would."""
    row = session.get(Campaign, slug)
    if row is None:
        raise KeyError(slug)
    changed = CampaignDefinition.model_validate(row.definition | changes, context=LOADING)
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
