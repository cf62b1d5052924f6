"""``dearmp directory``: import, refresh, inspect and prune the local MP directory."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from sqlalchemy import func, select

from workers.cli.base import (
    Cli,
    Nothing,
    cell,
    command,
    confirm,
    dry_run_option,
    main,
    refusing,
    yes_option,
)
from workers.database.models import (
    AddressHealth,
    Constituency,
    DirectoryVersion,
    Member,
    Submission,
)
from workers.mp import health
from workers.mp.directory import (
    DirectoryError,
    current_version,
    import_directory,
    prune,
    set_dissolved,
    sync_members,
)
from workers.mp.live_sources import LiveSources, SourceUnavailable
from workers.stages.pauses import pause_address, resume_address
from workers.stages.stage import Stage
from workers.wording import counted

UNCHANGED = " (the current directory is unchanged)"


@main.group()
def directory() -> None:
    """The local MP directory: constituencies, MPs and postcodes, in versions."""


@command(directory, "import")
@click.option(
    "--members",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Constituencies with their MPs (the constituencies_2024_current_mps layout). "
    "Left out: the current MPs are kept.",
)
@click.option(
    "--postcodes",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="ONS Postcode Directory CSV (pcds/pcon/doterm, or the sample layout); repeat for "
    "several files. Left out: the current postcodes are kept.",
)
@click.option("--source", default=None, help="A note on where the data came from.")
def directory_import(
    cli: Cli, members: Path | None, postcodes: tuple[Path, ...], source: str | None
) -> None:
    """Import a new directory version and switch to it atomically (all or nothing)."""

    if members is None and not postcodes:
        raise click.UsageError("give --members, --postcodes, or both")
    total = sum(p.stat().st_size for p in postcodes)
    label = source or ", ".join(p.name for p in [*([members] if members else []), *postcodes])
    columns = (
        TextColumn("[bold]postcodes"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not postcodes) as progress:
        task = progress.add_task("postcodes", total=total)
        with refusing(DirectoryError, then=UNCHANGED), cli.session() as session:
            advance = partial(progress.advance, task)
            counts = import_directory(
                session, members, list(postcodes), source=label, progress=advance
            )
            progress.update(task, description="switching")
    said = (
        f"version {counts.version_id} is current: "
        f"{counted(counts.constituencies, 'constituency', 'constituencies')}, "
        f"{counted(counts.members, 'member')}, {counted(counts.postcodes, 'postcode')}"
    )
    if counts.skipped:
        rows = counted(counts.skipped, "row")
        which = "that is not a postcode" if counts.skipped == 1 else "that are not postcodes"
        which += " we can store"  # "X", or a BFPO number longer than the postcode column
        said += f"; skipped {rows} {which} (the first: {counts.first_skipped})"
    cli.say(said, counts)


@command(directory, "sync")
def directory_sync(cli: Cli) -> None:
    """Refresh MPs and their emails from the UK Parliament Members API (MEMBERS_API_URL)."""
    members = LiveSources.from_settings(cli.app.settings).members
    with refusing(DirectoryError, SourceUnavailable, then=UNCHANGED), cli.session() as session:
        report = sync_members(session, members, source=f"Members API {members.api.base_url}")
    counts = {k: len(v) for k, v in report.items() if isinstance(v, list)}
    lines = [f"version {report['version_id']} is current"]
    lines += [f"  new MP: {i['member']} ({i['constituency']})" for i in report["new_members"]]
    lines += [f"  vacant: {i['constituency']}" for i in report["vacancies"]]
    lines += [
        f"  email changed: {i['member']}: {i['old']} -> {i['new']}"
        for i in report["changed_emails"]
    ]
    lines.append(", ".join(f"{k}: {n}" for k, n in counts.items()))
    cli.say("\n".join(lines), {**report, "counts": counts})


@command(directory, "dissolve")
@click.option("--off", is_flag=True, help="Parliament meets again (usually: import the new MPs).")
@dry_run_option
@yes_option
def directory_dissolve(cli: Cli, off: bool, dry_run: bool, yes: bool) -> None:
    """Mark Parliament dissolved: no seat has an MP; campaigns hold or refuse letters. Asks
    first (--yes does not); exits 1 when Parliament is in that state already."""
    state = "sits" if off else "dissolved"
    with cli.session() as session:
        current = current_version(session)
        if current is None:
            raise Nothing("no directory has been imported: `dearmp directory import` first")
        if current.dissolved != off:
            raise Nothing(f"Parliament is {'sitting' if off else 'dissolved'} already")
    if dry_run:
        said = f"would make a new current version: Parliament {state} (nothing changed)"
        cli.say(said, {"dry_run": True, "version_id": None, "dissolved": not off})
        return
    confirm(
        yes,
        "Mark Parliament sitting again?"
        if off
        else "Mark Parliament dissolved (letters wait or are refused until --off)?",
    )
    with cli.session() as session:
        version_id = set_dissolved(session, not off, source="dissolved" if not off else "sitting")
    said = f"version {version_id} is current: Parliament {state}"
    cli.say(said, {"dry_run": False, "version_id": version_id, "dissolved": not off})


@command(directory, "status")
def directory_status(cli: Cli) -> None:
    """The directory versions, which is current, and what each holds."""

    def count(model: Any) -> Any:  # of the version on the row
        where = model.version_id == DirectoryVersion.id
        return select(func.count()).select_from(model).where(where).scalar_subquery()

    versions: list[dict[str, Any]] = []
    with cli.session() as session:
        held = session.scalar(
            select(func.count()).select_from(Submission).where(Submission.state == "held")
        )
        query = select(DirectoryVersion, count(Constituency), count(Member))
        for v, seats, mps in session.execute(query.order_by(DirectoryVersion.id)):
            versions.append(
                {
                    "id": v.id,
                    "current": v.is_current,
                    "created_at": v.created_at.isoformat(),
                    "source": v.source,
                    "dissolved": v.dissolved,
                    "seats": seats,
                    "members": mps,
                    "postcodes_version_id": v.postcodes_version_id,
                    "held": held if v.is_current else None,
                }
            )
        failing = [
            {
                "email": row.email,
                "member_id": row.member_id,
                "since": row.changed_at.isoformat(),
                "reason": row.reason,
            }
            for row in health.failing(session)
        ]
    cli.say(lambda: _print_status(versions, failing), {"versions": versions, "failing": failing})


def _print_status(versions: list[dict[str, Any]], failing: list[dict[str, Any]]) -> None:
    table = Table("version", "current", "created", "source", "seats", "MPs", "postcodes of", "held")
    for v in versions:
        source = v["source"] + (" (dissolved)" if v["dissolved"] else "")
        created, current = v["created_at"][:16].replace("T", " "), "yes" if v["current"] else ""
        counts = (v["seats"], v["members"], v["postcodes_version_id"], v["held"])
        table.add_row(*map(cell, (v["id"], current, created, source, *counts)))
    Console().print(table)
    if failing:
        bad = Table("failing address", "member", "since", "why")
        for row in failing:
            since = row["since"][:16].replace("T", " ")
            bad.add_row(*map(cell, (row["email"], row["member_id"], since, row["reason"])))
        Console().print(bad)


@command(directory, "address")
@click.argument("email")
@click.option("--pause", "reason", metavar="REASON", help="Hold every letter to it, and why.")
@click.option("--ok", is_flag=True, help="It works again: end its pause or its failing mark.")
def directory_address(cli: Cli, email: str, reason: str | None, ok: bool) -> None:
    """Pause an MP address (an office asked for a break, a mailbox is full: its letters wait,
    never lost), or mark it working again: letters waiting for it go now, and letters held
    while it was failing are resolved again."""
    if (reason is None) == (not ok):
        raise click.UsageError("give one of --pause REASON or --ok")
    with cli.session() as session:
        if reason is not None:
            with refusing(LookupError):  # marked failing: its mark must stay
                paused = pause_address(session, email, reason)
            if not paused:
                raise click.ClickException(f"{email} is paused already")
            action, said, groups = "paused", "paused; its letters wait until --ok", {}
        else:
            row = session.get(AddressHealth, health.key(email))
            if row is not None and row.status == health.PAUSED:
                ids = resume_address(session, email)
                action, groups = "resumed", {Stage.DELIVER: ids}
                said = f"resumed; {counted(len(ids), 'waiting letter')} queued to go"
            elif health.mark_ok(session, email):
                held = health.held_for(session, row.member_id) if row and row.member_id else []
                action, groups = "marked ok", {Stage.RESOLVE: held}
                said = f"marked ok; {counted(len(held), 'held letter')} sent to resolution again"
            else:
                raise click.ClickException(f"{email} is neither paused nor marked failing")
    cli.send(groups)
    letters = [i for ids in groups.values() for i in ids]
    cli.say(f"{email} {said}", {"address": email, "action": action, "letters": letters})


@command(directory, "prune")
@click.option(
    "--keep",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Versions to keep (newest first), at least 1.",
)
@dry_run_option
@yes_option
def directory_prune(cli: Cli, keep: int, dry_run: bool, yes: bool) -> None:
    """Delete old directory versions (and postcode sets nothing uses any more). Asks first
    (--yes does not); exits 1 when there is none to delete."""

    def pruned(dry: bool) -> list[int]:
        # A dry run's session is closed without a commit: nothing is deleted.
        with cli.app.sessions() if dry else cli.session() as session:
            return prune(session, keep=keep)

    gone = pruned(True)
    if not gone:
        kept = f"{counted(keep, 'version')} {'is' if keep == 1 else 'are'}"
        raise Nothing(f"no version to delete: at most {kept} kept, and no more exist")
    if not dry_run:
        old = counted(len(gone), "old directory version")
        confirm(yes, f"Delete {old} ({', '.join(map(str, gone))})?")
        gone = pruned(False)
    said = "would delete" if dry_run else "deleted"
    cli.say(
        f"{said} versions: {', '.join(map(str, gone)) or 'none'}",
        {"dry_run": dry_run, "deleted": gone},
    )
