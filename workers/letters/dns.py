"""The DNS records a deployment publishes so that its letters are delivered and what comes back
reaches it: SPF, DKIM and DMARC for each campaign's From domain, and MX (and SPF) for the
bounce and reply domains. ``dearmp dns`` prints them.

DMARC passes when DKIM (signed for the From domain) or SPF (checked on the envelope sender's
domain) aligns with the From domain. With a bounce domain, SPF is checked on it: make it a
subdomain of the From domain (``bounces.example.org`` for ``example.org``), so that relaxed
alignment holds for SPF as well as DKIM.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization

from config.settings import Settings


@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str
    why: str


def dkim_public_key(private_pem: bytes) -> str:
    """The base64 ``p=`` value of a DKIM record, from the PEM private key."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _spf(settings: Settings) -> str:
    if settings.mail_backend == "http":
        return "v=spf1 include:mailgun.org ~all"
    if settings.mail_backend == "smtp":
        return f"v=spf1 a:{settings.smtp_host} mx ~all"
    return "v=spf1 a:<your mail relay> ~all"


def records(
    settings: Settings, from_domains: list[str], mx_host: str | None = None
) -> list[Record]:
    mx = mx_host or urlsplit(settings.public_url).hostname or "<the host running dearmp inbound>"
    out: list[Record] = []
    key = settings.dkim_key()
    for domain in sorted(set(from_domains)):
        if not settings.bounce_domain:
            out.append(Record(domain, "TXT", _spf(settings), "SPF: letters' envelope sender"))
        if key is not None and settings.dkim_selector:
            value = f"v=DKIM1; k=rsa; p={dkim_public_key(key)}"
            out.append(
                Record(
                    f"{settings.dkim_selector}._domainkey.{domain}",
                    "TXT",
                    value,
                    "DKIM: the key letters are signed with",
                )
            )
        else:
            out.append(
                Record(
                    f"<selector>._domainkey.{domain}",
                    "TXT",
                    "v=DKIM1; k=rsa; p=<public key>",
                    "DKIM: set DEARMP_DKIM_PRIVATE_KEY(_FILE) and DEARMP_DKIM_SELECTOR first",
                )
            )
        out.append(
            Record(
                f"_dmarc.{domain}",
                "TXT",
                f"v=DMARC1; p=quarantine; adkim=r; aspf=r; rua=mailto:dmarc-reports@{domain}",
                "DMARC: receivers check DKIM/SPF alignment with the From domain",
            )
        )
    if settings.bounce_domain:
        out.append(Record(settings.bounce_domain, "MX", f"10 {mx}.", "bounces come back here"))
        out.append(
            Record(settings.bounce_domain, "TXT", _spf(settings), "SPF: the envelope sender's")
        )
    if settings.reply_domain:
        out.append(Record(settings.reply_domain, "MX", f"10 {mx}.", "MPs' replies come here"))
    return out


def zone_lines(found: list[Record]) -> list[str]:
    """The records as zone-file lines, each with its reason as a comment."""
    lines = []
    for record in found:
        value = f'"{record.value}"' if record.type == "TXT" else record.value
        lines.append(f"; {record.why}")
        lines.append(f"{record.name}. IN {record.type} {value}")
    return lines
