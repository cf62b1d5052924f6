"""A load of bad input never produces a server error: schemathesis against the service's own
OpenAPI description, and hypothesis fuzzing the submission schema and the postcode check."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from schemas.postcode import check_format
from schemas.submission import SubmissionV1, parse_submission
from tests.conftest import make_settings
from tests.factories import submission
from workers.pipeline.actors import setup
from workers.pipeline.app import App, set_app
from workers.pipeline.runtime import prepare
from workers.web.api import create_app


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    base = tmp_path_factory.mktemp("fuzz")
    app = App.from_settings(
        make_settings(
            base,
            database_url=f"sqlite:///{base / 'fuzz.sqlite3'}",
            api_ip_limit=0,
            api_email_limit=0,
        )
    )
    prepare(app)
    set_app(app)
    yield create_app(lambda: app, setup(app.settings))
    set_app(None)
    app.engine.dispose()


@pytest.fixture(scope="module")
def api_schema(api_app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", api_app)


@pytest.mark.thorough
def test_no_input_produces_a_server_error(api_schema: Any) -> None:
    """Every operation in the OpenAPI description, with generated valid and invalid requests.

    (Schemathesis's strategies driven by hypothesis directly: its pytest plugin does not run
    under pytest 9 yet.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 9
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for operation, mode in itertools.product(operations, modes):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: Any) -> None:
            response = case.call()
            # A body too large is refused before it is read (413): a rejection of bad data too,
            # which schemathesis's list of rejections leaves out.
            checks = ALL_CHECKS if response.status_code != 413 else BUT_REJECTION
            case.validate_response(response, checks=checks)

        try:
            no_server_error()
        except Unsatisfiable:
            # Some operations have no invalid form (a path of one free string): nothing to try.
            assert mode == schemathesis.GenerationMode.NEGATIVE


schemathesis.checks.load_all_checks()
ALL_CHECKS = list(schemathesis.checks.CHECKS.get_all())
BUT_REJECTION = [c for c in ALL_CHECKS if c.__name__ != "negative_data_rejection"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(JSON)
@settings(max_examples=300, deadline=None)
def test_any_json_gets_a_submission_or_messages_never_an_exception(value: Any) -> None:
    result = parse_submission(value)
    assert isinstance(result, SubmissionV1) or (
        isinstance(result, dict) and all(isinstance(m, str) and m for m in result.values())
    )


FIELDS = [
    "supporter__name",
    "supporter__email",
    "supporter__postcode",
    "supporter__phone",
    "letter__subject",
    "letter__body",
    "source_url",
    "user_agent",
    "client_ip",
    "idempotency_key",
    "campaign",
]


@given(st.sampled_from(FIELDS), JSON)
@settings(max_examples=400, deadline=None)
def test_any_value_in_any_field_is_refused_with_a_message_or_accepted(
    field: str, value: Any
) -> None:
    result = parse_submission(submission(**{field: value}))
    if isinstance(result, dict):
        assert set(result) and all(isinstance(m, str) and m for m in result.values())


@given(st.text(max_size=40))
@settings(max_examples=500, deadline=None)
def test_no_text_crashes_the_postcode_check_and_no_header_breaks_through(text: str) -> None:
    postcode, problem = check_format(text)
    if problem is None:
        assert "\n" not in postcode and "\r" not in postcode and len(postcode) <= 8
