"""The ``dearmp`` command line: the whole pipeline, or any piece of it.

``base`` holds the top-level group and what commands share; each other module declares its
commands on that group.
"""

import click

from workers.cli import (  # noqa: F401  (their commands are declared on main)
    demo,
    directory,
    outbox,
    pipeline,
    privacy,
    queues,
    replies,
    review,
    submissions,
    web,
)
from workers.cli.base import main
from workers.cli.webhooks import webhooks

main.add_command(webhooks)
# The installed distribution's version (pyproject.toml's), not a copy kept in the code.
click.version_option(package_name="dearmp", prog_name="dearmp")(main)

__all__ = ["main"]
