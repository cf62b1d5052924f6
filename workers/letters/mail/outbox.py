"""The file outbox, the embedded default backend: each letter an ``.eml`` file, readable by
this user only, written whole (a temporary file, then a rename)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from workers.letters.mail.mailer import Mailer, Outgoing


class OutboxMailer(Mailer):
    """One ``.eml`` file per letter, named by its Message-ID: writing it twice leaves one file."""

    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(self, mail: Outgoing) -> str:
        stem = mail.message_id.strip("<>").split("@", 1)[0]
        path = self.directory / f"{stem}.eml"
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        try:
            _write_private(tmp, mail.data)
        except FileNotFoundError:  # the first letter (or the folder was removed): make it
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_private(tmp, mail.data)
        os.replace(tmp, path)
        return f"written {path.name}"


def _write_private(path: Path, data: bytes) -> None:
    """A letter's file, readable by this user only (it holds personal data)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
