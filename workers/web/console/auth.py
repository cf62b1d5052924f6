"""Who may use the console: operator accounts from DEARMP_CONSOLE_ACCOUNTS (scrypt hashes), a
signed session cookie, a CSRF token tied to the session, and a cap on failed logins. The session
is the cookie alone (HMAC-signed, expiring): nothing is stored server-side, so a login ends when
its cookie expires or the operator logs out."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass

# scrypt's cost: 2**14 rounds, 16 MiB, about 50 ms (the figures OWASP gives as a minimum).
LOG2_N, R, P = 14, 8, 1
MAX_PASSWORD = 1024  # characters: a longer one is refused before it is hashed
# A failed login costs as much as a good one; this many in a row for one name from one client
# lock it a while for that client (from another, anyone could lock an operator out).
FAILURES_ALLOWED = 5
LOCKED_SECONDS = 900.0
# Passwords checked at once in a process: a flood of logins is refused, not queued on the
# threads the intake needs. And at most this many logins per client in the window.
CHECKED_AT_ONCE = 2
LOGINS_PER_CLIENT, LOGIN_WINDOW = 20, 300.0
# Failed logins for one name from every client together (many addresses guessing a password):
# past this within LOCKED_SECONDS, the name is refused to every client but those that logged
# in as it in the last KNOWN_SECONDS (so anyone can lock out strangers, not its operator).
FAILURES_PER_NAME = 100
KNOWN_SECONDS = 30 * 86400.0
KEPT_CLIENTS = 10_000  # entries kept before the stale ones are swept
ANONYMOUS_SECONDS = 3600.0  # the session a login form is given, before anyone logs in
COOKIE = "dearmp_console"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=2**log2_n, r=r, p=p, maxmem=2**26, dklen=32
    )


def hash_password(password: str) -> str:
    """The hash to put in DEARMP_CONSOLE_ACCOUNTS after ``name:``."""
    salt = secrets.token_bytes(16)
    return f"scrypt${LOG2_N}${R}${P}${_b64(salt)}${_b64(_scrypt(password, salt, LOG2_N, R, P))}"


# Checked against when the name is unknown: an unknown name takes as long as a wrong password.
_NOBODY = hash_password(secrets.token_hex(16))


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` is the one ``hashed`` was made from (constant-time compare)."""
    _, log2_n, r, p, salt, digest = hashed.split("$")
    if int(log2_n) > 20 or len(password) > MAX_PASSWORD:
        return False
    found = _scrypt(password, base64.urlsafe_b64decode(salt), int(log2_n), int(r), int(p))
    return hmac.compare_digest(found, base64.urlsafe_b64decode(digest))


class Busy(Exception):
    """:data:`CHECKED_AT_ONCE` passwords are being checked: try again in a moment."""


class Throttle:
    """Failed logins in this process, per name and client and per name from every client (the
    limits above); a locked name is answered as a wrong password, as slowly."""

    def __init__(self) -> None:
        self.failures: dict[tuple[str, str], list[float]] = {}  # client "*": every client
        self.known: dict[tuple[str, str], float] = {}  # (name, client): its last login
        self.lock = threading.Lock()
        self.turns = threading.BoundedSemaphore(CHECKED_AT_ONCE)

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        recent = [t for t in self.failures.pop(key, []) if now - t < LOCKED_SECONDS]
        if recent:  # (one with none is not kept)
            self.failures[key] = recent
        return recent

    def check_login(
        self, accounts: dict[str, str], name: str, password: str, client: str = ""
    ) -> str | None:
        """The operator's name if ``password`` is theirs and the name is not locked for
        ``client``, else None; :class:`Busy` (at once) while others are being checked."""
        now, name = time.monotonic(), name[:64]
        key, everyone = (name, client), (name, "*")
        with self.lock:
            mine, all_of_them = self._recent(key, now), self._recent(everyone, now)
            known = now - self.known.get(key, -KNOWN_SECONDS) < KNOWN_SECONDS
            locked = len(mine) >= FAILURES_ALLOWED or (
                len(all_of_them) >= FAILURES_PER_NAME and not known
            )
            if len(self.failures) + len(self.known) > KEPT_CLIENTS:  # clients come and go
                self._sweep(now)
        if not self.turns.acquire(blocking=False):
            raise Busy
        try:  # a locked name is checked all the same: it answers as slowly as any other
            good = verify_password(password, accounts.get(name, _NOBODY)) and name in accounts
        finally:
            self.turns.release()
        good = good and not locked
        with self.lock:
            if good:
                self.failures.pop(key, None)
                self.known[key] = now
            elif not locked:  # (invented names count too: a lock says nothing of who exists)
                self.failures.setdefault(key, []).append(now)
                self.failures.setdefault(everyone, []).append(now)
        return name if good else None

    def _sweep(self, now: float) -> None:
        """Forget what has lapsed; then, under a flood of invented names and clients, the oldest
        failures until half the room is free (memory stays bounded)."""
        for key in [k for k, times in self.failures.items() if now - times[-1] >= LOCKED_SECONDS]:
            del self.failures[key]
        for key in [k for k, at in self.known.items() if now - at >= KNOWN_SECONDS]:
            del self.known[key]
        if len(self.failures) > KEPT_CLIENTS // 2:
            oldest = sorted(self.failures, key=lambda k: self.failures[k][-1])
            for key in oldest[: len(self.failures) - KEPT_CLIENTS // 2]:
                del self.failures[key]


@dataclass(frozen=True)
class Session:
    """What the cookie says: the operator (empty before login), a random nonce the CSRF token
    is made from, and when it expires (epoch seconds)."""

    operator: str
    nonce: str
    expires: float

    @classmethod
    def new(cls, operator: str, seconds: float) -> Session:
        return cls(operator, secrets.token_urlsafe(16), time.time() + seconds)


class Signer:
    """Sessions to and from cookie values, and their CSRF tokens, under keys derived from the
    secret key (one purpose each: a CSRF token is never a valid cookie)."""

    def __init__(self, secret: bytes) -> None:
        self.cookie_key = hmac.new(secret, b"console-session", hashlib.sha256).digest()
        self.csrf_key = hmac.new(secret, b"console-csrf", hashlib.sha256).digest()

    def dump(self, session: Session) -> str:
        body = _b64(json.dumps([session.operator, session.nonce, session.expires]).encode())
        return f"{body}.{self._mac(body)}"

    def load(self, value: str | None) -> Session | None:
        """The session a cookie value holds, if it is ours, whole and not expired."""
        if not value or len(value) > 1000:
            return None
        body, _, mac = value.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return None
        operator, nonce, expires = json.loads(base64.urlsafe_b64decode(body))
        return Session(operator, nonce, expires) if expires > time.time() else None

    def csrf(self, session: Session) -> str:
        return hmac.new(self.csrf_key, session.nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Session, token: str) -> bool:
        return hmac.compare_digest(self.csrf(session).encode(), token.encode())

    def _mac(self, body: str) -> str:
        return hmac.new(self.cookie_key, body.encode(), hashlib.sha256).hexdigest()
