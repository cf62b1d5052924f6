"""What a campaign front end posts: the versioned submission schema.

Every field check raises a message a supporter can read next to the field. Single-line fields
refuse control characters (CR/LF would allow header injection); the letter body allows only
newlines and tabs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
)
from pydantic_core import core_schema

from schemas.postcode import MESSAGES, PostcodeProblem, check_format, normalise_postcode

__all__ = [
    "Postcode",
    "SubmissionV1",
    "error_message",
    "normalise_postcode",
    "parse_submission",
    "single_line",
]

SCHEMA_VERSION: Literal[1] = 1

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
# The published patterns are the rules themselves: what matches is accepted, what does not is
# refused with a message (email addresses also pass email-validator, which refuses the few
# special-use domains such as .test; an internationalised domain is accepted beside the pattern,
# which spells the ASCII form). Spaces only where a space may be; no \s, which JSON Schema's
# engines and Python read differently.
PHONE_RE = re.compile(r"^ *(?:\+?[ ()-]*(?:[0-9][ ()-]*){10,15})? *$")
MAX_PHONE = 40
_ATEXT = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# No "=?" anywhere: a mail reader may decode it as an encoded word, showing another address.
EMAIL_RE = re.compile(rf"^(?!.*=\?) *{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}\.)+[A-Za-z]{{2,63}} *$")
# An internationalised domain as IDNA spells it, its top-level label too (xn--p1ai is .рф):
# what is stored for one, and checked again by the pipeline.
_IDNA_TLD = "(?:[A-Za-z]{2,63}|[Xx][Nn]--[A-Za-z0-9-]{1,59})"
IDNA_EMAIL_RE = re.compile(rf"^(?!.*=\?){_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}\.)+{_IDNA_TLD}$")
MAX_EMAIL = 254
# A UK postcode in any case, with whitespace of any kind anywhere (a tab, a no-break space from
# a copied address): BS 7666's shape (see schemas.postcode). Whitespace is what str.isspace()
# says it is, less the C0 information separators, spelled out for JSON Schema's engines.
_WS = "[\\x09-\\x0d\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]*"
_AREA = f"[A-PR-UWYZa-pr-uwyz]{_WS}(?:[A-HK-Ya-hk-y]{_WS})?"
_DISTRICT = f"[0-9]{_WS}(?:[0-9A-HJKMNPR-Ya-hjkmnpr-y]{_WS})?"
_UNIT = "[ABD-HJLNP-UW-Zabd-hjlnp-uw-z]"
POSTCODE_SHAPE = re.compile(rf"^{_WS}{_AREA}{_DISTRICT}[0-9]{_WS}{_UNIT}{_WS}{_UNIT}{_WS}$")
# IPv4 and IPv6 addresses as RFC 3986 spells them.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = "[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H}:{_H}|{_V4})"
_V6 = "|".join(
    [
        rf"(?:{_H}:){{6}}{_LS32}",
        rf"::(?:{_H}:){{5}}{_LS32}",
        rf"(?:{_H})?::(?:{_H}:){{4}}{_LS32}",
        rf"(?:(?:{_H}:){{0,1}}{_H})?::(?:{_H}:){{3}}{_LS32}",
        rf"(?:(?:{_H}:){{0,2}}{_H})?::(?:{_H}:){{2}}{_LS32}",
        rf"(?:(?:{_H}:){{0,3}}{_H})?::{_H}:{_LS32}",
        rf"(?:(?:{_H}:){{0,4}}{_H})?::{_LS32}",
        rf"(?:(?:{_H}:){{0,5}}{_H})?::{_H}",
        rf"(?:(?:{_H}:){{0,6}}{_H})?::",
    ]
)
IP_RE = re.compile(rf"^(?:{_V4}|{_V6})$")


class Choice(StrEnum):
    GRANTED = "granted"
    REFUSED = "refused"
    NOT_ASKED = "not_asked"


CHANNELS = ("email", "phone", "sms", "post")


# What is not writable text, as one character class that Python's re and JSON Schema (ECMA
# regular expressions with the u flag) read alike: C0 and C1 controls, the line and paragraph
# separators, the bidi embeddings, overrides and isolates (they can make a letter read
# differently from what is stored), the interlinear annotation marks and the BMP noncharacters.
# Other format characters are real text: ZWNJ and ZWJ in Persian names and emoji sequences, a
# soft hyphen in an address. (Lone surrogates, which are not Unicode scalar values, are refused
# by check_text: a pattern cannot name them in every engine.)
NOT_TEXT = (
    "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069"
    "\\ufff9-\\ufffb\\ufdd0-\\ufdef\\ufffe\\uffff"
)
# A letter's body may also hold tabs and line breaks.
NOT_LETTER_TEXT = NOT_TEXT.replace("\\x00-\\x1f", "\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f")
_NOT_TEXT_RE = re.compile(f"[{NOT_TEXT}]")
_NOT_LETTER_TEXT_RE = re.compile(f"[{NOT_LETTER_TEXT}]")
# The spaces that text may hold and that are removed around it: every character str.strip()
# removes that the classes above leave (spelled out: JSON Schema's engines, Python's re and
# schemathesis each read \s differently).
SPACES = "\\x20\\xa0\\u1680\\u2000-\\u200a\\u202f\\u205f\\u3000"
# Characters that show nothing (zero-width spaces, joiners and marks, fillers, the braille
# blank, a byte order mark): allowed in text, but text of nothing else is empty.
INVISIBLE = (
    "\\xad\\u034f\\u115f\\u1160\\u180e\\u200b-\\u200f\\u2060-\\u2064\\u2800\\u3164\\ufeff\\uffa0"
)
_SHOWS_RE = re.compile(f"[^{SPACES}{INVISIBLE}\\t\\n\\r]")


def _text_pattern(excluded: str, required: bool, also_blank: str = "") -> str:
    """The JSON Schema pattern for text without ``excluded`` and, when ``required``, with a
    character that shows (not a space, :data:`INVISIBLE` or ``also_blank``)."""
    if not required:
        return f"^[^{excluded}]*$"
    return f"^[^{excluded}]*[^{SPACES}{INVISIBLE}{also_blank}{excluded}][^{excluded}]*$"


def _not_scalar(text: str) -> bool:
    """True if ``text`` holds a lone surrogate: not a Unicode scalar value, so not encodable."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_control(text: str, letter: bool = False) -> bool:
    """True if ``text`` holds anything that is not writable text (:data:`NOT_TEXT`; in a
    letter's body, tabs and line breaks are text)."""
    return (_NOT_LETTER_TEXT_RE if letter else _NOT_TEXT_RE).search(text) is not None


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
    "characters; the spaces around it are removed."
)


def single_line(label: str, max_len: int, min_len: int = 1, optional: bool = False) -> Any:
    """One line of text, checked as it arrives (what the published pattern says), kept without
    the spaces around it."""

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{label} must be text.")
        check_text(label, value)
        if _has_control(value):
            raise ValueError(f"{label} must be on one line, without control characters.")
        if len(value) > max_len:
            raise ValueError(f"{label} must be at most {max_len} characters.")
        text: str = value.strip()
        if len(text) < min_len or (min_len and not _SHOWS_RE.search(text)):
            raise ValueError(f"Please enter your {label.lower()}.")
        return text

    schema = {
        "format": "single-line-text",
        "maxLength": max_len,
        "pattern": _text_pattern(NOT_TEXT, required=min_len > 0),
        "description": SINGLE_LINE,
    }
    return Checked(check, schema)


def _check_postcode(value: Any) -> str:
    """A postcode of the right shape (:data:`POSTCODE_SHAPE`), normalised. Whether it has an MP
    (a Crown dependency, a BFPO or PO box address, one the directory does not know) is for
    resolution to say, with its reason; the preview says so before the letter is written."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Please enter your postcode.")
    check_text("Postcode", value)
    if POSTCODE_SHAPE.fullmatch(value):
        return normalise_postcode(value)
    if _has_control(value):
        raise ValueError("Postcode must be on one line, without control characters.")
    _, problem = check_format(value)
    raise ValueError(problem.message if problem else MESSAGES[PostcodeProblem.NOT_A_POSTCODE])


def check_email(value: Any) -> str:
    """An address as it goes on the wire (see :func:`_ascii_email`), or ValueError saying why not:
    a supporter's, and an MP's from a directory."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("Please enter your email address.")
    check_text("Email address", value)
    if _has_control(value):
        raise ValueError("Email address must be on one line, without control characters.")
    if len(value) > MAX_EMAIL:
        raise ValueError(f"An email address has at most {MAX_EMAIL} characters.")
    return _ascii_email(value.strip(" "))


def _ascii_email(value: str) -> str:
    """The address as it goes on the wire: an internationalised domain as IDNA (punycode).

    A non-ASCII local part (``zoë@example.org``) is refused: it needs SMTPUTF8 from every server
    between us and the MP's office and back to the supporter (their ``Reply-To``), which a
    campaign cannot know; refusing it at the door is an answer the supporter can act on."""
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
    # The pipeline checks the stored form with this same function, so the rule holds for it as
    # for what was posted: the published pattern for an ASCII domain; for an internationalised
    # one (in Unicode or already as IDNA), IDNA's own check and the IDNA form's shape.
    if checked.domain != checked.ascii_domain:
        forms, pattern = [address], IDNA_EMAIL_RE
    else:
        forms, pattern = [value, address] if value.isascii() else [address], EMAIL_RE
    if any(not pattern.fullmatch(form) or len(form) > MAX_EMAIL for form in forms):
        raise ValueError("This is not a valid email address: it should look like name@example.org.")
    return address


def _check_phone(value: Any) -> str | None:
    # The length first, as the published maxLength says: 41 spaces are too long, not "none".
    if isinstance(value, str) and len(value) > MAX_PHONE:
        raise ValueError(f"A phone number has at most {MAX_PHONE} characters.")
    if value is None or (isinstance(value, str) and not value.strip(" ")):
        return None
    if not isinstance(value, str) or not re.fullmatch(r" *\+?[0-9 ()-]* *", value):
        raise ValueError("This is not a phone number. Use digits, spaces and an optional +.")
    if not PHONE_RE.fullmatch(value):
        raise ValueError("A phone number has between 10 and 15 digits.")
    return value.strip(" ")


def letter_text(label: str, max_len: int, empty: str | None) -> Callable[[Any], str]:
    """The check for text that goes into a letter (its body, an answer to a campaign's
    question): lines of text, tabs allowed, line breaks as ``\\n``, without the spaces around
    it. ``empty``: the message for text with nothing in it, or None where empty text is taken."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or (empty is not None and not _SHOWS_RE.search(value)):
            raise ValueError(empty or f"{label} must be text.")
        check_text(label, value)
        if _has_control(value, letter=True):
            raise ValueError(f"{label} contains control characters that cannot be sent.")
        if len(value) > max_len:
            raise ValueError(f"{label} is too long: the limit is {max_len} characters.")
        return value.replace("\r\n", "\n").replace("\r", "\n").strip()

    return check


MAX_BODY = 10_000
_check_body = letter_text(
    "Your letter", MAX_BODY, "Your letter is empty. Please write something to your MP."
)
# A campaign asks at most MAX_PROMPTS questions; its answers are letter text, each at most
# MAX_ANSWER characters (a campaign sets its own lengths, within these).
MAX_PROMPTS = 5
MAX_ANSWER = 2_000
PROMPT_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def _check_ip(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not IP_RE.fullmatch(value):
        raise ValueError("client_ip is not an IPv4 or IPv6 address.")
    return str(ipaddress.ip_address(value))


def _check_regex(pattern: re.Pattern[str], message: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):  # ("$" takes a "\n")
            raise ValueError(message)
        return value

    return Checked(check, {"pattern": pattern.pattern})


Postcode = Annotated[
    str,
    Checked(
        _check_postcode,
        {
            "format": "uk-postcode",
            "pattern": POSTCODE_SHAPE.pattern,
            "description": "A UK postcode, in any case, whitespace anywhere. Whether it has an MP "
            "is for the pipeline to say (POST /v1/campaigns/{slug}/preview says it at once).",
        },
    ),
    Field(examples=["SW1A 1AA"]),
]
Email = Annotated[
    str,
    Checked(
        check_email,
        {
            "maxLength": MAX_EMAIL,
            "pattern": EMAIL_RE.pattern,
            "description": "An email address with an ASCII local part. The pattern spells an "
            "ASCII domain; an internationalised one, in Unicode or as IDNA (.рф or "
            ".xn--p1ai), is accepted too and stored as IDNA. "
            "Special-use domains (.test, .local, .invalid...) are refused.",
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
            {
                "pattern": PHONE_RE.pattern,
                "maxLength": MAX_PHONE,
                "description": "10 to 15 digits, with spaces, ( ) and - between them and an "
                "optional + first; empty for none.",
            },
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
                "characters). Each campaign sets its own lengths (GET /v1/campaigns/{slug}).",
                "maxLength": MAX_BODY,
                "pattern": _text_pattern(NOT_LETTER_TEXT, required=True, also_blank="\\t\\n\\r"),
            },
        ),
    ]
    answers: Annotated[
        dict[AnswerKey, Answer],
        BeforeValidator(_check_answer_keys),
        Field(
            max_length=MAX_PROMPTS,
            json_schema_extra={"additionalProperties": False},
            description="The supporter's answers to the campaign's questions (its `prompts`), "
            "by question key; merged into the letter where the campaign's template places them.",
        ),
    ] = {}


AnswerKey = Annotated[str, Field(pattern=PROMPT_KEY_RE.pattern)]


def _check_answer_keys(value: Any) -> Any:
    """Refuse a key that cannot be a question's at the answers' own path (a key's error would
    otherwise be filed under the key, which is not a field the page has)."""
    if isinstance(value, dict) and any(
        not isinstance(key, str) or not PROMPT_KEY_RE.fullmatch(key) for key in value
    ):
        raise ValueError("This is not one of the campaign's questions. Please reload the page.")
    return value


Answer = Annotated[
    str,
    Checked(
        letter_text("Your answer", MAX_ANSWER, empty=None),
        {
            "format": "letter-text",
            "description": "Letter text, as the body. Empty for a question left unanswered. "
            "Each campaign sets its own questions and lengths (GET /v1/campaigns/{slug}).",
            "maxLength": MAX_ANSWER,
            "pattern": _text_pattern(NOT_LETTER_TEXT, required=False),
        },
    ),
]


class ContactPreferences(BaseModel):
    """How the supporter wants the organisation to contact them, per channel."""

    model_config = ConfigDict(extra="forbid")

    email: Choice = Choice.NOT_ASKED
    phone: Choice = Choice.NOT_ASKED
    sms: Choice = Choice.NOT_ASKED
    post: Choice = Choice.NOT_ASKED
    wording_version: Annotated[str, single_line("Consent wording version", 64)]


def _check_version(value: Any) -> Any:
    """The integer 1, strictly: not ``true`` or ``1.0``, which a lax ``Literal[1]`` takes."""
    if type(value) is not int:
        raise ValueError("schema_version must be the integer 1.")
    return value


def _strip_url(value: str | None) -> str | None:
    return value.strip() if value else None


class SubmissionV1(BaseModel):
    """A supporter's letter to their MP, as a campaign front end posts it."""

    model_config = ConfigDict(extra="forbid", title="DearMP submission v1")

    schema_version: Annotated[Literal[1], BeforeValidator(_check_version)] = SCHEMA_VERSION
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
        Checked(_check_ip, {"pattern": f"^(?:|{IP_RE.pattern[1:-1]})$"}),
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
    if type(version) is not int or version != SCHEMA_VERSION:  # not True, not 1.0
        return {"schema_version": f"Unsupported schema version {version!r}; this server speaks 1."}
    try:
        return SubmissionV1.model_validate(payload)
    except ValidationError as exc:
        return field_errors(exc)


def stored_email(payload: Any) -> str | None:
    """The supporter's email in a stored submission payload; None once erased (or malformed)."""
    supporter = payload.get("supporter") if isinstance(payload, dict) else None
    value = supporter.get("email") if isinstance(supporter, dict) else None
    return value if isinstance(value, str) and value else None
