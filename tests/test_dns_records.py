"""`dearmp dns` prints records a zone parser (dnspython) loads as they are, with values that do
what they say: SPF names an address with ip4:/ip6:, a DKIM key longer than one TXT string is
split, DMARC starts at p=none, and an MX names a host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rdatatype
import dns.zone
import pytest
from click.testing import CliRunner, Result

from tests.conftest import make_settings
from tests.services import dkim_keys
from workers.cli import main
from workers.letters.dns import records, zone_lines
from workers.pipeline.app import App, set_app

FROM = "campaign.example.org"
BOUNCES = f"bounces.{FROM}"
REPLIES = f"replies.{FROM}"


def zone(lines: list[str]) -> dns.zone.Zone:
    """The lines as a zone file, loaded by dnspython (which refuses what a server would)."""
    text = "\n".join(lines) + "\n"
    return dns.zone.from_text(text, origin="example.org.", check_origin=False, relativize=False)


def txt(loaded: dns.zone.Zone, name: str) -> list[str]:
    """Each TXT record at ``name``, its strings joined as a reader joins them."""
    rdataset = loaded.get_rdataset(f"{name}.", dns.rdatatype.TXT)
    assert rdataset is not None, name
    return [b"".join(r.strings).decode() for r in rdataset]


def settings(tmp_path: Path, **values: Any) -> Any:
    signing = {"dkim_private_key": dkim_keys()[0].decode(), "dkim_selector": "dearmp"}
    return make_settings(tmp_path, **(signing | values))


@pytest.mark.parametrize(
    ("relay", "mechanism"),
    [("203.0.113.5", "ip4:203.0.113.5"), ("2001:db8::25", "ip6:2001:db8::25"),
     ("relay.example.org", "a:relay.example.org")],
)  # fmt: skip
def test_every_record_loads_in_a_zone_file_and_means_what_it_says(
    tmp_path: Path, relay: str, mechanism: str
) -> None:
    config = settings(
        tmp_path,
        mail_backend="smtp",
        smtp_host=relay,
        bounce_domain=BOUNCES,
        reply_domain=REPLIES,
    )
    loaded = zone(zone_lines(records(config, [FROM], "mx.example.org")))
    [spf] = txt(loaded, BOUNCES)
    assert spf == f"v=spf1 {mechanism} mx ~all"
    [dkim] = txt(loaded, f"dearmp._domainkey.{FROM}")
    assert dkim == dkim_keys()[1].decode()  # 2048-bit: over 255 characters, split and joined
    assert len(dkim) > 255
    [dmarc] = txt(loaded, f"_dmarc.{FROM}")
    assert "p=none;" in dmarc  # where the README says to start
    for domain in (BOUNCES, REPLIES):
        mx = loaded.get_rdataset(f"{domain}.", dns.rdatatype.MX)
        assert mx is not None and [str(r.exchange) for r in mx] == ["mx.example.org."]


def test_records_still_to_be_filled_in_are_comments_so_the_zone_still_loads(
    tmp_path: Path,
) -> None:
    config = make_settings(tmp_path)  # no DKIM key, no relay (the file outbox)
    lines = zone_lines(records(config, [FROM]))
    loaded = zone(lines)
    assert loaded.get_rdataset(f"_dmarc.{FROM}.", dns.rdatatype.TXT) is not None
    assert any("<selector>._domainkey" in line and line.startswith(";") for line in lines)


@pytest.fixture
def cli_app(tmp_path: Path) -> Iterator[Any]:
    """`dearmp` commands run on an App of the given settings."""
    made: list[App] = []

    def run(*args: str, **values: Any) -> Result:
        made.append(App.from_settings(settings(tmp_path, **values)))
        set_app(made[-1])
        return CliRunner().invoke(main, ["dns", *args])

    yield run
    set_app(None)
    for app in made:
        app.engine.dispose()


def test_an_address_as_the_mx_is_refused_with_what_to_do(cli_app: Any) -> None:
    given = cli_app("--mx", "203.0.113.7", bounce_domain=BOUNCES)
    assert given.exit_code == 1
    assert "an MX needs a host name" in given.output and "--mx" in given.output
    # With no --mx, DEARMP_PUBLIC_URL's host is used: here 127.0.0.1, an address too. The
    # other records are printed; the MX is a comment that says to give --mx.
    default = cli_app(reply_domain=REPLIES)
    assert default.exit_code == 0, default.output
    mx_lines = [line for line in default.stdout.splitlines() if " MX " in line]
    assert mx_lines and all(line.startswith(";") for line in mx_lines)
    assert "an MX needs a host: give --mx" in default.stdout
    zone(default.stdout.splitlines())  # still a zone that loads


def test_mx_without_a_bounce_or_reply_domain_says_so(cli_app: Any) -> None:
    result = cli_app("--mx", "mx.example.org")
    assert result.exit_code == 1
    assert "DEARMP_BOUNCE_DOMAIN" in result.output and result.stdout == ""


def test_the_command_prints_a_zone_that_loads(cli_app: Any) -> None:
    result = cli_app("--mx", "mx.example.org", bounce_domain=BOUNCES, smtp_host="203.0.113.5",
                     mail_backend="smtp")  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = zone(result.stdout.splitlines())
    assert txt(loaded, BOUNCES) == ["v=spf1 ip4:203.0.113.5 mx ~all"]
