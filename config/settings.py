"""The one typed settings object, read from the environment at start-up.

Unset means "embedded default": an embedded Redis server, a SQLite file under ``DATA_DIR``,
the sample campaign and the fictional MP directory shipped in ``config/``, and a file outbox.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import secrets
import ssl
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from dkim.crypto import UnparsableKeyError, parse_pem_private_key
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from config.addresses import wire_address

CONFIG_DIR = Path(__file__).resolve().parent

# A URL's [user[:password]@]host[:port], the host a name or a bracketed IPv6 address.
NETLOC_RE = re.compile(r"(?:[^@/]*@)?(?:\[[0-9A-Fa-f:.]+\]|[^:@/\[\]]*)(?::\d*)?")
PASSWORD_PARAMETER_RE = re.compile(r"(?i)([?&]password=)[^&#]*")

# Variables with these prefixes are ours: one that is not a setting is a mistake (a misspelled
# name would otherwise be ignored, and its default used).
PREFIXES = ("DEARMP_", "SMTP_", "MAILGUN_")
EMBEDDED_UNLESS_SET = ("DATABASE_URL", "REDIS_URL")
# Variables with those prefixes read by name outside Settings (none today): known all the same.
READ_ELSEWHERE: frozenset[str] = frozenset()

# Rate limits (DEARMP_MP_LIMIT*, DEARMP_API_*_LIMIT, *_WINDOW): the largest count, and the longest
# window in seconds (31 days).
RATE_COUNT = 1_000_000_000
RATE_WINDOW = 31 * 86_400

# The keyed hashes (client IPs, supporters, return addresses) are only as strong as their key:
# `openssl rand -hex 32` gives 64 characters; the key DearMP generates itself is 64 too.
SECRET_KEY_MIN_LENGTH = 32


# A fully qualified host name: two labels or more, letters, digits and inner hyphens, a top
# label that is not all digits.
FQDN_RE = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
# A DKIM selector: DNS labels (letters, digits, inner hyphens) joined by dots. It is written into
# every DKIM-Signature header: a CR, an LF or a ``;`` would start another header or tag.
SELECTOR_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
ADDRESS_LITERAL_RE = re.compile(r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]")


def _loopback(host: str) -> bool:
    """``host`` is this machine (a name that resolves elsewhere is not: nothing is looked up)."""
    if host.lower().rstrip(".") in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _one_edit(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by one letter added, dropped, changed, or two swapped."""
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
        return len(diff) == 1 or (swapped and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return len(long) - len(short) == 1 and any(
        long[:i] + long[i + 1 :] == short for i in range(len(long))
    )


class Settings(BaseSettings):
    # An empty variable means unset (SMTP_CA_FILE= is no CA file, not the current directory).
    # No number is inf or nan (inf overflows every date and Redis expiry; nan passes no check),
    # and each has an upper bound an operator never needs to pass, which keeps timedelta, date
    # arithmetic and Redis's expiries (whole milliseconds) far from overflow: why each bound is
    # what it is, is said with the setting.
    model_config = SettingsConfigDict(
        allow_inf_nan=False,
        env_prefix="",
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
    )

    # Where embedded state lives (SQLite file, embedded Redis socket, outbox, secret key).
    data_dir: Path = Field(default=Path("var"), alias="DEARMP_DATA_DIR")

    # Transport and source of truth. Empty means embedded.
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    broker: Literal["redis", "stub"] = Field(default="redis", alias="DEARMP_BROKER")
    redis_namespace: str = Field(default="dearmp", alias="DEARMP_REDIS_NAMESPACE")
    # A worker silent for this long is dead: its unfinished messages go back on their queue at
    # the next maintenance pass, which runs on this many of every million broker commands.
    # A pass only takes back the dead worker's messages of the queue the command was about, and an
    # idle queue is polled about once a second: at 1 in 5, a dead worker's message is back within
    # 30 s of its timeout with a probability of 1 - 0.8^30 (over 99.9 %). A pass with no dead
    # worker costs two range reads. (dramatiq's defaults, 60 s and 1,000 per million, can leave
    # a crashed worker's message for many minutes; our earlier 5 % left one for 45 s 1 time in 10.)
    # At most an hour: a dead worker's messages wait that long.
    broker_heartbeat_timeout_ms: int = Field(
        default=15_000, ge=1_000, le=3_600_000, alias="DEARMP_BROKER_HEARTBEAT_TIMEOUT_MS"
    )
    broker_maintenance_chance: int = Field(
        default=200_000, ge=1, le=1_000_000, alias="DEARMP_BROKER_MAINTENANCE_CHANCE"
    )

    # What the stages move on is held this long and sent to the next stage in groups
    # (workers.pipeline.handoff); 0 sends each transaction's submissions at once.
    handoff_linger_ms: float = Field(
        default=100.0, ge=0, le=1_000, alias="DEARMP_HANDOFF_LINGER_MS"
    )

    # Campaigns are data: TOML files in this folder.
    campaigns_dir: Path = Field(default=CONFIG_DIR / "campaigns", alias="DEARMP_CAMPAIGNS_DIR")

    # Keyed hashes (client IP, supporter identity). Generated and kept in data_dir if unset.
    secret_key: SecretStr | None = Field(default=None, alias="DEARMP_SECRET_KEY")

    # Delivery.
    mail_backend: Literal["outbox", "smtp", "http"] = Field(
        default="outbox", alias="DEARMP_MAIL_BACKEND"
    )
    outbox_dir: Path | None = Field(default=None, alias="DEARMP_OUTBOX_DIR")
    smtp_host: str = Field(default="localhost", alias="SMTP_HOST")
    smtp_port: int = Field(default=25, ge=1, le=65535, alias="SMTP_PORT")
    smtp_username: str | None = Field(default=None, alias="SMTP_USERNAME")
    smtp_password: SecretStr | None = Field(default=None, alias="SMTP_PASSWORD")
    smtp_security: Literal["none", "starttls", "tls"] = Field(default="none", alias="SMTP_SECURITY")
    # Timeouts of a mail server or provider: at most 120 s, the longest a send may take (the
    # delivery actor's time limit); a longer one could never be reached.
    smtp_timeout: float = Field(default=30.0, gt=0, le=120, alias="SMTP_TIMEOUT")
    # The name this host gives in EHLO; relays check it. Unset: the machine's own name.
    smtp_helo_name: str | None = Field(default=None, alias="SMTP_HELO_NAME")
    # Sessions to the relay, per worker process: at most this many open at once, each closed
    # (with QUIT) when this old, after this many letters, or when idle this long: at most an
    # hour and 10,000 letters (relays close sessions long before).
    smtp_max_connections: int = Field(default=4, ge=1, le=100, alias="SMTP_MAX_CONNECTIONS")
    smtp_connection_max_age: float = Field(
        default=60.0, gt=0, le=3600, alias="SMTP_CONNECTION_MAX_AGE"
    )
    smtp_connection_max_letters: int = Field(
        default=100, ge=1, le=10_000, alias="SMTP_CONNECTION_MAX_LETTERS"
    )
    smtp_connection_idle: float = Field(default=5.0, gt=0, le=3600, alias="SMTP_CONNECTION_IDLE")
    # When the relay refuses us (our login, our sender, our right to relay), or the http
    # provider our key or domain, delivery pauses for this long, doubling with each refusal in a
    # row up to 15 minutes.
    smtp_pause: float = Field(default=30.0, ge=1, le=900, alias="SMTP_PAUSE_SECONDS")
    # Extra CA bundle to trust for the SMTP server's certificate (a private CA, or tests).
    smtp_ca_file: Path | None = Field(default=None, alias="SMTP_CA_FILE")
    # The HTTP email provider (Mailgun's raw-MIME API: the message is sent byte for byte).
    email_api_url: str = Field(default="https://api.mailgun.net", alias="EMAIL_API_URL")
    email_api_key: SecretStr | None = Field(default=None, alias="EMAIL_API_KEY")
    email_api_domain: str | None = Field(default=None, alias="EMAIL_API_DOMAIN")
    email_api_timeout: float = Field(default=15.0, gt=0, le=120, alias="EMAIL_API_TIMEOUT")
    # DKIM: sign every letter when a key and selector are set.
    dkim_private_key: SecretStr | None = Field(default=None, alias="DEARMP_DKIM_PRIVATE_KEY")
    dkim_private_key_file: Path | None = Field(default=None, alias="DEARMP_DKIM_PRIVATE_KEY_FILE")
    dkim_selector: str | None = Field(default=None, alias="DEARMP_DKIM_SELECTOR")
    # Letters of campaigns in sandbox mode go here, with the intended MP noted at the top. With
    # a mail server it must be a real mailbox (relays refuse sandbox@localhost for good).
    sandbox_address: str = Field(default="sandbox@localhost", alias="DEARMP_SANDBOX_ADDRESS")
    # Rate limits, across every worker process (Redis-backed). 0 means no limit. Each window is
    # 1 s to 31 days (RATE_WINDOW): its entries live in Redis that long, in whole milliseconds
    # (a shorter window would be 0 ms: no limit). A count is at most a billion (RATE_COUNT: a
    # benchmark sets 100,000,000 to count without refusing), a send rate 1,000 letters a second.
    mp_limit: int = Field(default=0, ge=0, le=RATE_COUNT, alias="DEARMP_MP_LIMIT")
    mp_limit_window: float = Field(
        default=3600.0, ge=1, le=RATE_WINDOW, alias="DEARMP_MP_LIMIT_WINDOW"
    )
    send_rate_per_second: float = Field(default=0.0, ge=0, le=1000, alias="DEARMP_SEND_RATE")
    # A delivery claimed longer ago than this by a worker that never finished is taken back: at
    # most a day (a longer lease leaves a dead worker's letter unsent for days).
    delivery_lease_seconds: int = Field(
        default=300, ge=5, le=86_400, alias="DEARMP_DELIVERY_LEASE_SECONDS"
    )

    # After this many attempts that failed for a passing reason, the letter is a recorded failure
    # (at most 100: with waits of up to an hour, days of trying).
    delivery_max_attempts: int = Field(
        default=20, ge=1, le=100, alias="DEARMP_DELIVERY_MAX_ATTEMPTS"
    )

    # After a letter is sent. Each letter's envelope sender (Return-Path) is an address of its
    # own on the bounce domain, and, for campaigns with ``replies = "relay"``, its Reply-To one on
    # the reply domain: what comes back to them names the letter (HMAC-signed tokens). Unset: the
    # envelope sender is the campaign's From address, and nothing comes back to DearMP.
    bounce_domain: str | None = Field(default=None, alias="DEARMP_BOUNCE_DOMAIN")
    reply_domain: str | None = Field(default=None, alias="DEARMP_REPLY_DOMAIN")
    # `dearmp inbound`: the SMTP receiver for those domains. At most: a message of 100 MB (it is
    # held in memory; providers refuse far smaller), 100,000 messages a minute from a peer,
    # 10,000 sessions, and an hour for a session's idle and whole times (a relay retries).
    inbound_host: str = Field(default="127.0.0.1", alias="DEARMP_INBOUND_HOST")
    inbound_port: int = Field(default=2525, ge=1, le=65535, alias="DEARMP_INBOUND_PORT")
    inbound_max_bytes: int = Field(
        default=10_000_000, ge=10_000, le=100_000_000, alias="DEARMP_INBOUND_MAX_BYTES"
    )
    # Messages one peer may send per minute; more are told to try later (450).
    inbound_peer_per_minute: int = Field(
        default=600, ge=1, le=100_000, alias="DEARMP_INBOUND_PEER_PER_MINUTE"
    )
    # Sessions open at once (more are answered 421), and seconds without a byte before a
    # session is closed (RFC 5321 suggests 5 minutes; a sender whose session is closed retries).
    inbound_max_sessions: int = Field(
        default=100, ge=1, le=10_000, alias="DEARMP_INBOUND_MAX_SESSIONS"
    )
    inbound_idle_seconds: float = Field(
        default=60.0, gt=0, le=3600, alias="DEARMP_INBOUND_IDLE_SECONDS"
    )
    # Sessions open at once from one address (more are answered 421: one host cannot take every
    # place), and seconds a session may last in all, bytes or none (a peer sending a byte a
    # minute is never idle; 10 minutes carries the largest message at a slow relay's pace).
    inbound_max_sessions_per_peer: int = Field(
        default=5, ge=1, le=10_000, alias="DEARMP_INBOUND_MAX_SESSIONS_PER_PEER"
    )
    inbound_session_seconds: float = Field(
        default=600.0, gt=0, le=3600, alias="DEARMP_INBOUND_SESSION_SECONDS"
    )
    # A certificate (PEM, with its chain) and its key: the receiver offers STARTTLS. Unset: no
    # STARTTLS (relays then deliver in clear).
    inbound_tls_cert: Path | None = Field(default=None, alias="DEARMP_INBOUND_TLS_CERT")
    inbound_tls_key: Path | None = Field(default=None, alias="DEARMP_INBOUND_TLS_KEY")
    # Letters to one MP address returned for good within the window mark it failing: new
    # letters to that MP are held until the directory has a new address or an operator says ok.
    # At most 1,000 letters within 30 days (720 hours): older bounces say little of the address.
    failing_after_bounces: int = Field(
        default=3, ge=1, le=1000, alias="DEARMP_FAILING_AFTER_BOUNCES"
    )
    failing_window_hours: float = Field(
        default=24.0, gt=0, le=720, alias="DEARMP_FAILING_WINDOW_HOURS"
    )
    # Replies forwarded to the supporter per letter, at most.
    forwards_per_letter: int = Field(default=5, ge=1, le=100, alias="DEARMP_FORWARDS_PER_LETTER")
    # The authserv-id (RFC 8601) of the relay in front of `dearmp inbound`, comma-separated if
    # several: only its Authentication-Results headers are believed (anyone can write one), and
    # it must remove any arriving with its own id. A reply whose sender is not on the MP
    # address's domain, or that the relay found failing DMARC, is held for an operator.
    inbound_authserv_id: str | None = Field(default=None, alias="DEARMP_INBOUND_AUTHSERV_ID")
    # Mailgun's webhook signing key (`POST /v1/webhooks/mailgun`). Unset: the endpoint refuses.
    mailgun_signing_key: SecretStr | None = Field(default=None, alias="MAILGUN_WEBHOOK_SIGNING_KEY")

    # Resolution: the local directory, the live sources (postcodes.io, the Members API), or the
    # local directory with the live sources as fallback for postcodes it does not know.
    resolution_order: Literal["local", "local,live", "live"] = Field(
        default="local", alias="DEARMP_RESOLUTION_ORDER"
    )
    postcodes_io_url: str = Field(default="https://api.postcodes.io", alias="POSTCODES_IO_URL")
    members_api_url: str = Field(
        default="https://members-api.parliament.uk", alias="MEMBERS_API_URL"
    )
    # A request's timeout and the longest wait in a thread at most 60 s, the resolving actor's
    # time limit; the first backoff at most 10 s (doubling, over at most 10 attempts).
    lookup_timeout: float = Field(default=10.0, gt=0, le=60, alias="DEARMP_LOOKUP_TIMEOUT")
    # Attempts per request for connection errors, 429 and 5xx (then the actor's own retries).
    lookup_attempts: int = Field(default=3, ge=1, le=10, alias="DEARMP_LOOKUP_ATTEMPTS")
    lookup_backoff: float = Field(default=0.5, ge=0, le=10, alias="DEARMP_LOOKUP_BACKOFF")
    # Longest Retry-After honoured inside one attempt; longer waits go back to the queue.
    lookup_max_wait: float = Field(default=30.0, ge=0, le=60, alias="DEARMP_LOOKUP_MAX_WAIT")
    # A live answer is kept at most 30 days: MPs change.
    lookup_cache_ttl: float = Field(
        default=86_400.0, ge=0, le=2_592_000, alias="DEARMP_LOOKUP_CACHE_TTL"
    )
    # Held submissions (vacant seat) are looked at again this often, and at each new directory:
    # at least once a week (7 days).
    held_recheck: float = Field(default=21_600.0, gt=0, le=604_800, alias="DEARMP_HELD_RECHECK")

    # The HTTP intake (`dearmp api`).
    public_url: str = Field(default="http://127.0.0.1:8000", alias="DEARMP_PUBLIC_URL")
    # A submission is a few kilobytes: a body of 10 MiB at most.
    api_max_body_bytes: int = Field(
        default=65_536, ge=1024, le=10_485_760, alias="DEARMP_API_MAX_BODY_BYTES"
    )
    # Per hashed client IP and per supporter email, across every API process (Redis). 0: none.
    # Bounded as the rate limits above.
    api_ip_limit: int = Field(default=30, ge=0, le=RATE_COUNT, alias="DEARMP_API_IP_LIMIT")
    api_ip_window: float = Field(default=600.0, ge=1, le=RATE_WINDOW, alias="DEARMP_API_IP_WINDOW")
    api_email_limit: int = Field(default=5, ge=0, le=RATE_COUNT, alias="DEARMP_API_EMAIL_LIMIT")
    api_email_window: float = Field(
        default=3600.0, ge=1, le=RATE_WINDOW, alias="DEARMP_API_EMAIL_WINDOW"
    )
    # IPv6 clients are counted by network: a home or host has a whole /64.
    api_ipv6_prefix: int = Field(default=64, ge=32, le=128, alias="DEARMP_API_IPV6_PREFIX")
    # Keys for server-side front ends (comma-separated). A request with one in its
    # ``X-DearMP-Key`` header may pass the supporter's own ``client_ip`` and ``user_agent`` as
    # consent evidence; any other request's evidence is its own peer address (behind the proxies
    # uvicorn trusts: FORWARDED_ALLOW_IPS) and User-Agent header.
    api_keys: SecretStr | None = Field(default=None, alias="DEARMP_API_KEYS")
    # Sender confirmation: the link's life, and when the one reminder goes; each at most 90
    # days (a supporter who has not confirmed in three months will not).
    confirm_valid_days: float = Field(default=7.0, gt=0, le=90, alias="DEARMP_CONFIRM_VALID_DAYS")
    confirm_reminder_hours: float = Field(
        default=24.0, gt=0, le=2160, alias="DEARMP_CONFIRM_REMINDER_HOURS"
    )
    # The operators' web console (/console): off, answering 404, until accounts are set.
    # Comma-separated ``name:hash`` entries, each hash made by `dearmp console hash-password`.
    console_accounts: SecretStr | None = Field(default=None, alias="DEARMP_CONSOLE_ACCOUNTS")
    # Hours a console login lasts.
    console_session_hours: float = Field(
        default=8.0, gt=0, le=168, alias="DEARMP_CONSOLE_SESSION_HOURS"
    )

    # Reconciler: how often it runs (at least hourly) and how long a submission may sit in one
    # state before it is sent on again (at most a day: a stalled letter waits that long).
    reconcile_interval: float = Field(
        default=60.0, gt=0, le=3600, alias="DEARMP_RECONCILE_INTERVAL"
    )
    reconcile_after: float = Field(default=120.0, gt=0, le=86_400, alias="DEARMP_RECONCILE_AFTER")
    # A submission dead-lettered this many times (each after all of a stage's retries) fails the
    # same way every time: it becomes `failed` with the reason, and is not resent again.
    max_dead_letters: int = Field(default=3, ge=1, le=100, alias="DEARMP_MAX_DEAD_LETTERS")
    # An email to a supporter (workers.outbox) is tried at most this many times: each failed
    # attempt (the mail server's refusal, an error, the worker sending it stopped) waits longer
    # before the next (1 minute, doubling, at most an hour); the last is recorded as failed.
    outbox_max_attempts: int = Field(default=8, ge=1, le=100, alias="DEARMP_OUTBOX_MAX_ATTEMPTS")
    # The wait after the first failed attempt of anything sent (a letter too), doubling after
    # each, at most an hour.
    outbox_backoff_seconds: float = Field(
        default=60.0, gt=0, le=3600, alias="DEARMP_OUTBOX_BACKOFF_SECONDS"
    )
    # A webhook to a CRM (workers/webhooks): seconds to connect, and to wait for each read of its
    # answer; a receiver that takes longer is a failed attempt, retried like any other. At most
    # 50 s: within the webhook actor's time limit (60 s).
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=50, alias="DEARMP_WEBHOOK_TIMEOUT_SECONDS"
    )

    # Threads per process of `dearmp run`, `demo` and `worker`; webhooks take at most half.
    worker_threads: int = Field(default=8, ge=1, le=64, alias="DEARMP_WORKER_THREADS")

    # dramatiq's Prometheus middleware in each worker (per-actor counts and durations), served by
    # the worker's main process on dramatiq_prom_host:dramatiq_prom_port (default 0.0.0.0:9191).
    worker_metrics: bool = Field(default=False, alias="DEARMP_WORKER_METRICS")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", alias="DEARMP_LOG_LEVEL"
    )

    @field_validator("database_url")
    @classmethod
    def _a_database_we_run_on(cls, value: str | None) -> str | None:
        if not value:
            return None
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        dialect = scheme.partition("+")[0]
        if dialect == "postgres":
            raise ValueError("postgres:// is not a scheme SQLAlchemy knows: write postgresql://")
        if dialect not in ("sqlite", "postgresql"):
            what = f"{scheme}:// is" if scheme else "no scheme:"
            raise ValueError(
                f"{what} not a database DearMP runs on: "
                "write sqlite:///path/to/file or postgresql://user:password@host/name"
            )
        try:
            make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL (sqlite:///path, postgresql://...)") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = _split(value)
        if parts is None or parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "not a Redis URL: write redis://host:6379/0, rediss://host:6380/0 (TLS) "
                "or unix:///path/to/redis.sock"
            )
        if parts.scheme == "unix" and not parts.path:
            raise ValueError("a unix:// URL needs the socket's path: unix:///path/to/redis.sock")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"a {parts.scheme}:// URL needs a host: {parts.scheme}://host:6379/0")
        return value

    @field_validator("public_url", "email_api_url", "postcodes_io_url", "members_api_url")
    @classmethod
    def _a_web_address(cls, value: str) -> str:
        parts = _split(value)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// address with a host")
        return value

    @field_validator("sandbox_address")
    @classmethod
    def _an_address(cls, value: str) -> str:
        """Checked with the mail writer's own rule: an address it refuses fails every letter."""
        try:
            wire_address(value)
        except ValueError as exc:
            raise ValueError(
                f"must be an email address such as sandbox@campaign.example.org ({exc})"
            ) from None
        return value

    @field_validator("bounce_domain", "reply_domain")
    @classmethod
    def _a_domain(cls, value: str | None) -> str | None:
        if value is None or FQDN_RE.fullmatch(value):
            return value
        raise ValueError("must be a domain name such as bounces.campaign.example.org")

    @field_validator("dkim_selector")
    @classmethod
    def _a_selector(cls, value: str | None) -> str | None:
        if value is None or (len(value) <= 253 and SELECTOR_RE.fullmatch(value)):
            return value
        raise ValueError(
            "must be a DNS name such as dearmp or s1.2024 (labels of letters, digits and inner "
            "hyphens, joined by dots)"
        )

    @field_validator("secret_key")
    @classmethod
    def _a_long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or len(value.get_secret_value()) >= SECRET_KEY_MIN_LENGTH:
            return value
        raise ValueError(
            f"must be at least {SECRET_KEY_MIN_LENGTH} characters (openssl rand -hex 32 "
            "makes one), or unset to have one generated in DEARMP_DATA_DIR"
        )

    @field_validator("console_accounts")
    @classmethod
    def _console_accounts_read(cls, value: SecretStr | None) -> SecretStr | None:
        """Each entry a name and a password hash: a typo would lock everyone out unseen."""
        if value is not None:
            console_accounts(value.get_secret_value())
        return value

    @field_validator("smtp_helo_name")
    @classmethod
    def _helo_is_a_full_name(cls, value: str | None) -> str | None:
        """A relay that checks EHLO refuses a name that is not fully qualified (Postfix's
        ``reject_non_fqdn_helo_hostname``): every letter would be refused, so refuse it here."""
        if value is None or FQDN_RE.fullmatch(value) or ADDRESS_LITERAL_RE.fullmatch(value):
            return value
        raise ValueError(
            "SMTP_HELO_NAME must be a fully qualified host name such as mail.example.org "
            f"(or an address literal such as [203.0.113.5]), not {value!r}: "
            "relays refuse a name like it"
        )

    @model_validator(mode="after")
    def _inbound_tls_loads(self) -> Settings:
        """The receiver's certificate and key: both or neither, and a pair that loads."""
        cert, key = self.inbound_tls_cert, self.inbound_tls_key
        if cert is None and key is None:
            return self
        if cert is None or key is None:
            raise ValueError("set DEARMP_INBOUND_TLS_CERT and DEARMP_INBOUND_TLS_KEY together")
        for name, path in (("DEARMP_INBOUND_TLS_CERT", cert), ("DEARMP_INBOUND_TLS_KEY", key)):
            if not path.is_file() or not os.access(path, os.R_OK):
                raise ValueError(f"{name}: no readable file at {path}")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                "DEARMP_INBOUND_TLS_CERT and DEARMP_INBOUND_TLS_KEY are not a PEM certificate "
                f"and its key ({type(exc).__name__})"
            ) from None
        return self

    @field_validator("dkim_private_key")
    @classmethod
    def _dkim_key_parses(cls, value: SecretStr | None) -> SecretStr | None:
        """A key that does not parse would fail every letter's rendering: refuse it at start."""
        if value is not None:
            _parse_dkim_key(value.get_secret_value().encode())
        return value

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_file_loads(cls, value: Path | None) -> Path | None:
        """Certificates that do not load would fail every letter's connection: refuse at start."""
        if value is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=str(value))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"no certificates can be read from {value} ({exc})") from None
        return value

    @field_validator("dkim_private_key_file")
    @classmethod
    def _dkim_key_file_loads(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file() or not os.access(value, os.R_OK):
            raise ValueError(f"no readable file at {value}")
        _parse_dkim_key(value.read_bytes())
        return value

    @model_validator(mode="after")
    def _dkim_key_and_selector(self) -> Settings:
        """One key, and its selector: a key without one would leave letters unsigned."""
        key, path = self.dkim_private_key, self.dkim_private_key_file
        if key is not None and path is not None:
            raise ValueError(
                "set DEARMP_DKIM_PRIVATE_KEY or DEARMP_DKIM_PRIVATE_KEY_FILE, not both"
            )
        if (key is not None or path is not None) and not self.dkim_selector:
            name = "DEARMP_DKIM_PRIVATE_KEY" if key is not None else "DEARMP_DKIM_PRIVATE_KEY_FILE"
            raise ValueError(
                f"{name} is set but DEARMP_DKIM_SELECTOR is not: letters would go unsigned"
            )
        if key is None and path is None and self.dkim_selector:
            raise ValueError(
                "DEARMP_DKIM_SELECTOR is set but no key: set DEARMP_DKIM_PRIVATE_KEY or "
                "DEARMP_DKIM_PRIVATE_KEY_FILE"
            )
        return self

    @model_validator(mode="after")
    def _mail_server_credentials(self) -> Settings:
        """What a mail backend cannot send without: refused at start, not at the first letter."""
        if self.mail_backend == "http" and not (self.email_api_key and self.email_api_domain):
            raise ValueError("DEARMP_MAIL_BACKEND=http needs EMAIL_API_KEY and EMAIL_API_DOMAIN")
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError(
                "set SMTP_USERNAME and SMTP_PASSWORD together: one alone logs in as no one"
            )
        if (
            self.mail_backend == "smtp"
            and self.smtp_username is not None
            and self.smtp_security == "none"
            and not _loopback(self.smtp_host)
        ):
            raise ValueError(
                f"SMTP_SECURITY=none would send SMTP_PASSWORD in clear to {self.smtp_host}: set "
                "SMTP_SECURITY=starttls or tls (a login without TLS only to a relay on this host)"
            )
        return self

    @model_validator(mode="after")
    def _sandbox_is_a_real_mailbox(self) -> Settings:
        domain = self.sandbox_address.rpartition("@")[2].lower()
        if self.mail_backend != "outbox" and ("." not in domain or domain.endswith(".localhost")):
            raise ValueError(
                "DEARMP_SANDBOX_ADDRESS must be a real mailbox on a real domain when letters go "
                f"to a mail server ({self.sandbox_address!r} would be refused by a relay)"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'dearmp.sqlite3').resolve()}"

    @property
    def resolved_redis_url(self) -> str:
        return self.redis_url or f"unix://{self.embedded_redis_socket}"

    @property
    def resolved_outbox_dir(self) -> Path:
        return self.outbox_dir or self.data_dir / "outbox"

    @property
    def embedded_redis_socket(self) -> Path:
        return (self.data_dir / "redis.sock").resolve()

    def dkim_key(self) -> bytes | None:
        if self.dkim_private_key is not None:
            return self.dkim_private_key.get_secret_value().encode()
        if self.dkim_private_key_file is not None:
            return self.dkim_private_key_file.read_bytes()
        return None

    def secret(self) -> bytes:
        """The key for keyed hashes; generated once and kept beside the embedded data."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.data_dir / "secret_key"
        if not path.exists():
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        return path.read_text().strip().encode()


# A console account: a plain name and a scrypt hash (workers.web.console.auth makes them).
CONSOLE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CONSOLE_HASH_RE = re.compile(
    r"scrypt\$\d{1,2}\$\d{1,2}\$\d{1,2}\$[A-Za-z0-9_=-]{16,}\$[A-Za-z0-9_=-]{16,}"
)


def console_accounts(value: str) -> dict[str, str]:
    """DEARMP_CONSOLE_ACCOUNTS as {name: password hash}; ValueError naming a bad entry by its
    position (never its text: it holds a hash)."""
    accounts: dict[str, str] = {}
    for n, entry in enumerate((e.strip() for e in value.split(",") if e.strip()), 1):
        name, _, hashed = entry.partition(":")
        if not CONSOLE_NAME_RE.fullmatch(name) or not CONSOLE_HASH_RE.fullmatch(hashed):
            raise ValueError(
                f"entry {n} is not name:hash (a name of letters, digits, . _ -, and a hash "
                "from `dearmp console hash-password`)"
            )
        if name in accounts:
            raise ValueError(f"entry {n} names {name} a second time")
        accounts[name] = hashed
    if not accounts:
        raise ValueError("no account: unset it to keep the console off")
    return accounts


def _parse_dkim_key(pem: bytes) -> None:
    try:
        key = parse_pem_private_key(pem)
    except (UnparsableKeyError, ValueError, TypeError):
        raise ValueError("not a PEM RSA private key") from None
    bits = int(key["modulus"]).bit_length()
    if bits < 1024:  # RFC 8301: receivers refuse signatures of shorter keys
        raise ValueError(f"a {bits}-bit key: receivers refuse under 1024 (use 2048)")


def _split(url: str) -> SplitResult | None:
    """``url``'s parts, or None if its host and port cannot be read (a port that is not a
    number). A port out of range is left to the connection to refuse."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts if NETLOC_RE.fullmatch(parts.netloc) else None


def masked_url(url: str) -> str:
    """``url`` without its password (in the address or a ``password=`` parameter): for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(unreadable)"
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    return PASSWORD_PARAMETER_RE.sub(r"\1***", f"{scheme}://{netloc}{slash}{path}")


def variables() -> frozenset[str]:
    """Every variable DearMP reads: the settings' and those read elsewhere."""
    return frozenset(f.alias for f in Settings.model_fields.values() if f.alias) | READ_ELSEWHERE


def unknown_variables(names: Iterable[str]) -> list[str]:
    """A problem for each of ``names`` with one of our prefixes that is not a variable we read,
    with the nearest one that is; and for a misspelling of one of :data:`EMBEDDED_UNLESS_SET`."""
    known, given = variables(), {name.upper() for name in names}
    # Unset, these fall back to the embedded Redis and SQLite file without a word: a name one
    # letter from one of them is its misspelling (DATABSE_URL), not another program's variable.
    unset = [name for name in EMBEDDED_UNLESS_SET if name not in given]
    problems = []
    for name in sorted(names):
        upper = name.upper()
        if upper in known:
            continue
        if upper.startswith(PREFIXES):
            # The shortest known name holding each of its words (DEARMP_DKIM_KEY:
            # DEARMP_DKIM_PRIVATE_KEY), or else the closest spelling.
            words = set(upper.split("_"))
            holding = sorted((len(k), k) for k in known if words <= set(k.split("_")))
            nearest = [holding[0][1]] if holding else difflib.get_close_matches(upper, known, n=1)
        elif not (nearest := [meant for meant in unset if _one_edit(upper, meant)]):
            continue
        hint = f" (did you mean {nearest[0]}?)" if nearest else ""
        problems.append(f"{name} is not a setting{hint}")
    return problems


def problems_of(error: ValidationError) -> list[str]:
    """One line per problem in ``error``, each naming the variable (not the field)."""
    aliases = {name: f.alias for name, f in Settings.model_fields.items() if f.alias}
    problems = []
    for e in error.errors(include_url=False):
        message = str(e["msg"]).removeprefix("Value error, ")
        if not e["loc"]:  # a check of several settings: its message names them
            problems.append(message)
            continue
        field = str(e["loc"][0])
        name = aliases.get(field, field).upper()
        problems.append(message if message.startswith(name) else f"{name}: {message}")
    return problems


class ConfigurationError(SystemExit):
    """Settings a process cannot start with, one line per problem, each naming its variable.

    A SystemExit: a worker process or uvicorn that meets one exits non-zero with these lines on
    stderr rather than a traceback. The command line shows them its own way."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"configuration: {p}" for p in problems))


def load_settings() -> Settings:
    """The settings from the environment, or :class:`ConfigurationError` with every problem:
    unknown variables and every value that does not pass its check."""
    problems = unknown_variables(os.environ)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigurationError([*problems, *problems_of(exc)]) from None
    if problems:
        raise ConfigurationError(problems)
    return settings


def default(name: str) -> Any:
    """A setting's default, for code that takes the setting as a parameter: kept here only."""
    return Settings.model_fields[name].default


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (see :func:`load_settings`), read once."""
    return load_settings()
