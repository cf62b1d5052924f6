"""UK postcodes: normalisation, the official format, and the special cases with no MP.

Every problem has a stable code (for front ends and logs) and a message a supporter can act on.
The format is the British Standard one (BS 7666): an outward code (area letters, district) and an
inward code (sector digit, two unit letters), with the letters Royal Mail never uses left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class PostcodeProblem(StrEnum):
    MISSING = "missing"
    NOT_A_POSTCODE = "not_a_postcode"
    UNKNOWN = "unknown"
    TERMINATED = "terminated"
    CROWN_DEPENDENCY = "crown_dependency"
    OVERSEAS_TERRITORY = "overseas_territory"
    BFPO = "bfpo"
    NON_GEOGRAPHIC = "non_geographic"
    NO_CONSTITUENCY = "no_constituency"


MESSAGES: dict[PostcodeProblem, str] = {
    PostcodeProblem.MISSING: "Please enter your postcode.",
    PostcodeProblem.NOT_A_POSTCODE: "This is not a UK postcode. It should look like SW1A 1AA.",
    PostcodeProblem.UNKNOWN: (
        "We could not find this postcode. It looks right, but it is not in the postcode "
        "directory: please check it and try again."
    ),
    PostcodeProblem.TERMINATED: (
        "This postcode is no longer in use. Please enter the current postcode for your address."
    ),
    PostcodeProblem.CROWN_DEPENDENCY: (
        "{place} is a Crown dependency and has no MP in the House of Commons. "
        "Its own parliament is the {assembly}."
    ),
    PostcodeProblem.OVERSEAS_TERRITORY: (
        "This postcode belongs to a British Overseas Territory, which has no MP in the House of "
        "Commons."
    ),
    PostcodeProblem.BFPO: (
        "British Forces Post Office (BFPO) addresses are not in a constituency. Please enter the "
        "postcode of your home address in the UK: your MP is the one for that address."
    ),
    PostcodeProblem.NON_GEOGRAPHIC: (
        "This postcode is for a PO box or an organisation's mail, not for where someone lives, so "
        "it does not tell us your constituency. Please enter your home postcode."
    ),
    PostcodeProblem.NO_CONSTITUENCY: (
        "This postcode is not in a UK parliamentary constituency. Please enter your home postcode."
    ),
}

CROWN_DEPENDENCIES = {
    "JE": ("Jersey", "States Assembly"),
    "GY": ("Guernsey", "States of Deliberation"),
    "IM": ("The Isle of Man", "Tynwald"),
}
# Pseudo constituency codes the ONSPD (and postcodes.io) give the Channel Islands and Isle of Man.
CROWN_PSEUDO_CODES = {"L99999999": "GY", "M99999999": "IM"}

# Overseas territories with UK-style postcodes (Royal Mail and the territories' own lists).
OVERSEAS_TERRITORIES = frozenset(
    {
        "ASCN 1ZZ",
        "BBND 1ZZ",
        "BIQQ 1ZZ",
        "FIQQ 1ZZ",
        "GX11 1AA",
        "PCRN 1ZZ",
        "SIQQ 1ZZ",
        "STHL 1ZZ",
        "TDCU 1ZZ",
        "TKCA 1ZZ",
    }
)

# Non-geographic postcode districts: PO boxes, bulk mail and business reply addresses. Each one
# sits in the ONSPD with the constituency of its delivery office, not of anyone who lives there.
NON_GEOGRAPHIC_AREAS = frozenset({"BX", "XX"})
NON_GEOGRAPHIC_DISTRICTS = frozenset(
    {
        "BS98",
        "BS99",
        "E98",
        "EC50",
        "N1P",
        "NE98",
        "NE99",
        "NW1W",
        "SE1P",
        "SW95",
        "SW99",
        "WC99",
    }
)

_AREA = "[A-PR-UWYZ][A-HK-Y]?"  # no Q, V, X first; no I, J, Z second
_DISTRICT = "[0-9][0-9A-HJKMNPR-Y]?"  # A9A and AA9A districts
_INWARD = "[0-9][ABD-HJLNP-UW-Z]{2}"  # never C, I, K, M, O or V in the unit
POSTCODE_RE = re.compile(rf"^({_AREA}{_DISTRICT}) ({_INWARD})$")
LOOSE_RE = re.compile(r"^[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}$")
BFPO_RE = re.compile(r"^BFPO ?[0-9]{1,4}$|^BF1 ?[0-9][A-Z]{2}$")
GIR_0AA = "GIR 0AA"


@dataclass(frozen=True)
class Problem:
    code: PostcodeProblem
    message: str


def problem(code: PostcodeProblem, **details: str) -> Problem:
    return Problem(code, MESSAGES[code].format(**details))


def normalise_postcode(value: str) -> str:
    """Upper-case, single inner space, no stray whitespace: ``" sw1a0aa "`` → ``"SW1A 0AA"``."""
    compact = re.sub(r"\s+", "", value).upper()
    return f"{compact[:-3]} {compact[-3:]}" if len(compact) > 3 else compact


def outward(postcode: str) -> str:
    return postcode.split(" ", 1)[0]


def area(postcode: str) -> str:
    match = re.match(r"[A-Z]+", postcode)
    return match.group(0) if match else ""


def crown_dependency(postcode_area: str) -> Problem:
    place, assembly = CROWN_DEPENDENCIES[postcode_area]
    return problem(PostcodeProblem.CROWN_DEPENDENCY, place=place, assembly=assembly)


def check_format(raw: str) -> tuple[str, Problem | None]:
    """The normalised postcode and, when it can have no MP whatever the directory says, why not.

    A well-formed postcode with no problem may still be unknown or terminated: only the directory
    can tell (see :mod:`workers.stages.resolution`).
    """
    text = raw.strip()
    if not text:
        return "", problem(PostcodeProblem.MISSING)
    compact = re.sub(r"\s+", "", text).upper()
    if BFPO_RE.match(compact) or BFPO_RE.match(normalise_postcode(text)):
        return normalise_postcode(text), problem(PostcodeProblem.BFPO)
    postcode = normalise_postcode(text)
    if postcode in OVERSEAS_TERRITORIES:
        return postcode, problem(PostcodeProblem.OVERSEAS_TERRITORY)
    if postcode == GIR_0AA:
        return postcode, problem(PostcodeProblem.NON_GEOGRAPHIC)
    if LOOSE_RE.match(postcode) and postcode.startswith("ZZ99"):
        # NHS pseudo-postcodes (no fixed abode, overseas, not known) are not addresses.
        return postcode, problem(PostcodeProblem.NO_CONSTITUENCY)
    if not POSTCODE_RE.match(postcode):
        return postcode, problem(PostcodeProblem.NOT_A_POSTCODE)
    if area(postcode) in CROWN_DEPENDENCIES:
        return postcode, crown_dependency(area(postcode))
    return postcode, None


def is_non_geographic(postcode: str) -> bool:
    return area(postcode) in NON_GEOGRAPHIC_AREAS or outward(postcode) in NON_GEOGRAPHIC_DISTRICTS
