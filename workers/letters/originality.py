"""How much of a letter is the supporter's own words, and near-duplicate fingerprints (MinHash
signatures and their band keys). Pure functions, no I/O: the comparison stage stores what they
return, and the database's index on the band keys finds the candidate near-duplicates."""

from __future__ import annotations

import functools
import hashlib
import operator
import re
import struct
import unicodedata
from collections.abc import Iterator, Sequence

# A changed word leaves its neighbours covered when 3 unchanged words stand on either side, while
# a 4-word run shared with the template by chance is rare in own text (3-grams like "I want to"
# are not).
SHINGLE = 4

NUM_PERM = 64  # signature values (one-permutation MinHash bins)
ROWS = 3  # values per band
# 21 (the 64th value counts in similarity only): P(candidate) = 1 - (1 - s**3)**21 is 0.94 at a
# similarity of 0.5 and 1.0 at 0.9, so thresholds from 0.5 up find nearly every pair.
BANDS = NUM_PERM // ROWS

_EMPTY = 0xFFFFFFFF  # a bin no shingle fell in (before densification)
_BAND_BITS = 58  # a band key: the band number above 58 bits of the band's hash (< 2**63)
_PACK = struct.Struct(f">{NUM_PERM}I")
_PACK_ROWS = struct.Struct(f">{ROWS}I")
# A change to any constant or hash here makes signatures and band keys that cannot be compared
# with those stored: the comparison window must then be computed again (a test pins them).

# Invisible format characters (soft hyphen, zero-width space/joiners, bidi marks and isolates,
# word joiner, BOM) would split or disguise words; apostrophes are dropped ("don't" = "dont").
_INVISIBLE = re.compile(
    "[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff'\u2018\u2019\u02bc`]"
)
_WORD = re.compile(r"[^\W_]+")
# A word as written, its apostrophes kept (for quoting a letter's own words back).
_APOSTROPHES = re.compile("['\u2018\u2019\u02bc`]")
_WRITTEN = re.compile(r"[^\W_]+(?:['\u2018\u2019\u02bc`][^\W_]+)*")
_SALUTATION = re.compile(r"(dear|hello|hi|to whom it may concern)\b")
_CLOSING = re.compile(
    r"(yours(\s+(sincerely|faithfully|truly|respectfully))?|sincerely|faithfully|respectfully"
    r"|(kind|kindest|best|warm|warmest|many)\s+(regards|wishes|thanks)|regards|best"
    r"|with\s+(thanks|best\s+wishes|kind\s+regards)|many\s+thanks|thanks|thank\s+you|cheers)"
    r"\W*((\s+\S+){0,3})\s*"
)
_SALUTATION_WORDS = 8  # "Dear Sir or Madam," and "Dear Jane Smith MP," but no sentence
_TRAILER_LINES = 3  # after the closing: a name, a postcode, an address line
_TRAILER_WORDS = 6


def words(text: str) -> list[str]:
    """The letter's normalised words (NFKC, casefolded, letters and digits only), without a
    "Dear ..." first line or a closing ("Yours sincerely", "Kind regards", "Thanks", ...) and the
    short name or address lines after it among the last lines."""
    return _WORD.findall(_body(_INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold()))


def _body(text: str) -> str:
    """The text's non-blank lines without a salutation and a sign-off."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and _is_salutation(lines[0].casefold()):
        lines = lines[1:]
    return "\n".join(lines[: _closing_start(lines)])


def _visible(text: str) -> str:
    """The text without invisible format characters, its apostrophes kept."""
    return _INVISIBLE.sub(
        lambda m: m.group() if _APOSTROPHES.fullmatch(m.group()) else "",
        unicodedata.normalize("NFKC", text),
    )


def _is_salutation(line: str) -> bool:
    """A short first line that greets ("Dear Ms Smith,"), not a sentence that begins "Dear me."."""
    return (
        _SALUTATION.match(line) is not None
        and len(line.split()) <= _SALUTATION_WORDS
        and not line.endswith((".", "!", "?"))
    )


def _closing_start(lines: list[str]) -> int:
    """Where the sign-off starts: a closing line (not the first) followed only by short lines,
    or ``len(lines)``."""
    for start in range(len(lines) - 1, max(len(lines) - 2 - _TRAILER_LINES, 0), -1):
        if _CLOSING.fullmatch(lines[start].casefold()):
            return start
        if len(lines[start].split()) > _TRAILER_WORDS:
            break
    return len(lines)


def _grams(letter: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    """The letter's runs of ``n`` words."""
    return zip(*(letter[i:] for i in range(n)), strict=False)


class Template:
    """A campaign's template text, its word shingles computed once for every letter scored."""

    def __init__(self, text: str) -> None:
        self.words = words(text)
        # Shorter shingles for a template or a letter shorter than SHINGLE words.
        self._grams = [set(_grams(self.words, n)) for n in range(SHINGLE + 1)]
        self._signature = signature(self.words)

    def signature_of(self, letter: Sequence[str]) -> tuple[int, ...]:
        """:func:`signature` of ``letter``, the template's own computed once (most letters are
        the campaign's draft)."""
        return self._signature if letter == self.words else signature(letter)

    def share(self, body: str) -> float:
        """The share of the letter's words that are its own: see :meth:`share_of`."""
        return self.share_of(words(body))

    def share_of(self, letter: Sequence[str]) -> float:
        """The share of ``letter``'s words not covered by any SHINGLE-word run it has in common
        with the template: 0.0 for the template itself (or no words), 1.0 for an empty template."""
        if not letter:
            return 0.0
        n = min(SHINGLE, len(letter), len(self.words))
        if n == 0:
            return 1.0
        known = self._grams[n]
        reach = covered = 0  # reach: the end of the last run found in the template
        for i, gram in enumerate(_grams(letter, n)):
            if gram in known:
                covered += min(n, i + n - reach)
                reach = i + n
        return (len(letter) - covered) / len(letter)

    def added(self, text: str, least: int = 3) -> list[str]:
        """The passages of a letter in the writer's own words, as they wrote them: its runs of
        at least ``least`` words that no SHINGLE-word run shared with the template covers
        (salutation and sign-off left out, as :func:`words` does)."""
        body = _body(_visible(text))
        found = list(_WRITTEN.finditer(body))
        letter = [_APOSTROPHES.sub("", m.group()).casefold() for m in found]
        n = min(SHINGLE, len(letter), len(self.words))
        ours = [True] * len(letter)
        for i, gram in enumerate(_grams(letter, n) if n else ()):
            if gram in self._grams[n]:
                ours[i : i + n] = [False] * n
        passages, start = [], None
        for i, own in enumerate([*ours, False]):
            if own and start is None:
                start = i
            elif not own and start is not None:
                if i - start >= least:
                    passages.append(body[found[start].start() : found[i - 1].end()])
                start = None
        return passages


@functools.lru_cache(maxsize=64)
def template(text: str) -> Template:
    """The :class:`Template` of a campaign's text, built once per process."""
    return Template(text)


def own_words_share(body: str, template_text: str) -> float:
    """The share of ``body``'s words that are not the template's, in [0, 1]."""
    return template(template_text).share(body)


def _hash64(data: bytes, person: bytes) -> int:
    # BLAKE2b, not hash(): the same value in every process, on every machine, in every release.
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "big")


# Most shingles of most letters are the template's: their hashes are kept (about 3 MB).
@functools.lru_cache(maxsize=1 << 14)
def _shingle_hash(gram: str) -> int:
    return _hash64(gram.encode(), b"dearmp-shingle")


def _fallback_order(i: int) -> list[int]:
    keyed = sorted(range(NUM_PERM), key=lambda j: _hash64(f"{i}:{j}".encode(), b"dearmp-dens"))
    return [j for j in keyed if j != i]


# Where an empty bin takes its value from: a fixed pseudo-random order of the other bins per bin
# ("optimal densification", Shrivastava 2017), so P[two letters agree in a bin] stays their
# Jaccard similarity.
_FALLBACK = [_fallback_order(i) for i in range(NUM_PERM)]


def signature(letter: Sequence[str]) -> tuple[int, ...]:
    """A one-permutation MinHash signature of the letter's SHINGLE-word shingles: each is
    hashed once, into a bin by its low bits, and each bin keeps the least of its top 32 bits;
    empty bins are filled from others (densification). Letters without words all get one."""
    n = min(SHINGLE, len(letter))
    mins = [_EMPTY] * NUM_PERM
    for gram in map(" ".join, _grams(letter, n) if n else ()):
        h = _shingle_hash(gram)
        b, value = h % NUM_PERM, h >> 32
        if value < mins[b]:
            mins[b] = value
    filled = list(mins)
    for i, value in enumerate(mins):
        if value == _EMPTY:
            for j in _FALLBACK[i]:
                if mins[j] != _EMPTY:
                    filled[i] = mins[j]
                    break
    return tuple(filled)


def bands(sig: Sequence[int]) -> list[int]:
    """The signature's BANDS band keys, each a non-negative signed 64-bit int (a BIGINT) that
    holds its band number in the top bits: two letters sharing any key are candidates."""
    return [
        (band << _BAND_BITS)
        | (
            _hash64(_PACK_ROWS.pack(*sig[band * ROWS : (band + 1) * ROWS]), b"dearmp-band")
            >> (64 - _BAND_BITS)
        )
        for band in range(BANDS)
    ]


def band_number(key: int) -> int:
    """The band a key of :func:`bands` belongs to."""
    return key >> _BAND_BITS


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """The estimated Jaccard similarity of two letters' shingles, from their signatures."""
    if len(a) != len(b) or not a:
        raise ValueError("signatures of different lengths")
    equal: int = sum(map(operator.eq, a, b))
    return equal / len(a)


def pack(sig: Sequence[int]) -> bytes:
    """The signature as 4 * NUM_PERM bytes, for a LargeBinary column."""
    return _PACK.pack(*sig)


def unpack(data: bytes) -> tuple[int, ...]:
    """The signature :func:`pack` stored."""
    if len(data) != _PACK.size:
        raise ValueError(f"a packed signature is {_PACK.size} bytes, not {len(data)}")
    return _PACK.unpack(data)
