"""Counts in messages people read agree with their nouns."""

from __future__ import annotations

from workers.wording import counted


def test_one_is_singular_and_every_other_count_plural() -> None:
    assert counted(1, "letter") == "1 letter"
    assert [counted(n, "letter") for n in (0, 2, 650)] == ["0 letters", "2 letters", "650 letters"]
    assert counted(1, "MP address", "MP addresses") == "1 MP address"
    assert counted(3, "delivery", "deliveries") == "3 deliveries"


def test_a_float_count_is_written_as_it_reads() -> None:
    assert counted(24.0, "hour") == "24 hours"
    assert counted(1.0, "hour") == "1 hour"
    assert counted(1.5, "hour") == "1.5 hours"
