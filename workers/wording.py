"""Text for people: counts in sentences ("1 letter", "3 letters", "1.5 hours"), and text from
outside (a server's answer, an MP's name, a reply's subject) made safe to show on a terminal or
a page and to put in a header: :func:`one_line` and :func:`printable`, the one place it is done."""

import unicodedata

# Never shown as they are: control characters (an escape sequence's ESC, C1's CSI), format
# characters (a bidirectional override), line and paragraph separators, lone surrogates.
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


def printable(text: str) -> str:
    """Outside text of many lines, as it is but for line ends (CRLF and a lone CR as LF) and
    anything else :data:`_HIDDEN` but a tab, shown as U+FFFD."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) not in _HIDDEN else "\ufffd" for c in lines
    )
