"""The webhooks DearMP sends to a CRM: a body per event (Standard Webhooks: ``type``,
``timestamp``, ``data``), exported as ``schemas/json/webhook.<event>.v1.schema.json``.

``data.supporter`` (personal data) is there only when the endpoint may receive it and the
supporter agreed to be contacted by the organisation; ``supporter.erased`` never has it.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, create_model

Choice = Literal["granted", "refused", "not_asked"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preferences(Strict):
    email: Choice
    phone: Choice
    sms: Choice
    post: Choice


class Supporter(Strict):
    """Personal data: sent only with the endpoint's permission and the supporter's consent."""

    name: str
    email: str
    postcode: str
    address_lines: list[str]
    contact_preferences: Preferences


class Mp(Strict):
    member_id: int | None
    name: str


class Submission(Strict):
    """What every event about a submission says: ids, campaign, state and public facts."""

    submission_id: str
    campaign: str
    state: str
    constituency: str | None = None
    constituency_code: str | None = None
    mp: Mp | None = None
    supporter: Supporter | None = None


class Rejected(Submission):
    reasons: list[str]  # the fields refused (the supporter's own words are never sent)
    code: str | None = None


class Reply(Submission):
    inbound_id: str
    kind: str  # "reply" or "acknowledgement"


class Answered(Submission):
    answer: str


class Consented(Submission):
    wording_version: str | None = None


class Erased(Strict):
    submission_id: str
    campaign: str
    erased_at: datetime | None


DATA: dict[str, type[BaseModel]] = {
    "submission.accepted": Submission,
    "submission.rejected": Rejected,
    "letter.delivered": Submission,
    "letter.bounced": Submission,
    "reply.received": Reply,
    "survey.answered": Answered,
    "consent.recorded": Consented,
    "supporter.erased": Erased,
}


@cache
def envelope(event: str) -> type[BaseModel]:
    """The body of ``event``'s webhook."""
    return create_model(
        f"Webhook{''.join(p.title() for p in event.split('.'))}",
        __config__=ConfigDict(extra="forbid"),
        type=(Literal[event], ...),  # type: ignore[arg-type]
        timestamp=(datetime, ...),
        data=(DATA[event], ...),
    )


def json_schemas() -> dict[str, str]:
    """Each event's JSON Schema, as file name → text."""
    out = {}
    for event in DATA:
        name = f"webhook.{event}.v1.schema.json"
        schema = envelope(event).model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://dearmp.example/schemas/{name}"
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export(directory: Path) -> None:
    for name, text in json_schemas().items():
        (directory / name).write_text(text)
