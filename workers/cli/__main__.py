"""``python -m workers.cli``: the ``dearmp`` command."""

from workers.cli import main

main()
