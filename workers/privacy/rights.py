"""Supporter rights and retention: export, erasure, scrubbing, consent receipts, CRM export.

A supporter is found by the keyed hash of their normalised email (``submissions.supporter_hash``),
the same identity the consent ledger uses, so the ledger's proof survives erasure of their details.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, bindparam, delete, select, text, update
from sqlalchemy.orm import Session

from schemas.campaign import Retention
from schemas.postcode import outward
from schemas.submission import CHANNELS
from workers.database.models import (
    Base,
    Campaign,
    ConsentEvent,
    Failure,
    InboundMessage,
    InboundStatus,
    Letter,
    LetterEvent,
    LetterPrint,
    OutboxItem,
    OutboxStatus,
    State,
    Submission,
    SubmissionEvent,
    WebhookEndpoint,
    utcnow,
)
from workers.database.transitions import AlreadyMoved, advance, rowcount
from workers.letters.definitions import get_definition
from workers.logging import STATUS_RE
from workers.outbox import sending as outbox
from workers.outbox.kinds import file_stem
from workers.outbox.sending import Kind
from workers.privacy.hashing import mask_supporter, supporter_hash
from workers.privacy.ledger import append, current_preferences, hold
from workers.stages import digests
from workers.stages.comparison import uncount
from workers.stages.digests import KIND as DIGEST
from workers.webhooks.events import KIND as WEBHOOK
from workers.webhooks.events import emit

ERASED = "(erased)"
BY_REQUEST = "erased at the supporter's request"
RETENTION_OVER = "the letter's retention period ended"
# A failure's message and traceback may quote what failed to be written: they go with the rest.
FAILURE_TEXT_GONE = "(removed with the supporter's details)"
RECEIPT_NAMESPACE = uuid.UUID("6b1c3a52-8d8e-4c39-a0f4-2f0a3f6d9e11")


def _facts(row: Any, fields: str) -> dict[str, Any]:
    """``row``'s space-separated ``fields`` (``key:attribute`` to name one otherwise) as
    JSON-ready data: datetimes in ISO 8601."""
    facts = {}
    for field in fields.split():
        key, _, attribute = field.partition(":")
        value = getattr(row, attribute or key)
        facts[key] = value.isoformat() if isinstance(value, datetime) else value
    return facts


SUBMISSION_FACTS = (
    "id campaign:campaign_slug state received_at:created_at details:payload rejection "
    "failure_reason constituency_code mp:recipient scrubbed_at erased_at"
)
LEDGER_FACTS = (
    "id type:event_type campaign:campaign_slug channel choice wording wording_version "
    "wording_sha256 lawful_basis privacy_notice_version source_url recorded_at hash"
)


def _submissions(session: Session, who: str) -> list[Submission]:
    found = select(Submission).where(Submission.supporter_hash == who)
    return list(session.scalars(found.order_by(Submission.created_at)))


def _ledger(session: Session, who: str) -> list[ConsentEvent]:
    found = select(ConsentEvent).where(ConsentEvent.supporter_hash == who)
    return list(session.scalars(found.order_by(ConsentEvent.id)))


def _about(session: Session, model: Any, submission_id: str, *where: Any, order: Any = None) -> Any:
    """``model``'s rows about one submission, by ``order`` (by default their ids)."""
    found = select(model).where(model.submission_id == submission_id, *where)
    return session.scalars(found.order_by(model.id if order is None else order))


def holds_anything(session: Session, secret: bytes, email: str) -> bool:
    """Whether anything is held about the address: a submission, or an event of the ledger."""
    who = supporter_hash(secret, email)
    return any(
        session.scalar(select(model.id).where(model.supporter_hash == who).limit(1)) is not None
        for model in (Submission, ConsentEvent)
    )


def _erased(session: Session, who: str) -> bool:
    """Whether the supporter was erased, and nothing has been held about them since: an erasure
    in the ledger, and no submission that is not erased (one after it: they came back)."""
    erasure = select(ConsentEvent.id).where(
        ConsentEvent.supporter_hash == who, ConsentEvent.event_type == "erasure"
    )
    kept = select(Submission.id).where(
        Submission.supporter_hash == who, Submission.erased_at.is_(None)
    )
    return session.scalar(erasure.limit(1)) is not None and session.scalar(kept.limit(1)) is None


def _webhook(session: Session, item: OutboxItem) -> dict[str, Any]:
    """What a CRM was told: the event, where it went, and whether it could carry the
    supporter's details (the endpoint's permission; their consent decides it when sent)."""
    endpoint = session.get(WebhookEndpoint, item.endpoint_id)
    return {
        "event": item.key.partition(":")[0],
        "to": urlsplit(endpoint.url).hostname if endpoint else None,
        "personal_data_allowed": bool(endpoint and endpoint.personal_data),
    }


def _export(session: Session, sub: Submission) -> dict[str, Any]:
    letter = session.get(Letter, sub.id)
    delivery = session.get(OutboxItem, sub.id)  # the letter's item: its submission's id
    return _facts(sub, SUBMISSION_FACTS) | {
        "history": [_facts(e, "state at detail") for e in _about(session, SubmissionEvent, sub.id)],
        "letter": None
        if letter is None
        else _facts(letter, "subject body:body_text from:from_name")
        | {"to": f"{letter.to_name} <{letter.to_email}>", "message_id": letter.message_id},
        "delivery": None if delivery is None else _facts(delivery, "status sent_at attempts"),
        # What came back to the letter (its facts: no reply text is kept).
        "after_sent": [
            _facts(e, "event:kind at status detail") for e in _about(session, LetterEvent, sub.id)
        ],
        # Everything else sent about it (the outbox's items but the letter).
        "notices": [
            _facts(n, "kind status sent_at")
            | (_webhook(session, n) if n.endpoint_id is not None else {})
            for n in _about(
                session, OutboxItem, sub.id, OutboxItem.id != sub.id, order=OutboxItem.created_at
            )
        ],
    }


def export_supporter(session: Session, secret: bytes, email: str) -> dict[str, Any]:
    """Everything held about one person (UK GDPR article 15), as JSON-ready data."""
    who = supporter_hash(secret, email)
    return {
        "supporter": {"email": email, "supporter_id": who},
        "generated_at": utcnow().isoformat(),
        "submissions": [_export(session, sub) for sub in _submissions(session, who)],
        "consent": {
            "current": current_preferences(session, who),
            "events": [_facts(e, LEDGER_FACTS) for e in _ledger(session, who)],
        },
    }


@dataclass
class ErasureReport:
    submissions: int = 0
    stopped_before_sending: int = 0
    letters_scrubbed: int = 0
    outbox_files_removed: int = 0
    consent_events_kept: int = 0
    consent_events_added: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _update(session: Session, model: type[Base], *where: ColumnElement[bool], **values: Any) -> int:
    """UPDATE ``model``'s rows matching ``where`` (none of them loaded); how many matched."""
    statement = update(model).where(*where).values(**values)
    return rowcount(session.execute(statement.execution_options(synchronize_session=False)))


def _remove_outbox_file(outbox_dir: Path | None, stem: str) -> int:
    """Remove the file outbox's copy, and any half-written one a stopped worker left behind
    (``<stem>.tmp<pid>-<thread>``); 1 if there was a copy."""
    if outbox_dir is None:
        return 0
    for left in outbox_dir.glob(f"{glob.escape(stem)}.tmp*"):
        left.unlink(missing_ok=True)
    if not (path := outbox_dir / f"{stem}.eml").exists():
        return 0
    path.unlink()
    return 1


# A letter's columns retention scrubs; erasure scrubs its names and addresses too.
SCRUBBED_LETTER = {"body_text": None, "body_html": None, "dkim_signature": None, "subject": ERASED}
ERASED_LETTER = SCRUBBED_LETTER | {"from_name": ERASED, "reply_to": None}


def _forget(
    session: Session,
    submission_id: str,
    outbox_dir: Path | None,
    letter: dict[str, Any],
    why: str,
    payload: Any,
) -> tuple[int, int]:
    """Scrub the letter's columns ``letter`` and remove its file outbox copy; delete the kept
    text of what came back to it, its fingerprint (made from its words; the record of the
    digest it went in stays) and the text of its failures; keep of servers' answers about it
    only their status, and hide the details ``payload`` (the submission's, as it was) held in
    the rest; skip the emails to the supporter not yet sent (``why``: the reason recorded), and
    remove their copies. How many letters and letter files."""
    scrubbed = _update(session, Letter, Letter.submission_id == submission_id, **letter)
    removed = _remove_outbox_file(outbox_dir, submission_id)
    digest_id = session.scalar(
        select(LetterPrint.digest_id).where(LetterPrint.submission_id == submission_id)
    )
    if digest_id is not None:  # its copy names every constituent in it; sent without them
        _remove_outbox_file(outbox_dir, f"digest-{digest_id}")
    uncount(session, submission_id)
    if digest_id is None:
        session.execute(delete(LetterPrint).where(LetterPrint.submission_id == submission_id))
    else:  # what a bounce of the digest returns: its letters (mates()), this one among them
        _update(session, LetterPrint, LetterPrint.submission_id == submission_id, signature=None)
    _update(session, InboundMessage, InboundMessage.submission_id == submission_id, raw=None)
    items = session.scalars(select(OutboxItem).where(OutboxItem.submission_id == submission_id))
    about = [submission_id]  # what a failure row names: the submission, an item, an inbound
    for item in items.all():
        _remove_outbox_file(outbox_dir, file_stem(item))
        about.append(item.id)
    inbound = select(InboundMessage.id).where(InboundMessage.submission_id == submission_id)
    about += session.scalars(inbound).all()
    _update(
        session,
        Failure,
        Failure.submission_id.in_(about),
        exception_message=FAILURE_TEXT_GONE,
        traceback=FAILURE_TEXT_GONE,
    )
    # What servers (and offices' automatic replies) wrote about the letter can quote it, or the
    # sender's name; the rest is ours (a survey's answer, a stage's move).
    answered = OutboxItem.submission_id == submission_id, OutboxItem.status != OutboxStatus.SKIPPED
    about_it = (
        (
            SubmissionEvent.detail,
            SubmissionEvent.submission_id == submission_id,
            SubmissionEvent.state.in_(SERVER_WORDS),
        ),
        (Submission.failure_reason, Submission.id == submission_id),
        (
            LetterEvent.detail,
            LetterEvent.submission_id == submission_id,
            LetterEvent.kind != "survey",
        ),
        (InboundMessage.reason, InboundMessage.submission_id == submission_id),
        (OutboxItem.error, *answered),  # (a skipped one's error is ours: why)
        (OutboxItem.response, *answered),
    )
    for column, *where in about_it:
        _without_servers_words(session, column, where, payload)
    _update(
        session,
        OutboxItem,
        OutboxItem.submission_id == submission_id,
        OutboxItem.status == OutboxStatus.PENDING,
        # A webhook is written when sent, without their details; a digest carries other
        # letters too, and is written without an erased one's.
        OutboxItem.kind.not_in((WEBHOOK, DIGEST)),
        status=OutboxStatus.SKIPPED,
        error=why,
    )
    return scrubbed, removed


# The states whose move's detail can be a server's words (its sent mark, a refusal, a DSN).
SERVER_WORDS = (State.DELIVERED, State.FAILED, State.BOUNCED)


def _without_servers_words(
    session: Session, column: Any, where: list[ColumnElement[bool]], payload: Any
) -> None:
    """``column``'s texts in the rows ``where`` (one supporter's: few), each kept up to the
    status a server's answer in it gives, the supporter's details in ``payload`` hidden in that
    ("gave up after 3 failed attempts: 550 5.7.1 (erased)"); a text with no status, whoever
    wrote it, is erased whole."""
    model = column.class_
    key = model.__mapper__.primary_key[0]
    for ident, said in session.execute(select(key, column).where(*where, column.is_not(None))):
        found = STATUS_RE.search(said)
        kept = f"{mask_supporter(said[: found.end()], payload)} " if found else ""
        if said != kept + ERASED:
            _update(session, model, key == ident, **{column.key: kept + ERASED})


def _stop(session: Session, submission: Submission) -> bool:
    """A submission still on its way: it ends here, before any letter goes."""
    for _ in range(5):
        session.refresh(submission)
        if State(submission.state).is_final:
            return False
        try:
            with session.begin_nested():
                advance(session, submission, State.WITHDRAWN, detail=BY_REQUEST)
            return True
        except AlreadyMoved:
            continue  # a worker moved it meanwhile: look again
    raise RuntimeError(f"submission {submission.id} kept moving; try the erasure again")


def _erased_payload(payload: Any) -> dict[str, Any]:
    found = payload if isinstance(payload, dict) else {}
    kept = ("schema_version", "campaign", "contact_preferences")
    return {"erased": True} | {key: found[key] for key in kept if key in found}


def erase_supporter(
    session: Session,
    secret: bytes,
    email: str,
    kinds: Mapping[str, Kind],
    outbox_dir: Path | None = None,
) -> ErasureReport:
    """Remove a person's name, email, phone, address and letter text everywhere DearMP holds them.

    Kept: the delivery facts and the pseudonymous consent ledger, to which a withdrawal of every
    channel and an erasure event are added. A submission still on its way is withdrawn.
    A submission erased before is not counted again, but what reached it since (a held reply, a
    failure's text, a copy written by a send under way at the erasure) goes; a supporter erased
    already, with nothing sent since, gets no new ledger events.
    """
    hold(session)  # the ledger's lock before any row lock (see workers.privacy.ledger.hold)
    report = ErasureReport()
    now = utcnow()
    who = supporter_hash(secret, email)
    erased_before = _erased(session, who)
    subs = _submissions(session, who)
    # Letters a server took already, their move still to come, move on as their sender would;
    # the items of those on their way are locked (none is claimed until the commit), every one
    # at once in one order, as a sender locks its group's.
    carriers = {
        sub.id: digests.carriers(session, sub.id)
        for sub in subs
        if sub.erased_at is None and not State(sub.state).is_final
    }
    in_flight = outbox.settle(session, [i for items in carriers.values() for i in items], kinds)
    for sub in subs:
        if sub.erased_at is not None:
            _forget(session, sub.id, outbox_dir, ERASED_LETTER, BY_REQUEST, sub.payload)
            continue
        report.submissions += 1
        stopped = _stop(session, sub)  # (one with its server now may have gone: not counted)
        report.stopped_before_sending += stopped and not (in_flight & set(carriers.get(sub.id, ())))
        _update(
            session,
            Submission,
            Submission.id == sub.id,
            payload=_erased_payload(sub.payload),
            rejection={field: ERASED for field in sub.rejection} if sub.rejection else None,
            erased_at=now,
            scrubbed_at=now,
            updated_at=now,
        )
        scrubbed, removed = _forget(
            session, sub.id, outbox_dir, ERASED_LETTER, BY_REQUEST, sub.payload
        )
        report.letters_scrubbed += scrubbed
        report.outbox_files_removed += removed
        emit(session, "supporter.erased", sub.id, campaign=sub.campaign_slug)
    report.consent_events_kept = len(_ledger(session, who))
    if erased_before:
        return report
    report.consent_events_added = withdraw(
        session, secret, email, list(CHANNELS), source="erasure request"
    )
    report.consent_events_added += append(
        session,
        [
            ConsentEvent(
                supporter_hash=who,
                event_type="erasure",
                campaign_slug="*",
                channel="all",
                choice="erased",
                wording_version="erasure",
                wording="The supporter's personal details were erased at their request.",
                wording_sha256="-",
                lawful_basis="legal_obligation",
                source_url="erasure request",
                recorded_at=now,
            )
        ],
    )
    return report


# Final states and the retention period (campaign setting) that applies to each.
RETENTION_STATES = {
    State.DELIVERED: "delivered_days",
    State.FAILED: "failed_days",
    State.REJECTED: "rejected_days",
    State.WITHDRAWN: "rejected_days",
    State.EXPIRED: "unconfirmed_days",
    State.BOUNCED: "failed_days",
}


_AGREED = text(
    "SELECT supporter_hash, channel FROM consent_current WHERE choice = 'granted' "
    "AND supporter_hash IN :hashes"
).bindparams(bindparam("hashes", expanding=True))
# Where a letter went: a reply, a bounce or the survey may still come back to the supporter.
LETTER_WENT = (State.DELIVERED, State.FAILED, State.BOUNCED)


def _agreed(session: Session, subs: list[Submission]) -> dict[str, set[str]]:
    """Of these submissions' supporters, the channels each agrees to now, by the ledger: one
    query for a batch."""
    hashes = sorted({s.supporter_hash for s in subs if s.supporter_hash})
    agreed: dict[str, set[str]] = {}
    for who, channel in session.execute(_AGREED, {"hashes": hashes}) if hashes else ():
        agreed.setdefault(who, set()).add(channel)
    return agreed


def _scrubbed_payload(payload: Any, keep_contact: bool, phone: bool) -> Any:
    """What retention keeps of a submission: its letter's words go (body, answers, subject) and
    the postal address (the postcode cut to its district). The name and email stay until
    erasure if ``keep_contact`` (a letter went: a late reply is forwarded to them; or they agree
    to be contacted: the CRM export), the phone only if ``phone`` (they agree to calls or
    texts); otherwise nothing of the supporter stays."""
    if not isinstance(payload, dict):
        return payload
    if not keep_contact:
        return _erased_payload(payload)
    supporter = dict(payload.get("supporter") or {})
    if not phone:
        supporter.pop("phone", None)
    if "address_lines" in supporter:
        supporter["address_lines"] = []
    if isinstance(supporter.get("postcode"), str):
        supporter["postcode"] = outward(supporter["postcode"])  # the district says little
    letter = dict(payload.get("letter") or {})
    if "body" in letter:
        letter["body"] = ""
    if "answers" in letter:  # their own words too
        letter["answers"] = {}
    if letter.get("subject"):
        letter["subject"] = ""
    return payload | {"supporter": supporter, "letter": letter}


# run_retention's count of inbound messages whose text it deleted, tied to no letter it scrubs.
INBOUND_UNLINKED = "inbound without a letter"
RETENTION_BATCH = 500  # submissions scrubbed per query


def run_retention(session: Session, outbox_dir: Path | None = None) -> dict[str, int]:
    """Scrub letter bodies and postal addresses past each campaign's retention period, and the
    kept text of inbound messages tied to no letter past the longest ``failed_days``.

    Idempotent, safe from cron. Returns how many were scrubbed per final state (inbound texts
    under :data:`INBOUND_UNLINKED`).
    """
    now = utcnow()
    done: dict[str, int] = {}
    failed_days: list[int] = []
    for slug in session.scalars(select(Campaign.slug)).all():
        definition = get_definition(session, slug)
        if definition is None:
            continue
        failed_days.append(definition.retention.failed_days)
        for state, setting in RETENTION_STATES.items():
            cutoff = now - timedelta(days=getattr(definition.retention, setting))
            due_now = select(Submission).where(
                Submission.campaign_slug == slug,
                Submission.state == state,
                Submission.scrubbed_at.is_(None),
                Submission.updated_at <= cutoff,
            )
            while due := list(session.scalars(due_now.limit(RETENTION_BATCH))):
                agreed = _agreed(session, due)
                for sub in due:
                    before = sub.payload
                    # (consent not recorded: rejected at validation, or never confirmed)
                    channels = agreed.get(sub.supporter_hash or "", set())
                    consented = sub.consent_logged_at is not None
                    keep = consented and (state in LETTER_WENT or bool(channels))
                    phone = bool(channels & {"phone", "sms"})
                    sub.payload = _scrubbed_payload(before, keep, phone)
                    sub.scrubbed_at = now
                    _forget(session, sub.id, outbox_dir, SCRUBBED_LETTER, RETENTION_OVER, before)
                done[state] = done.get(state, 0) + len(due)
                session.flush()
                if len(due) < RETENTION_BATCH:
                    break
    # What tells of no one letter is kept long enough to investigate: the longest failed_days.
    longest = max(failed_days, default=Retention().failed_days)
    forgotten = _forget_inbound(session, now - timedelta(days=longest))
    if forgotten:
        done[INBOUND_UNLINKED] = forgotten
    return done


def _forget_inbound(session: Session, cutoff: datetime) -> int:
    """Delete the kept text of processed inbound messages received before ``cutoff`` that are
    tied to no submission, or to one already scrubbed. How many."""
    scrubbed = select(Submission.id).where(Submission.scrubbed_at.is_not(None))
    return _update(
        session,
        InboundMessage,
        InboundMessage.raw.is_not(None),
        InboundMessage.received_at <= cutoff,
        InboundMessage.status != InboundStatus.RECEIVED,
        InboundMessage.submission_id.is_(None) | InboundMessage.submission_id.in_(scrubbed),
        raw=None,
    )


PURPOSES = {
    "email": ("Contact: email address", "updates about campaigns and fundraising by email"),
    "phone": ("Contact: telephone number", "updates about campaigns and fundraising by phone"),
    "sms": ("Contact: mobile telephone number", "updates about campaigns and fundraising by SMS"),
    "post": ("Contact: postal address", "updates about campaigns and fundraising by post"),
}


def consent_receipt(session: Session, secret: bytes, email: str) -> dict[str, Any] | None:
    """A consent receipt following the Kantara Initiative Consent Receipt Specification v1.1."""
    who = supporter_hash(secret, email)
    events = _ledger(session, who)
    collected = [e for e in events if e.event_type in ("preference", "mp_notice")]
    if not collected:
        return None
    latest = collected[-1]
    definition = get_definition(session, latest.campaign_slug)
    current = current_preferences(session, who)
    controller: dict[str, Any] = {"piiController": latest.campaign_slug, "onBehalf": False}
    policy_url = ""
    if definition is not None:
        c = definition.controller
        controller = {
            "piiController": c.name or definition.organisation,
            "onBehalf": False,
            "contact": c.name or definition.organisation,
            "address": c.address,
            "email": str(c.email or definition.from_email),
            "phone": c.phone,
            "piiControllerUrl": c.url or definition.privacy_notice_url,
        }
        policy_url = definition.privacy_notice_url
    wording = {e.channel: e.wording for e in collected}
    purposes, services = [], []
    for channel in CHANNELS:
        if current.get(channel, {}).get("choice") != "granted":
            continue
        category, purpose = PURPOSES[channel]
        purposes.append(
            {
                "purpose": wording.get(channel) or purpose,
                "purposeCategory": ["Marketing", "Campaigning"],
                "consentType": "EXPLICIT",
                "piiCategory": [category],
                "primaryPurpose": False,
                "termination": "Until withdrawn (reply to any message, or ask the controller)",
                "thirdPartyDisclosure": False,
            }
        )
    if purposes:
        services.append({"service": "Campaign updates", "purposes": purposes})
    notices = [e for e in collected if e.event_type == "mp_notice"]
    if notices:
        services.append(
            {
                "service": "Your letter to your MP",
                "purposes": [
                    {
                        "purpose": notices[-1].wording or "",
                        "purposeCategory": ["Core function"],
                        # Not consent but the supporter informed (legitimate interests): the
                        # letter goes because they sent it.
                        "consentType": "IMPLIED",
                        "lawfulBasis": notices[-1].lawful_basis,
                        "piiCategory": ["Name", "Email address", "Postal address", "Letter text"],
                        "primaryPurpose": True,
                        "termination": "When the letter has been delivered",
                        "thirdPartyDisclosure": True,
                        "thirdPartyName": "The supporter's Member of Parliament",
                    }
                ],
            }
        )
    return {
        "version": "KI-CR-v1.1.0",
        "jurisdiction": "GB",
        "consentTimestamp": int(latest.recorded_at.timestamp()),
        "collectionMethod": f"Web form: {latest.source_url or 'campaign page'}",
        "consentReceiptID": str(
            uuid.uuid5(RECEIPT_NAMESPACE, events[-1].hash or str(events[-1].id))
        ),
        "publicKey": "",
        "language": "en",
        "piiPrincipalId": email,
        "piiControllers": [controller],
        "policyUrl": policy_url,
        "services": services,
        "sensitive": False,
        "spiCat": [],
        # Not in the specification: the ledger events this receipt was drawn from.
        "ledgerEventHashes": [e.hash for e in events],
    }


EXPORT_COLUMNS = [
    "supporter_id",
    "email",
    "name",
    *(f"consent_{c}" for c in CHANNELS),
    "updated_at",
]


def writable(text: str) -> str:
    """``text`` with any lone surrogate (stored before the intake refused them) as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# A cell a spreadsheet would run as a formula starts with one of these (OWASP's CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that a spreadsheet shows as text: a leading apostrophe before a formula."""
    if isinstance(value, str) and value.lstrip(" ").startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _csv_line(values: list[Any]) -> str:
    line = io.StringIO()
    csv.writer(line).writerow([spreadsheet_safe(value) for value in values])
    return line.getvalue()


def consent_csv(session: Session) -> Iterator[str]:
    """Current contact preferences per supporter, as CSV lines for a CRM (header first). An
    erased supporter appears by their pseudonymous id only."""
    contact: dict[str, tuple[str, str]] = {}
    for who, payload in session.execute(
        select(Submission.supporter_hash, Submission.payload)
        .where(Submission.supporter_hash.is_not(None), Submission.erased_at.is_(None))
        .order_by(Submission.created_at)
        .execution_options(yield_per=1000)
    ):
        supporter = payload.get("supporter") if isinstance(payload, dict) else None
        if isinstance(supporter, dict) and supporter.get("email"):
            contact[who] = (supporter["email"], supporter.get("name") or "")
    yield _csv_line(EXPORT_COLUMNS)
    rows = session.execute(
        select(ConsentEvent.supporter_hash).distinct().order_by(ConsentEvent.supporter_hash)
    ).scalars()
    for who in list(rows):
        current = current_preferences(session, who)
        if not current:
            continue
        email, name = contact.get(who, ("", ""))
        updated = max(p["since"] for p in current.values())
        choices = [current.get(c, {}).get("choice", "not_asked") for c in CHANNELS]
        yield _csv_line([who, email, name, *choices, updated])


WITHDRAWAL_WORDING = "The supporter withdrew consent for contact by this channel."


def withdraw(
    session: Session,
    secret: bytes,
    email: str,
    channels: list[str],
    source: str = "operator",
) -> int:
    """Record a withdrawal (a new event per channel; nothing earlier changes)."""
    now = utcnow()
    events = [
        ConsentEvent(
            supporter_hash=supporter_hash(secret, email),
            event_type="withdrawal",
            campaign_slug="*",
            channel=channel,
            choice="refused",
            wording_version="withdrawal",
            wording=WITHDRAWAL_WORDING,
            wording_sha256=hashlib.sha256(WITHDRAWAL_WORDING.encode()).hexdigest(),
            lawful_basis="consent",
            source_url=source,
            recorded_at=now,
        )
        for channel in channels
    ]
    added = append(session, events)
    if {"phone", "sms"} & set(channels):
        _forget_phone(session, supporter_hash(secret, email))
    return added


def _forget_phone(session: Session, who: str) -> None:
    """After a withdrawal: the phone of a supporter who no longer agrees to calls or texts goes
    from their submissions retention has scrubbed (it kept it only while they agreed); the
    others' goes when their retention period ends."""
    now = current_preferences(session, who)
    if any(now.get(channel, {}).get("choice") == "granted" for channel in ("phone", "sms")):
        return
    scrubbed = select(Submission).where(
        Submission.supporter_hash == who,
        Submission.scrubbed_at.is_not(None),
        Submission.erased_at.is_(None),  # (erased: nothing of theirs left)
    )
    # Read afresh: an erasure in this transaction changed rows the session holds already.
    for sub in session.scalars(scrubbed.execution_options(populate_existing=True)):
        payload = sub.payload if isinstance(sub.payload, dict) else {}
        person = payload.get("supporter")
        if isinstance(person, dict) and "phone" in person:
            kept = {key: value for key, value in person.items() if key != "phone"}
            sub.payload = payload | {"supporter": kept}
