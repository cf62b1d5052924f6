"""docs/campaigns.md is the reference for campaign files: every field of CampaignDefinition and of
the tables in it has a row in its table's section, and the complete example is a valid campaign
that sets every field."""

from __future__ import annotations

import re
import tomllib
import typing
from typing import Any

from pydantic import BaseModel

from schemas.campaign import CampaignDefinition
from tests.services import REPO

DOC = REPO / "docs" / "campaigns.md"


def nested_models(model: type[BaseModel], path: str = "") -> dict[str, type[BaseModel]]:
    """Each model a campaign file holds, by its TOML table: "" for the top level, "consent",
    "consent.questions" (an array of tables)..."""
    found = {path: model}
    for name, field in model.model_fields.items():
        for inner in _models_in(field.annotation):
            found.update(nested_models(inner, f"{path}.{name}" if path else name))
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def sections() -> dict[str, str]:
    """The doc's "## " sections by heading."""
    parts = re.split(r"^## (.+)$", DOC.read_text(), flags=re.M)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def section_for(table: str) -> str:
    if not table:
        return sections()["Top-level fields"]
    arrays = {"consent.questions", "prompts"}  # lists of tables: [[...]]
    heading = f"`[[{table}]]`" if table in arrays else f"`[{table}]`"
    assert heading in sections(), f"docs/campaigns.md has no section {heading}"
    return sections()[heading]


def test_the_reference_has_a_row_for_every_field_of_every_table() -> None:
    models = nested_models(CampaignDefinition)
    assert {"", "consent", "consent.questions", "targets", "retention", "survey"} <= set(models)
    missing = []
    for table, model in models.items():
        rows = set(re.findall(r"^\| `(\w+)` \|", section_for(table), flags=re.M))
        missing += [
            f"{table or '(top level)'}: {name}" for name in model.model_fields.keys() - rows
        ]
        extra = rows - model.model_fields.keys()
        assert not extra, f"{table}: the reference names fields the model does not have: {extra}"
    assert not missing, f"fields missing from docs/campaigns.md: {missing}"


def test_the_reference_says_which_fields_are_required() -> None:
    for table, model in nested_models(CampaignDefinition).items():
        text = section_for(table)
        for name, field in model.model_fields.items():
            row = re.search(rf"^\| `{name}` \|([^\n]*)$", text, flags=re.M)
            assert row is not None
            cells = [cell.strip() for cell in row[1].split("|")]
            assert (cells[1] == "required") == field.is_required(), (table, name, cells[1])


def test_the_complete_example_is_a_valid_campaign_setting_every_field() -> None:
    example = re.search(r"## A complete example\n.*?```toml\n(.*?)```", DOC.read_text(), re.S)
    assert example is not None
    definition = CampaignDefinition.model_validate(tomllib.loads(example[1]))
    definition.check_channels()

    def unset(model: BaseModel, path: str) -> list[str]:
        missing = [
            f"{path}{n}" for n in type(model).model_fields if n not in model.model_fields_set
        ]
        for name in model.model_fields_set:
            value = getattr(model, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, BaseModel):
                    missing += unset(item, f"{path}{name}.")
        return missing

    assert unset(definition, "") == []
