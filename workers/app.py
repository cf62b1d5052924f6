"""What a process needs, built once: settings, the database, the mailer, the hashing key.

Nothing here connects at import time; :func:`get_app` builds on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings, get_settings
from workers.db import make_engine, make_sessionmaker
from workers.mail import Mailer, make_mailer


@dataclass
class App:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    mailer: Mailer
    secret: bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> App:
        engine = make_engine(settings.resolved_database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            mailer=make_mailer(settings),
            secret=settings.secret(),
        )


_app: App | None = None


def get_app() -> App:
    global _app
    if _app is None:
        _app = App.from_settings(get_settings())
    return _app


def set_app(app: App | None) -> None:
    """Install the process's App (tests, and commands that build their own)."""
    global _app
    _app = app
