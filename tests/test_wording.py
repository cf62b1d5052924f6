"""Counts in messages people read agree with their nouns."""

from __future__ import annotations

from workers.wording import counted, one_line, printable


def test_one_is_singular_and_every_other_count_plural() -> None:
    assert counted(1, "letter") == "1 letter"
    assert [counted(n, "letter") for n in (0, 2, 650)] == ["0 letters", "2 letters", "650 letters"]
    assert counted(1, "MP address", "MP addresses") == "1 MP address"
    assert counted(3, "delivery", "deliveries") == "3 deliveries"


def test_a_float_count_is_written_as_it_reads() -> None:
    assert counted(24.0, "hour") == "24 hours"
    assert counted(1.0, "hour") == "1 hour"
    assert counted(1.5, "hour") == "1.5 hours"


def test_outside_text_on_one_line_keeps_nothing_that_moves_a_terminal_or_splits_a_header() -> None:
    hostile = "550 refused\r\x1b[2Khealthy\x9b2J \x1b]8;;https://evil.example/\x07ok\u202e\u2028x"
    assert one_line(hostile) == "550 refused [2Khealthy2J ]8;;https://evil.example/ok x"
    assert one_line("  Siân   Llywelyn-Évans\t") == "Siân Llywelyn-Évans"
    assert one_line("a" * 50, 10) == "a" * 10


def test_outside_text_of_many_lines_keeps_its_lines_and_shows_what_is_hidden() -> None:
    assert (
        printable("Dear MP,\r\n\tthanks\rbye\x1b[2J\u202e")
        == "Dear MP,\n\tthanks\nbye\ufffd[2J\ufffd"
    )
    # What the intake takes as text stays: a Persian name's ZWNJ, a soft hyphen (an export).
    assert printable("Mehr\u200cdad, Long\u00adstreet") == "Mehr\u200cdad, Long\u00adstreet"
