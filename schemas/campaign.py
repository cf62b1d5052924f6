"""A campaign definition: what an organisation writes to run one (config/campaigns/*.toml)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import time
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    ValidationInfo,
    model_validator,
)

from schemas.submission import CHANNELS, MAX_ANSWER, MAX_PROMPTS, PROMPT_KEY_RE, single_line

# Checks added after campaigns were stored run only on a file being loaded (``campaigns sync``,
# ``init``, ``run``: ``model_validate(data, context=LOADING)``): a definition stored before them
# still reads, so that its letters and retention go on while the operator fixes its file.
LOADING = {"loading": True}


def _loading(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("loading"))


# What a template may make: a letter is a page or two, and a sync must not hang or fill memory.
MAX_REPEAT = 10_000  # characters or items a ``*`` may make
MAX_RANGE = 1_000  # items a ``range`` may make
MAX_LETTER = 100_000  # characters of a sample letter rendered when a campaign is loaded


MAX_WIDTH = 1_000  # a padding or indent, or a width or precision in a % format


class CampaignSandbox(SandboxedEnvironment):
    """Jinja2's sandbox with what makes text bounded: ``*``, ``**``, ``%`` and the ``format``,
    ``center`` and ``indent`` filters; ``range`` short; no ``lipsum``. Growth by other means
    (``replace``, ``join``, nested loops) is not bounded: a campaign file is trusted that far."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(undefined=StrictUndefined, **options)
        self.globals.pop("lipsum", None)
        self.globals["range"] = _short_range
        center, indent, format_ = (self.filters[n] for n in ("center", "indent", "format"))
        self.filters["center"] = lambda value, width=80: center(value, _width(width))
        self.filters["indent"] = lambda s, width=4, *args, **kw: indent(
            s, _width(width), *args, **kw
        )
        self.filters["format"] = lambda value, *args, **kw: format_(_format(value), *args, **kw)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and not (abs(right) <= 64 and abs(left) <= 2**64):
            raise SecurityError("a power over 2**64 to the 64th is refused")
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(times, int):
                    if len(sequence) * times > MAX_REPEAT:
                        raise SecurityError(f"a * making over {MAX_REPEAT:,} is refused")
        if operator == "%" and isinstance(left, str):
            _format(left)
        return super().call_binop(context, operator, left, right)


def _width(width: Any) -> int:
    """A filter's width: a whole number up to :data:`MAX_WIDTH` (a string as indent's width would
    be put in the letter unescaped)."""
    if not isinstance(width, int) or abs(width) > MAX_WIDTH:
        raise SecurityError(f"a width must be a whole number up to {MAX_WIDTH:,}")
    return width


_WIDE = re.compile(r"%[^a-zA-Z%]*?\d{4}")  # a width or precision of four digits or more


def _format(text: Any) -> Any:
    if isinstance(text, str) and _WIDE.search(text):
        raise SecurityError(f"a % format's width or precision over {MAX_WIDTH - 1} is refused")
    return text


def _short_range(*args: int) -> range:
    made = range(*args)
    if len(made) > MAX_RANGE:
        raise SecurityError(f"a range over {MAX_RANGE:,} items is refused")
    return made


# The sandboxed environments campaign templates run in (a name they are not given is an error):
# here, so that a definition is checked when it is loaded (below) with what renders its letters.
TEXT_TEMPLATES = CampaignSandbox(autoescape=False, keep_trailing_newline=True)
HTML_TEMPLATES = CampaignSandbox(autoescape=True)


@lru_cache(maxsize=256)
def campaign_template(source: str, html: bool = False) -> Template:
    """A campaign's template, compiled once per process (never the supporter's text)."""
    return (HTML_TEMPLATES if html else TEXT_TEMPLATES).from_string(source)


# The answers to the campaign's questions (``prompts``) follow the body, a paragraph each.
DEFAULT_LETTER_TEMPLATE = """\
{{ salutation }}

{{ body }}

{% for answer in answers %}{{ answer.text }}

{% endfor %}{{ sign_off }}

{{ supporter.name }}
{% for line in supporter.address_lines %}{{ line }}
{% endfor %}{{ supporter.postcode }}
{{ supporter.email }}
"""


class ConsentQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: Literal["email", "phone", "sms", "post"]
    wording: str = Field(min_length=1)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.wording.encode()).hexdigest()


class ConsentWording(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)
    lawful_basis: str = "consent"
    questions: list[ConsentQuestion]
    mp_notice: str = Field(
        min_length=1, description="What the supporter is told about their details going to the MP."
    )

    def question(self, channel: str) -> ConsentQuestion | None:
        return next((q for q in self.questions if q.channel == channel), None)

    @model_validator(mode="after")
    def _each_channel_once(self, info: ValidationInfo) -> ConsentWording:
        if not _loading(info):
            return self
        channels = [q.channel for q in self.questions]
        twice = sorted({c for c in channels if channels.count(c) > 1})
        if twice:  # the ledger would record one wording and the version check see the other
            raise ValueError(f"questions: channel {', '.join(twice)} is asked more than once")
        return self


class QuietHours(BaseModel):
    """No letters leave between ``start`` and ``end``, UK time (may span midnight)."""

    model_config = ConfigDict(extra="forbid")

    start: time
    end: time

    @model_validator(mode="after")
    def _uk_time(self) -> QuietHours:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("quiet hours are UK time: give them without an offset or Z")
        return self


class RateLimit(BaseModel):
    """At most ``per_mp`` letters from this campaign to one MP in any ``window_seconds``."""

    model_config = ConfigDict(extra="forbid")

    per_mp: int = Field(ge=1)
    window_seconds: float = Field(default=3600, gt=0, le=366 * 86400, allow_inf_nan=False)


def _placeholders(*names: str) -> AfterValidator:
    """A message's check: the ``{name}`` placeholders in it are among ``names`` (another would
    reach the supporter as it is)."""

    def check(text: str) -> str:
        unknown = sorted(set(re.findall(r"\{(\w+)\}", text)) - set(names))
        if unknown:
            known = ", ".join(f"{{{n}}}" for n in names)
            raise ValueError(f"no placeholder {{{unknown[0]}}} here; it may use {known}")
        return text

    return AfterValidator(check)


def _web_address(text: str, info: ValidationInfo) -> str:
    """A page's address: http(s) with a host (a ``javascript:`` one would run where it is shown)."""
    if not _loading(info):
        return text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or not text.isprintable():
        raise ValueError("must be an http:// or https:// address")
    return text


def _origin(text: str, info: ValidationInfo) -> str:
    """A web origin as a browser sends it: scheme, host and port, no path (``null``, which any
    sandboxed page sends, and ``*`` are no page's)."""
    if not _loading(info):
        return text
    parts = urlsplit(text)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or text != f"{parts.scheme}://{parts.netloc}"
    ):
        raise ValueError(f"{text!r} is not an origin: give scheme://host[:port], no path or /")
    return text


WebAddress = Annotated[str, AfterValidator(_web_address)]
Origin = Annotated[str, AfterValidator(_origin)]
SeatMessage = Annotated[str, _placeholders("constituency")]
MemberMessage = Annotated[str, _placeholders("mp", "constituency", "contact")]


class Targets(BaseModel):
    """Which MPs a campaign writes to, and what happens when one cannot simply be emailed.

    Messages may use ``{mp}``, ``{constituency}`` and ``{contact}`` (the MP's official contact
    route), those about a seat without an MP ``{constituency}`` only; nothing else is
    substituted, and another placeholder is refused.
    """

    model_config = ConfigDict(extra="forbid")

    # A vacant seat (by-election pending) or Parliament dissolved: hold the letter until the
    # directory has a member again (for at most hold_days), or reject it at once.
    vacant_seat: Literal["hold", "reject"] = "hold"
    hold_days: int = Field(default=90, ge=1, le=400)
    vacant_message: SeatMessage = (
        "The seat of {constituency} is vacant until a by-election, so there is no MP to write to "
        "yet."
    )
    dissolved_message: SeatMessage = (
        "Parliament has been dissolved for a general election, so there are no MPs until it "
        "meets again."
    )
    # An MP with no email address in the directory: never guess one from a name.
    no_email: Literal["hold", "reject"] = "reject"
    no_email_message: MemberMessage = (
        "Your MP, {mp}, does not publish an email address, so we cannot send your letter by "
        "email. You can write to them at {contact}."
    )
    # Non-geographic postcodes (PO boxes, business mail) do not say where someone lives.
    non_geographic: Literal["accept", "reject"] = "reject"
    # MPs this campaign does not write to (the Speaker, MPs who do not take their seats...).
    excluded_member_ids: list[int] = []
    excluded_parties: list[str] = []
    excluded_message: MemberMessage = "Your MP, {mp}, is not taking part in this campaign."


MAX_RETENTION_DAYS = 3650


class Retention(BaseModel):
    """How long personal details stay after a submission's final state (``dearmp retention run``).

    After these many days the letter body and the postal address are scrubbed; the facts (which MP,
    when, delivered or not) and the consent proof stay.
    """

    model_config = ConfigDict(extra="forbid")

    delivered_days: int = Field(default=28, ge=0)
    failed_days: int = Field(default=90, ge=0, description="Long enough to investigate and resend.")
    rejected_days: int = Field(default=7, ge=0)
    unconfirmed_days: int = Field(default=7, ge=0, description="Never confirmed by the sender.")

    @model_validator(mode="after")
    def _at_most_ten_years(self, info: ValidationInfo) -> Retention:
        """Personal details kept longer serve no letter (and a date that far overflows)."""
        for field in ("delivered_days", "failed_days", "rejected_days", "unconfirmed_days"):
            if _loading(info) and getattr(self, field) > MAX_RETENTION_DAYS:
                raise ValueError(f"{field} must be at most {MAX_RETENTION_DAYS:,} (ten years)")
        return self


class Survey(BaseModel):
    """ "Did your MP reply?": asked ``after_days`` after delivery when no reply was detected, with
    one reminder ``reminder_days`` after that."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    after_days: int = Field(default=14, ge=1, le=365)
    reminder_days: int = Field(default=7, ge=1, le=365)


class Controller(BaseModel):
    """The data controller, as named on consent receipts (defaults: the organisation)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    email: EmailStr | None = None
    address: str = ""
    phone: str = ""
    url: WebAddress | None = None


class SimilarLetters(BaseModel):
    """What to do with a letter near-identical to many others to the same MP (offices filter
    those), once more than ``hold_after`` letters to that MP within ``hold_hours`` are at least
    ``threshold`` alike (estimated Jaccard similarity of their word shingles): ``send`` it as
    every other; ``hold`` it for an operator to release or reject with a reason the supporter is
    told; or put it in the MP's ``digest``, one email a day (from ``digest_hour``, UTC) with the
    common text once and each constituent's own words. Letters are compared with those to the
    same MP within ``window_days``."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["send", "hold", "digest"] = "send"
    digest_hour: int = Field(default=17, ge=0, le=23)
    threshold: float = Field(default=0.9, gt=0, le=1)
    hold_after: int = Field(default=5, ge=0)
    hold_hours: int = Field(default=24, ge=1, le=24 * 30)
    window_days: int = Field(default=30, ge=1, le=365)

    @model_validator(mode="after")
    def _hold_within_window(self) -> SimilarLetters:
        if self.hold_hours > self.window_days * 24:
            raise ValueError("hold_hours must be within window_days")
        return self


class Prompt(BaseModel):
    """A question the supporter may answer in their own words ("Why does this matter to you?").

    The answer is letter text, checked as the body is, and goes into the letter where the
    campaign's templates put ``answers``; an optional question left empty adds nothing."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=PROMPT_KEY_RE.pattern, description="The answer's name when posted.")
    question: str = Field(min_length=1, max_length=200)
    required: bool = False
    min_chars: int = Field(default=1, ge=1, le=MAX_ANSWER)
    max_chars: int = Field(default=1000, ge=1, le=MAX_ANSWER)

    @model_validator(mode="after")
    def _min_within_max(self) -> Prompt:
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must be at most max_chars")
        return self


def _unique_keys(prompts: list[Prompt]) -> list[Prompt]:
    keys = [p.key for p in prompts]
    if len(set(keys)) != len(keys):
        raise ValueError("each prompt needs a key of its own")
    return prompts


# What a campaign's one-line texts are checked with: the supporters' own one-line check (no
# line breaks or other control characters: these go into headers). A subject variant is held
# to a supporter's subject's length.
Title = Annotated[str, single_line("Title", 200)]
Organisation = Annotated[str, single_line("Organisation", 120)]
SubjectVariant = Annotated[str, single_line("Subject variant", 200)]
# The From display name sender_name gives, as rendering stores it (stripped; its column holds 300).
_FROM_NAME = single_line("The From name it gives", 300, min_len=0)

# The sample supporters a definition's templates are rendered for when it is loaded: the fewest
# address lines and answers a submission can have, and the most (with the longest name).
_FEWEST_NAME = "Sam Sample"
_LONGEST_NAME = ("Samantha Sample-Supporter " * 4)[:100]  # a supporter's name: at most 100


def _unescaping(parsed: nodes.Template) -> bool:
    """Whether an HTML template turns autoescape off anywhere (``|safe``, ``{% filter safe %}``,
    ``map('safe')``, a ``map`` of a filter named by a variable, ``{% autoescape %}``): what a
    supporter typed would then reach the MP as HTML."""
    for found in parsed.find_all(nodes.Filter):
        named = found.args[0] if found.name == "map" and found.args else None
        if found.name == "safe" or (
            named is not None and not (isinstance(named, nodes.Const) and named.value != "safe")
        ):
            return True
    return any(True for _ in parsed.find_all(nodes.EvalContextModifier))


def _message(error: Exception) -> str:
    """What a template's error says, on one line."""
    if isinstance(error, TemplateSyntaxError):
        text = f"{error.message} (line {error.lineno})"
    elif isinstance(error, TemplateError):
        text = error.message or type(error).__name__
    else:  # anything else a template can raise when rendered (1/0, a missing loader...)
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())


class CampaignDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    title: Title
    organisation: Organisation
    introduction: str = ""
    mode: Literal["sandbox", "live"] = "sandbox"
    from_email: EmailStr = Field(description="An address on the campaign's own (DMARC) domain.")
    privacy_notice_url: WebAddress
    privacy_notice_version: str = "1"
    subject_variants: list[SubjectVariant] = Field(min_length=1)
    draft_body: str = Field(min_length=1, description="The pre-written letter the supporter edits.")
    editable: list[Literal["subject", "body"]] = ["subject", "body"]
    salutation: str = "Dear {{ mp.name }},"
    sign_off: str = "Yours sincerely,"
    letter_template: str = DEFAULT_LETTER_TEMPLATE
    letter_template_html: str | None = Field(
        default=None, description="An HTML alternative; rendered with autoescape on."
    )
    sender_name: str = Field(
        default="{{ supporter_name }} via {{ organisation }}",
        description="The From display name; the address is always from_email.",
    )
    quiet_hours: QuietHours | None = None
    rate_limit: RateLimit | None = None
    body_min_chars: int = Field(default=20, ge=1, le=10_000)
    body_max_chars: int = Field(default=5000, ge=1, le=10_000)
    consent: ConsentWording
    targets: Targets = Targets()
    # Ask the sender to confirm by email (a signed link, valid 7 days) before the letter goes.
    confirmation: bool = False
    # Web origins whose pages may post to this campaign from the browser (CORS).
    allowed_origins: list[Origin] = []
    retention: Retention = Retention()
    # "direct": Reply-To is the supporter. "relay": Reply-To is the letter's own address on the
    # reply domain; the MP's reply is recorded and forwarded to the supporter.
    replies: Literal["direct", "relay"] = "direct"
    survey: Survey = Survey()
    controller: Controller = Controller()
    similar_letters: SimilarLetters = SimilarLetters()
    # Questions answered in the supporter's own words, placed by the templates' ``answers``.
    prompts: Annotated[
        list[Prompt], Field(max_length=MAX_PROMPTS), AfterValidator(_unique_keys)
    ] = []

    @model_validator(mode="after")
    def _min_within_max(self) -> CampaignDefinition:
        if self.body_min_chars > self.body_max_chars:
            raise ValueError("body_min_chars must be at most body_max_chars")
        return self

    @model_validator(mode="after")
    def _templates_work(self, info: ValidationInfo) -> CampaignDefinition:
        """Every template compiles in the sandbox that renders it and renders, with nothing
        undefined, for the fewest and the most a supporter can send; the From name it gives is
        one line. A template that fails here would fail every letter, at every retry."""
        sources = {
            "salutation": (self.salutation, False),
            "letter_template": (self.letter_template, False),
            "sender_name": (self.sender_name, False),
        }
        if self.letter_template_html is not None:
            sources["letter_template_html"] = (self.letter_template_html, True)
        templates = {}
        for field, (source, html) in sources.items():
            try:
                parsed = (HTML_TEMPLATES if html else TEXT_TEMPLATES).parse(source)
            except TemplateSyntaxError as exc:
                raise ValueError(f"{field}: {_message(exc)}") from None
            # An answer the template leaves out would be accepted and silently never sent.
            # Before find_undeclared_variables, whose optimiser folds `'<'|safe` into a constant.
            if html and _loading(info) and _unescaping(parsed):
                raise ValueError(
                    f"{field}: `safe` and `autoescape` are refused: a supporter's text must "
                    "reach the MP escaped"
                )
            placed = "answers" in meta.find_undeclared_variables(parsed)
            if field.startswith("letter_template") and self.prompts and not placed:
                raise ValueError(f"{field} must place the answers to prompts (use `answers`)")
            templates[field] = (HTML_TEMPLATES if html else TEXT_TEMPLATES).from_string(parsed)
        for fewest in (True, False):
            self._render_sample(templates, fewest, _loading(info))
        return self

    def _render_sample(self, templates: dict[str, Template], fewest: bool, loading: bool) -> None:
        """Render the templates as workers.stages.rendering.compose does, for a sample of the
        same shape: ValueError naming a template that fails."""
        mp = {"name": "Alex Sample", "constituency": "Sampleton and Exampleford"}
        campaign = {"title": self.title, "organisation": self.organisation}
        asked = [p for p in self.prompts if p.required or not fewest]
        answers = [{"key": p.key, "question": p.question, "text": "My own words."} for p in asked]
        address_lines = ["1 Sample Street"] if fewest else [f"Line {n}" for n in range(1, 6)]
        name = _FEWEST_NAME if fewest else _LONGEST_NAME
        supporter = {
            "name": name,
            "address_lines": address_lines,
            "postcode": "SW1A 1AA",
            "email": "sam.sample@example.org",
        }

        def render(field: str, **context: Any) -> str:
            try:
                return templates[field].render(context)
            except Exception as exc:  # whatever it raises, it would raise for every letter
                raise ValueError(f"{field}: {_message(exc)}") from None

        context: dict[str, Any] = {"mp": mp, "campaign": campaign}
        letter = {
            **context,
            "salutation": render("salutation", **context),
            "body": self.draft_body.strip(),
            "sign_off": self.sign_off,
            "answers": answers,
            "supporter": supporter,
        }
        for field in ("letter_template", "letter_template_html"):
            if field in templates and len(render(field, **letter)) > MAX_LETTER and loading:
                raise ValueError(f"{field}: it makes a letter of over {MAX_LETTER:,} characters")
        from_name = render("sender_name", supporter_name=name, organisation=self.organisation)
        try:
            _FROM_NAME.check(from_name.strip())
        except ValueError as exc:
            raise ValueError(f"sender_name: {exc}") from None

    def answered(self, answers: Mapping[str, Any]) -> list[tuple[Prompt, str]]:
        """The questions a supporter answered, in the campaign's order, with their answers."""
        found = [(p, answers.get(p.key)) for p in self.prompts]
        return [(p, text.strip()) for p, text in found if isinstance(text, str) and text.strip()]

    def check_channels(self) -> None:
        missing = [c for c in CHANNELS if self.consent.question(c) is None]
        if missing:
            raise ValueError(f"campaign {self.slug}: no consent wording for {', '.join(missing)}")
