"""What ``dearmp health`` checks: whether letters can go out now, and what an operator should
look at. Each check is ``ok``, ``degraded`` (something to look at; letters still go) or
``down`` (nothing can go out: no database, no Redis, no worker, no mail server).
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from config.settings import Settings
from workers.database.engine import schema_problem, session_scope, unwritable
from workers.database.models import OutboxItem, OutboxStatus, State, Submission, utcnow
from workers.letters.mail import smtp
from workers.letters.mail.http import HttpMailer
from workers.letters.mail.relay import answer_text
from workers.mp import health as addresses
from workers.outbox import sending as outbox
from workers.pipeline.app import App
from workers.pipeline.dead_letters import dead_counts, mail_pause, oldest_waiting_seconds
from workers.pipeline.heartbeat import (
    clock_offset,
    clock_problem,
    last_pass,
    live_workers,
    mail_route,
    reconciler_about,
    redis_now,
    shared,
)
from workers.pipeline.states import STAGES
from workers.privacy.hashing import mask_supporter
from workers.stages import pauses
from workers.stages.delivery import KIND as LETTER
from workers.stages.digests import KIND as DIGEST
from workers.stages.digests import TO_MPS
from workers.stages.stage import Stage
from workers.webhooks.events import KIND as WEBHOOK
from workers.wording import counted

OK, DEGRADED, DOWN = "ok", "degraded", "down"
ORDER = {OK: 0, DEGRADED: 1, DOWN: 2}  # also the exit code
# A day's digest is made once a day: a letter waiting longer, its reconciler is not running.
DIGEST_LATE_HOURS = 36
# Letters tried in this window whose every try failed, and none sent: nothing goes out.
STALLED_WINDOW = timedelta(minutes=15)
STALLED_LETTERS = 3
# Letters given up within this window make health degraded: an operator reopens them.
GIVEN_UP_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


def overall(checks: list[Check]) -> str:
    """The worst status of the checks: ``ok`` (healthy), ``degraded`` or ``down``."""
    return max((c.status for c in checks), key=ORDER.__getitem__, default=OK)


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"status": overall(checks), "checks": [asdict(c) for c in checks]}


def run(
    app: App, client: redis.Redis, namespace: str, max_dead: int, max_age: float
) -> list[Check]:
    """Every check, the database's first (what the others read)."""
    settings = app.settings
    checks = [Check("redis", OK, "reachable")]
    where = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    try:  # reads that begin no write (select objects), and a write lock waited for 2 s at most
        problem = schema_problem(app.engine) or unwritable(app.engine)
    except Exception as exc:
        return [*checks, Check("database", DOWN, f"cannot reach {where} ({type(exc).__name__})")]
    if problem is not None:  # a migration its statements fail on, or writes that cannot go in
        return [*checks, Check("database", DOWN, f"{where}: {problem}")]
    checks.append(Check("database", OK, "reachable"))
    checks += [_workers(client, namespace, settings), _mail_server(settings)]
    if (lease := _lease(settings)) is not None:
        checks.append(lease)
    checks += _pipeline(app, client, namespace, max_dead, max_age)
    checks.append(_reconciler(client, namespace, settings.reconcile_interval))
    if app.returns.domains:
        checks.append(_receiver(settings))
    return checks


def _workers(client: redis.Redis, namespace: str, settings: Settings) -> Check:
    """The live worker processes; degraded when their letters go elsewhere than these settings
    say (the mail server checked below is then not theirs), when a process's clock (or this
    machine's) is off Redis's, or when one holds other settings that must be shared."""
    workers = live_workers(client, namespace)
    if not workers:
        return Check("workers", DOWN, "no worker process is alive (`dearmp worker`): nothing moves")
    hosts = sorted({w["host"] for w in workers})
    alive = counted(len(workers), "worker process", "worker processes")
    mine = mail_route(settings)
    elsewhere = sorted({w["mail"] for w in workers if w.get("mail") not in ("", None, mine)})
    if elsewhere:
        said = f"{alive} alive, sending letters to {' and '.join(elsewhere)}; these settings "
        return Check("workers", DEGRADED, said + f"say {mine}, which is what health checked")
    problems = _disagreements(client, namespace, workers, settings)
    if problems:
        return Check("workers", DEGRADED, f"{alive} alive; " + "; ".join(problems))
    return Check("workers", OK, f"{alive} alive on {', '.join(hosts)}")


def _disagreements(
    client: redis.Redis, namespace: str, workers: list[dict[str, Any]], settings: Settings
) -> list[str]:
    """Clocks off Redis's (this machine's too) and shared settings (:func:`shared`) that a
    worker or the reconciler holds otherwise than these settings say."""
    processes = [(f"worker {w['host']}:{w['pid']}", w) for w in workers]
    if (reconciler := reconciler_about(client, namespace)) is not None:
        processes.append(
            (f"the reconciler on {reconciler['host']}:{reconciler['pid']}", reconciler)
        )
    problems = [clock_problem(clock_offset(client))]
    problems += [clock_problem(float(about.get("clock") or 0), who) for who, about in processes]
    ours = shared(settings)
    for name, value in ours.items():
        theirs = sorted(
            {who for who, about in processes if about.get("settings", {}).get(name, value) != value}
        )
        if theirs:
            held = {about["settings"][name] for who, about in processes if who in theirs}
            problems.append(
                f"{name} is {' or '.join(sorted(held))} on {', '.join(theirs)} but {value} here: "
                "every process must hold it alike"
            )
    return [problem for problem in problems if problem is not None]


def _lease(settings: Settings) -> Check | None:
    """A claim's lease shorter than a send may take (the delivery actor's time limit): a slow
    mail server would see the letter taken over and sent again while it still has it."""
    longest = STAGES[Stage.DELIVER].time_limit / 1000
    lease = settings.delivery_lease_seconds
    if settings.mail_backend == "outbox" or lease > longest:
        return None
    return Check(
        "lease",
        DEGRADED,
        f"DEARMP_DELIVERY_LEASE_SECONDS is {lease}, no longer than a send may take ({longest:g} s):"
        " a slow mail server can make a letter go twice (the default is 300)",
    )


def _mail_server(settings: Settings) -> Check:
    """Whether letters can reach a mail server: connected as letters are, TLS verified, as far
    as EHLO (SMTP); nothing sent, no login."""
    backend = settings.mail_backend
    if backend == "outbox":
        return Check(
            "mail server",
            DEGRADED,
            f"letters go to files in {settings.resolved_outbox_dir}, not to a mail server "
            "(DEARMP_MAIL_BACKEND=outbox): no MP receives them",
        )
    if backend == "http":
        refused = HttpMailer(settings).probe()
        host = urlsplit(settings.email_api_url).hostname
        if refused:
            return Check("mail server", DOWN, refused)
        return Check("mail server", OK, f"{host} accepts our key for {settings.email_api_domain}")
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    try:
        conn = smtp.connect(settings, timeout=min(settings.smtp_timeout, 5.0))
    except smtplib.SMTPHeloError as exc:
        return Check("mail server", DOWN, f"{where} answered EHLO with {exc.smtp_code}")
    except smtplib.SMTPConnectError as exc:  # it answered, with a refusal for its greeting
        said = f"{where} refused us at its greeting: {exc.smtp_code} {answer_text(exc.smtp_error)}"
        return Check("mail server", DEGRADED if 400 <= exc.smtp_code < 500 else DOWN, said)
    except smtplib.SMTPNotSupportedError:
        return Check("mail server", DOWN, f"{where} offers no STARTTLS (SMTP_SECURITY=starttls)")
    except ssl.SSLCertVerificationError as exc:
        said = f"{where}'s certificate is not trusted ({exc.verify_message}): check SMTP_CA_FILE"
        return Check("mail server", DOWN, said)
    except ssl.SSLError as exc:
        return Check("mail server", DOWN, f"TLS with {where} failed ({exc.reason}): SMTP_SECURITY?")
    except socket.gaierror:
        return Check("mail server", DOWN, f"{settings.smtp_host}: no such host (SMTP_HOST)")
    except smtplib.SMTPServerDisconnected as exc:  # (smtplib's words, or a reply's bound's)
        return Check("mail server", DOWN, f"{where}: {exc}")
    except (OSError, smtplib.SMTPException) as exc:
        return Check("mail server", DOWN, f"cannot reach {where} ({type(exc).__name__})")
    try:
        if settings.smtp_username and smtp.login_mechanism(conn) is None:
            return Check("mail server", DOWN, f"{where}: {smtp.NoLogin()}")
    finally:
        smtp.close(conn)
    return Check("mail server", OK, f"{where} answers")


def _pipeline(
    app: App, client: redis.Redis, namespace: str, max_dead: int, max_age: float
) -> list[Check]:
    """Dead letters, waiting messages, what is overdue or waiting to retry, the mail pause."""
    settings = app.settings
    checks: list[Check] = []

    def degraded(name: str, detail: str) -> None:
        checks.append(Check(name, DEGRADED, detail))

    paused = mail_pause(client, namespace)
    if paused is None:
        checks.append(Check("mail pause", OK, "none"))
    elif not paused.get("lasting"):
        degraded(
            "mail pause",
            f"mail delivery paused until {paused['until']}: {paused['reason']}; letters "
            "wait, and resume when a try succeeds",
        )
    else:  # our login, certificate or sender refused: the same answer until someone acts
        checks.append(
            Check(
                "mail pause",
                DOWN,
                f"mail delivery paused: {paused['reason']}; nothing goes "
                "out until that is fixed, then `dearmp deliveries resume`",
            )
        )
    dead = sum(dead_counts(app.sessions).values())  # the database's count: Redis may forget
    if dead <= max_dead:
        checks.append(Check("dead letters", OK, counted(dead, "dead letter")))
    else:
        degraded("dead letters", f"{counted(dead, 'dead letter')} (more than {max_dead})")
    age = oldest_waiting_seconds(client, namespace, int(time.time() * 1000))
    if age <= max_age:
        checks.append(Check("queues", OK, f"oldest waiting message {age:.0f}s"))
    else:
        degraded("queues", f"oldest waiting message is {age:.0f}s old (more than {max_age:g}s)")
    late, lease = timedelta(seconds=max_age), timedelta(seconds=settings.delivery_lease_seconds)
    with session_scope(app.sessions) as session:
        now = utcnow()
        since, letters = now - STALLED_WINDOW, OutboxItem.kind.in_(TO_MPS)
        retried = (OutboxItem.status == OutboxStatus.PENDING) & (OutboxItem.failures > 0)

        def count(model: Any, *where: Any) -> int:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

        def by_error(*where: Any) -> list[tuple[str | None, int]]:
            """(error, how many) of the items ``where``, the commonest first, each with its
            supporter's details hidden (a server's answer can quote them: operators see this)."""
            query = select(OutboxItem.error, func.count(), func.min(OutboxItem.submission_id))
            rows = session.execute(query.where(*where).group_by(OutboxItem.error)).all()
            quoted = {sid for error, _, sid in rows if error}
            of = select(Submission.id, Submission.payload).where(Submission.id.in_(quoted))
            payloads: dict[str, Any] = dict(session.execute(of).all()) if quoted else {}
            errors: Counter[str | None] = Counter()
            for error, n, sid in rows:
                errors[error and mask_supporter(error, payloads.get(sid))] += n
            return errors.most_common()

        every = outbox.overdue(session, now, late, lease)
        hooks = outbox.overdue(session, now, late, lease, WEBHOOK)
        failing = addresses.failing_count(session)
        held_back = pauses.paused(session)
        in_review = count(Submission, Submission.state == State.IN_REVIEW)
        late_digests = count(
            Submission,
            Submission.state == State.IN_DIGEST,
            Submission.updated_at < now - timedelta(hours=DIGEST_LATE_HOURS),
        )
        failed = {k: n for (k, status), n in outbox.counts(session).items() if status == "failed"}
        retrying = by_error(letters, retried)
        # Tried lately and not sent: waiting after a failed try, or given up (a refusal for good).
        failed_lately = by_error(
            letters,
            OutboxItem.claimed_at >= since,
            retried | (OutboxItem.status == OutboxStatus.FAILED),
        )
        given_up_today = (
            OutboxItem.status == OutboxStatus.FAILED,
            OutboxItem.claimed_at >= now - GIVEN_UP_WINDOW,
        )
        # Letters `deliveries reopen --reason` would send again (not digests, nor the erased).
        kept = select(Submission.id).where(
            Submission.id == OutboxItem.submission_id,
            Submission.erased_at.is_(None),
            Submission.scrubbed_at.is_(None),
        )
        failed_today = by_error(OutboxItem.kind == LETTER, *given_up_today, kept.exists())
        # Events a CRM did not get: `outbox retry --kind webhook` sends them again.
        webhooks_today = by_error(OutboxItem.kind == WEBHOOK, *given_up_today)
        sent_lately = count(
            OutboxItem, letters, OutboxItem.status == OutboxStatus.SENT, OutboxItem.sent_at >= since
        )
    overdue = every - hooks
    if not overdue:
        checks.append(Check("outbox", OK, "nothing overdue"))
    else:
        degraded(
            "outbox",
            f"{counted(overdue, 'letter or email', 'letters and emails')} overdue by more than "
            f"{max_age:g}s: is a worker running?",
        )
    if hooks:  # letters and emails are not held up by it: their own queue
        degraded(
            "webhooks",
            f"{counted(hooks, 'webhook')} overdue by more than {max_age:g}s: a CRM endpoint "
            "does not answer, or no worker serves dearmp.webhook (`dearmp webhooks show ID`)",
        )
    waiting = sum(n for _, n in retrying)
    minutes = STALLED_WINDOW.total_seconds() / 60
    stalled = sum(n for _, n in failed_lately)
    if stalled >= STALLED_LETTERS and not sent_lately:
        checks.append(
            Check(
                "retries",
                DOWN,
                f"no letter sent in {counted(minutes, 'minute')} while {stalled} failed their "
                "last try "
                f"(most often: {failed_lately[0][0]}); `dearmp deliveries waiting` lists those "
                "to retry, `dearmp dlq list` those given up",
            )
        )
    elif waiting:
        checks.append(
            Check(
                "retries",
                OK,
                f"{counted(waiting, 'letter')} waiting to retry (most often: {retrying[0][0]}); "
                "`dearmp deliveries waiting` lists them",
            )
        )
    for what, name, resume in (
        ("campaign", "campaigns", "`dearmp campaigns resume SLUG`"),
        ("address", "paused MP addresses", "`dearmp directory address EMAIL --ok`"),
    ):
        held = [
            f"{p.name} ({counted(p.waiting, 'letter')} waiting)"
            for p in held_back
            if p.what == what
        ]
        if held:
            degraded(name, f"paused: {', '.join(held)}; {resume} sends them")
    if in_review:
        degraded(
            "review",
            f"{counted(in_review, 'letter')} near-identical to others waiting for an operator: "
            "`dearmp review list`",
        )
    if late_digests:
        degraded(
            "digests",
            f"{counted(late_digests, 'letter')} waiting over {DIGEST_LATE_HOURS} h for their MP's "
            "digest (is the reconciler running?): `dearmp review digest --now`",
        )
    if failing:
        degraded(
            "MP addresses",
            f"{counted(failing, 'MP address', 'MP addresses')} failing (letters to them are held): "
            "`dearmp directory status` lists them",
        )
    if failed_today:
        degraded(
            "failed letters",
            f"{counted(sum(n for _, n in failed_today), 'letter')} to MPs failed in the last "
            f"{GIVEN_UP_WINDOW.total_seconds() / 3600:g} h "
            f"(most often: {failed_today[0][0] or 'no answer recorded'}); "
            "once the cause is fixed, `dearmp deliveries reopen --reason TEXT` sends them again",
        )
    if webhooks_today:
        degraded(
            "webhooks given up",
            f"{counted(sum(n for _, n in webhooks_today), 'webhook')} to CRMs given up in the "
            f"last {GIVEN_UP_WINDOW.total_seconds() / 3600:g} h "
            f"(most often: {webhooks_today[0][0] or 'no answer recorded'}); once the endpoint "
            "is fixed, `dearmp outbox retry --kind webhook` sends them again",
        )
    given_up = sum(n for kind, n in failed.items() if kind not in (WEBHOOK, LETTER, DIGEST))
    digests = f"{counted(failed[DIGEST], 'MP digest')} failed, " if failed.get(DIGEST) else ""
    checks.append(
        Check(
            "given up",
            OK,
            f"{counted(failed.get(LETTER, 0), 'letter')} failed, {digests}"
            f"{counted(given_up, 'email')} to supporters given up, "
            f"{counted(failed.get(WEBHOOK, 0), 'webhook')} given up",
        )
    )
    return checks


def _reconciler(client: redis.Redis, namespace: str, interval: float) -> Check:
    at = last_pass(client, namespace)
    if at is None:
        return Check(
            "reconciler",
            DEGRADED,
            "no pass recorded: is `dearmp reconcile` running? (what Redis loses is not resent)",
        )
    ago = redis_now(client) - at  # a host whose clock ran ahead once made it "-7200s ago"
    if ago > max(3 * interval, 120):
        return Check("reconciler", DEGRADED, f"last pass {ago:.0f}s ago: is it running?")
    return Check("reconciler", OK, f"last pass {ago:.0f}s ago")


def _receiver(settings: Settings) -> Check:
    """The inbound SMTP receiver (returned letters and replies): does it greet a sender, as a
    relay would meet it? Accepting connections is not enough: a receiver at its cap of sessions
    answers 421, a stalled one nothing."""
    anywhere = settings.inbound_host in ("0.0.0.0", "::")  # noqa: S104 (where it listens)
    host = "127.0.0.1" if anywhere else settings.inbound_host
    where = f"{host}:{settings.inbound_port}"
    lost = "returned letters and replies are not received"
    try:
        with smtplib.SMTP(host, settings.inbound_port, timeout=3) as receiver:
            receiver.noop()
    except smtplib.SMTPConnectError as exc:  # its greeting refuses: 421 at the cap of sessions
        said = f"{exc.smtp_code} {answer_text(exc.smtp_error)}"
        return Check("inbound receiver", DEGRADED, f"{where} refuses senders ({said}): {lost}")
    except (TimeoutError, smtplib.SMTPServerDisconnected) as exc:
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            said = f"{where} accepts connections but does not greet within 3 s: is it stalled?"
        else:
            said = f"{where} closes connections without a greeting"
        return Check("inbound receiver", DEGRADED, f"{said} ({lost})")
    except (OSError, smtplib.SMTPException) as exc:
        return Check(
            "inbound receiver",
            DEGRADED,
            f"nothing accepts mail at {where} ({type(exc).__name__}): {lost} (`dearmp inbound`)",
        )
    return Check("inbound receiver", OK, f"{where} greets senders")
