"""Production-shaped files: docker-compose.yml, the Dockerfile, migrations matching the models.

Docker cannot run here, so the compose file is checked for structure and for commands that exist.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from tests.services import REPO
from workers.cli import main as cli
from workers.database.engine import alembic_config
from workers.database.models import Base


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_compose_has_the_production_shaped_services() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "migrate", "worker", "reconciler", "smtp", "inbound"} <= set(
        services
    )
    worker = services["worker"]
    # Scalable with --scale: no fixed container name or host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    env = worker["environment"]
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["REDIS_URL"].startswith("redis://redis:")
    # The relay, its login and the DKIM key are the deployment's: the catcher by default.
    assert env["SMTP_HOST"] == "${SMTP_HOST:-smtp}"
    assert {"SMTP_USERNAME", "SMTP_PASSWORD", "DEARMP_DKIM_PRIVATE_KEY"} <= set(env)
    assert "readyz" in " ".join(services["api"]["healthcheck"]["test"])
    # Confirmation links must point at the deployment, not at 127.0.0.1.
    assert "DEARMP_PUBLIC_URL:?" in env["DEARMP_PUBLIC_URL"]
    assert "FORWARDED_ALLOW_IPS" in env and "DEARMP_API_KEYS" in env
    # Every letter has its own return address: bounces reach the inbound service.
    assert "DEARMP_BOUNCE_DOMAIN:?" in env["DEARMP_BOUNCE_DOMAIN"]
    assert services["inbound"]["command"][:2] == ["dearmp", "inbound"]


def test_every_compose_command_exists_in_the_project() -> None:
    for name, service in compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "dearmp":
            continue
        assert command[1] in cli.commands, f"{name}: dearmp {command[1]} does not exist"  # type: ignore[attr-defined]
        sub = cli.commands[command[1]]  # type: ignore[attr-defined]
        sub.make_context(command[1], list(command[2:]))  # raises on unknown options


def test_dockerfile_installs_the_project_and_copies_every_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    for part in ("COPY workers", "COPY schemas", "COPY config", "pip install", "USER"):
        assert part in text


def test_migrations_produce_exactly_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], diff


def test_the_newest_migrations_go_down_and_up_again(db_url: str) -> None:
    config = alembic_config(db_url)
    command.downgrade(config, "0005")
    command.upgrade(config, "head")
    test_migrations_produce_exactly_the_models(db_url)


def test_readme_names_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "python3 dev.py demo" in readme and "python3 dev.py test" in readme
    assert Path(REPO / ".ci" / "run").read_text().count("dev.py test") == 1


def test_consent_events_from_before_the_ledger_are_chained_so_the_ledger_verifies(
    db_url: str,
) -> None:
    """Migration 0005 seals the events written before the ledger had hashes with its own frozen
    copy of the hash: what the ledger checks today agrees with it."""
    from datetime import UTC, datetime

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from workers.privacy.ledger import verify

    config = alembic_config(db_url)
    command.downgrade(config, "0004")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        for i, channel in enumerate(["email", "mp_notice", "sms"]):
            conn.execute(
                text(
                    "INSERT INTO consent_events (submission_id, supporter_hash, campaign_slug, "
                    "channel, choice, wording_version, wording_sha256, lawful_basis, "
                    "source_url, user_agent, ip_hash, recorded_at) VALUES (:s, :h, 'c', :ch, "
                    "'yes', 'v1', :w, 'consent', 'https://example.org/ünï', 'UA', NULL, :at)"
                ),
                {
                    "s": f"s-{i}",
                    "h": "a" * 64,
                    "ch": channel,
                    "w": "b" * 64,
                    "at": datetime(2026, 11, 20, 9, i, 30, 123456, tzinfo=UTC),
                },
            )
    command.upgrade(config, "head")
    with Session(engine) as session:
        checked = verify(session)
    engine.dispose()
    assert checked.events == 3 and checked.intact, checked


def test_every_variable_compose_sets_is_a_setting() -> None:
    """A misspelled variable would stop every container at start (configuration fails fast)."""
    from config.settings import unknown_variables

    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        assert unknown_variables(list(env)) == [], name
