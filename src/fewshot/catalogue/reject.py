"""The reject option: answer "unknown" when a photo is not confidently one of the catalogue's articles.

``reject`` is ``"auto"`` (the threshold calibrated for the catalogue and a target false-accept
rate, :func:`fewshot.catalogue.calibrate.calibrate`), ``"none"`` (every photo gets its best
article, as before) or a score (a number: that threshold on the chosen open-set score). A
rejected photo keeps its ranked articles; with ``auto`` and a catalogue with brands, it is given
its brand when the brand alone is confident ("unknown article, brand X").

:class:`Rejector` holds the decision for one catalogue; :func:`answers` applies it to ranked
predictions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, InputError
from ..index import CatalogueIndex, Prediction
from .calibrate import Calibration, CalibrationScores, calibration_from, calibration_scores, check_calibratable
from .scores import DEFAULT_SCORE, OPEN_SCORES, SCORE_DEPTH, brand_scores, open_scores, with_rivals

__all__ = ["Answer", "Rejector", "answers", "parse_reject", "prediction_arrays", "DEFAULT_TARGET_FAR",
           "CALIBRATION_FILE", "SCORE_DEPTH", "UNKNOWN", "read_calibration", "write_calibration", "cached_calibration", "check_score_name", "check_target_far"]

log = logging.getLogger("fewshot")

DEFAULT_TARGET_FAR = 0.05
#: the answer of a rejected photo
UNKNOWN = "unknown"


def parse_reject(value: object) -> str | float:
    """``"auto"``, ``"none"`` or a finite threshold from a flag, a query parameter or the API.

    Raises:
        InputError: anything else (option ``reject``).
    """
    if isinstance(value, str) and value.strip().lower() in ("auto", "none"):
        return value.strip().lower()
    try:
        number = float(value) if not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"reject={_short(value)} is not auto, none or a score", hint="use reject='auto', 'none' or e.g. 0.4",
                         options=("reject",))
    return number


def _short(value: object) -> str:
    """``repr(value)``, cut to 40 characters (a value is echoed in an error, not a document)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_score_name(score: object) -> str:
    """An open-set score's name.

    Raises:
        InputError: not a registered score (option ``open_score``; the hint lists them).
    """
    if not isinstance(score, str) or score not in OPEN_SCORES:
        raise InputError(f"open_score={_short(score)} is not an open-set score",
                         hint=f"use one of {', '.join(OPEN_SCORES.names())} (default {DEFAULT_SCORE})",
                         options=("open_score",))
    return score


def check_target_far(value: object) -> float:
    """The target false-accept rate, a number in ``(0, 1)``.

    Raises:
        InputError: anything else (option ``target_far``).
    """
    try:
        far = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        far = math.nan
    if isinstance(value, bool) or not 0.0 < far < 1.0:
        raise InputError(f"target_far={_short(value)} is not a rate in (0, 1)", hint="use e.g. target_far=0.05 for 5%",
                         options=("target_far",))
    return far


@dataclass(frozen=True)
class Answer:
    """The decision for one photo: ``article`` (its best article, or :data:`UNKNOWN`), the open-set
    ``score`` it was judged on and the ``threshold`` used (``None``: no reject), the false-accept
    rate that threshold was calibrated for (``None``: a threshold given by hand), and for an
    unknown article the ``brand`` when the brand alone is confident."""

    article: str
    score: float
    score_name: str
    threshold: float | None
    target_far: float | None
    brand: str | None = None
    #: the batch classifier that chose ``article`` (``classify(..., transductive="paddle")``), else ``None``
    transductive: str | None = None

    @property
    def unknown(self) -> bool:
        return self.threshold is not None and self.score < self.threshold

    def to_dict(self) -> dict:
        d = {"article": self.article, "unknown": self.unknown, "score": round(self.score, 6),
             "open_score": self.score_name,
             "threshold": None if self.threshold is None else round(self.threshold, 6),
             "target_far": self.target_far}
        if self.brand is not None:
            d["brand"] = self.brand
        if self.transductive is not None:
            d["transductive"] = self.transductive
        return d

    def text(self) -> str:
        """``"unknown article, brand X"``, ``"unknown"`` or the article."""
        if not self.unknown:
            return self.article
        return f"{UNKNOWN} article, brand {self.brand}" if self.brand else UNKNOWN


@dataclass(frozen=True)
class Rejector:
    """How one catalogue rejects: ``threshold`` on the ``score`` (``None``: never), from
    ``calibration`` with ``reject="auto"``."""

    score: str = DEFAULT_SCORE
    threshold: float | None = None
    calibration: Calibration | None = None

    @classmethod
    def for_index(cls, index: CatalogueIndex, reject: object = "auto", *, target_far: object = DEFAULT_TARGET_FAR,
                  score: str = DEFAULT_SCORE, warn: bool = True) -> "Rejector":
        """The rejector of ``index``; ``auto`` calibrates (cached on the index until it changes), and
        falls back to no reject, with a warning, when the catalogue is too small. ``warn=False``:
        no warning that the threshold accepts few of the catalogue's own photos (a protocol that
        reports what each of its catalogues accepts).

        Raises:
            InputError: a bad ``reject``, ``target_far`` or ``score``.
        """
        reject, far = parse_reject(reject), check_target_far(target_far)
        check_score_name(score)
        if reject == "none":
            return cls(score)
        if reject != "auto":
            return cls(score, float(reject))
        try:
            cal = cached_calibration(index, far, score, warn=warn)
        except DataError as e:
            log.warning("no reject threshold: %s; every photo gets its best article (reject='none')", e.message)
            return cls(score)
        return cls(score, cal.threshold, cal)

    def record(self) -> dict:
        """What the responses say about the threshold used."""
        cal = self.calibration
        return {"reject": "none" if self.threshold is None else ("auto" if cal else "score"),
                "open_score": self.score, "threshold": self.threshold,
                "target_far": cal.target_far if cal else None,
                "brand_threshold": cal.brand_threshold if cal else None}


#: below this share of the catalogue's own photos accepted, a calibration warns
FEW_ACCEPTED = 0.10
#: calibrations kept per index (one per score and target asked for; the oldest goes first)
MAX_CACHED = 8


def _cache_key(score: str, target_far: float) -> tuple:
    """Where ``index.derived`` keeps the calibration for a score and a target."""
    return ("calibration", score, target_far)


def cached_calibration(index: CatalogueIndex, target_far: float, score: str, *, warn: bool = True) -> Calibration:
    """:func:`calibrate` of ``index``, kept in ``index.derived`` until the index changes: the
    calibration scores once per open-set score (the costly part), the thresholds per target (a
    sort), at most :data:`MAX_CACHED` of them; ``warn``: say so when the threshold accepts under
    :data:`FEW_ACCEPTED` of the catalogue's own photos."""
    key = _cache_key(score, target_far)
    if key in index.derived:
        return index.derived[key]
    scores_key = ("calibration scores", score)
    if scores_key not in index.derived:
        index.derived.update({("calibration scores", name): s for name, s in _scores(index, score).items()})
    cal = calibration_from(index.derived[scores_key], target_far, score=score)
    if warn and cal.present_accepted < FEW_ACCEPTED:
        log.warning("the reject threshold (%s score >= %.4f for %g%% false accepts) accepts only %.0f%% of the "
                    "catalogue's own photos left out in turn: almost every photo will be answered 'unknown'. Add "
                    "articles and photos, choose a higher target_far, or classify with reject='none'", score,
                    cal.threshold, target_far * 100, cal.present_accepted * 100)
    kept = [k for k in index.derived if k[0] == "calibration"]
    for old in kept[: max(0, len(kept) + 1 - MAX_CACHED)]:
        del index.derived[old]
    index.derived[key] = cal
    return cal


#: the most photos of a whitened catalogue calibrated fold by fold (:func:`_scores`)
MAX_WHITENED_PHOTOS = 100_000


def _scores(index: CatalogueIndex, score: str) -> dict[str, CalibrationScores]:
    """The calibration scores of ``index`` for ``score``, by score name: for a whitened one, of
    every open-set score at once (its cost is the fold fits), each photo in a whitening fitted
    without its article's fold (:func:`fewshot.catalogue.whitened.whitened_calibration_scores`,
    from the model's embeddings the index keeps); above :data:`MAX_WHITENED_PHOTOS` photos, or
    when a fold cannot be fitted, in the index's own whitening, with a warning that the threshold
    is then not its target (on Grocery: 3.1% false accepts for 5%).

    Raises:
        DataError: too few articles to calibrate (:func:`calibration_scores`)."""
    if index.whitening is None:
        return {score: calibration_scores(index, score=score)}
    check_calibratable(index)  # too few articles: no threshold at all, whitened or not
    if len(index) > MAX_WHITENED_PHOTOS:
        log.warning("the whitened catalogue has %d photos, more than the %d calibrated fold by fold: its reject "
                    "threshold comes from its own whitening, which has seen every article, so its false-accept "
                    "rate is not its target (on Grocery 3.1%% for 5%%)", len(index), MAX_WHITENED_PHOTOS)
        return {score: calibration_scores(index, score=score)}
    from .whitened import whitened_calibration_scores

    vectors = index.embedding_rows(0, len(index))
    try:
        return whitened_calibration_scores(vectors, index.labels, index.groups, OPEN_SCORES.names(),
                                           digests=index.digests, prior=index.whitening.prior)
    except DataError as e:  # articles removed since the build: a fold's other articles cannot be fitted
        log.warning("the whitened catalogue cannot be calibrated fold by fold (%s): its reject threshold comes from "
                    "its own whitening, which has seen every article, so its false-accept rate is not its target",
                    e.message)
        return {score: calibration_scores(index, score=score)}


#: the file of an index folder that records its calibration (for the default score and target)
CALIBRATION_FILE = "calibration.json"
#: a larger calibration file is not read (the record is a few kB)
MAX_CALIBRATION_BYTES = 1 << 20


def _digest(index: CatalogueIndex, record: dict, folder: Path) -> str:
    """SHA-256 of a calibration record and of the index it was made for (its articles, and the
    file of the sums of their vectors, which a save writes first: the sums in memory are not
    always bit for bit those read back): a record edited by hand, or copied from another index,
    does not match.

    Raises:
        OSError: the folder has no ``prototype_sums.npy`` (a format-1 folder)."""
    h = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    h.update(json.dumps([len(index.labels), index.articles]).encode())
    with open(folder / "prototype_sums.npy", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if index.whitening is not None:  # the threshold was made in this whitening
        for array in index.whitening.to_arrays().values():
            h.update(array.tobytes())
    return h.hexdigest()


def write_calibration(index: CatalogueIndex, folder: Path) -> dict:
    """Calibrate ``index`` for the default score and target (:func:`cached_calibration`) and
    record it in ``folder/calibration.json``: the thresholds and the score histograms, or why
    the catalogue cannot be calibrated, with the digest :func:`read_calibration` checks.
    Returns the record."""
    try:
        record = {"calibrated": True, **cached_calibration(index, DEFAULT_TARGET_FAR, DEFAULT_SCORE).as_dict()}
    except DataError as e:
        record = {"calibrated": False, "reason": e.message, "score": DEFAULT_SCORE, "target_far": DEFAULT_TARGET_FAR}
    record["digest"] = _digest(index, record, folder)
    (folder / CALIBRATION_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def read_calibration(index: CatalogueIndex, folder: Path) -> Calibration | None:
    """The calibration recorded in ``folder/calibration.json`` for ``index`` as saved there, kept
    in ``index.derived`` (so a loaded catalogue does not calibrate again until it changes);
    ``None`` when there is none, it cannot be read, or its digest does not match this index and
    record (edited by hand, copied from another index): it is then computed when needed."""
    try:
        file = folder / CALIBRATION_FILE
        if file.stat().st_size > MAX_CALIBRATION_BYTES:
            return None
        record = json.loads(file.read_text(encoding="utf-8"))
        digest = record.pop("digest")
        if digest != _digest(index, record, folder) or not record.pop("calibrated"):
            return None
        cal = Calibration(**{f.name: record[f.name] for f in fields(Calibration) if f.name in record})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    index.derived[_cache_key(cal.score, cal.target_far)] = cal
    return cal


def prediction_arrays(predictions: Sequence[Sequence[Prediction]]) -> tuple[np.ndarray, np.ndarray]:
    """``(top float32 [Q, m], groups object [Q, m])`` of ranked predictions (``m >= 2``; ``-inf`` /
    ``None`` pad): the input of :func:`fewshot.catalogue.scores.open_scores`."""
    m = max(2, max((len(p) for p in predictions), default=0))
    top = np.full((len(predictions), m), -np.inf, np.float32)
    groups = np.full((len(predictions), m), None, object)
    for r, preds in enumerate(predictions):
        top[r, :len(preds)] = [p.score for p in preds]
        groups[r, :len(preds)] = [p.group for p in preds]
    return top, groups


def answers(rejector: Rejector, predictions: Sequence[Sequence[Prediction]],
            rivals: np.ndarray | None = None) -> list[Answer]:
    """The answer for each photo from its ranked predictions (at least ``SCORE_DEPTH`` when the
    catalogue has that many articles: the scores read them) and its best rival cosine
    (``rivals float32 [Q]``, :func:`fewshot.catalogue.calibrate.rival_cosines`; ``None``: none),
    which the calibration counted too."""
    if not predictions:
        return []
    top, groups = prediction_arrays(predictions)
    scores = open_scores(with_rivals(top, rivals), rejector.score)
    cal = rejector.calibration
    brand_ok = np.zeros(len(top), bool)
    if cal is not None and cal.brand_threshold is not None:
        brand_ok = brand_scores(top, groups) >= cal.brand_threshold
    out = []
    for preds, s, named in zip(predictions, scores, brand_ok):
        best = preds[0] if preds else None
        a = Answer(best.label if best else UNKNOWN, float(s), rejector.score, rejector.threshold,
                   cal.target_far if cal else None)
        if a.unknown:
            a = Answer(UNKNOWN, a.score, a.score_name, a.threshold, a.target_far,
                       best.group if (named and best and best.group) else None)
        out.append(a)
    return out

