"""The ``dearmp`` command line: the whole pipeline, or any piece of it.

``base`` holds the top-level group; each module adds its commands: ``pipeline`` (workers,
reconciler, queues, dead letters, health, campaigns, deliveries), ``web`` (the HTTP intake),
``directory`` (the MP directory) and ``privacy`` (consent, supporters, retention).
"""

from workers.cli import pipeline  # noqa: F401  (its commands are declared on main)
from workers.cli.base import main
from workers.cli.directory import directory
from workers.cli.privacy import consent, retention, supporter
from workers.cli.web import api

for group in (api, directory, consent, supporter, retention):
    main.add_command(group)

__all__ = ["main"]
