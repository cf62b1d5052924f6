"""The pipeline's stages by name: each has one queue and one actor, and a group size."""

from __future__ import annotations

from enum import StrEnum

from schemas.messages import MAX_IDS


class Stage(StrEnum):
    VALIDATE = "validate"
    RESOLVE = "resolve"
    COMPARE = "compare"  # the letter against the campaign's draft and other letters to the MP
    RENDER = "render"
    DELIVER = "deliver"
    CONSENT = "consent"
    NOTIFY = "notify"  # queue the sender-confirmation email (or its reminder) in the outbox
    # Their messages carry inbound message and outbox item ids.
    INBOUND = "inbound"  # act on what came back to a letter (bounce, reply...)
    OUTBOX = "outbox"  # send an email to a supporter (workers.outbox): a notice, a confirmation
    # A webhook to a CRM (workers.webhooks): an outbox item on a queue of its own, so that an
    # endpoint that is down or hangs never delays a letter or an email.
    WEBHOOK = "webhook"

    @property
    def queue(self) -> str:
        return f"dearmp.{self.value}"

    @property
    def actor(self) -> str:
        return {
            Stage.INBOUND: "process_inbound",
            Stage.OUTBOX: "send_outbox",
            Stage.WEBHOOK: "send_webhook",
        }.get(self, f"{self.value}_submission")

    @property
    def id_name(self) -> str:
        """What the ids in this stage's messages are, as logs name them."""
        if self in (Stage.OUTBOX, Stage.WEBHOOK):
            return "outbox_id"
        return "inbound_id" if self == Stage.INBOUND else "submission_id"

    @property
    def group_size(self) -> int:
        """The most submissions one message to this stage carries (more than one: version 2).
        Delivery sends a group's letters one after another within one time limit, so its groups
        are smaller; the confirmation email goes one per message."""
        one = (Stage.NOTIFY, Stage.OUTBOX, Stage.WEBHOOK)
        return 1 if self in one else {Stage.DELIVER: 16, Stage.INBOUND: 16}.get(self, MAX_IDS)


class Deferred(Exception):
    """The stage must wait (quiet hours, a rate limit): send it again later, costing no retry."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(f"{reason}: wait {seconds:.1f}s")
        self.seconds = seconds
        self.reason = reason
