"""The intake and the after-sent links, hardened: every state has its outcome; IPv4 clients
behind a dual-stack proxy are limited one by one; one email rule at the door and in the pipeline;
one survey answer per letter, signed for its answer, its token kept out of the access log; a
honeypot a robot cannot tell from the real answer; the schema's gaps closed; postcodes with any
whitespace."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from structlog.testing import capture_logs

from schemas.submission import SubmissionV1, parse_submission
from tests.conftest import ApiClient, drain
from tests.test_api import SLUG, count, posted
from tests.test_stages import get
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import LetterEvent, State, Submission, utcnow
from workers.letters.definitions import update_definition
from workers.pipeline.app import App
from workers.privacy.hashing import ip_hash, limiter_network
from workers.stages import survey
from workers.web.api import create_app
from workers.web.bodies import OUTCOMES
from workers.web.honeypot import SETTLE, fake_submission_id

MP = {"name": "Alex Rivers", "constituency": "Millbrook and Eastvale", "email": "a@mp.example"}


@pytest.fixture
def client(app: App, stub_broker: Any) -> Iterator[TestClient]:
    app.settings.api_ip_limit = app.settings.api_email_limit = 0
    with ApiClient(create_app(lambda: app, stub_broker), client=("203.0.113.9", 5000)) as api:
        yield api


def stored(app: App, state: State, **values: Any) -> str:
    """A submission row in ``state``, as the pipeline leaves it there."""
    with session_scope(app.sessions) as session:
        sub = Submission(
            campaign_slug=SLUG,
            idempotency_key=str(uuid.uuid4()),
            state=state.value,
            recipient=MP,
            rejection={"supporter.postcode": "Not a postcode."}
            if state == State.REJECTED
            else None,
            **values,
        )
        session.add(sub)
        session.flush()
        return sub.id


# Every state has its outcome


def test_every_state_has_its_outcome_on_the_status_url_and_in_the_cli(
    app: App, client: TestClient
) -> None:
    for state in State:  # a new state without an outcome fails here
        sid = stored(app, state)
        status = client.get(f"/v1/submissions/{sid}")
        assert status.status_code == 200, (state, status.text)
        data = status.json()
        assert (data["state"], data["final"]) == (state.value, state.is_final)
        assert data["outcome"] == OUTCOMES[state]
        shown = CliRunner().invoke(main, ["show", sid, "--json"], catch_exceptions=False)
        assert json.loads(shown.stdout)["outcome"] == OUTCOMES[state]
        text = CliRunner().invoke(main, ["show", sid], catch_exceptions=False, terminal_width=300)
        assert f"outcome: {OUTCOMES[state]}" in " ".join(text.stdout.split())


# IPv4 behind a dual-stack proxy


def test_an_ipv4_client_in_ipv6_form_is_limited_as_its_ipv4_address(
    app: App, stub_broker: Any
) -> None:
    app.settings.api_ip_limit, app.settings.api_email_limit = 1, 0
    api = create_app(lambda: app, stub_broker)

    def post_from(host: str) -> int:
        with ApiClient(api, client=(host, 5000)) as one:
            return one.post("/v1/submissions", json=posted()).status_code

    # Two supporters behind a dual-stack proxy are two clients, not one /64.
    assert post_from("::ffff:203.0.113.1") == 202
    assert post_from("::ffff:203.0.113.2") == 202
    assert post_from("::ffff:203.0.113.1") == 429
    assert post_from("203.0.113.2") == 429  # the same client, however it is written
    # Its consent evidence is its IPv4 address too.
    with session_scope(app.sessions) as session:
        hashes = set(session.scalars(select(Submission.client_ip_hash)))
    assert hashes == {ip_hash(app.secret, "203.0.113.1"), ip_hash(app.secret, "203.0.113.2")}


@pytest.mark.parametrize("form", ["::ffff:198.51.100.7", "64:ff9b::c633:6407", "2002:c633:6407::1"])
def test_an_ipv4_client_in_any_ipv6_form_is_one_client_for_its_evidence_and_its_limit(
    app: App, stub_broker: Any, form: str
) -> None:
    """The consent evidence and the rate limit read an IPv6 form of an IPv4 address one way
    (IPv4-mapped, NAT64, 6to4): the hashed address recorded is the IPv4 one the limit counts."""
    app.settings.api_ip_limit, app.settings.api_email_limit = 1, 0
    api = create_app(lambda: app, stub_broker)

    def post_from(host: str) -> int:
        with ApiClient(api, client=(host, 5000)) as one:
            return one.post("/v1/submissions", json=posted()).status_code

    assert post_from(form) == 202
    with session_scope(app.sessions) as session:
        hashes = set(session.scalars(select(Submission.client_ip_hash)))
    assert (
        hashes
        == {ip_hash(app.secret, "198.51.100.7")}
        == {ip_hash(app.secret, limiter_network(form))}
    )
    assert post_from("198.51.100.7") == 429  # the same client


@pytest.mark.parametrize(
    ("address", "client"),
    [
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("64:ff9b::c633:6407", "198.51.100.7"),  # NAT64
        ("2002:c633:6407::1", "198.51.100.7"),  # 6to4
        ("2001:db8:5:6::1", "2001:db8:5:6::/64"),
        ("198.51.100.7", "198.51.100.7"),
    ],
)
def test_the_rate_limits_client_is_the_ipv4_address_an_ipv6_one_stands_for(
    address: str, client: str
) -> None:
    assert limiter_network(address) == client


# One email rule at the door and in the pipeline


def test_an_internationalised_top_level_domain_is_accepted_at_the_door_and_in_the_pipeline(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    reply = client.post("/v1/submissions", json=posted(supporter__email="ivan@пример.рф"))
    assert reply.status_code == 202, reply.text
    drain(stub_broker, stub_worker)
    sub = get(app, reply.json()["id"])
    assert sub.state == State.DELIVERED, sub.rejection
    assert sub.payload is not None
    assert sub.payload["supporter"]["email"] == "ivan@xn--e1afmkfd.xn--p1ai"


LABELS = st.sampled_from(["пример", "münchen", "例え", "bücher", "example", "a-b", "xn--p1ai"])
TLDS = st.sampled_from(["рф", "de", "中国", "xn--p1ai", "org", "ελ", "москва", "uk", "c"])
LOCALS = st.from_regex(r"[A-Za-z0-9._%+-]{1,20}", fullmatch=True)


@given(
    st.builds(
        lambda local, labels, tld: f"{local}@{'.'.join([*labels, tld])}",
        LOCALS,
        st.lists(LABELS, min_size=1, max_size=3),
        TLDS,
    )
    | st.emails()
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_what_the_door_accepts_the_pipeline_accepts_for_any_address(address: str) -> None:
    """The pipeline parses the stored form of what the API accepted with the same rule."""
    posted_form = parse_submission(posted(supporter__email=address))
    if isinstance(posted_form, SubmissionV1):
        again = parse_submission(posted_form.model_dump(mode="json"))
        assert isinstance(again, SubmissionV1), (address, again)
        assert again.supporter.email == posted_form.supporter.email


# The survey: one answer per letter, signed for its answer, its token not logged


def survey_answers(app: App, sid: str) -> list[str | None]:
    with session_scope(app.sessions) as session:
        return list(
            session.scalars(
                select(LetterEvent.detail).where(
                    LetterEvent.submission_id == sid, LetterEvent.kind == "survey"
                )
            )
        )


def link_path(app: App, sid: str, answer: str) -> str:
    url = survey.links(app.settings.public_url, app.secret, sid)[answer]
    return url.removeprefix(app.settings.public_url.rstrip("/"))


def test_answering_again_keeps_one_answer_the_latest(app: App, client: TestClient) -> None:
    sid = stored(app, State.DELIVERED)
    answers = ["yes", "no", "not_yet", "yes"] * 4
    for answer in answers:  # 16 posts
        assert client.post(link_path(app, sid, answer)).status_code == 200
    assert survey_answers(app, sid) == ["yes"]
    assert client.post(link_path(app, sid, "no")).status_code == 200
    assert survey_answers(app, sid) == ["no"]


def test_answers_at_the_same_time_leave_one_row(app: App) -> None:
    sid = stored(app, State.DELIVERED)
    tokens = {a: link_path(app, sid, a).split("/")[3] for a in survey.ANSWERS}
    start = threading.Barrier(12)

    def answer(i: int) -> str:
        value = survey.ANSWERS[i % 3]
        start.wait()
        with session_scope(app.sessions) as session:
            return survey.answer(session, app.secret, tokens[value], value)

    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(answer, range(12))) == {"recorded"}
    [kept] = survey_answers(app, sid)
    assert kept in survey.ANSWERS


def test_a_survey_link_is_valid_for_its_own_answer_only(app: App, client: TestClient) -> None:
    sid = stored(app, State.DELIVERED)
    no = link_path(app, sid, "no")
    turned = no.removesuffix("/no") + "/yes"  # the "no" link's token with another answer
    assert client.get(turned).status_code == 404
    assert client.post(turned).status_code == 404
    assert survey_answers(app, sid) == []
    # A link signed over the id alone (before the answer was signed too) is not valid.
    old = survey.base64.urlsafe_b64encode(
        survey.hmac.new(app.secret, f"survey\x00{sid}".encode(), "sha256").digest()[:18]
    ).decode()
    assert client.post(f"/v1/replied/{sid}.{old}/yes").status_code == 404
    assert client.post(no).status_code == 200 and survey_answers(app, sid) == ["no"]


def test_survey_and_confirmation_tokens_are_masked_in_the_access_log(
    app: App, client: TestClient
) -> None:
    sid = stored(app, State.DELIVERED)
    path = link_path(app, sid, "yes")
    with capture_logs() as logs:
        client.get(path)
        client.post(path)
        client.get("/v1/confirm/abc.123.secret-token")
    paths = {e["path"] for e in logs if e["event"] == "http_request"}
    assert paths == {"/v1/replied/[token]", "/v1/confirm/[token]"}
    text = json.dumps(logs)
    assert path.split("/")[3] not in text and sid not in text and "secret-token" not in text


# The honeypot


def trap(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "website": "http://spam.example"}


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no such campaign", 404),
        ("old consent wording", 409),
        ("letter too short", 422),
        ("over the rate limit", 429),
        ("origin not allowed", 403),
        ("a wrong key", 401),
    ],
)
def test_a_filled_trap_gets_the_answer_the_same_letter_gets_without_it(
    app: App, stub_broker: Any, case: str, status: int
) -> None:
    app.settings.api_ip_limit = app.settings.api_email_limit = 0
    changes: dict[str, Any] = {
        "no such campaign": {"campaign": "no-such-campaign"},
        "old consent wording": {"contact_preferences__wording_version": "2019-old"},
        "letter too short": {"letter__body": "Too short."},
    }.get(case, {})
    headers = {
        "origin not allowed": {"Origin": "https://elsewhere.example"},
        "a wrong key": {"X-DearMP-Key": "not-a-key"},
    }.get(case, {})
    with ApiClient(create_app(lambda: app, stub_broker), client=("203.0.113.9", 5000)) as api:
        if case == "over the rate limit":
            app.settings.api_ip_limit = 1
            assert api.post("/v1/submissions", json=posted()).status_code == 202
        payload = posted(**changes)
        real = api.post("/v1/submissions", json=payload, headers=headers)
        trapped = api.post("/v1/submissions", json=trap(payload), headers=headers)
    assert real.status_code == trapped.status_code == status, (real.text, trapped.text)
    assert real.json() == trapped.json()
    assert real.headers.keys() == trapped.headers.keys()


def test_a_filled_trap_with_a_stored_key_is_answered_as_a_repeat(
    app: App, client: TestClient
) -> None:
    payload = posted()
    real = client.post("/v1/submissions", json=payload).json()
    again = client.post("/v1/submissions", json=trap(payload)).json()
    assert again == {**real, "duplicate": True}
    assert count(app) == 1


def test_a_trapped_letters_status_moves_on_as_a_real_ones_and_nothing_is_sent(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    trapped = client.post("/v1/submissions", json=trap(posted()))
    assert trapped.status_code == 202 and trapped.json()["state"] == "received"
    first = client.get(trapped.json()["status_url"]).json()
    assert first["state"] in {"received", "failed"}
    drain(stub_broker, stub_worker)
    assert count(app) == 0 and not list(app.settings.resolved_outbox_dir.glob("*.eml"))
    # Its times are its own: they do not change from one look to the next.
    assert client.get(trapped.json()["status_url"]).json()["received_at"] == first["received_at"]

    now = utcnow()
    settled = client.get(f"/v1/submissions/{fake_submission_id(app.secret, SLUG, now - SETTLE)}")
    data = settled.json()
    assert (data["state"], data["final"], data["outcome"]) == (
        "failed",
        True,
        OUTCOMES[State.FAILED],
    )
    assert data["updated_at"] > data["received_at"]

    # On a campaign that asks for confirmation: unconfirmed, then expired as an unclicked
    # link's letter is.
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, confirmation=True)
    client.app.fastapi.state.intake.definitions._values.clear()  # type: ignore[attr-defined]
    confirm = client.post("/v1/submissions", json=trap(posted()))
    assert confirm.json()["state"] == "unconfirmed"
    assert client.get(confirm.json()["status_url"]).json()["state"] == "unconfirmed"
    valid = timedelta(days=app.settings.confirm_valid_days)
    for age, state in ((valid - timedelta(minutes=1), "unconfirmed"), (valid, "expired")):
        fake = fake_submission_id(app.secret, SLUG, now - age)
        assert client.get(f"/v1/submissions/{fake}").json()["state"] == state
    assert count(app) == 0


# The schema's gaps


@pytest.mark.parametrize("path", ["/v1/confirm/abc.1.x", "/v1/replied/abc.x/yes"])
def test_a_wrong_method_names_every_method_the_path_has(client: TestClient, path: str) -> None:
    reply = client.options(path)
    assert reply.status_code == 405
    assert {"GET", "POST"} <= {m.strip() for m in reply.headers["allow"].split(",")}


def test_a_phone_of_spaces_over_the_length_is_refused(client: TestClient) -> None:
    reply = client.post("/v1/submissions", json=posted(supporter__phone=" " * 41))
    assert reply.status_code == 422
    assert "at most 40" in reply.json()["errors"]["supporter.phone"]
    assert client.post("/v1/submissions", json=posted(supporter__phone=" " * 40)).status_code == 202


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_schema_version_is_the_integer_one(client: TestClient, version: Any) -> None:
    reply = client.post("/v1/submissions", json=posted(schema_version=version))
    assert reply.status_code == 422 and "schema_version" in reply.json()["errors"]
    assert isinstance(parse_submission(posted(schema_version=version)), dict)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_body_that_is_not_utf8_is_refused_with_a_message(
    app: App, client: TestClient, encoding: str
) -> None:
    body = json.dumps(posted()).encode(encoding)
    reply = client.post(
        "/v1/submissions", content=body, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 422
    assert "UTF-8" in reply.json()["errors"]["body"]
    assert count(app) == 0


# Postcodes with whitespace of any kind


@pytest.mark.parametrize(
    "postcode", ["DM1\t1AA", "DM1\xa01AA", "dm1\u202f1aa", "\tDM11AA\u3000", "D M 1 \u2009 1 A A"]
)
def test_a_postcode_with_any_whitespace_is_normalised(
    app: App,
    client: TestClient,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    postcode: str,
) -> None:
    preview = client.post(f"/v1/campaigns/{SLUG}/preview", json={"name": "A", "postcode": postcode})
    assert preview.status_code == 200, preview.text
    assert preview.json()["postcode"] == "DM1 1AA"
    reply = client.post("/v1/submissions", json=posted(supporter__postcode=postcode))
    assert reply.status_code == 202, reply.text
    drain(stub_broker, stub_worker)
    assert get(app, reply.json()["id"]).state == State.DELIVERED


def test_a_key_reused_with_another_body_is_a_409_naming_the_key_and_stores_nothing(
    app: App, client: TestClient
) -> None:
    first = posted()
    stored = client.post("/v1/submissions", json=first).json()
    key = str(uuid.uuid4())
    client.post("/v1/submissions", json={**first, "idempotency_key": key})  # a second letter
    for changed in (
        {**first, "supporter": {**first["supporter"], "email": "someone.else@example.com"}},
        {**first, "letter": {**first["letter"], "subject": "Another subject"}},
        trap({**first, "supporter": {**first["supporter"], "name": "A Robot"}}),
    ):
        reply = client.post("/v1/submissions", json=changed)
        assert reply.status_code == 409, reply.text
        message = reply.json()["errors"]["idempotency_key"]
        assert first["idempotency_key"] in message and "different" in message
    other = posted(supporter__email="someone.else@example.com", idempotency_key=key)
    assert client.post("/v1/submissions", json=other).status_code == 409
    assert count(app) == 2
    kept = get(app, stored["id"])
    assert (
        kept.payload is not None
        and kept.payload["supporter"]["email"] == (first["supporter"]["email"])
    )


def test_a_repeat_differing_only_in_transport_evidence_order_or_nulls_is_the_same_body(
    client: TestClient,
) -> None:
    first = posted()
    first["supporter"].pop("phone")
    stored = client.post("/v1/submissions", json=first).json()
    for repeat in (
        dict(reversed(list(first.items()))),  # key order
        {**first, "supporter": {**first["supporter"], "phone": None}},  # null is absent
        {**first, "user_agent": "Another/2.0"},  # the browser is the request's, not the letter's
    ):
        reply = client.post("/v1/submissions", json=repeat)
        assert (reply.status_code, reply.json()["id"]) == (202, stored["id"]), reply.text
    without_source = {k: v for k, v in first.items() if k != "source_url"}
    assert client.post("/v1/submissions", json=without_source).status_code == 409


def test_the_same_key_again_answers_with_the_submissions_current_state(
    app: App, client: TestClient, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    payload = posted()
    first = client.post("/v1/submissions", json=payload).json()
    assert (first["state"], first["duplicate"]) == ("received", False)
    drain(stub_broker, stub_worker)
    again = client.post("/v1/submissions", json=payload)
    assert again.status_code == 202
    assert again.json() == {**first, "state": "delivered", "duplicate": True}
    assert client.post("/v1/submissions", json=trap(payload)).json() == again.json()


def test_a_scrubbed_or_erased_submission_still_binds_its_key(app: App, client: TestClient) -> None:
    payload = posted()
    sid = client.post("/v1/submissions", json=payload).json()["id"]
    with session_scope(app.sessions) as session:
        row = session.get(Submission, sid)
        assert row is not None
        row.payload, row.supporter_hash, row.erased_at = None, None, utcnow()
    assert client.post("/v1/submissions", json=payload).json()["id"] == sid
    changed = {**payload, "letter": {**payload["letter"], "subject": "Changed"}}
    assert client.post("/v1/submissions", json=changed).status_code == 409


def test_a_row_stored_before_bodies_were_hashed_takes_a_repeat_as_the_same(
    app: App, client: TestClient
) -> None:
    payload = posted()
    sid = client.post("/v1/submissions", json=payload).json()["id"]
    with session_scope(app.sessions) as session:
        row = session.get(Submission, sid)
        assert row is not None
        row.body_hash = None
    changed = {**payload, "letter": {**payload["letter"], "subject": "Changed"}}
    reply = client.post("/v1/submissions", json=changed)
    assert (reply.status_code, reply.json()["id"], reply.json()["duplicate"]) == (202, sid, True)


def test_two_bodies_under_one_key_in_one_batch_store_the_first_and_refuse_the_second(
    app: App,
) -> None:
    from workers.pipeline.intake import accept_many

    first = posted()
    second = posted(supporter__email="b@example.com", idempotency_key=first["idempotency_key"])
    with session_scope(app.sessions) as session:
        results = accept_many(
            session, [(first, State.RECEIVED), (second, State.RECEIVED)], app.secret
        )
    assert [(r.created, r.conflict) for r in results] == [(True, False), (False, True)]
    assert results[1].submission_id == results[0].submission_id
    assert count(app) == 1


@pytest.mark.parametrize("path", ["/v1/confirm/a.b.c/", "/demo/political-prisoners/", "/v1/x/"])
def test_a_path_with_a_trailing_slash_is_not_redirected_to_the_host_it_names(
    client: TestClient, path: str
) -> None:
    """Starlette's redirect to the path without its "/" is built from the Host header: a link's
    token would go to whatever host a request names."""
    answer = client.get(path, headers={"host": "evil.example"}, follow_redirects=False)
    assert answer.status_code == 404 and "location" not in answer.headers
