"""Versioned wire schemas: what front ends post and what actors pass to each other."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.messages import StageMessage, StageMessageV2
from schemas.submission import SubmissionV1

JSON_SCHEMA_DIR = Path(__file__).resolve().parent / "json"
EXPORTED: dict[str, type[BaseModel]] = {
    "submission.v1.schema.json": SubmissionV1,
    "stage-message.v1.schema.json": StageMessage,
    "stage-message.v2.schema.json": StageMessageV2,
}


def json_schemas() -> dict[str, str]:
    """The JSON Schema documents front ends validate against, as file name → text."""
    out = {}
    for name, model in EXPORTED.items():
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://dearmp.example/schemas/{name}"
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export_json_schemas(directory: Path = JSON_SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
