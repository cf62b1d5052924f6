"""``dearmp inbound``: the SMTP receiver (aiosmtpd) for our token addresses and ``postmaster``
only, never an open relay. It limits size, messages per peer, sessions at once and per peer, and
a session's length, so that slow peers cannot hold the door shut. ``250`` only once the message
is committed (else 451); its id then goes to the inbound stage (or the reconciler sends it)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SmtpSession
from sqlalchemy.orm import Session, sessionmaker

from workers.receiving.addresses import ReturnAddresses
from workers.receiving.store import recipient_key, store

log = structlog.get_logger(__name__)

MAX_RECIPIENTS = 20
# Anyone may write to the postmaster: this many messages an hour are kept, the rest told to
# try again later, so that mail to it cannot fill the database.
POSTMASTER_PER_HOUR = 100
POSTMASTER_FULL = "452 4.3.1 The postmaster's mailbox is full for now; try again later"


class FixedWindow:
    """At most ``limit`` messages per key in each ``seconds`` from the first (a fixed window)."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit, self.seconds = limit, seconds
        self.windows: dict[str, tuple[float, int]] = {}  # key -> (window's start, messages)

    def allow(self, key: str, more: int = 1) -> bool:
        """Whether ``key`` may have another message now, counting ``more`` if so."""
        now = time.monotonic()
        start, count = self.windows.get(key, (now, 0))
        if now - start >= self.seconds:
            start, count = now, 0
        if count >= self.limit:
            return False
        self.windows[key] = (start, count + more)
        if len(self.windows) > 100_000:  # forget idle keys
            self.windows = {k: w for k, w in self.windows.items() if now - w[0] < self.seconds}
        return True


class InboundHandler:
    """aiosmtpd's handler: checks recipients, limits peers, stores, then hands on."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        returns: ReturnAddresses,
        send_on: Callable[[list[str]], None],
        hash_peer: Callable[[str], str],
        per_minute: int = 600,
    ) -> None:
        """``send_on`` sends stored ids to the inbound stage; ``hash_peer`` makes the keyed hash
        that is all the receiver keeps and logs of a peer's address."""
        self.sessions = sessions
        self.returns = returns
        self.send_on = send_on
        self.hash_peer = hash_peer
        self.peers = FixedWindow(per_minute, 60)
        self.postmaster = FixedWindow(POSTMASTER_PER_HOUR, 3600)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: SmtpSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not self.peers.allow(_host(session.peer)):
            log.warning("inbound_peer_limited", peer_hash=self._hash(session))
            return "450 4.7.1 Too many messages from you; try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: SmtpSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if recipient_key(address) in {recipient_key(r) for r in envelope.rcpt_tos}:
            return "250 OK (a recipient already)"  # stored once, however often it is given
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        postmaster = self.returns.is_postmaster(address)
        if not (postmaster or self.returns.accepts(address)):
            log.info("inbound_recipient_refused", peer_hash=self._hash(session))
            return "550 5.1.1 No such address here"
        if postmaster:
            if any(self.returns.is_postmaster(str(r)) for r in envelope.rcpt_tos):
                return "250 OK (a recipient already)"  # every form of it is one mailbox
            if not self.postmaster.allow("postmaster", more=0):
                log.warning("inbound_postmaster_limited", peer_hash=self._hash(session))
                return POSTMASTER_FULL
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def _hash(self, session: SmtpSession) -> str:
        return self.hash_peer(_host(session.peer))

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        raw = envelope.original_content or b""  # the bytes as they came, whatever decode_data
        recipients = [str(r) for r in envelope.rcpt_tos]
        peer_hash = self._hash(session)
        # Counted when kept, not at RCPT: an envelope left without DATA spends nothing.
        to_postmaster = any(map(self.returns.is_postmaster, recipients))
        if to_postmaster and not self.postmaster.allow("postmaster"):
            log.warning("inbound_postmaster_limited", peer_hash=peer_hash)
            return POSTMASTER_FULL
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(
                None, lambda: store(self.sessions, "smtp", recipients, raw, peer_hash)
            )
        except Exception as exc:
            log.error("inbound_store_failed", error=type(exc).__name__)
            return "451 4.3.0 Could not store the message; try again later"
        try:
            await loop.run_in_executor(None, self.send_on, ids)
        except Exception as exc:  # stored: the reconciler sends it on
            log.warning("dispatch_failed", stage="inbound", error=type(exc).__name__)
        log.info("inbound_stored", count=len(ids), size=len(raw), peer_hash=peer_hash)
        return "250 OK stored"


class SessionCap:
    """At most ``limit`` SMTP sessions open at once, ``per_peer`` of them from one address, each
    open ``seconds`` at the most (counted on the receiver's one event loop)."""

    def __init__(self, limit: int, per_peer: int = 5, seconds: float = 600.0) -> None:
        self.limit, self.per_peer, self.seconds = limit, per_peer, seconds
        self.peers: dict[str, int] = {}  # address -> sessions open from it

    def enter(self, peer: str) -> str | None:
        """None when the session may start, else the answer that refuses it."""
        if sum(self.peers.values()) >= self.limit:
            return "421 4.7.0 Too many connections; try again later"
        if self.peers.get(peer, 0) >= self.per_peer:
            return "421 4.7.0 Too many connections from you; try again later"
        self.peers[peer] = self.peers.get(peer, 0) + 1
        return None

    def leave(self, peer: str) -> None:
        left = self.peers.pop(peer) - 1
        if left:
            self.peers[peer] = left


def _host(peer: Any) -> str:
    """A peer's address, from what aiosmtpd or asyncio give as its name."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


class CappedSMTP(SMTP):
    """aiosmtpd's SMTP session, answering ``421`` when a cap is reached, idle only when no bytes
    come, and ended once open ``cap.seconds`` (else a byte a minute would hold it for ever)."""

    def __init__(self, handler: Any, cap: SessionCap, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.cap = cap
        self.peer_address = ""
        self.refusal: str | None = None
        self.counted = False
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not STARTTLS's second call, with the TLS transport
            self.peer_address = _host(transport.get_extra_info("peername"))
            self.refusal = self.cap.enter(self.peer_address)
            self.counted = self.refusal is None
            if self.counted:
                self.deadline = self.loop.call_later(self.cap.seconds, self._too_long)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.counted:
            self.counted = False
            self.cap.leave(self.peer_address)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._reset_timeout()
        super().data_received(data)

    def _too_long(self) -> None:
        self.deadline = None
        log.warning("inbound_session_too_long", seconds=self.cap.seconds)
        if self.transport is not None:
            self._writer.write(b"421 4.4.2 Session too long; closing connection\r\n")
            self.transport.close()

    async def _handle_client(self) -> None:
        if self.counted:
            await super()._handle_client()
            return
        log.warning(
            "inbound_sessions_capped",
            answer=self.refusal,
            limit=self.cap.limit,
            per_peer=self.cap.per_peer,
        )
        await self.push(self.refusal or "421 4.7.0 Too many connections; try again later")
        if self.transport is not None:
            self.transport.close()


class InboundController(Controller):
    """aiosmtpd's controller (a thread with its own event loop) serving :class:`CappedSMTP`."""

    def __init__(
        self,
        handler: Any,
        max_sessions: int,
        per_peer: int = 5,
        session_seconds: float = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.cap = SessionCap(max_sessions, per_peer, session_seconds)

    def factory(self) -> SMTP:
        return CappedSMTP(self.handler, self.cap, **self.SMTP_kwargs)


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The context STARTTLS uses, or None (no certificate configured: STARTTLS not offered)."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def server_options(
    max_bytes: int, idle_seconds: float = 60.0, tls: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """aiosmtpd's SMTP options: size limit, bytes as they came, idle timeout, and STARTTLS
    offered (never required) when there is a context."""
    options: dict[str, Any] = {
        "data_size_limit": max_bytes,
        "decode_data": False,
        "enable_SMTPUTF8": True,
        "timeout": idle_seconds,
        "ident": "ESMTP",  # not aiosmtpd's name and version
    }
    if tls is not None:
        options |= {"tls_context": tls, "require_starttls": False}
    return options
