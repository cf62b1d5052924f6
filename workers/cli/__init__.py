"""The ``dearmp`` command line: the whole pipeline, or any piece of it.

``base`` holds the top-level group; each module adds its commands: ``pipeline`` (workers,
reconciler, queues, dead letters, health, campaigns, deliveries), ``web`` (the HTTP intake),
``directory`` (the MP directory), ``privacy`` (consent, supporters, retention),
``replies`` (inbound mail, the replies report, DNS records), ``outbox`` (emails to supporters),
``webhooks`` (signed webhooks to a CRM) and ``submissions`` (finding submissions).
"""

import click

from workers.cli import pipeline, replies  # noqa: F401  (their commands are declared on main)
from workers.cli.base import main
from workers.cli.console import console
from workers.cli.directory import directory
from workers.cli.outbox import outbox
from workers.cli.privacy import consent, retention, supporter
from workers.cli.replies import replies as replies_group
from workers.cli.review import review
from workers.cli.submissions import submissions
from workers.cli.web import api
from workers.cli.webhooks import webhooks

for group in (api, directory, consent, supporter, retention, replies_group, outbox, webhooks):
    main.add_command(group)
main.add_command(submissions)
main.add_command(console)
main.add_command(review)
# The installed distribution's version (pyproject.toml's), not a copy kept in the code.
click.version_option(package_name="dearmp", prog_name="dearmp")(main)

__all__ = ["main"]
