"""Settings an operator gets wrong are refused at start, with what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from config.settings import Settings, get_settings
from tests.conftest import make_settings
from tests.services import REPO, SmtpSink
from workers.cli import main
from workers.letters.mail import Outgoing, SmtpMailer


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SMTP_CA_FILE", "DEARMP_DKIM_PRIVATE_KEY_FILE", "DATABASE_URL", "SMTP_PORT"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.smtp_ca_file is None and settings.dkim_private_key_file is None
    assert settings.database_url is None and settings.smtp_port == 25
    assert settings.dkim_key() is None


@pytest.mark.parametrize("address", ["sandbox@localhost", "sandbox@relay", "a@b.localhost"])
def test_sandbox_letters_need_a_real_mailbox_when_they_go_to_a_mail_server(
    address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_settings(tmp_path, sandbox_address=address)  # the outbox takes any address
    http = {"email_api_key": "key-1", "email_api_domain": "campaign.example.org"}
    for backend, more in (("smtp", {}), ("http", http)):
        with pytest.raises(ValidationError, match="DEARMP_SANDBOX_ADDRESS must be a real"):
            make_settings(tmp_path, mail_backend=backend, sandbox_address=address, **more)
    monkeypatch.setenv("DEARMP_MAIL_BACKEND", "smtp")
    monkeypatch.setenv("DEARMP_SANDBOX_ADDRESS", address)
    monkeypatch.setenv("DEARMP_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["queues"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: configuration: DEARMP_SANDBOX_ADDRESS must be")


@pytest.mark.smtp
def test_the_ehlo_name_is_the_configured_one(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    settings = make_settings(
        tmp_path,
        mail_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp_sink.port,
        smtp_helo_name="mail.campaign.example.org",
    )
    data = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nhello\r\n"
    SmtpMailer(settings).send(Outgoing("a@example.org", ["b@example.org"], data, "<1@x>"))
    assert smtp_sink.helo_names == ["mail.campaign.example.org"]


def example_variables() -> dict[str, str]:
    """The variables ``.env.example`` sets, with their values."""
    lines = (REPO / ".env.example").read_text().splitlines()
    pairs = [line.partition("=") for line in lines if line and not line.startswith("#")]
    return {name: value for name, _, value in pairs}


def test_the_example_environment_names_every_variable_and_nothing_else() -> None:
    names = list(example_variables())
    assert len(names) == len(set(names))
    assert set(names) == {f.alias for f in Settings.model_fields.values()}


def test_the_example_environment_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copied as it is, ``.env.example`` changes nothing: its values are the defaults."""
    for name in example_variables():
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    for name, value in example_variables().items():
        monkeypatch.setenv(name, value)
    assert Settings() == defaults


def test_a_policy_made_without_settings_has_the_settings_defaults() -> None:
    """The defaults live in Settings only: the policies' own are read from there."""
    from workers.outbox.sending import OutboxPolicy
    from workers.pipeline import reconciler
    from workers.pipeline.runtime import reconciler_options
    from workers.stages.confirmation import ConfirmationPolicy
    from workers.stages.delivery import DeliveryPolicy
    from workers.stages.inbound import InboundPolicy

    defaults = Settings.model_construct()
    for policy in (DeliveryPolicy, ConfirmationPolicy, InboundPolicy):
        assert policy() == policy.from_settings(defaults)
    options = reconciler_options(defaults)
    assert (reconciler.HELD_RECHECK, reconciler.MAX_DEAD_LETTERS, reconciler.LEASE) == (
        options["held_recheck"],
        options["max_dead_letters"],
        options["lease"],
    )
    assert OutboxPolicy().lease_seconds == defaults.delivery_lease_seconds
    assert OutboxPolicy().max_attempts == defaults.outbox_max_attempts
    assert OutboxPolicy().first_backoff == defaults.outbox_backoff_seconds


def test_an_smtp_ca_file_that_loads_no_certificates_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "not-pem.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "not-pem.pem"):
        with pytest.raises(ValidationError, match="no certificates can be read from"):
            make_settings(tmp_path, smtp_ca_file=path)
