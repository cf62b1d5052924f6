"""Payload factories: a valid submission, changed only where a test says."""

from __future__ import annotations

import copy
import uuid
from typing import Any

WORDING = "2024-03-contact-v2"

VALID: dict[str, Any] = {
    "schema_version": 1,
    "campaign": "political-prisoners",
    "idempotency_key": "will-be-replaced",
    "supporter": {
        "name": "Amira Haddad",
        "email": "amira.haddad@example.com",
        "postcode": "DM1 1AA",
        "address_lines": ["12 Mill Lane", "Millbrook"],
        "phone": "+44 20 7946 0000",
    },
    "letter": {
        "subject": "Please act for Palestinian political prisoners",
        "body": "As your constituent I ask you to stand with Palestinian political prisoners.",
    },
    "contact_preferences": {
        "email": "granted",
        "phone": "refused",
        "sms": "not_asked",
        "post": "granted",
        "wording_version": WORDING,
    },
    "source_url": "https://campaign.example.org/political-prisoners",
    "user_agent": "Mozilla/5.0 (test)",
    "client_ip": "203.0.113.7",
}


def submission(**changes: Any) -> dict[str, Any]:
    """A valid payload with a fresh idempotency key; ``supporter__email=...`` sets nested fields."""
    payload = copy.deepcopy(VALID)
    payload["idempotency_key"] = str(uuid.uuid4())
    for key, value in changes.items():
        target = payload
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return payload


DELETE = object()
