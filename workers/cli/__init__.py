"""The ``dearmp`` command line: the whole pipeline, or any piece of it.

``base`` holds the top-level group and what commands share; each other module declares its
commands on that group.
"""

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
    webhooks,
)
from workers.cli.base import main

__all__ = ["main"]
