"""The table of states and stages (workers/pipeline/states.py) is whole, and what derives from it
agrees with it: the actors' options, the reconciler's resends, the final states, the outcomes,
the README's list of states, and the guarded move, which refuses a move the table does not have.
"""

from __future__ import annotations

import ast
import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import String, select

from tests.test_api import SLUG
from workers.database.engine import session_scope
from workers.database.models import FINAL_STATES, Submission, SubmissionEvent
from workers.database.transitions import AlreadyMoved, At, NotAMove, advance
from workers.letters.mail import PermanentDeliveryError
from workers.outbox.kinds import stage_of
from workers.pipeline import actors, reconciler
from workers.pipeline.app import App
from workers.pipeline.states import (
    FROM_ANY_UNFINISHED,
    MOVES,
    OUTCOMES,
    STAGES,
    STARTS,
    STATES,
    Row,
    State,
    moves_from,
)
from workers.stages.stage import Stage
from workers.web import bodies

REPO = Path(__file__).resolve().parent.parent


def reachable(starts: tuple[State, ...]) -> set[State]:
    seen, todo = set(starts), list(starts)
    while todo:
        for to in moves_from(todo.pop()):
            if to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


# The table is whole


def test_every_state_has_one_row_and_its_name_fits_the_column() -> None:
    assert set(STATES) == set(State) and len(STATES) == len(State)
    assert all(isinstance(row, Row) for row in STATES.values())
    column = Submission.__table__.c.state.type
    assert isinstance(column, String) and column.length is not None
    assert max(len(state.value) for state in State) <= column.length


def test_every_next_state_has_a_row_of_its_own() -> None:
    for state, row in STATES.items():
        for to in (*row.next, *row.later, *FROM_ANY_UNFINISHED):
            assert isinstance(to, State) and to in STATES, (state, to)
        assert state not in row.next, f"{state} moves to itself"
        assert len(set(row.next)) == len(row.next), state


def test_a_final_state_has_no_stage_and_no_next_state_and_the_others_have_both() -> None:
    for state, row in STATES.items():
        if row.final:
            assert row.stage is None and row.next == (), state
        else:  # only what comes back, or an operator, moves a submission out of a final state
            assert row.stage is not None and row.next != () and row.later == (), state
    assert all(STATES[state].final for state in FROM_ANY_UNFINISHED)


def test_every_state_is_reachable_and_every_unfinished_one_from_where_submissions_start() -> None:
    assert all(not STATES[start].final for start in STARTS)
    pipeline_only = set(STARTS)
    todo = list(STARTS)
    while todo:  # by the pipeline's own moves, not the ends open to all nor an operator's
        for to in STATES[todo.pop()].next:
            if to not in pipeline_only:
                pipeline_only.add(to)
                todo.append(to)
    assert {state for state, row in STATES.items() if not row.final} <= pipeline_only
    assert reachable(STARTS) == set(State)


def test_every_stage_has_a_policy_and_every_unfinished_state_the_policy_of_its_stage() -> None:
    assert set(STAGES) == set(Stage)
    for row in STATES.values():  # an unfinished state has a stage, so its stage's policy
        assert (row.stage is None) == row.final


# What derives from it


def test_the_actors_options_are_the_tables_policies() -> None:
    for stage, row in STAGES.items():
        options = actors.options(stage)
        assert {k: v for k, v in options.items() if k != "throws"} == row.options()
        assert set(actors.NOT_RETRIED) <= set(options["throws"])
        assert PermanentDeliveryError in options["throws"]
    assert STAGES[Stage.DELIVER].dead_letters_refusals


def test_the_reconciler_resends_each_resent_state_to_its_stage() -> None:
    assert reconciler.RESENT_TO == {
        state: row.stage for state, row in STATES.items() if row.resent and row.stage
    }
    assert set(reconciler.RESENT_TO) == {
        State.RECEIVED,
        State.VALIDATED,
        State.RESOLVED,
        State.COMPARED,
        State.RENDERED,  # unless its letter waits in the outbox, whose timing resends it
    }
    assert stage_of("letter") == Stage.DELIVER


def test_final_states_and_outcomes_are_the_tables() -> None:
    assert {state for state, row in STATES.items() if row.final} == FINAL_STATES
    assert all(state.is_final == (state in FINAL_STATES) for state in State)
    for state in State:  # the status API and the page (which shows the API's), and the CLI
        assert bodies.OUTCOMES[state] == OUTCOMES[state] == STATES[state].outcome
        assert OUTCOMES[state].strip()


def test_the_readme_lists_the_tables_states_and_moves() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("\nStates (")
    paragraph = " ".join(readme[start : readme.index("\n\n", start)].split())
    listed = {
        State(source): {State(to.strip()) for to in targets.split("|")}
        for source, targets in re.findall(r"`(\w+) → ([\w |]+)`", paragraph)
    }
    assert listed == {
        state: set(row.next + row.later) for state, row in STATES.items() if row.next or row.later
    }
    found = re.search(r"Final states: (.*?)\. ", paragraph)
    assert found is not None
    assert {State(name) for name in re.findall(r"`(\w+)`", found.group(1))} == FINAL_STATES
    ends = re.search(r"Any state not final may also end (.*?)\. ", paragraph)
    assert ends is not None
    assert {State(name) for name in re.findall(r"`(\w+)`", ends.group(1))} == set(
        FROM_ANY_UNFINISHED
    )


# Every move the code makes is in the table


def _state(node: ast.expr) -> State | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id == "State":
            return State[node.attr]
    return None


def test_every_move_the_code_asks_for_is_one_the_table_has() -> None:
    """Every ``advance(session, At(id, State.A), State.B)`` is a move of the table, and every
    state a ``move``/``advance`` call moves to is one the table moves something to."""
    targets: set[State] = set()
    pairs: set[tuple[State, State]] = set()
    calls = 0
    for path in (REPO / "workers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id == "move" and len(node.args) >= 2:
                target = _state(node.args[1])
            elif node.func.id == "advance" and len(node.args) >= 3:
                target = _state(node.args[2])
                at = node.args[1]
                if isinstance(at, ast.Call) and getattr(at.func, "id", "") == "At":
                    source = _state(at.args[1])
                    if source is not None and target is not None:
                        pairs.add((source, target))
            else:
                continue
            calls += 1
            if target is not None:
                targets.add(target)
    assert calls >= 10 and pairs  # the scan finds them
    assert {(a, b) for a, b in pairs if (a, b) not in MOVES} == set()
    moved_to = {to for state in STATES for to in moves_from(state)}
    assert targets - moved_to == set()


# The guarded move


def stored(app: App, state: State) -> str:
    with session_scope(app.sessions) as session:
        sub = Submission(campaign_slug=SLUG, idempotency_key=str(uuid.uuid4()), state=state.value)
        session.add(sub)
        session.flush()
        return sub.id


def test_advance_makes_every_move_of_the_table(app: App) -> None:
    for source, to in sorted(MOVES):
        sid = stored(app, State(source))
        with session_scope(app.sessions) as session:
            advance(session, At(sid, source), State(to), "a move of the table")
        with session_scope(app.sessions) as session:
            assert session.get(Submission, sid).state == to  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("source", "to"),
    [
        (State.RECEIVED, State.DELIVERED),  # past every stage
        (State.RENDERED, State.VALIDATED),  # backwards
        (State.REJECTED, State.VALIDATED),  # out of a final state
        (State.DELIVERED, State.FAILED),  # a final state is not "any unfinished state"
        (State.WITHDRAWN, State.RECEIVED),
    ],
)
def test_advance_refuses_a_move_the_table_does_not_have(app: App, source: State, to: State) -> None:
    assert (source, to) not in MOVES
    sid = stored(app, source)
    with session_scope(app.sessions) as session:
        with pytest.raises(NotAMove, match=f"{source.value} -> {to.value}") as refused:
            advance(session, At(sid, source), to)
        assert not isinstance(refused.value, AlreadyMoved)  # a bug, not a lost race
    with session_scope(app.sessions) as session:
        assert session.get(Submission, sid).state == source  # type: ignore[union-attr]
        events = select(SubmissionEvent).where(SubmissionEvent.submission_id == sid)
        assert session.scalars(events).all() == []
