"""Logs: structlog JSON with ids bound, and personal data masked even if a caller slips."""

from __future__ import annotations

import io
import json

import structlog

from workers.logging import configure_logging


def test_events_are_json_with_bound_context_and_masked_personal_data() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    structlog.contextvars.bind_contextvars(submission_id="abc")
    try:
        structlog.get_logger("t").info("oops", detail="from jo.bloggs@example.com at SW1A 1AA")
    finally:
        structlog.contextvars.clear_contextvars()
    event = json.loads(out.getvalue().splitlines()[-1])
    assert event["event"] == "oops" and event["submission_id"] == "abc"
    assert event["detail"] == "from [email] at [postcode]"
