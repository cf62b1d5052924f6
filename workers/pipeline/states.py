"""The pipeline as data: every state a submission can be in (:data:`STATES`) and each stage's
retry policy (:data:`STAGES`). The actors' options, the reconciler's resends, the outcomes, the
metrics' labels and the guard in :func:`workers.database.transitions.advance` (which refuses a
move not listed here) derive from them; see the README's "Adding a stage". Imports nothing of
the project but :class:`Stage`, so the models can use it."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple

from workers.stages.stage import Stage

HOUR = 3_600_000  # dramatiq's durations are in milliseconds
DAY = 24 * HOUR


class State(StrEnum):
    """Where a submission is (``submissions.state``, at most 16 characters)."""

    UNCONFIRMED = "unconfirmed"
    EXPIRED = "expired"
    RECEIVED = "received"
    VALIDATED = "validated"
    REJECTED = "rejected"
    HELD = "held"
    RESOLVED = "resolved"
    COMPARED = "compared"
    IN_REVIEW = "in_review"
    IN_DIGEST = "in_digest"
    RENDERED = "rendered"
    DELIVERED = "delivered"
    FAILED = "failed"
    WITHDRAWN = "withdrawn"
    BOUNCED = "bounced"

    @property
    def is_final(self) -> bool:
        return STATES[self].final


class Row(NamedTuple):
    stage: Stage | None  # the stage that acts on a submission in this state
    next: tuple[State, ...]  # the states the pipeline moves it to from here
    outcome: str  # what it means to the supporter: status API, page, `dearmp show`
    final: bool = False  # the pipeline is done with it: nothing resends it
    # After a final state: the moves that what comes back, or an operator, may still make.
    later: tuple[State, ...] = ()
    # The reconciler sends it to its stage again once its last dispatch is older than the
    # deadline. (Held and unconfirmed submissions are looked at on timetables of their own.)
    resent: bool = True
    # What a CRM hears when a submission reaches this state (workers.webhooks), if anything.
    event: str | None = None


S = State
# Where a submission starts: unconfirmed when its campaign asks the sender to confirm by email.
STARTS = (S.RECEIVED, S.UNCONFIRMED)
# Any state that is not final may also end here: erased at the supporter's request before a
# letter went, or failed when its stage was dead-lettered again and again (pipeline.failures).
FROM_ANY_UNFINISHED = (S.WITHDRAWN, S.FAILED)

# fmt: off
STATES: dict[State, Row] = {
    # state:       Row(stage acting on it, (next states), outcome, [final, later, resent])
    # Waiting for the sender to click the link in their email; NOTIFY queues it (and a
    # reminder) in the outbox.
    S.UNCONFIRMED: Row(Stage.NOTIFY, (S.RECEIVED, S.EXPIRED),
                       "Waiting for you to confirm by email.", resent=False),
    S.RECEIVED:    Row(Stage.VALIDATE, (S.VALIDATED, S.REJECTED),
                       "Received."),
    S.VALIDATED:   Row(Stage.RESOLVE, (S.RESOLVED, S.HELD, S.REJECTED, S.FAILED),
                       "Checked; finding your MP.", event="submission.accepted"),
    # The seat has no MP to write to yet, the MP has no email (a campaign that holds those) or
    # the MP's address fails: resolution is tried again when the directory changes, and every
    # few hours (so that a hold can expire). The outcome is true for each reason.
    S.HELD:        Row(Stage.RESOLVE, (S.RESOLVED, S.REJECTED, S.FAILED),
                       "Waiting until it can be sent to your MP: your constituency has no MP "
                       "just now, or no working email address for them.", resent=False),
    S.RESOLVED:    Row(Stage.COMPARE, (S.COMPARED, S.IN_REVIEW, S.FAILED),
                       "Your MP is found; preparing the letter."),
    S.COMPARED:    Row(Stage.RENDER, (S.RENDERED, S.IN_DIGEST, S.FAILED),
                       "Your MP is found; preparing the letter."),
    # Rendered, for the MP's daily digest (a campaign whose similar_letters policy is digest):
    # the digest, an outbox item of its own (workers.stages.digests), moves it on when sent.
    S.IN_DIGEST:   Row(Stage.DELIVER, (S.DELIVERED, S.FAILED),
                       "Going to your MP in today's digest of letters from constituents, with "
                       "your own words and your name.", resent=False),
    # Near-identical to many letters to the same MP, in a campaign that holds those: an
    # operator releases it (compared) or rejects it with a reason (`dearmp letters review`).
    S.IN_REVIEW:   Row(Stage.COMPARE, (S.COMPARED, S.REJECTED),
                       "Waiting for the campaign team: your letter is very like many others "
                       "to your MP, and letters in your own words carry more weight.",
                       resent=False),
    # The letter is an outbox item: the outbox's own timing resends it while it waits
    # (workers.outbox); the reconciler resends a submission whose letter was sent or given up
    # but which did not move (its worker died between the two commits).
    S.RENDERED:    Row(Stage.DELIVER, (S.DELIVERED, S.FAILED),
                       "On its way to your MP."),
    # Taken by the relay; returned for good by the MP's server later, it is bounced.
    S.DELIVERED:   Row(None, (), "Delivered to your MP.", final=True, later=(S.BOUNCED,),
                       event="letter.delivered"),
    # Sent again to a corrected address by an operator (`dearmp replies resend-bounced`).
    S.BOUNCED:     Row(None, (), "Returned by your MP's mail server, so it did not reach them. "
                       "The campaign team has been told.", final=True, later=(S.COMPARED,),
                       event="letter.bounced"),
    # The supporter is told why: reasons per field.
    S.REJECTED:    Row(None, (), "Not sent: see the reasons.", final=True,
                       event="submission.rejected"),
    # Needs an explanation (the reason is recorded); an operator may reopen a failed delivery,
    # a letter's or an MP's digest's (`dearmp deliveries reopen`).
    S.FAILED:      Row(None, (), "We could not deliver it. The campaign team has been told.",
                       final=True, later=(S.RENDERED, S.IN_DIGEST)),
    S.EXPIRED:     Row(None, (), "Never confirmed, so it was not sent.", final=True),
    S.WITHDRAWN:   Row(None, (), "Withdrawn at your request.", final=True),
}
# fmt: on


class Policy(NamedTuple):
    """A stage's retry policy, as dramatiq's actor options. A message past ``max_age`` is
    dead-lettered instead of run; it is young again whenever it is re-sent (deferral,
    reconciler, requeue), so the age bounds retrying."""

    max_retries: int
    min_backoff: int
    max_backoff: int
    max_age: int = DAY
    time_limit: int = 60_000
    # A permanent refusal by the mail server is never retried; recorded on its outbox item (and
    # a letter's on its submission), it is also dead-lettered for an operator (letters).
    dead_letters_refusals: bool = False
    # Of the messages a worker holds, those with the lowest number run first (dramatiq's).
    priority: int = 0
    # Run by the worker that moved the submissions to it, right after that commit, in a
    # transaction of its own (a stage cheaper than its message). Its queue still carries its
    # retries, the reconciler's resends and dead letters requeued.
    inline: bool = False

    def options(self) -> dict[str, Any]:
        """The numbers as dramatiq's keyword options (the actors add what is never retried)."""
        ours = ("dead_letters_refusals", "inline")
        return {name: value for name, value in self._asdict().items() if name not in ours}


# fmt: off
STAGES: dict[Stage, Policy] = {
    Stage.VALIDATE: Policy(max_retries=5, min_backoff=500, max_backoff=30_000),
    Stage.RESOLVE:  Policy(max_retries=8, min_backoff=1_000, max_backoff=120_000),
    Stage.COMPARE:  Policy(max_retries=5, min_backoff=500, max_backoff=30_000, inline=True),
    Stage.RENDER:   Policy(max_retries=5, min_backoff=500, max_backoff=30_000),
    Stage.DELIVER:  Policy(max_retries=10, min_backoff=5_000, max_backoff=600_000,
                           max_age=7 * DAY - HOUR, time_limit=120_000, dead_letters_refusals=True),
    Stage.NOTIFY:   Policy(max_retries=10, min_backoff=5_000, max_backoff=600_000),
    # Acting on no state of its own: the consent record of every validated submission.
    Stage.CONSENT:  Policy(max_retries=8, min_backoff=1_000, max_backoff=120_000, max_age=7 * DAY),
    # After a letter is sent: what came back to it.
    Stage.INBOUND:  Policy(max_retries=8, min_backoff=1_000, max_backoff=120_000),
    # Every email to a supporter (workers.outbox): its table owns the timing (the backoff after a
    # failed attempt, a wait for the mail server) through deferrals, which cost no retry; these
    # retries are for what the outbox did not foresee (passing trouble costs none for a minute:
    # actors.PASSING_WAITS). It gives an item up after DEARMP_OUTBOX_MAX_ATTEMPTS; the
    # reconciler resends it.
    Stage.OUTBOX:   Policy(max_retries=10, min_backoff=5_000, max_backoff=600_000,
                           max_age=7 * DAY - HOUR),
    # Webhooks to a CRM: outbox items too (the same timing and giving up), on their own queue.
    # A receiver that hangs is cut off by DEARMP_WEBHOOK_TIMEOUT_SECONDS, well within the limit.
    # Last in each worker: a letter or an email it holds runs before a webhook.
    Stage.WEBHOOK:  Policy(max_retries=10, min_backoff=5_000, max_backoff=600_000,
                           max_age=7 * DAY - HOUR, priority=100),
}
# fmt: on


# Derived from the tables.

FINAL_STATES = frozenset(state for state, row in STATES.items() if row.final)
# A letter that went: delivered, and what may come of it later (returned).
SENT = (S.DELIVERED, *STATES[S.DELIVERED].later)
OUTCOMES: dict[State, str] = {state: row.outcome for state, row in STATES.items()}
# What the reconciler resends to which stage once it has stopped moving.
RESENT_TO: dict[State, Stage] = {
    state: row.stage for state, row in STATES.items() if row.stage is not None and row.resent
}


def moves_from(state: State) -> tuple[State, ...]:
    """Every state a submission in ``state`` may be moved to."""
    row = STATES[state]
    return row.next + row.later + (() if row.final else FROM_ANY_UNFINISHED)


MOVES: frozenset[tuple[str, str]] = frozenset(
    (state, to) for state in STATES for to in moves_from(state)
)


def reached_only_through(through: State) -> frozenset[State]:
    """The states a submission can reach only by passing ``through`` (the pipeline's moves and
    the ends open to any unfinished state; not the later moves an operator makes)."""

    def reachable(starts: tuple[State, ...], avoiding: State | None) -> set[State]:
        seen, todo = set(starts) - {avoiding}, [s for s in starts if s != avoiding]
        while todo:
            row = STATES[todo.pop()]
            for to in row.next + (() if row.final else FROM_ANY_UNFINISHED):
                if to != avoiding and to not in seen:
                    seen.add(to)
                    todo.append(to)
        return seen

    return frozenset(reachable((through,), None) - reachable(STARTS, through))
