"""Keyed hashes: identify a supporter or a client address without storing it."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from contextlib import suppress
from typing import Any

import idna

from workers.logging import mask_text


def keyed_hash(secret: bytes, value: str, purpose: str) -> str:
    """HMAC-SHA256 of ``value``; ``purpose`` keeps hashes of one kind from matching another."""
    return hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()


def mask_supporter(text: str, payload: Any) -> str:
    """``text`` with the supporter's own details (and anything email- or postcode-shaped) hidden."""
    supporter = payload.get("supporter", {}) if isinstance(payload, dict) else {}
    details = [supporter.get("name"), supporter.get("email"), supporter.get("phone")]
    details += [supporter.get("postcode"), *supporter.get("address_lines", [])]
    for value in sorted((d for d in details if isinstance(d, str) and d), key=len, reverse=True):
        text = text.replace(value, "[hidden]")
    return mask_text(text)


def canonical_email(email: str) -> str:
    """One form per mailbox for identifying a supporter: lower case, the domain as IDNA (as the
    submission stores it). Only a non-ASCII domain goes through IDNA, which is costly."""
    local, _, domain = email.strip().lower().rpartition("@")
    if not domain.isascii():
        with suppress(idna.IDNAError):
            domain = idna.encode(domain, uts46=True).decode("ascii")
    return f"{local}@{domain}"


# Providers that deliver ``a.b.c@`` to ``abc@``.
DOTLESS_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


def limiter_email(email: str) -> str:
    """The mailbox an address reaches, as a rate-limit key only: no ``+tag``, and no dots for
    providers that ignore them, so one person cannot take a fresh limit with ``me+1@``."""
    local, _, domain = canonical_email(email).rpartition("@")
    local = local.split("+", 1)[0]
    if domain in DOTLESS_DOMAINS:
        local = local.replace(".", "")
        domain = "gmail.com"
    return f"{local}@{domain}"


# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 client's address.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, 6to4 or NAT64), else None."""
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


def limiter_network(ip: str, ipv6_prefix: int = 64) -> str:
    """The client a rate limit counts: an IPv4 address, or an IPv6 address's network (a host gets
    a whole /64); an IPv6 form of an IPv4 address counts as that IPv4 address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    ipv4 = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else address
    if ipv4 is not None:
        return str(ipv4)
    return str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))


def supporter_hash(secret: bytes, email: str) -> str:
    return keyed_hash(secret, canonical_email(email), "supporter-email")


def ip_hash(secret: bytes, ip: str) -> str:
    return keyed_hash(secret, ip, "client-ip")
