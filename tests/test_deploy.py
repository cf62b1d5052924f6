"""Production-shaped files: docker-compose.yml, the Dockerfile, migrations matching the models.

Docker cannot run here, so the compose file is checked for structure, for commands that exist,
and against the compose specification's JSON Schema (the copy check-jsonschema ships: offline)
once interpolated with the environment the README's production quick start tells an operator to
write.
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
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


def test_letters_compared_before_their_counts_existed_are_counted_by_the_hour(
    db_url: str,
) -> None:
    """Migration 0021 counts the fingerprints stored before it, so holds go on counting them."""
    from datetime import UTC, datetime

    from sqlalchemy import select, text

    from workers.database.models import PRINT_COUNTS

    config = alembic_config(db_url)
    command.downgrade(config, "0020")
    engine = create_engine(db_url)
    compared = [(7, 9, 5), (7, 9, 55), (7, 10, 5), (None, 9, 0)]  # MP, hour, minute
    with engine.begin() as conn:
        for i, (member, hour, minute) in enumerate(compared):
            at = datetime(2026, 12, 1, hour, minute, 30, 123456, tzinfo=UTC)
            row = {"id": f"s-{i}", "m": member, "at": at, "sig": bytes([1]) * 256}
            conn.execute(
                text(
                    "INSERT INTO submissions (id, campaign_slug, state, created_at, updated_at, "
                    "dispatched_at) VALUES (:id, 'c', 'compared', :at, :at, :at)"
                ),
                row,
            )
            conn.execute(
                text(
                    "INSERT INTO letter_prints (submission_id, campaign_slug, member_id, "
                    'created_at, own_words, signature, "similar", similar_recent, decision) '
                    "VALUES (:id, 'c', :m, :at, 0, :sig, 0, 0, 'send')"
                ),
                row,
            )
    command.upgrade(config, "head")
    counts = PRINT_COUNTS.c  # read as the stage reads them (SQLite keeps times as text)
    with engine.connect() as conn:
        rows = conn.execute(select(counts.member_id, counts.hour, counts.letters).order_by("hour"))
        rows = rows.all()
    engine.dispose()
    assert [(m, h.replace(tzinfo=None), n) for m, h, n in rows] == [
        (7, datetime(2026, 12, 1, 9), 2),
        (7, datetime(2026, 12, 1, 10), 1),
    ]


def test_every_variable_compose_sets_is_a_setting() -> None:
    """A misspelled variable would stop every container at start (configuration fails fast)."""
    from config.settings import unknown_variables

    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        assert unknown_variables(list(env)) == [], name


# --- The compose file as docker compose reads it -------------------------------------------------

# Compose's interpolation: $$, $NAME, ${NAME}, and ${NAME<op>arg} with op one of :- - :? ? :+ +.
VARIABLE_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})"
)


class MissingVariable(Exception):
    """A ${NAME:?message} (or ${NAME?message}) whose variable is unset, as compose refuses it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` (a loaded compose file, or part of one) with every variable substituted."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["named"] or match["braced"]
        op, arg = match["op"], match["arg"] or ""
        is_set = name in env
        has_value = bool(env.get(name))
        if op in (":-", "-"):
            return env[name] if (has_value if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            if not (has_value if op == ":?" else is_set):
                raise MissingVariable(name, arg)
            return env[name]
        if op in (":+", "+"):
            return arg if (has_value if op == ":+" else is_set) else ""
        return env.get(name, "")

    return VARIABLE_RE.sub(substitute, value)


def compose_schema() -> dict[str, Any]:
    """The compose specification's schema, as check-jsonschema vendors it (no network)."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())  # type: ignore[no-any-return]


def env_file(text: str) -> dict[str, str]:
    """NAME=value lines, as a .env file has them (comments and blank lines skipped)."""
    pairs = (line.partition("=") for line in text.splitlines())
    return {
        name.strip(): value.strip()
        for name, sep, value in pairs
        if sep and name.strip() and not name.lstrip().startswith("#")
    }


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def documented_environment() -> dict[str, str]:
    """What an operator following the README's production quick start has: .env.example copied
    to .env, the secret key generated into it, and the lines the quick start gives."""
    quick_start = readme_section("Production quick start")
    env = env_file((REPO / ".env.example").read_text())
    assert "openssl rand -hex 32" in quick_start
    env["DEARMP_SECRET_KEY"] = "0f" * 32  # what `openssl rand -hex 32` writes
    blocks = re.findall(r"```ini\n(.*?)```", quick_start, re.S)
    assert blocks, "the quick start gives the .env lines in an ini block"
    env.update(env_file(blocks[0]))
    return env


def required_variables() -> set[str]:
    return set(
        re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", (REPO / "docker-compose.yml").read_text())
    )


def test_the_compose_file_is_valid_with_the_documented_environment() -> None:
    config = interpolate(compose(), documented_environment())
    validator = jsonschema.validators.validator_for(compose_schema())(compose_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    # The documented values arrive: the relay named in the quick start, not the catcher.
    worker = config["services"]["worker"]["environment"]
    assert worker["SMTP_HOST"] != "smtp" and worker["DEARMP_MAIL_BACKEND"] == "smtp"


def test_the_schema_is_the_compose_specification_and_refuses_a_mistake() -> None:
    schema = compose_schema()
    assert "compose" in schema["$id"].lower()
    broken = interpolate(compose(), documented_environment())
    broken["services"]["worker"]["depends_on"]["redis"]["condition"] = "service_ready"
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert list(validator.iter_errors(broken))


def test_the_required_variables_are_the_quick_starts_and_each_is_named_when_missing() -> None:
    required = required_variables()
    assert required == {
        "DEARMP_SECRET_KEY",
        "DEARMP_PUBLIC_URL",
        "DEARMP_SANDBOX_ADDRESS",
        "DEARMP_BOUNCE_DOMAIN",
    }
    documented = documented_environment()
    quick_start = readme_section("Production quick start")
    for name in required:
        assert name in quick_start, name
        for missing in (
            {k: v for k, v in documented.items() if k != name},
            {**documented, name: ""},
        ):
            with pytest.raises(MissingVariable) as raised:
                interpolate(compose(), missing)
            assert raised.value.name == name and name in str(raised.value)


def test_copied_as_it_is_the_example_environment_is_refused_for_want_of_the_required() -> None:
    """.env.example leaves the four empty: compose refuses to start on a copy not filled in."""
    with pytest.raises(MissingVariable) as raised:
        interpolate(compose(), env_file((REPO / ".env.example").read_text()))
    assert raised.value.name in required_variables()


def test_every_variable_compose_reads_is_in_the_example_environment() -> None:
    """An operator finds in .env.example every variable the compose file takes from .env, and a
    value there that compose would pass on is the setting's default or empty."""
    text = (REPO / "docker-compose.yml").read_text()
    read = {m["named"] or m["braced"] for m in VARIABLE_RE.finditer(text) if not m["escaped"]}
    example = env_file((REPO / ".env.example").read_text())
    assert read - {"FORWARDED_ALLOW_IPS"} <= set(example), read - set(example)
    # A value in .env.example overrides compose's default: only where both agree.
    defaults = {
        name: m["arg"]
        for m in VARIABLE_RE.finditer(text)
        if m["op"] == ":-" and (name := m["braced"]) in example
    }
    for name, default in defaults.items():
        assert example[name] in ("", default), f"{name}={example[name]} would override {default!r}"


def test_services_start_on_health_and_every_long_running_one_has_a_check() -> None:
    services = compose()["services"]
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"migrate", "demo-data"}
    for name, service in services.items():
        for needed, how in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if needed in one_shot else "service_healthy"
            assert how == {"condition": expected}, (name, needed)
            assert needed in one_shot or "healthcheck" in services[needed], (name, needed)
        if name not in one_shot | {"retention"}:  # retention sleeps a day between passes
            assert "healthcheck" in service, name
        command = service.get("command") or []
        if command[:1] == ["dearmp"] and name not in {"migrate"}:
            assert service["depends_on"]["migrate"] == {
                "condition": "service_completed_successfully"
            }, name
    # A worker's check is its own liveness, not `dearmp health`, which is "down" for the whole
    # deployment when the mail server is away.
    worker_check = " ".join(services["worker"]["healthcheck"]["test"])
    assert "health" not in services["worker"]["command"] and "dearmp health" not in worker_check
    assert "live_workers" in worker_check and "gethostname" in worker_check


def test_the_health_checks_python_is_python_and_imports_what_exists() -> None:
    import importlib

    for name, service in compose()["services"].items():
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[:3] != ["CMD", "python", "-c"]:
            continue
        tree = ast.parse(test[3])  # raises on a syntax error
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), (name, node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)


def test_the_sample_data_is_loaded_only_in_the_demo_profile() -> None:
    """`dearmp init` loads the campaign files and, with no directory, the fictional sample MPs:
    only the demo profile runs it, and it alone reads the image's sample campaign folder."""
    services = compose()["services"]
    for name, service in services.items():
        command = service.get("command") or []
        env = service.get("environment") or {}
        demo = service.get("profiles") == ["demo"]
        if command[:2] == ["dearmp", "init"] or command[:2] == ["dearmp", "demo"]:
            assert demo, f"{name} loads the sample data outside the demo profile"
        if command[:1] == ["dearmp"] and not demo:
            assert env.get("DEARMP_CAMPAIGNS_DIR") == "/srv/dearmp/campaigns", name
    assert services["demo-data"]["environment"]["DEARMP_CAMPAIGNS_DIR"] == ""
    assert services["migrate"]["command"] == ["dearmp", "migrate"]


def test_the_quick_start_posts_a_submission_the_intake_accepts() -> None:
    """The quick start's curl example: a body the schema takes, for a campaign file that exists,
    with that campaign's current consent wording version (else the intake answers 409)."""
    from schemas.submission import SubmissionV1, parse_submission
    from workers.letters.definitions import load_definitions

    quick_start = readme_section("Production quick start")
    found = re.search(r"curl [^\n]*?/v1/submissions.*?-d '(\{.*?\})'", quick_start, re.S)
    assert found, "the quick start has a curl example posting to /v1/submissions"
    body = json.loads(found[1])
    parsed = parse_submission(body)
    assert isinstance(parsed, SubmissionV1), parsed
    campaigns = {d.slug: d for d in load_definitions(REPO / "config" / "campaigns")}
    campaign = campaigns[body["campaign"]]
    assert body["contact_preferences"]["wording_version"] == campaign.consent.version
