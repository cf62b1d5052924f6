"""What a campaign front end posts: the versioned submission schema.

Every field check raises a message a supporter can read next to the field. Single-line fields
refuse control characters (CR/LF would allow header injection); the letter body allows only
newlines and tabs.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
)
from pydantic_core import core_schema

from schemas.postcode import check_format, normalise_postcode

__all__ = [
    "SubmissionV1",
    "ascii_email",
    "error_message",
    "normalise_postcode",
    "parse_submission",
    "single_line",
]

SCHEMA_VERSION: Literal[1] = 1

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
PHONE_RE = re.compile(r"^\+?[0-9 ()-]{7,24}$")


class Choice(StrEnum):
    GRANTED = "granted"
    REFUSED = "refused"
    NOT_ASKED = "not_asked"


CHANNELS = ("email", "phone", "sms", "post")


# Format characters that only steer how text is shown, never part of it: the explicit bidi
# embeddings, overrides and isolates (they can make a letter read differently from what is
# stored) and the interlinear annotation marks. Other format characters are real text: ZWNJ and
# ZWJ in Persian names and emoji sequences, a soft hyphen in an address.
BIDI_AND_ANNOTATION = frozenset(
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufff9\ufffa\ufffb"
)


def _not_scalar(text: str) -> bool:
    """True if ``text`` holds a lone surrogate: not a Unicode scalar value, so not encodable."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _is_noncharacter(ch: str) -> bool:
    code = ord(ch)
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


def _has_control(text: str, allowed: str = "") -> bool:
    """True if ``text`` holds a control character (other than ``allowed``), a line or paragraph
    separator, a bidi control or a noncharacter."""
    probe = text
    for ch in allowed:
        probe = probe.replace(ch, "")
    if probe.isprintable():  # no Cc, Cf, Zl, Zp or Cs at all (checked in C): the usual case
        return False
    return any(
        (unicodedata.category(ch) in {"Cc", "Zl", "Zp", "Cs"} and ch not in allowed)
        or ch in BIDI_AND_ANNOTATION
        or _is_noncharacter(ch)
        for ch in probe
    )


def check_text(label: str, text: str) -> None:
    """Refuse text that is not a sequence of Unicode scalar values (a lone surrogate, as JSON's
    ``\\ud800`` escape gives): it cannot be stored, rendered or sent."""
    if _not_scalar(text):
        raise ValueError(
            f"{label} contains characters that are not valid text (a broken emoji or a "
            "copy-and-paste error). Please type it again."
        )


@dataclass(frozen=True)
class Checked:
    """A field's own check, run before pydantic's, and what the published JSON Schema says of
    the field's string form (a format named for the rule, lengths, a pattern)."""

    check: Callable[[Any], Any]
    schema: dict[str, Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_before_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> Any:
        json_schema = handler.resolve_ref_schema(handler(schema))
        for branch in json_schema.get("anyOf", [json_schema]):
            if branch.get("type") == "string":
                branch.update(self.schema)
        return json_schema


SINGLE_LINE = (
    "One line of text: no control characters, line breaks, bidi controls or broken "
    "characters; leading and trailing spaces are removed."
)


def single_line(label: str, max_len: int, min_len: int = 1, optional: bool = False) -> Any:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{label} must be text.")
        check_text(label, value)
        text: str = value.strip()
        if _has_control(text):
            raise ValueError(f"{label} must be on one line, without control characters.")
        if len(text) < min_len:
            raise ValueError(f"Please enter your {label.lower()}.")
        if len(text) > max_len:
            raise ValueError(f"{label} must be at most {max_len} characters.")
        return text

    schema = {"format": "single-line-text", "maxLength": max_len, "description": SINGLE_LINE}
    return Checked(check, schema | ({"minLength": min_len} if min_len else {}))


def _check_postcode(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Please enter your postcode.")
    check_text("Postcode", value)
    if _has_control(value.strip()):
        raise ValueError("Postcode must be on one line, without control characters.")
    postcode, problem = check_format(value)
    if problem is not None:
        raise ValueError(problem.message)
    return postcode


def _check_email(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Please enter your email address.")
    value = value.strip()
    check_text("Email address", value)
    if _has_control(value):
        raise ValueError("Email address must be on one line, without control characters.")
    return ascii_email(value)


def ascii_email(value: str) -> str:
    """The address as it goes on the wire: an internationalised domain as IDNA (punycode).

    A non-ASCII local part (``zoë@example.org``) is refused: it needs SMTPUTF8 from every server
    between us and the MP's office and back to the supporter (their ``Reply-To``), which a
    campaign cannot know; refusing it at the door is an answer the supporter can act on."""
    check_text("Email address", value)
    local = value.rpartition("@")[0]
    if not local.isascii():
        raise ValueError(
            "Letters with accents or non-Latin characters before the @ cannot be used in an "
            "email address here. Please use another address."
        )
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"This is not a valid email address: {exc}") from None
    address: str = checked.ascii_email or checked.normalized
    return address


def _check_phone(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or not value.isascii() or not PHONE_RE.match(value.strip()):
        raise ValueError("This is not a phone number. Use digits, spaces and an optional +.")
    digits = re.sub(r"\D", "", value)
    if not 10 <= len(digits) <= 15:
        raise ValueError("A phone number has between 10 and 15 digits.")
    return value.strip()


def _check_body(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Your letter is empty. Please write something to your MP.")
    check_text("Your letter", value)
    if _has_control(value, allowed="\n\t\r"):
        raise ValueError("Your letter contains control characters that cannot be sent.")
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def _check_ip(value: Any) -> str | None:
    if value is None or value == "":
        return None
    try:
        return str(ipaddress.ip_address(value))
    except (TypeError, ValueError):
        raise ValueError("client_ip is not an IPv4 or IPv6 address.") from None


def _check_regex(pattern: re.Pattern[str], message: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise ValueError(message)
        return value

    return Checked(check, {"pattern": pattern.pattern})


Postcode = Annotated[
    str,
    Checked(
        _check_postcode,
        {"format": "uk-postcode", "description": "A UK postcode where someone lives."},
    ),
    Field(examples=["SW1A 1AA"]),
]
Email = Annotated[
    str,
    Checked(
        _check_email,
        {
            "format": "email",
            "maxLength": 254,
            "description": "An email address with an ASCII local part; the domain may be "
            "internationalised (it is stored as IDNA).",
        },
    ),
]


class Supporter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, single_line("Full name", 100), Field(title="Full name")]
    email: Email
    postcode: Postcode
    address_lines: Annotated[
        list[Annotated[str, single_line("Address line", 100)]],
        Field(min_length=1, max_length=5, title="Postal address (without the postcode)"),
    ]
    phone: Annotated[
        str | None,
        Checked(
            _check_phone,
            {"pattern": PHONE_RE.pattern, "description": "10 to 15 digits, spaces, () - and +."},
        ),
    ] = None


class Letter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: Annotated[
        str,
        single_line("Subject", 200, min_len=0),
        Field(description="Empty, or not editable in the campaign: a campaign variant is used."),
    ] = ""
    body: Annotated[
        str,
        Checked(
            _check_body,
            {
                "format": "letter-text",
                "description": "Lines of text (tabs and line breaks allowed, no other control "
                "characters); the campaign sets its own lengths.",
            },
        ),
        Field(max_length=10_000),
    ]


class ContactPreferences(BaseModel):
    """How the supporter wants the organisation to contact them, per channel."""

    model_config = ConfigDict(extra="forbid")

    email: Choice = Choice.NOT_ASKED
    phone: Choice = Choice.NOT_ASKED
    sms: Choice = Choice.NOT_ASKED
    post: Choice = Choice.NOT_ASKED
    wording_version: Annotated[str, single_line("Consent wording version", 64)]


def _strip_url(value: str | None) -> str | None:
    return value.strip() if value else None


class SubmissionV1(BaseModel):
    """A supporter's letter to their MP, as a campaign front end posts it."""

    model_config = ConfigDict(extra="forbid", title="DearMP submission v1")

    schema_version: Literal[1] = SCHEMA_VERSION
    campaign: Annotated[
        str, _check_regex(SLUG_RE, "Campaign must be a slug like 'free-the-prisoners'.")
    ]
    idempotency_key: Annotated[
        str,
        _check_regex(
            IDEMPOTENCY_KEY_RE,
            "idempotency_key must be 8 to 128 letters, digits or . _ : - (a UUID is ideal).",
        ),
    ]
    supporter: Supporter
    letter: Letter
    contact_preferences: ContactPreferences
    source_url: Annotated[
        str | None,
        single_line("Source page URL", 2000, min_len=0, optional=True),
        AfterValidator(_strip_url),
    ] = None
    user_agent: Annotated[str | None, single_line("User agent", 512, min_len=0, optional=True)] = (
        None
    )
    client_ip: Annotated[
        str | None,
        Checked(_check_ip, {"format": "ip-address"}),
        Field(
            description="Only ever stored as a keyed hash; the raw address is dropped on intake."
        ),
    ] = None


def error_message(err: Any, loc: list[str]) -> str:
    """The human message for one pydantic error (``loc`` is its field path)."""
    path = ".".join(loc) or "submission"
    if err["type"] == "value_error":
        return str(err["ctx"]["error"]) if "ctx" in err else str(err["msg"])
    if err["type"] == "missing":
        return f"{path.split('.')[-1].replace('_', ' ').capitalize()} is required."
    if err["type"] == "extra_forbidden":
        return "This field is not part of the submission schema."
    if err["type"] == "enum":
        return "Choose one of: granted, refused, not_asked."
    return str(err["msg"])


def field_errors(exc: ValidationError) -> dict[str, str]:
    """One human message per field, keyed by a dotted path ('supporter.email')."""
    errors: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        errors.setdefault(".".join(loc) or "submission", error_message(err, loc))
    return errors


def parse_submission(payload: Any) -> SubmissionV1 | dict[str, str]:
    """Parse a posted payload, or return the per-field reasons it was refused."""
    if not isinstance(payload, dict):
        return {"submission": "A submission must be a JSON object."}
    version = payload.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        return {"schema_version": f"Unsupported schema version {version!r}; this server speaks 1."}
    try:
        return SubmissionV1.model_validate(payload)
    except ValidationError as exc:
        return field_errors(exc)
