"""Configuration that fails fast: every mistake an operator can make in the environment stops
each process at start with one line naming the variable, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import structlog
from click.testing import CliRunner
from structlog.testing import capture_logs

from config.settings import (
    SECRET_KEY_MIN_LENGTH,
    ConfigurationError,
    Settings,
    get_settings,
    load_settings,
    masked_url,
    unknown_variables,
)
from tests.conftest import new_pg_database
from tests.services import REPO, PostgresCluster, dkim_keys
from workers.cli import main
from workers.pipeline.app import App, log_started
from workers.pipeline.middleware import ProcessApp

OURS = ("DEARMP_", "SMTP_", "MAILGUN_", "REDIS_URL", "DATABASE_URL", "EMAIL_API_")


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """An environment with none of our variables but a data folder of the test's own."""
    for name in os.environ:
        if name.upper().startswith(OURS):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DEARMP_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def problems(monkeypatch: pytest.MonkeyPatch, **variables: str) -> list[str]:
    """The problems :func:`load_settings` finds with ``variables`` set (none: an empty list)."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    try:
        load_settings()
    except ConfigurationError as exc:
        return exc.problems
    return []


def test_a_misspelled_variable_is_refused_with_the_nearest_name(
    environment: pytest.MonkeyPatch,
) -> None:
    found = problems(environment, DEARMP_MAIL_BACKEDN="smtp")
    assert found == ["DEARMP_MAIL_BACKEDN is not a setting (did you mean DEARMP_MAIL_BACKEND?)"]


def test_each_prefix_is_ours_and_other_variables_are_left_alone() -> None:
    found = unknown_variables(["SMTP_PASWORD", "MAILGUN_SIGNING_KEY", "DEARMP_ZZZZZZZZ", "HOME"])
    assert found == [
        "DEARMP_ZZZZZZZZ is not a setting",
        "MAILGUN_SIGNING_KEY is not a setting (did you mean MAILGUN_WEBHOOK_SIGNING_KEY?)",
        "SMTP_PASWORD is not a setting (did you mean SMTP_PASSWORD?)",
    ]
    assert unknown_variables(["DEARMP_MAIL_BACKEND", "REDIS_URL", "PATH", "dearmp_log_level"]) == []


def test_a_name_missing_a_word_is_pointed_at_the_setting_that_has_its_words() -> None:
    assert unknown_variables(["DEARMP_DKIM_KEY", "SMTP_USER"]) == [
        "DEARMP_DKIM_KEY is not a setting (did you mean DEARMP_DKIM_PRIVATE_KEY?)",
        "SMTP_USER is not a setting (did you mean SMTP_USERNAME?)",
    ]


def test_a_misspelled_database_or_redis_url_is_refused_while_the_setting_is_unset() -> None:
    """DATABSE_URL would leave production on the embedded SQLite file without a word."""
    found = unknown_variables(["DATABSE_URL", "REDIS_URI", "DATABASE_URL2", "PATH"])
    assert found == [
        "DATABASE_URL2 is not a setting (did you mean DATABASE_URL?)",
        "DATABSE_URL is not a setting (did you mean DATABASE_URL?)",
        "REDIS_URI is not a setting (did you mean REDIS_URL?)",
    ]
    # Other programs' variables: more than a letter away, or the setting itself is set.
    others = ["DATABASE_USER", "DATABASE_URL_RO", "REDIS_TLS_URL", "REDIS_PORT", "EMAIL_API_KY"]
    assert unknown_variables(others) == []
    assert unknown_variables(["DATABASE_URL", "DATABASE_URI"]) == []


def test_every_settings_variable_is_known(environment: pytest.MonkeyPatch) -> None:
    aliases = [f.alias for f in Settings.model_fields.values() if f.alias]
    assert unknown_variables(aliases) == []


BAD_VALUES = [
    ("DATABASE_URL", "garbage", "no scheme: not a database DearMP runs on"),
    ("DATABASE_URL", "postgres://u:pw@db/dearmp", "write postgresql://"),
    ("DATABASE_URL", "mysql://u:pw@db/dearmp", "mysql:// is not a database DearMP runs on"),
    ("DATABASE_URL", "postgresql://db:port/x", "not a database URL"),
    ("REDIS_URL", "http://x", "not a Redis URL"),
    ("REDIS_URL", "redis://:6379/0", "needs a host"),
    ("REDIS_URL", "redis://h:notaport/0", "not a Redis URL"),
    ("REDIS_URL", "unix://", "needs the socket's path"),
    ("DEARMP_PUBLIC_URL", "notaurl", "http:// or https:// address with a host"),
    ("DEARMP_PUBLIC_URL", "ftp://letters.example.org", "http:// or https://"),
    ("POSTCODES_IO_URL", "https://", "with a host"),
    ("DEARMP_SANDBOX_ADDRESS", "sandbox", "must be an email address"),
    ("DEARMP_SANDBOX_ADDRESS", "Sandbox <a@b.example.org>", "must be an email address"),
    # What the mail writer refuses: every sandbox letter would fail.
    ("DEARMP_SANDBOX_ADDRESS", "sandbox.@campaign.example.org", "must be an email address"),
    ("DEARMP_SANDBOX_ADDRESS", "s\u00e4ndbox@campaign.example.org", "non-ASCII local part"),
    ("DEARMP_SANDBOX_ADDRESS", "sandbox@campaign..example.org", "must be an email address"),
    ("DEARMP_SANDBOX_ADDRESS", "a,b@campaign.example.org", "must be an email address"),
    ("DEARMP_BOUNCE_DOMAIN", "bounces", "must be a domain name"),
    ("DEARMP_SECRET_KEY", "short", f"at least {SECRET_KEY_MIN_LENGTH} characters"),
    ("SMTP_PORT", "x", "valid integer"),
    # Finite but beyond what an operator needs: a dead worker's letter never taken back, a
    # reconciler pass overflowing a date.
    ("DEARMP_DELIVERY_LEASE_SECONDS", "1000000000", "less than or equal to 86400"),
    ("DEARMP_HELD_RECHECK", "1e12", "less than or equal to 604800"),
]


@pytest.mark.parametrize(("name", "value", "says"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_its_variable(
    environment: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    [problem] = problems(environment, **{name: value})
    assert problem.startswith(f"{name}: ") and says in problem


def test_a_sandbox_address_the_mail_writer_takes_is_accepted(
    environment: pytest.MonkeyPatch,
) -> None:
    plus, idn = "sandbox+dearmp@campaign.example.org", "sandbox@b\u00fccher.example"
    for address in ("sandbox@localhost", plus, idn):
        assert problems(environment, DEARMP_SANDBOX_ADDRESS=address) == []


def _numeric(annotation: Any) -> bool:
    """int or float, alone or optional (``int | None``)."""
    return any(kind in (int, float) for kind in (get_args(annotation) or (annotation,)))


NUMBERS = [f.alias for f in Settings.model_fields.values() if _numeric(f.annotation)]
assert len(NUMBERS) > 30  # the walk finds them


@pytest.mark.parametrize("name", NUMBERS)
def test_every_number_refuses_infinity_nan_and_an_absurd_value(
    environment: pytest.MonkeyPatch, name: str
) -> None:
    """Each duration and count has a bound that no date, timeout or Redis expiry overflows: a
    setting added without one fails here."""
    for value in ("inf", "-inf", "nan", "1" + "0" * 30):
        found = problems(environment, **{name: value})
        assert len(found) == 1 and found[0].startswith(f"{name}: "), (value, found)
        assert "\n" not in found[0]


def test_no_line_repeats_a_password_or_a_secret(environment: pytest.MonkeyPatch) -> None:
    found = problems(
        environment,
        DATABASE_URL="mysql://u:hunter2@db/dearmp",
        DEARMP_SECRET_KEY="sw0rdfish",
        DEARMP_DKIM_PRIVATE_KEY="-----BEGIN RSA PRIVATE KEY-----\nZm9v\n",
        DEARMP_DKIM_SELECTOR="s1",
    )
    assert len(found) == 3
    assert not any(s in line for line in found for s in ("hunter2", "sw0rdfish", "Zm9v"))


def test_every_problem_is_told_at_once(environment: pytest.MonkeyPatch) -> None:
    found = problems(environment, DEARMP_MAIL_BACKEDN="smtp", REDIS_URL="http://x", SMTP_PORT="x")
    assert [line.split()[0].rstrip(":") for line in found] == [
        "DEARMP_MAIL_BACKEDN",
        "REDIS_URL",
        "SMTP_PORT",
    ]


def test_the_urls_a_deployment_uses_are_accepted(environment: pytest.MonkeyPatch) -> None:
    for database in ("sqlite:////srv/dearmp.sqlite3", "postgresql+psycopg://u:p@db:5432/dearmp"):
        for redis in ("redis://:p@redis:6379/0", "rediss://redis:6380/0", "unix:///run/r.sock"):
            assert problems(environment, DATABASE_URL=database, REDIS_URL=redis) == []
    assert problems(environment, DEARMP_PUBLIC_URL="https://letters.example.org/") == []


def test_a_dkim_key_that_does_not_parse_is_refused(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("DEARMP_DKIM_SELECTOR", "dearmp")
    found = problems(environment, DEARMP_DKIM_PRIVATE_KEY="notapem")
    assert found == ["DEARMP_DKIM_PRIVATE_KEY: not a PEM RSA private key"]


def test_a_missing_or_broken_dkim_key_file_is_refused(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environment.setenv("DEARMP_DKIM_SELECTOR", "dearmp")
    missing = tmp_path / "nope.pem"
    found = problems(environment, DEARMP_DKIM_PRIVATE_KEY_FILE=str(missing))
    assert found == [f"DEARMP_DKIM_PRIVATE_KEY_FILE: no readable file at {missing}"]
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    found = problems(environment, DEARMP_DKIM_PRIVATE_KEY_FILE=str(broken))
    assert found == ["DEARMP_DKIM_PRIVATE_KEY_FILE: not a PEM RSA private key"]


def test_a_dkim_key_needs_its_selector_and_only_one_source(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pem = dkim_keys()[0].decode()
    [unsigned] = problems(environment, DEARMP_DKIM_PRIVATE_KEY=pem)
    assert "DEARMP_DKIM_SELECTOR is not" in unsigned
    assert problems(environment, DEARMP_DKIM_SELECTOR="dearmp") == []  # a good key loads
    key_file = tmp_path / "dkim.pem"
    key_file.write_text(pem)
    [both] = problems(environment, DEARMP_DKIM_PRIVATE_KEY_FILE=str(key_file))
    assert "not both" in both
    environment.delenv("DEARMP_DKIM_PRIVATE_KEY")
    assert problems(environment) == []
    environment.delenv("DEARMP_DKIM_PRIVATE_KEY_FILE")
    [no_key] = problems(environment)
    assert no_key.startswith("DEARMP_DKIM_SELECTOR is set but no key")


@pytest.mark.parametrize(
    "selector",
    ["s1\r\nBcc: victim@evil.example", "s1\r", "s1; d=evil.example", "-s1", "s1..a", " ", "a" * 64],
)
def test_a_dkim_selector_that_is_not_dns_labels_is_refused(
    environment: pytest.MonkeyPatch, selector: str
) -> None:
    """It goes into every letter's DKIM-Signature header: a CR, LF or ; would write another."""
    environment.setenv("DEARMP_DKIM_PRIVATE_KEY", dkim_keys()[0].decode())
    found = problems(environment, DEARMP_DKIM_SELECTOR=selector)
    assert found == [
        "DEARMP_DKIM_SELECTOR: must be a DNS name such as dearmp or s1.2024 (labels of letters, "
        "digits and inner hyphens, joined by dots)"
    ]
    for good in ("s1", "dearmp-2024.mail", "2024a"):
        assert problems(environment, DEARMP_DKIM_SELECTOR=good) == []


def test_a_mail_backend_without_its_credentials_is_refused(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv("DEARMP_SANDBOX_ADDRESS", "sandbox@campaign.example.org")
    [http] = problems(environment, DEARMP_MAIL_BACKEND="http", EMAIL_API_KEY="key-1")
    assert http == "DEARMP_MAIL_BACKEND=http needs EMAIL_API_KEY and EMAIL_API_DOMAIN"
    assert problems(environment, EMAIL_API_DOMAIN="campaign.example.org") == []
    [half] = problems(environment, DEARMP_MAIL_BACKEND="smtp", SMTP_USERNAME="dearmp")
    assert half.startswith("set SMTP_USERNAME and SMTP_PASSWORD together")
    assert problems(environment, SMTP_PASSWORD="pw") == []  # on localhost, no TLS is fine
    [clear] = problems(environment, SMTP_HOST="smtp.campaign.example.org")
    assert clear.startswith("SMTP_SECURITY=none would send SMTP_PASSWORD in clear to smtp.")
    assert problems(environment, SMTP_SECURITY="starttls") == []
    for here in ("::1", "localhost.", "127.0.0.2", "::ffff:127.0.0.1"):
        assert problems(environment, SMTP_SECURITY="none", SMTP_HOST=here) == []


def test_the_demo_needs_no_configuration(environment: pytest.MonkeyPatch) -> None:
    """Unset, the key is generated (long enough) and every default passes its check."""
    settings = load_settings()
    assert len(settings.secret()) >= SECRET_KEY_MIN_LENGTH


def test_a_command_prints_one_line_per_problem(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("DATABASE_URL", "postgres://u:pw@db/dearmp")
    environment.setenv("DEARMP_MAIL_BACKEDN", "smtp")
    result = CliRunner().invoke(main, ["queues"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        "Error: configuration: DEARMP_MAIL_BACKEDN is not a setting "
        "(did you mean DEARMP_MAIL_BACKEND?)",
        "Error: configuration: DATABASE_URL: postgres:// is not a scheme SQLAlchemy knows: "
        "write postgresql://",
    ]


def clean_environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(OURS)}
    return env | {"DEARMP_DATA_DIR": str(tmp_path / "var")} | variables


def test_a_database_without_tables_is_named_as_such_not_as_unreachable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "submissions", "list"],
        cwd=REPO,
        env=clean_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "Error: the database has no DearMP tables yet: `dearmp migrate` makes them "
        "(or DATABASE_URL names another database)"
    )
    nowhere = tmp_path / "a-file"
    nowhere.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "submissions", "list"],
        cwd=REPO,
        env=clean_environment(tmp_path, DATABASE_URL=f"sqlite:///{nowhere}/x.db"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"Error: configuration: DATABASE_URL: no SQLite file can be made at {nowhere}/x.db "
        f"(File exists: {nowhere})"
    )


@pytest.mark.postgres
def test_a_postgresql_database_without_tables_is_named_as_such(
    tmp_path: Path, pg_cluster: PostgresCluster
) -> None:
    empty = new_pg_database(pg_cluster, "template0")
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "submissions", "list"],
        cwd=REPO,
        env=clean_environment(tmp_path, DATABASE_URL=empty),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("Error: the database has no DearMP tables yet")


def test_the_real_command_line_fails_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "queues"],
        cwd=REPO,
        env=clean_environment(tmp_path, REDIS_URL="http://x"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: configuration: REDIS_URL: not a Redis URL")


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "dramatiq", "workers.pipeline.actors:setup", "--processes", "1", "--threads", "1"],
        ["-m", "uvicorn", "--factory", "workers.web.asgi:application", "--port", "0"],
    ],
    ids=["worker", "api"],
)
def test_a_worker_and_the_api_fail_with_the_line_not_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env=clean_environment(tmp_path, DATABASE_URL="mysql://u:pw@db/dearmp"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "DATABASE_URL" in line]
    assert lines == [
        "configuration: DATABASE_URL: mysql:// is not a database DearMP runs on: "
        "write sqlite:///path/to/file or postgresql://user:password@host/name"
    ]


def test_urls_are_logged_without_their_passwords() -> None:
    assert masked_url("postgresql://dearmp:s3cret@db:5432/dearmp") == (
        "postgresql://dearmp:***@db:5432/dearmp"
    )
    assert masked_url("rediss://:s3cret@redis:6380/0?password=s3cret&db=1") == (
        "rediss://:***@redis:6380/0?password=***&db=1"
    )
    assert masked_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
    assert masked_url("sqlite:////srv/dearmp.sqlite3") == "sqlite:////srv/dearmp.sqlite3"


def test_a_process_says_once_what_it_runs_with(app: App) -> None:
    with capture_logs() as logs:
        log_started(app, "worker")
    [line] = logs
    assert line["event"] == "dearmp_started" and line["process"] == "worker"
    assert line["mail_backend"] == "outbox" and line["outbox_dir"].endswith("outbox")
    assert line["campaigns"] == {"political-prisoners": "live"}
    assert line["redis"] == "stub" and line["database"] == masked_url(
        app.settings.resolved_database_url
    )
    assert "secret" not in repr(line).lower()


def test_a_worker_process_logs_the_line_as_it_boots(app: App) -> None:
    with capture_logs() as logs:
        ProcessApp(lambda: app).after_process_boot(broker=None)  # type: ignore[arg-type]
    assert [e["process"] for e in logs if e["event"] == "dearmp_started"] == ["worker"]
    structlog.contextvars.clear_contextvars()


# A 512-bit RSA key, made for this test only (cryptography will not make one so short).
KEY_512 = """\
-----BEGIN RSA PRIVATE KEY-----
MIIBOgIBAAJBAMgSkDDDRUp5m8VK+vBvh+DYK42ROKACLLmLuK/CVCDQ9JGpWcAf
t7226lnw0Eg/2fVUjYuudzDVb4F9NxBYvMcCAwEAAQJAdyIWmfKsn9wp1SEAq4q9
7jTKOlHu1dh1qUZ5gq7ESYUVanaGPHGgFj3QpwPKny6IBWb8IZXhYjQXSpmK3Yxn
gQIhAOqNZVUgFw0S4T8A7b2a/AwChagGWq62oRSUEMcatcpVAiEA2l4IteKHEAIS
L8bgh7BaiKX7tHKhii6znFOmcehCPqsCIQCW3NVlmFtbPF6GsKk5wDsH2oNvXI7t
O2iGHOphtithdQIgZBzEZY7rWP16FQlamxrRBuECGuKLCO0MT1lSb9qJtG0CICUi
1ztHM+JCW7uZqNgOOmyfLovI6wVFkb4WiSDkhGZz
-----END RSA PRIVATE KEY-----
"""


def test_a_dkim_key_shorter_than_receivers_take_is_refused(environment: pytest.MonkeyPatch) -> None:
    """RFC 8301: a signature by a key under 1024 bits is refused; health said nothing."""
    environment.setenv("DEARMP_DKIM_SELECTOR", "dearmp")
    found = problems(environment, DEARMP_DKIM_PRIVATE_KEY=KEY_512)
    assert found == [
        "DEARMP_DKIM_PRIVATE_KEY: a 512-bit key: receivers refuse under 1024 (use 2048)"
    ]
