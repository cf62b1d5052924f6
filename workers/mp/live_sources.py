"""Live sources over HTTP: postcodes.io (postcode → constituency) and the UK Parliament Members
API (constituency → current MP and contact details), cached in the database with a time to live.
Connection errors, 429 and 5xx are retried with backoff (honouring ``Retry-After`` up to a
limit); past that, :class:`SourceUnavailable` leaves it to the actor's retries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from functools import cached_property
from typing import Any
from urllib.parse import quote

import requests
import structlog
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from schemas.submission import check_email
from workers.database.engine import insert_on_conflict, session_scope
from workers.database.models import LookupCache, utcnow
from workers.letters.mail.http import ThreadSessions, read_capped, retry_after
from workers.wording import counted, one_line

log = structlog.get_logger(__name__)

USER_AGENT = "DearMP/1 (+https://github.com/dearmp)"
# The Members API's contact type of the parliamentary office.
PARLIAMENTARY_OFFICE = 1
# A live answer's texts are outside text, kept on one line within their columns (name, party,
# seat): a line break in a name would fail every letter to that MP, an escape reach the operator.
NAME_CHARS = 200
TEXT_CHARS = (NAME_CHARS, 100, NAME_CHARS)
# Bytes of an answer read, at most: a real one is a few KB (a page of 20 members, 30 KB).
ANSWER_CAP = 1 << 20
# A member id is an integer column: PostgreSQL's holds at most this.
MAX_INTEGER = 2**31 - 1
PAGE = 20  # members asked for at a time
MOST_MEMBERS = 2_000  # sitting members of the Commons believed: it has 650 seats


def _gss(code: object) -> bool:
    """A GSS code as ONS writes them (``S14000060``): a letter and eight digits."""
    return (
        isinstance(code, str)
        and len(code) == 9
        and code.isascii()  # Arabic-Indic digits are digits too
        and code[0].isalpha()
        and code[1:].isdigit()
    )


def office_email(value: object) -> str | None:
    """A directory's address for an MP's office, or None if a letter cannot go to it: outside
    data like any other, it becomes a ``To`` header and an SMTP recipient."""
    try:
        return check_email(value.strip() if isinstance(value, str) else value)
    except ValueError:  # the supporters' check, whose message is for them
        return None


class SourceUnavailable(Exception):
    """A live source did not answer usefully after retries; try the whole message again later."""


@contextmanager
def documented(source: str, what: str) -> Iterator[None]:
    """An answer to ``what`` not shaped as ``source`` documents it (a key missing, a value of
    another type, a member id out of range) is the source's fault: :class:`SourceUnavailable`,
    as for an outage, never another error (nothing of it is kept)."""
    try:
        yield
    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
        raise SourceUnavailable(
            f"{source} answered {what} in a shape it does not document: {one_line(str(exc), 200)}"
        ) from exc


def _member_id(value: object) -> int:
    """A member id as the directory stores it: a whole number from 1 to PostgreSQL's integer's
    most (10**20 overflowed SQLite's on writing it)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_INTEGER:
        shown = repr(value) if len(repr(value)) <= 20 else f"{repr(value)[:16]}..."
        raise ValueError(f"a member id that is not a whole number from 1 to {MAX_INTEGER}: {shown}")
    return value


def _answered(status: int, body: Any) -> str:
    """An answer's status, and that it was no JSON if it was not (too deep, NaN, not UTF-8)."""
    return f"{status}" if body is not None else f"{status} (no JSON we can read)"


@dataclass(frozen=True)
class PostcodeAnswer:
    """What postcodes.io knows of a postcode: found with a constituency code, or why not."""

    status: str  # "found", "unknown", "terminated", "invalid"
    gss_code: str | None = None
    constituency: str | None = None


@dataclass(frozen=True)
class MemberAnswer:
    member_id: int
    name: str
    party: str
    constituency: str
    email: str | None
    phone: str | None


@dataclass
class JsonApi:
    """GET JSON from one base URL with timeouts, retries and a session per thread."""

    base_url: str
    timeout: float = 10.0
    attempts: int = 3
    backoff: float = 0.5
    max_wait: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    sessions: ThreadSessions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.sessions = ThreadSessions(
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"}
        )

    def get(self, path: str, params: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON or None) for any answer that is not worth retrying."""
        url = self.base_url + path
        problem = ""
        for attempt in range(self.attempts):
            wait = self.backoff * 2**attempt
            try:
                response = self.sessions.session.get(
                    url, params=params, timeout=self.timeout, stream=True, allow_redirects=False
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = type(exc).__name__
            else:
                if 300 <= response.status_code < 400:  # followed, it could lead anywhere
                    response.close()
                    raise SourceUnavailable(
                        f"{self.base_url} answered HTTP {response.status_code}, a redirect "
                        "(not followed)"
                    )
                if response.status_code != 429 and response.status_code < 500:
                    body, unread = read_capped(response, ANSWER_CAP, self.timeout)
                    if unread:  # asked again, it would be the same
                        raise SourceUnavailable(f"{self.base_url} gave {unread}")
                    return response.status_code, _json(body)
                response.close()
                problem = f"HTTP {response.status_code}"
                asked = retry_after(response)
                if asked is not None:
                    if asked > self.max_wait:
                        raise SourceUnavailable(
                            f"{self.base_url} asked us to wait {asked:.0f} s ({problem})"
                        )
                    wait = asked
            log.info("live_source_retry", source=self.base_url, problem=problem, attempt=attempt)
            if attempt + 1 < self.attempts:
                self.sleep(wait)
        raise SourceUnavailable(
            f"{self.base_url} unavailable after {counted(self.attempts, 'try', 'tries')}: {problem}"
        )


def _json(body: bytes) -> Any:
    """The JSON ``body`` holds, or None if it holds none as RFC 8259 writes it: NaN and
    Infinity are not JSON, nor is nesting deeper than the parser goes."""

    def not_json(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(body, parse_constant=not_json)
    except (ValueError, RecursionError):  # a UnicodeDecodeError is a ValueError
        return None


class PostcodesIo:
    def __init__(self, api: JsonApi) -> None:
        self.api = api

    def lookup(self, postcode: str) -> PostcodeAnswer:
        status, body = self.api.get(f"/postcodes/{quote(postcode)}")
        result = body.get("result") if isinstance(body, dict) else None
        if status == 200 and isinstance(result, dict):
            with documented("postcodes.io", "a postcode lookup"):
                gss_code = (result.get("codes") or {}).get("parliamentary_constituency")
                name = result.get("parliamentary_constituency")
                if not isinstance(name, str | None) or not (gss_code is None or _gss(gss_code)):
                    raise TypeError("a constituency code or name not as documented")  # null: none
            return PostcodeAnswer("found", gss_code, name and one_line(name, NAME_CHARS))
        if status == 404 and isinstance(body, dict):
            if body.get("terminated"):
                return PostcodeAnswer("terminated")
            if body.get("error") == "Invalid postcode":
                return PostcodeAnswer("invalid")
            return PostcodeAnswer("unknown")
        raise SourceUnavailable(
            f"postcodes.io answered {_answered(status, body)} for a postcode lookup"
        )


class MembersApi:
    def __init__(self, api: JsonApi) -> None:
        self.api = api

    @staticmethod
    def _member(value: dict[str, Any]) -> tuple[int, str, str, str]:
        membership = value.get("latestHouseMembership") or {}
        texts = (
            value.get("nameDisplayAs") or value.get("nameListAs") or "",
            (value.get("latestParty") or {}).get("name") or "",
            membership.get("membershipFrom") or "",
        )
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("a member's name, party or seat that is not text")
        return _member_id(value["id"]), *texts

    def _search(self, what: str, **params: Any) -> tuple[list[Any], int]:
        """A search of the sitting members of the Commons: a page of its items from ``skip``,
        and how many it finds in all; an answer with no list of items (``{}``, ``null``) or no
        count of them, or one that counts items it does not list, is the source's outage, never
        "nobody sits"."""
        params |= {"House": 1, "IsCurrentMember": "true"}
        status, body = self.api.get("/api/Members/Search", params)
        if status != 200 or not isinstance(body, dict):
            raise SourceUnavailable(f"Members API answered {_answered(status, body)} for {what}")
        with documented("the Members API", what):
            items, total = body.get("items"), body.get("totalResults")
            if not isinstance(items, list):
                raise TypeError(f"items is not a list: {type(items).__name__}")
            if isinstance(total, bool) or not isinstance(total, int) or total < 0:
                raise TypeError(f"totalResults is not a count: {str(total)[:20]!r}")
            if not items and total > params.get("skip", 0):
                raise ValueError(f"no items from {params.get('skip', 0)}, totalResults {total}")
        return items, total

    def for_postcode(self, postcode: str) -> MemberAnswer | None:
        """The sitting Commons member for a postcode, or None for a vacant seat."""
        items, _ = self._search("a member search", Location=postcode)
        if not items:
            return None
        with documented("the Members API", "a member search"):
            member_id, *texts = self._member(items[0]["value"])
        name, party, seat = map(one_line, texts, TEXT_CHARS)
        email, phone = self.contact(member_id)
        return MemberAnswer(member_id, name, party, seat, email, phone)

    def contact(self, member_id: int) -> tuple[str | None, str | None]:
        """(email, phone): the parliamentary office's first, then any other listed email; one
        that is no address (:func:`office_email`) is passed over, and logged by member id."""
        status, body = self.api.get(f"/api/Members/{member_id}/Contact")
        if status == 404:
            return None, None
        if status != 200 or not isinstance(body, dict):
            said = _answered(status, body)
            raise SourceUnavailable(f"Members API answered {said} for member contact details")
        with documented("the Members API", "member contact details"):
            entries = sorted(
                body.get("value") or [],
                key=lambda e: (e.get("typeId") != PARLIAMENTARY_OFFICE, not e.get("isPreferred")),
            )
            listed = [e["email"] for e in entries if str(e.get("email") or "").strip()]
            phone = next(
                (one_line(e["phone"], 40) for e in entries if (e.get("phone") or "").strip()), None
            )
        valid = [address for address in map(office_email, listed) if address]
        if len(valid) < len(listed):
            log.warning("mp_email_refused", member_id=member_id, refused=len(listed) - len(valid))
        email = valid[0] if valid else None
        return email, phone

    def current_members(self) -> list[tuple[int, str, str, str]]:
        """(member id, name, party, seat name) of every sitting member of the Commons. A list
        no Commons has is the source's outage: more than :data:`MOST_MEMBERS`, or a page that
        lists no one not listed before (either would be paged through for ever)."""
        members: dict[int, tuple[int, str, str, str]] = {}
        skip = 0
        while True:
            items, total = self._search("the member list", skip=skip, take=PAGE)
            if total > MOST_MEMBERS:
                raise SourceUnavailable(
                    f"the Members API lists {total:,} sitting members: more than "
                    f"{MOST_MEMBERS:,}, and the Commons has 650 seats"
                )
            with documented("the Members API", "the member list"):
                page = [self._member(item["value"]) for item in items]
            if items and all(member[0] in members for member in page):
                raise SourceUnavailable(
                    f"the Members API's page at {skip} lists no member not listed before"
                )
            members |= {member[0]: member for member in page}
            skip += len(items)
            if not items or skip >= total:
                return list(members.values())


def _upsert(session: Session, key: str, value: dict[str, Any] | None, ttl: float) -> None:
    now = utcnow()
    answer = {"value": value, "fetched_at": now, "expires_at": now + timedelta(seconds=ttl)}
    stmt = insert_on_conflict(session, LookupCache).values(key=key, **answer)
    session.execute(stmt.on_conflict_do_update(index_elements=["key"], set_=answer))


def _fresh(session: Session, key: str) -> tuple[bool, dict[str, Any] | None]:
    hit = session.execute(
        select(LookupCache.value).where(LookupCache.key == key, LookupCache.expires_at > utcnow())
    ).first()
    return (True, hit[0]) if hit is not None else (False, None)


def expire_cache(session: Session) -> int:
    """Delete the cached answers past their time to live; how many."""
    result = session.execute(delete(LookupCache).where(LookupCache.expires_at <= utcnow()))
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass
class LiveSources:
    """The live sources, their answers cached for ``ttl`` seconds under ``source:postcode``."""

    postcodes: PostcodesIo
    members: MembersApi
    ttl: float

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveSources:
        def api(url: str) -> JsonApi:
            return JsonApi(
                url,
                timeout=settings.lookup_timeout,
                attempts=settings.lookup_attempts,
                backoff=settings.lookup_backoff,
                max_wait=settings.lookup_max_wait,
            )

        return cls(
            PostcodesIo(api(settings.postcodes_io_url)),
            MembersApi(api(settings.members_api_url)),
            settings.lookup_cache_ttl,
        )

    @cached_property
    def once(self) -> LiveSources:
        """The same sources asking each question once (a supporter waiting on a page: the
        pipeline's retries are for messages that can wait), sharing the cache."""

        def once(api: JsonApi) -> JsonApi:
            return replace(api, attempts=1)

        postcodes, members = (
            PostcodesIo(once(self.postcodes.api)),
            MembersApi(once(self.members.api)),
        )
        return replace(self, postcodes=postcodes, members=members)

    def _fetch(self, key: str) -> dict[str, Any] | None:
        """The source's answer; one not shaped as its documentation says is the source's fault
        (:func:`documented`)."""
        source, _, postcode = key.partition(":")
        if source == "postcodes.io":
            return asdict(self.postcodes.lookup(postcode))
        found = self.members.for_postcode(postcode)
        return asdict(found) if found else None

    def warm(self, sessions: sessionmaker[Session], postcode: str) -> None:
        """Fetch a postcode's answers into the cache with no transaction open, so that resolution
        makes no network call inside its transaction."""
        if self.ttl <= 0:
            return
        for key in (f"postcodes.io:{postcode}", f"members:{postcode}"):
            with session_scope(sessions) as session:
                found, value = _fresh(session, key)
            if not found:
                value = self._fetch(key)  # the network, outside any transaction
                with session_scope(sessions) as session:
                    _upsert(session, key, value, self.ttl)
            if key.startswith("postcodes.io:") and (value or {}).get("status") != "found":
                return  # no constituency: no member to look up

    def _cached(self, session: Session, key: str) -> dict[str, Any] | None:
        found, value = _fresh(session, key)
        if not found:
            value = self._fetch(key)
            if self.ttl > 0:
                _upsert(session, key, value, self.ttl)
        return value

    def postcode(self, session: Session, postcode: str) -> PostcodeAnswer:
        value = self._cached(session, f"postcodes.io:{postcode}")
        assert value is not None
        return PostcodeAnswer(**value)

    def member(self, session: Session, postcode: str) -> MemberAnswer | None:
        value = self._cached(session, f"members:{postcode}")
        return MemberAnswer(**value) if value else None
