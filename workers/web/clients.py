"""Who is asking: the client's address and user agent, a front end's API key, and the API's
rate limits per network and per supporter."""

from __future__ import annotations

import hmac
import ipaddress
import uuid

from fastapi import Request

from workers.letters.rate_limits import Limit
from workers.pipeline.app import App
from workers.privacy.hashing import embedded_ipv4, ip_hash, limiter_network
from workers.wording import one_line


def client_ip(request: Request) -> str | None:
    """The peer's address (uvicorn applies X-Forwarded-For from trusted proxies), if it is one;
    an IPv4 client's IPv6 form as that IPv4 address, as the rate limits read it."""
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    ipv4 = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    return str(ipv4 or address)


def client_key(app: App, address: str | None) -> str:
    """The keyed hash of the network a rate limit counts for a client address."""
    network = limiter_network(address or "unknown", app.settings.api_ipv6_prefix)
    return ip_hash(app.secret, network)


def user_agent(request: Request) -> str | None:
    """The request's User-Agent as consent evidence: printable, at most 512 characters (what the
    submission schema accepts)."""
    value = request.headers.get("user-agent", "")
    return one_line(value, 512) or None


def authenticated(app: App, key: str | None) -> bool | None:
    """None without a key; True or False for a key checked against DEARMP_API_KEYS."""
    if key is None:
        return None
    configured = app.settings.api_keys
    keys = configured.get_secret_value().split(",") if configured else []
    given = key.encode("utf-8", "replace")
    return any(k.strip() and hmac.compare_digest(given, k.strip().encode()) for k in keys)


def over_limit(app: App, *checks: tuple[str, str, int, float]) -> float:
    """Seconds to wait when the client is over one of its limits, else 0. Each check is
    ``(kind, who, limit, window)`` (0: no limit), counted in order until one refuses."""
    for kind, who, limit, window in checks:
        if limit <= 0:
            continue
        rule = Limit(f"api:{kind}:{who}", limit, window)
        wait = app.limiter.reserve(uuid.uuid4().hex, [rule])
        if wait > 0:
            return wait
    return 0.0
