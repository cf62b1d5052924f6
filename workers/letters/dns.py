"""The DNS records a deployment publishes (``dearmp dns``): SPF, DKIM and DMARC for each
campaign's From domain, and MX (and SPF) for the bounce and reply domains. Make the bounce domain
a subdomain of the From domain, so that SPF aligns for DMARC as DKIM does."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization

from config.settings import Settings

# A TXT record's strings hold at most 255 bytes each (RFC 1035 3.3.14); readers join several.
TXT_STRING = 255
TTL = 3600


@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str
    why: str
    placeholder: bool = False  # to be filled in: written as a comment, not a record


def dkim_public_key(private_pem: bytes) -> str:
    """The base64 ``p=`` value of a DKIM record, from the PEM private key."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _spf_record(settings: Settings, name: str, why: str) -> Record:
    """SPF for the relay the letters leave by (a placeholder when there is none to name yet)."""
    if settings.mail_backend == "http":
        return Record(name, "TXT", "v=spf1 include:mailgun.org ~all", why)
    if settings.mail_backend != "smtp":
        return Record(name, "TXT", "v=spf1 ip4:<your mail relay> ~all", why, placeholder=True)
    ip = _ip(settings.smtp_host)
    relay = f"a:{settings.smtp_host}" if ip is None else f"ip{ip.version}:{ip}"
    return Record(name, "TXT", f"v=spf1 {relay} mx ~all", why)


def _dkim_record(settings: Settings, key: bytes | None, domain: str) -> Record:
    """DKIM for the key letters are signed with (a placeholder while there is none)."""
    if key is None or not settings.dkim_selector:
        why = "DKIM: set DEARMP_DKIM_PRIVATE_KEY(_FILE) and DEARMP_DKIM_SELECTOR first"
        value = "v=DKIM1; k=rsa; p=<public key>"
        return Record(f"<selector>._domainkey.{domain}", "TXT", value, why, placeholder=True)
    value = f"v=DKIM1; k=rsa; p={dkim_public_key(key)}"
    why = "DKIM: the key letters are signed with"
    return Record(f"{settings.dkim_selector}._domainkey.{domain}", "TXT", value, why)


def mx_host_name(settings: Settings, given: str | None) -> str:
    """The MX's host name: ``given``, else DEARMP_PUBLIC_URL's; never an address (RFC 5321 5.1)."""
    host = (given or urlsplit(settings.public_url).hostname or "").rstrip(".")
    if not host:
        raise ValueError("give --mx the host name of the machine running `dearmp inbound`")
    if _ip(host) is not None:
        raise ValueError(
            f"an MX needs a host name, not an address ({host}): give --mx a name whose A/AAAA "
            "record points at the machine running `dearmp inbound`"
        )
    return host


def records(
    settings: Settings, from_domains: list[str], mx_host: str | None = None
) -> list[Record]:
    """The records for ``from_domains``; ValueError if ``mx_host`` is an address. Without one,
    the MX is DEARMP_PUBLIC_URL's host, or a placeholder."""
    mx, unnamed = "", False
    if settings.bounce_domain or settings.reply_domain:
        try:
            mx = mx_host_name(settings, mx_host)
        except ValueError:
            if mx_host:
                raise
            mx, unnamed = "<host name of the machine running dearmp inbound>", True
    out: list[Record] = []
    key = settings.dkim_key()
    for domain in sorted(set(from_domains)):
        if not settings.bounce_domain:
            out.append(_spf_record(settings, domain, "SPF: letters' envelope sender"))
        out.append(_dkim_record(settings, key, domain))
        dmarc = f"v=DMARC1; p=none; adkim=r; aspf=r; rua=mailto:dmarc-reports@{domain}"
        why = "DMARC: start at p=none, read the reports, then move to p=quarantine"
        out.append(Record(f"_dmarc.{domain}", "TXT", dmarc, why))
    unnamed_why = "; DEARMP_PUBLIC_URL names an address, and an MX needs a host: give --mx"
    unnamed_why = unnamed_why if unnamed else ""
    if settings.bounce_domain:
        why = "bounces come back here" + unnamed_why
        out.append(Record(settings.bounce_domain, "MX", f"10 {mx}.", why, placeholder=unnamed))
        out.append(_spf_record(settings, settings.bounce_domain, "SPF: the envelope sender's"))
    if settings.reply_domain:
        why = "MPs' replies come here" + unnamed_why
        out.append(Record(settings.reply_domain, "MX", f"10 {mx}.", why, placeholder=unnamed))
    return out


def _txt(value: str) -> str:
    """A TXT value as quoted strings of at most 255 characters each."""
    parts = [value[i : i + TXT_STRING] for i in range(0, len(value), TXT_STRING)]
    return " ".join(f'"{part}"' for part in parts)


def zone_lines(found: list[Record]) -> list[str]:
    """The records as zone-file lines, each with its reason as a comment (a placeholder is
    commented out too)."""
    lines = [f"$TTL {TTL}"]
    for record in found:
        value = _txt(record.value) if record.type == "TXT" else record.value
        lines.append(f"; {record.why}")
        line = f"{record.name}. IN {record.type} {value}"
        lines.append(f"; {line}" if record.placeholder else line)
    return lines
