"""An address as the mail writer puts it in a header or the SMTP envelope: the one rule, here so
that the settings check with it too (``workers.letters.mail`` imports ``config.settings``, so
the settings cannot import the writer)."""

from __future__ import annotations

import re

import idna

# RFC 5322's dot-atom (what supporters' and MPs' addresses are checked to be) and a host name.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?")


def wire_address(address: str) -> str:
    """An address as it goes in a header or the SMTP envelope, its domain as IDNA: one mailbox
    of RFC 5322's plain form or refused, as the writer's last guard for addresses no validation
    saw (a comma or an angle bracket would name a second recipient). A non-ASCII local part would
    need SMTPUTF8 everywhere: refused too."""
    if "\r" in address or "\n" in address:
        raise ValueError("Header values may not contain linefeed or carriage return characters")
    local, _, domain = address.strip().rpartition("@")
    if not local.isascii():
        raise ValueError("an address with a non-ASCII local part needs SMTPUTF8")
    if not domain.isascii():
        domain = idna.encode(domain, uts46=True).decode("ascii")
    if not (_LOCAL_PART.fullmatch(local) and _DOMAIN.fullmatch(domain)):
        raise ValueError("not one plain address: spaces, controls, quotes and <>,;:()[]\\ refused")
    return f"{local}@{domain}"
