"""Which article labels and groups a catalogue accepts: one check for the Python API
(:meth:`fewshot.Catalogue.add`) and the service (``POST /articles``), so that neither can write an
index that cannot be read back or a label that cannot be shown.

A label (or group) is stored NFC-normalised with surrounding whitespace removed. Refused, with
an :class:`~fewshot.errors.InputError` whose ``code`` the service answers as its JSON ``error``:

* ``empty_enrolment`` (422): an empty label (``None``, ``""``, whitespace only);
* ``invalid_label`` (422): longer than :data:`MAX_LABEL_CHARS`; control characters (newline,
  tab, ...) or line / paragraph separators anywhere; bidirectional embedding, override or
  isolate controls (U+202A-U+202E, U+2066-U+2069) anywhere (they make a label display as
  another one); nothing visible once format characters (Unicode category Cf: zero-width
  space, BOM, ...) and whitespace are set aside;
* ``group_conflict`` (409): photos added to an existing article under another group.

A label that is not a ``str`` is a programming error: ``TypeError``.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from ..index import CatalogueIndex

__all__ = ["MAX_LABEL_CHARS", "BIDI_CONTROLS", "clean_label", "normalize_label", "resolve_group"]

#: longest accepted article label / group name
MAX_LABEL_CHARS = 200
#: bidirectional embedding / override (U+202A-U+202E) and isolate (U+2066-U+2069) controls
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: categories refused anywhere: control characters, line and paragraph separators
_BREAKING = {"Cc", "Zl", "Zp"}


def normalize_label(text: str) -> str:
    """``text`` as labels are stored: NFC-normalised, surrounding whitespace removed (so that
    ``"Cafe\u0301 "`` finds the article enrolled as ``"Café"``)."""
    return unicodedata.normalize("NFC", text).strip()


def clean_label(value: object, what: str = "label", *, required: bool = True) -> str | None:
    """``value`` as an article ``what`` (``"label"`` or ``"group"``) is stored: NFC-normalised,
    surrounding whitespace removed; ``None`` for an empty optional value.

    Raises:
        TypeError: ``value`` is neither a ``str`` nor ``None``.
        InputError: ``code="empty_enrolment"`` for an empty required value;
            ``code="invalid_label"`` for a value refused by the rules of the module docstring
            (the message says which rule, the hint the fix).
    """
    if value is not None and not isinstance(value, str):
        raise TypeError(f"the article {what} must be a str, not {type(value).__name__} ({value!r})")
    text = normalize_label(value or "")
    if not text:
        if required:
            raise InputError(f"the article {what} is empty", code="empty_enrolment",
                             hint=f"give the new article a {what} (e.g. 'Oatly-Oat-Milk')")
        return None
    if len(text) > MAX_LABEL_CHARS:
        raise InputError(f"the article {what} is {len(text)} characters long (limit {MAX_LABEL_CHARS})",
                         hint=f"use a shorter {what}", code="invalid_label")
    if any(unicodedata.category(c) in _BREAKING for c in text):
        raise InputError(f"the article {what} {text!r} contains control characters",
                         hint=f"use a {what} of printable characters", code="invalid_label")
    bidi = sorted({f"U+{ord(c):04X}" for c in text if c in BIDI_CONTROLS})
    if bidi:
        raise InputError(f"the article {what} {text!r} contains bidirectional text controls ({', '.join(bidi)}), "
                         "which make it display as another text", hint=f"remove them from the {what}",
                         code="invalid_label")
    if text in (".", ".."):
        raise InputError(f"the article {what} {text!r} cannot be told from a path step in a URL or a folder name",
                         hint=f"give a {what} with a letter or digit", code="invalid_label")
    if not any(not c.isspace() and unicodedata.category(c) != "Cf" for c in text):
        raise InputError(f"the article {what} {text!r} has no visible characters (only format characters "
                         "such as zero-width spaces, and spaces)", hint=f"give a {what} that can be read",
                         code="invalid_label")
    return text


def resolve_group(index: "CatalogueIndex", label: str, group: str | None) -> str | None:
    """The group the new photos of article ``label`` are stored under: ``group`` for a new
    article; for an existing one, its own group (``group`` may be ``None`` or the same).

    Raises:
        InputError: ``code="group_conflict"``: ``label`` exists with another group (or none).
    """
    if not index.has_article(label):
        return group
    existing = index.article_group(label)
    if group is None or group == existing:
        return existing
    held = f"in group '{existing}'" if existing is not None else "without a group"
    raise InputError(f"article '{label}' already exists {held}, not '{group}'", code="group_conflict",
                     hint="leave the group empty to add photos to it, or delete the article first")
