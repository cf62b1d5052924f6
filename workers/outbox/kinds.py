"""What each kind of outbox item is on the wire, written from its row (the same bytes every
time, so a resend is the same email), its envelope on the bounce domain. A new kind is a
:class:`~workers.outbox.sending.Kind` in :func:`kinds`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from config.settings import default
from schemas.submission import stored_email
from workers.database.models import (
    InboundMessage,
    Letter,
    LetterEvent,
    LetterPrint,
    OutboxItem,
    OutboxStatus,
    Submission,
)
from workers.letters import notices
from workers.letters.definitions import get_definition
from workers.letters.mail import DkimSigner, Mailer, Outgoing
from workers.letters.rate_limits import Limiter
from workers.outbox.sending import Kind
from workers.receiving.addresses import ReturnAddresses
from workers.stages import confirmation, delivery, digests, survey
from workers.stages.stage import Stage
from workers.webhooks import events as webhooks
from workers.webhooks import payloads


@dataclass(frozen=True)
class Context:
    """What composing needs, built once per App (:func:`workers.pipeline.actors.outbox_for`)."""

    returns: ReturnAddresses
    signer: DkimSigner | None
    secret: bytes
    mailer: Mailer
    delivery: delivery.DeliveryPolicy = field(default_factory=delivery.DeliveryPolicy)
    limiter: Limiter | None = None
    public_url: str = default("public_url")
    confirmation: confirmation.ConfirmationPolicy = field(
        default_factory=confirmation.ConfirmationPolicy
    )
    webhook_timeout: float = default("webhook_timeout_seconds")
    threads: int = default("worker_threads")


# Every kind the outbox sends (``outbox.kind``): what :func:`kinds` returns, by name.
KINDS = (
    delivery.KIND,
    digests.KIND,
    "confirm",
    "bounce",
    "forward",
    "survey",
    digests.NOTICE,
    webhooks.KIND,
)


def stage_of(kind: str) -> Stage:
    """The stage (queue) an item of ``kind`` is sent by: a webhook's its own, so that an
    endpoint that hangs holds up no email."""
    letters = {delivery.KIND: Stage.DELIVER, digests.KIND: Stage.DELIVER}
    return {**letters, webhooks.KIND: Stage.WEBHOOK}.get(kind, Stage.OUTBOX)


def kinds(context: Context) -> dict[str, Kind]:
    """Every kind the outbox sends, by ``outbox.kind`` (:data:`KINDS`)."""

    def confirm(session: Session, item: OutboxItem) -> Outgoing | str:
        return confirmation.compose(
            session,
            item.submission_id,
            item.key == "reminder",
            context.secret,
            context.confirmation,
            context.signer,
            context.returns,
        )

    after_sent = partial(_after_sent, context=context)
    mail = (context.mailer, context.delivery, context.limiter, context.signer, context.returns)
    return {
        delivery.KIND: delivery.kind(*mail),
        digests.KIND: digests.kind(*mail),
        digests.NOTICE: Kind(after_sent),
        "confirm": Kind(confirm),
        "bounce": Kind(after_sent),
        "forward": Kind(after_sent, done=_forget_reply),
        "survey": Kind(after_sent),
        webhooks.KIND: payloads.kind(context.webhook_timeout, context.threads),
    }


def file_stem(item: OutboxItem) -> str:
    """The name of the item's copy in the file outbox (its Message-ID's local part)."""
    return f"{item.key}-{item.submission_id}" if item.kind == "confirm" else f"notice-{item.id}"


def _after_sent(session: Session, item: OutboxItem, context: Context) -> Outgoing | str:
    """A notice about a letter that was sent: returned, a reply forwarded, the survey."""
    submission = session.get(Submission, item.submission_id)
    letter = session.get(Letter, item.submission_id)
    if submission is None or letter is None:
        return "the letter is gone"
    to = stored_email(submission.payload)
    if to is None:
        return "the supporter's details were erased"
    definition = get_definition(session, submission.campaign_slug)
    if definition is None:
        return "the campaign is gone"
    sender = notices.Sender(definition.organisation, str(definition.from_email))
    recipient = submission.recipient or {}
    mp_name = str(recipient.get("name") or letter.to_name)
    if item.kind == "bounce":
        message = notices.bounce_notice(
            item.id, sender, to, mp_name, submission.member_id, item.created_at
        )
    elif item.kind == "forward":
        inbound = session.get(InboundMessage, item.inbound_id) if item.inbound_id else None
        if inbound is None or inbound.raw is None:
            return "the reply's text is gone"
        message = notices.forward(
            item.id, sender, to, inbound.raw, mp_name, letter.to_email, item.created_at
        )
    elif item.kind == digests.NOTICE:
        digest = select(LetterPrint.digest_id).where(LetterPrint.submission_id == submission.id)
        sent = select(OutboxItem.sent_at).where(OutboxItem.id == digest.scalar_subquery())
        count = session.scalar(  # the letters it held: those of constituents erased since too
            select(func.count())
            .select_from(LetterPrint)
            .join(Submission, Submission.id == LetterPrint.submission_id)
            .where(
                LetterPrint.digest_id == digest.scalar_subquery(),
                Submission.erased_at.is_(None) | (Submission.erased_at > sent.scalar_subquery()),
            )
        )
        text = digests.notice_text(definition, mp_name, count or 1)
        message = notices.digested(item.id, sender, to, mp_name, text, item.created_at)
    else:
        answered = session.scalar(
            select(LetterEvent.id).where(
                LetterEvent.submission_id == submission.id,
                LetterEvent.kind.in_(("reply", "survey")),
            )
        )
        if answered is not None:
            return "a reply or an answer came first"
        links = survey.links(context.public_url, context.returns.secret, submission.id)
        reminder = item.key == "survey-reminder"
        message = notices.survey(item.id, sender, to, mp_name, links, item.created_at, reminder)
    envelope = context.returns.notice(item.id) or str(definition.from_email)
    return notices.outgoing(message, envelope, context.signer)


def _forget_reply(session: Session, item: OutboxItem, status: str, _detail: str | None) -> None:
    """A reply's text is kept only until it is forwarded or skipped: one given up keeps it for
    ``dearmp outbox retry`` (the submission's retention deletes it with the rest)."""
    if item.inbound_id is not None and status != OutboxStatus.FAILED:
        session.execute(
            update(InboundMessage)
            .where(InboundMessage.id == item.inbound_id)
            .values(raw=None)
            .execution_options(synchronize_session=False)
        )
