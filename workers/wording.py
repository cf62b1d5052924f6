"""Text for people: counts in sentences ("1 letter", "3 letters", "1.5 hours"), and text from
outside (a server's answer, an MP's name, a reply's subject) made safe to show on a terminal or
a page and to put in a header: :func:`one_line` and :func:`printable`, the one place it is done."""

import re
import unicodedata

from schemas.submission import NOT_LETTER_TEXT

# Never in one line (a header's, an operator's): control characters (an escape sequence's ESC,
# C1's CSI), format characters (a bidirectional override; in a header even a ZWJ), line and
# paragraph separators, lone surrogates.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def counted(n: float, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``plural`` where an added s is wrong)."""
    number = f"{n:g}" if isinstance(n, float) else str(n)
    return f"{number} {noun if n == 1 else plural or noun + 's'}"


def one_line(text: str, limit: int = 1000) -> str:
    """Outside text on one line: whitespace runs (line breaks included) as one space, nothing
    :data:`_HIDDEN`, at most ``limit`` characters. It can never become a header of its own, here
    or when a reader's software writes it again (CPython's CVE-2024-6923), nor move a terminal's
    cursor or reorder what an operator reads."""
    if not (text.isascii() and text.isprintable()):  # the common case has nothing to take out
        text = "".join(
            " " if c.isspace() else c
            for c in text
            if c.isspace() or unicodedata.category(c) not in _HIDDEN
        )
    return " ".join(text.split())[:limit].rstrip()


# What the intake calls not text in a letter (controls but tab and line breaks, bidirectional
# controls, noncharacters), and lone surrogates: ZWJ, ZWNJ and a soft hyphen are a name's own.
_NOT_TEXT = re.compile(f"[{NOT_LETTER_TEXT}\\ud800-\\udfff]")


def printable(text: str) -> str:
    """Outside text of many lines (a reply, an export), as it is but for line ends (CRLF and a
    lone CR as LF) and what is not text (:data:`_NOT_TEXT`), shown as U+FFFD."""
    return _NOT_TEXT.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))
