"""The intake's edges, through the real API and the real workers (in process, on StubBroker):
what the API accepts the pipeline accepts; text that is not text is refused at the door; consent
evidence that cannot be forged; limits that hold; a honeypot a robot cannot tell; Redis away."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.conftest import ApiClient, drain
from tests.factories import DELETE, submission
from tests.test_api import SLUG, count, posted
from tests.test_stages import get
from workers.database.models import State
from workers.letters.rate_limits import RedisLimiter
from workers.pipeline.app import App
from workers.privacy.hashing import ip_hash
from workers.web.api import create_app

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "json" / "submission.v1.schema.json"


@pytest.fixture
def client(app: App, stub_broker: Any) -> Iterator[TestClient]:
    peer = ("203.0.113.9", 50_000)
    app.settings.api_ip_limit = app.settings.api_email_limit = 0
    with ApiClient(create_app(lambda: app, stub_broker), client=peer) as test_client:
        yield test_client


def optional_fields() -> list[str]:
    """Every optional property of the published schema, as ``a__b`` paths."""
    schema = json.loads(SCHEMA.read_text())
    paths = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        required = set(node.get("required", []))
        for name, prop in node.get("properties", {}).items():
            if "$ref" in prop:
                walk(schema["$defs"][prop["$ref"].rsplit("/", 1)[1]], f"{prefix}{name}__")
            elif name not in required and name != "schema_version":
                paths.append(f"{prefix}{name}")

    walk(schema, "")
    return paths


OPTIONAL = optional_fields()


def test_the_schema_has_the_optional_fields_this_test_varies() -> None:
    assert {"source_url", "user_agent", "client_ip", "supporter__phone", "letter__subject"} <= set(
        OPTIONAL
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    choices=st.fixed_dictionaries(
        {f: st.sampled_from(["present", "absent", "null"]) for f in OPTIONAL}
    )
)
def test_what_the_api_accepts_the_pipeline_accepts(
    app: App,
    client: TestClient,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    choices: dict[str, str],
) -> None:
    """Every optional field of the published schema present, absent or null: a 202 is never
    refused later for its shape (it ends delivered)."""
    changes: dict[str, Any] = {}
    for field, choice in choices.items():
        if choice == "absent":
            changes[field] = DELETE
        elif choice == "null":
            changes[field] = None
    payload = submission(**changes)
    reply = client.post("/v1/submissions", json=payload, headers={"User-Agent": ""})
    if reply.status_code != 202:
        # A null subject or phone is not part of the schema's choices for them.
        assert reply.status_code == 422, reply.text
        schema = json.loads(SCHEMA.read_text())
        refused = set(reply.json()["errors"])
        for path in refused:
            *parents, leaf = path.split(".")
            node = schema
            for parent in parents:
                node = schema["$defs"][node["properties"][parent]["$ref"].rsplit("/", 1)[1]]
            allowed = node["properties"][leaf]
            types = {a.get("type") for a in allowed.get("anyOf", [allowed])}
            assert "null" not in types, (path, reply.text)
        return
    drain(stub_broker, stub_worker)
    sub = get(app, reply.json()["id"])
    assert sub.state == State.DELIVERED, (sub.state, sub.rejection)


def test_a_missing_user_agent_and_source_url_are_not_refused_later(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    payload = submission(source_url=DELETE, user_agent=DELETE, client_ip=DELETE)
    reply = client.post("/v1/submissions", json=payload, headers={"User-Agent": ""})
    explicit = client.post("/v1/submissions", json=submission(source_url=None, user_agent=None))
    long_agent = client.post(
        "/v1/submissions", json=posted(), headers={"User-Agent": "Mozilla/5.0 " + "x" * 900}
    )
    assert {reply.status_code, explicit.status_code, long_agent.status_code} == {202}
    drain(stub_broker, stub_worker)
    for answer in (reply, explicit, long_agent):
        assert get(app, answer.json()["id"]).state == State.DELIVERED


@pytest.mark.parametrize("field", ["name", "address", "subject", "body", "email", "postcode"])
def test_a_lone_surrogate_is_refused_at_the_door_with_a_field_message(
    app: App, client: TestClient, field: str
) -> None:
    path, changes = {
        "name": ("supporter.name", {"supporter__name": "A\ud800"}),
        "address": ("supporter.address_lines.0", {"supporter__address_lines": ["1 Mill\udfff"]}),
        "subject": ("letter.subject", {"letter__subject": "Hello \ud83d"}),
        "body": ("letter.body", {"letter__body": "Dear MP \udc00 please act now on this."}),
        "email": ("supporter.email", {"supporter__email": "a\ud800@example.com"}),
        "postcode": ("supporter.postcode", {"supporter__postcode": "DM1 \ud8001AA"}),
    }[field]
    body = json.dumps(posted(**changes))  # JSON's \ud800 escape: the way a surrogate arrives
    reply = client.post(
        "/v1/submissions", content=body, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 422
    message = reply.json()["errors"][path]
    assert "not valid text" in message or "not a valid" in message or "postcode" in message
    assert count(app) == 0
    preview = client.post(
        f"/v1/campaigns/{SLUG}/preview",
        content=json.dumps({"name": "A\ud800", "postcode": "DM1 1AA"}),
        headers={"Content-Type": "application/json"},
    )
    assert preview.status_code == 422 and "not valid text" in preview.json()["errors"]["name"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("supporter__name", "مهدی\u200cزاده"),  # noqa: RUF001 - ZWNJ in a Persian name
        ("supporter__name", "Ada 👩\u200d👩\u200d👧"),  # an emoji ZWJ sequence
        ("supporter__address_lines", ["12 Kirch\u00adstraße"]),  # a soft hyphen
    ],
)
def test_real_text_with_joiners_and_soft_hyphens_is_accepted_and_delivered(
    app: App,
    client: TestClient,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    field: str,
    value: Any,
) -> None:
    reply = client.post("/v1/submissions", json=posted(**{field: value}))
    assert reply.status_code == 202, reply.text
    drain(stub_broker, stub_worker)
    assert get(app, reply.json()["id"]).state == State.DELIVERED


@pytest.mark.parametrize(
    "value",
    ["Ada\u202eevil", "Ada\u2066x\u2069", "Ada\u2028Lovelace", "Ada\x85Lovelace", "Ada\ufffe"],
)
def test_bidi_overrides_and_line_breaks_stay_refused(client: TestClient, value: str) -> None:
    reply = client.post("/v1/submissions", json=posted(supporter__name=value))
    assert reply.status_code == 422
    assert "one line" in reply.json()["errors"]["supporter.name"]


def test_consent_evidence_comes_from_the_request_unless_a_key_vouches_for_it(
    app: App, client: TestClient
) -> None:
    forged = submission(client_ip="198.51.100.66", user_agent="Forged/1.0")
    reply = client.post("/v1/submissions", json=forged, headers={"User-Agent": "Real/2.0"})
    assert reply.status_code == 202
    stored = get(app, reply.json()["id"])
    assert stored.payload is not None and stored.payload["user_agent"] == "Real/2.0"
    assert stored.client_ip_hash == ip_hash(app.secret, "203.0.113.9")  # the peer, not the body

    app.settings.api_keys = SecretStr("k-one, k-two")
    server = submission(client_ip="198.51.100.66", user_agent="Supporter/3.0")
    vouched = client.post("/v1/submissions", json=server, headers={"X-DearMP-Key": "k-two"})
    assert vouched.status_code == 202
    stored = get(app, vouched.json()["id"])
    assert stored.payload is not None and stored.payload["user_agent"] == "Supporter/3.0"
    assert stored.client_ip_hash == ip_hash(app.secret, "198.51.100.66")
    wrong = client.post("/v1/submissions", json=posted(), headers={"X-DearMP-Key": "nope"})
    assert wrong.status_code == 401 and "X-DearMP-Key" in wrong.json()["errors"]


def test_rate_limits_key_ipv6_by_network_and_email_by_mailbox(app: App, stub_broker: Any) -> None:
    app.settings.api_ip_limit, app.settings.api_email_limit = 2, 100
    api = create_app(lambda: app, stub_broker)
    answers = []
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::ffff", "2001:db8:1:2:abcd::9"):
        with ApiClient(api, client=(host, 5000)) as one_host:
            reply = one_host.post(
                "/v1/submissions", json=posted(supporter__email=f"s{len(answers)}@example.com")
            )
            answers.append(reply.status_code)
    assert answers == [202, 202, 429]  # one /64, one limit
    with ApiClient(api, client=("2001:db8:1:3::1", 5000)) as other_network:
        assert other_network.post("/v1/submissions", json=posted()).status_code == 202

    app.settings.api_ip_limit, app.settings.api_email_limit = 0, 2
    with ApiClient(api, client=("203.0.113.50", 5000)) as one:
        codes = [
            one.post("/v1/submissions", json=posted(supporter__email=email)).status_code
            for email in (
                "Jo.Bloggs+a@gmail.com",
                "jobloggs+b@googlemail.com",
                "j.o.bloggs@gmail.com",
            )
        ]
    assert codes == [202, 202, 429]


def test_the_honeypots_answer_is_a_real_answer_and_whitespace_is_not_a_robot(
    app: App, client: TestClient
) -> None:
    real = client.post("/v1/submissions", json=posted())
    trapped = client.post("/v1/submissions", json={**posted(), "website": "http://spam.example"})
    assert trapped.status_code == real.status_code == 202
    assert set(trapped.json()) == set(real.json())
    assert sorted(trapped.headers) == sorted(real.headers)
    assert trapped.headers["location"] == trapped.json()["status_url"]
    status = client.get(trapped.json()["status_url"])
    assert status.status_code == 200
    assert set(status.json()) == set(client.get(real.json()["status_url"]).json())
    assert status.json()["campaign"] == SLUG and status.json()["state"] == "received"
    assert count(app) == 1
    # A browser's autofill or a stray space is not a robot: the letter is kept.
    spaced = client.post("/v1/submissions", json={**posted(), "website": "  "})
    assert spaced.status_code == 202 and count(app) == 2
    assert client.get("/v1/submissions/00000000-0000-4000-8000-000000000000").status_code == 404
    # Written another way, a fake id is found no more than a real one is.
    fake, real_id = trapped.json()["id"], real.json()["id"]
    for other in (fake.upper(), fake.replace("-", ""), f"urn:uuid:{fake}", f"{{{fake}}}"):
        assert client.get(f"/v1/submissions/{other}").status_code == 404
        assert client.get(f"/v1/submissions/{real_id.upper()}").status_code == 404


@pytest.mark.redis
def test_with_redis_down_the_intake_answers_503_with_retry_after(
    app: App, stub_broker: Any
) -> None:
    app.limiter = RedisLimiter(redis.Redis.from_url("redis://127.0.0.1:1/0"))
    app.settings.api_ip_limit = app.settings.api_email_limit = 5
    with ApiClient(create_app(lambda: app, stub_broker), raise_server_exceptions=False) as api:
        for path, body in (
            ("/v1/submissions", posted()),
            (f"/v1/campaigns/{SLUG}/preview", {"name": "A", "postcode": "DM1 1AA"}),
        ):
            reply = api.post(path, json=body)
            assert reply.status_code == 503, reply.text
            assert reply.headers["retry-after"] and "errors" in reply.json()
    assert count(app) == 0


@pytest.mark.parametrize("trouble", ["away", "pool full"])
def test_with_the_database_away_or_its_pool_full_the_intake_answers_503_with_retry_after(
    app: App, stub_broker: Any, tmp_path: Path, trouble: str
) -> None:
    """Passing trouble as the workers read it: a full pool (``sqlalchemy.exc.TimeoutError``, no
    ``OperationalError``) was a bare 500."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from sqlalchemy.pool import QueuePool

    if trouble == "away":
        engine = create_engine(f"sqlite:///{tmp_path}/no/such/folder/dearmp.db")
    else:
        engine = create_engine(
            app.sessions.kw["bind"].url, poolclass=QueuePool, pool_size=1, max_overflow=0,
            pool_timeout=0.1,
        )  # fmt: skip
    app.sessions = sessionmaker(engine)
    held = engine.connect() if trouble == "pool full" else None
    try:
        with ApiClient(create_app(lambda: app, stub_broker), raise_server_exceptions=False) as api:
            replies = [api.post("/v1/submissions", json=posted())]
            # A browser's: the campaigns' origins are read first (a 500 and a traceback).
            browser = {"Origin": "https://campaign.example.org"}
            replies.append(api.post("/v1/submissions", json=posted(), headers=browser))
            replies.append(api.options("/v1/submissions", headers=browser))
        for reply in replies:
            assert reply.status_code == 503, reply.text
            assert reply.headers["retry-after"] == "1"
            assert reply.json() == {"errors": {"body": "Please try again in a moment."}}
    finally:
        if held is not None:
            held.close()
        engine.dispose()


def test_malformed_json_and_an_oversized_streamed_body_keep_the_error_shape(
    client: TestClient,
) -> None:
    bad = client.post(
        "/v1/submissions", content=b'{"campaign": ', headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 422 and bad.json() == {
        "errors": {"body": "The body is not valid JSON."}
    }
    latin = client.post(
        "/v1/submissions", content=b'{"x": "\xff"}', headers={"Content-Type": "application/json"}
    )
    assert latin.status_code == 422 and "errors" in latin.json()

    def chunks() -> Iterator[bytes]:
        yield b'{"campaign": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    streamed = client.post(
        "/v1/submissions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413 and "errors" in streamed.json()
