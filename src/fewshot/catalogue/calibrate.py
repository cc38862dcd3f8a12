"""Calibration of a reject threshold from the catalogue alone.

A photo whose article is absent from the catalogue still gets an open-set score
(:mod:`fewshot.catalogue.scores`); the question is which score is too low to trust. The
catalogue answers it without any other photos, from its own photos (at most ``max_photos`` of
them, drawn at random with ``seed`` in a large catalogue):

* **absent scores** (leave one article out): each photo scored against every prototype but its
  own article's, as a photo of an article the catalogue does not hold but whose brand it may
  hold (``by="group"``: its whole brand left out too);
* **present scores** (leave one photo out): each photo scored against every prototype, its own
  article's recomputed without it (single-photo articles give none).

Leaving out one article at a time keeps the competition a photo meets at classify time: all the
other articles (with 5 folds of articles, each photo met only 4/5 of them and the threshold came
out low: 10.3% false accepts for a 5% target on Grocery's frozen protocol, 9.5% with one
article out, 4.1% with the ``relative`` score).

**Brands** are calibrated the same way when the catalogue has ``MIN_BRANDS`` or more: a photo
with its article left out is a photo of an unknown article of a known brand (brand present);
with its whole brand left out, of an unknown brand (brand absent). :func:`calibrate` returns both
thresholds and what they accept as a :class:`Calibration`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import DataError
from ..index import CatalogueIndex
from ..index.vectors import l2_normalize
from ..metrics.openset import threshold_for_far
from .scores import DEFAULT_SCORE, brand_scores, open_scores, top_scores, with_rivals

log = logging.getLogger("fewshot")

__all__ = ["Calibration", "CalibrationScores", "calibrate", "rival_cosines", "kept_rivals", "SAME_ARTICLE_COSINE", "calibration_from", "calibration_scores", "check_calibratable", "MIN_ARTICLES", "MIN_BRANDS",
           "MAX_PHOTOS", "HISTOGRAM_BINS"]

#: the fewest articles (or brands, with ``by="group"``) a catalogue needs to be calibrated
MIN_ARTICLES = 6
#: the fewest brands for a brand threshold (fewer: no brand is named)
MIN_BRANDS = 3
#: the most catalogue photos scored (a seeded sample of a larger catalogue)
MAX_PHOTOS = 20_000
#: photos scored together (their cosines to every prototype are held at once)
CHUNK = 512
#: bins of the stored score histograms
HISTOGRAM_BINS = 40


@dataclass
class CalibrationScores:
    """The scores a calibration is made from, each ``float64 [n]``.

    ``present`` / ``absent``: article scores of catalogue photos with their own photo / their
    whole article left out; ``brand_present`` (article left out, brand kept) with ``brand_right``
    (``bool``: the best article is of the photo's brand) and ``brand_absent`` (brand left out):
    brand scores, empty when the catalogue has fewer than :data:`MIN_BRANDS` brands."""

    present: np.ndarray
    absent: np.ndarray
    brand_present: np.ndarray = field(default_factory=lambda: np.zeros(0))
    brand_right: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    brand_absent: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass(frozen=True)
class Calibration:
    """Reject thresholds of one catalogue for one open-set score, and what they were made from.

    ``threshold``: accept a photo's best article when its score is at least this;
    ``target_far``: the share of absent-article scores it accepts at most; ``present_accepted``:
    the share of the catalogue's own photos (left out in turn) it accepts; ``brand_threshold``:
    name the brand of a rejected photo when its brand score is at least this (``None``: too few
    brands); ``brand_accepted`` / ``brand_precision``: of the photos of left-out articles of a
    kept brand, the share given a brand, and the share of those given the right one;
    ``histograms``: the score distributions (``edges`` and counts per kind of score)."""

    score: str
    threshold: float
    target_far: float
    present_accepted: float
    num_present: int
    num_absent: int
    by: str
    seed: int
    brand_threshold: float | None = None
    brand_accepted: float | None = None
    brand_precision: float | None = None
    histograms: dict = field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: the score, the threshold, its target and what it accepts."""
        brand = "" if self.brand_threshold is None else f"; brand threshold {self.brand_threshold:.4f}"
        return (f"{self.score} score >= {self.threshold:.4f} (calibrated for {self.target_far * 100:g}% false accepts "
                f"on {self.num_absent} photos of left-out articles; accepts {self.present_accepted:.0%} of "
                f"{self.num_present} catalogue photos{brand})")


#: a rival at least this near (whitened cosine) a catalogue article's prototype is taken for that
#: article under another name (the run's own photos of it enrolled again: about 0.99) and left
#: out. Different articles come near too: Grocery's Orange and the training article Satsumas
#: 0.82-0.85, Orange and Red-Grapefruit 0.68-0.80 (default runs, whitened catalogue of the 28 test
#: articles); such a rival is kept, it is the photo's real competitor. The same article under
#: another name with photos of its own is not caught (0.74-0.97 on the validation articles).
SAME_ARTICLE_COSINE = 0.95
#: what :func:`kept_rivals` has said (once per process: calibration folds and evaluation draws
#: build many indexes of the same articles)
_SAID: set[str] = set()


def rival_cosines(index: CatalogueIndex, vectors: np.ndarray, *, stored: bool = False) -> np.ndarray | None:
    """Each photo's best cosine to the rival articles of ``index``'s whitening prior
    (:func:`fewshot.catalogue.scores.with_rivals`), ``float32 [Q]``, or ``None`` when it has none
    (a plain catalogue, no prior, a prior written before 0.11.0). ``vectors float32 [Q, D]``: the
    model's embeddings, or with ``stored`` already as the index stores them (whitened). A rival
    that is one of the catalogue's articles (:func:`kept_rivals`) is left out."""
    whitening = index.whitening
    rivals = kept_rivals(index)
    if rivals is None or not len(rivals) or not len(vectors):
        return None
    x = np.asarray(vectors, np.float32) if stored else whitening.apply(vectors)
    return (x @ rivals.T).max(axis=1)


def kept_rivals(index: CatalogueIndex) -> np.ndarray | None:
    """The whitened rivals of ``index`` (``float32 [B', D]``; ``None``: none) without those named
    like one of its articles (case and spaces aside) or lying at :data:`SAME_ARTICLE_COSINE` or
    nearer one of its prototypes (an enrolled article the run trained on: it would be its own
    rival, and every photo of it rejected); said once per state of the index (kept in
    ``index.derived`` until it changes)."""
    whitening = index.whitening
    rivals = None if whitening is None else whitening.rival_vectors
    if rivals is None:
        return None
    if ("rivals",) not in index.derived:
        counts = np.bincount(index.image_article, minlength=len(index.articles))
        live = [a for a, c in zip(index.articles, counts) if c > 0]
        names = whitening.prior.rival_names or [""] * len(rivals)
        ours = {_plain(a) for a in live}
        near = (rivals @ l2_normalize(index.prototype_sums(0, len(index.articles))[counts > 0]).T).max(axis=1, initial=-1.0)
        out = np.array([_plain(n) in ours for n in names]) | (near >= SAME_ARTICLE_COSINE)
        shown = ", ".join(n or "?" for n in np.array(names, dtype=object)[out][:3]) + (" ..." if out.sum() > 3 else "")
        message = (f"{int(out.sum())} of the run's {len(rivals)} rival articles are left out of the open-set scores: "
                   f"they are articles of the catalogue (by name, or a mean at cosine {SAME_ARTICLE_COSINE:.2f} or more "
                   f"of one of its articles): {shown}")
        if out.any() and message not in _SAID:
            _SAID.add(message)
            log.warning(message)
        index.derived[("rivals",)] = rivals[~out]
    return index.derived[("rivals",)]


def _plain(name: str) -> str:
    """An article name compared without case or surrounding and repeated spaces."""
    return " ".join(str(name).split()).casefold()


def _sample(index: CatalogueIndex, max_photos: int, seed: int) -> np.ndarray:
    n = len(index.labels)
    return np.arange(n) if n <= max_photos else np.sort(np.random.default_rng(seed).choice(n, max_photos, False))


def _brand_codes(index: CatalogueIndex) -> np.ndarray:
    """A code per article for its brand; an article without one is its own brand."""
    names = [g if g is not None else f"\0{a}" for a, g in zip(index.articles, index.article_groups)]
    return np.unique(names, return_inverse=True)[1]


def _check(by: str, counts: np.ndarray, brand: np.ndarray) -> None:
    if by not in ("article", "group"):
        raise DataError(f"unknown calibration unit {by!r}", hint="use by='article' or by='group'")
    units = len(np.unique(brand[counts > 0])) if by == "group" else int((counts > 0).sum())
    if units < MIN_ARTICLES:
        raise DataError(f"the catalogue has {units} {by}s: too few to calibrate a reject threshold "
                        f"(at least {MIN_ARTICLES} are needed)",
                        hint="add articles, or classify without a reject threshold (reject='none')")


def check_calibratable(index: CatalogueIndex, by: str = "article") -> None:
    """Refuse a catalogue too small to calibrate (fewer than :data:`MIN_ARTICLES` articles, or
    brands with ``by="group"``) before any score is computed.

    Raises:
        DataError: as :func:`calibration_scores`.
    """
    _check(by, np.bincount(index.image_article, minlength=len(index.articles)), _brand_codes(index))


def calibration_scores(index: CatalogueIndex, *, score: str = DEFAULT_SCORE, by: str = "article",
                       max_photos: int = MAX_PHOTOS, seed: int = 0,
                       rows: np.ndarray | None = None) -> CalibrationScores:
    """The scores of the catalogue's own photos with their photo, article or brand left out
    (module docstring); ``rows``: score only these catalogue positions (sorted; default: all, or
    a seeded sample of ``max_photos``).

    Raises:
        DataError: fewer than :data:`MIN_ARTICLES` articles (brands with ``by="group"``);
            ``by`` not article / group. InputError: an unknown ``score``.
    """
    counts = np.bincount(index.image_article, minlength=len(index.articles))
    brand = _brand_codes(index)
    _check(by, counts, brand)
    sums = index.prototype_sums(0, len(index.articles))  # the index's own, float32 [C, D]
    protos = l2_normalize(sums)
    groups = np.array(index.article_groups, object)
    with_brands = len(np.unique(brand[counts > 0])) >= MIN_BRANDS and any(g is not None for g in groups)
    parts: dict[str, list] = {k: [] for k in ("present", "absent", "brand_present", "brand_right", "brand_absent")}
    rows = _sample(index, max_photos, seed) if rows is None else np.asarray(rows, np.int64)
    for start in range(0, len(rows), CHUNK):
        pos = rows[start:start + CHUNK]
        x = _rows(index, pos)
        own = index.image_article[pos]
        sims = x @ protos.T
        sims[:, counts == 0] = -np.inf  # a removed article keeps its row, without a photo
        r = np.arange(len(pos))
        same_brand = brand[own][:, None] == brand[None, :]
        absent = sims.copy()
        absent[same_brand if by == "group" else (r, own)] = -np.inf
        rivals = rival_cosines(index, x, stored=True)
        parts["absent"].append(open_scores(with_rivals(top_scores(absent), rivals), score))
        keep = counts[own] > 1
        loo = l2_normalize(sums[own[keep]] - x[keep])  # own article's prototype without the photo
        present = sims[keep].copy()
        present[np.arange(keep.sum()), own[keep]] = (loo * x[keep]).sum(1)
        parts["present"].append(open_scores(with_rivals(top_scores(present), None if rivals is None else rivals[keep]),
                                            score))
        if with_brands:
            _brand_parts(parts, sims, own, same_brand, counts, groups)
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    out["brand_right"] = out["brand_right"].astype(bool)
    return CalibrationScores(**out)


def _rows(index: CatalogueIndex, positions: np.ndarray) -> np.ndarray:
    """The stored vectors of catalogue positions ``positions`` (sorted), ``float32 [n, D]``."""
    return index.vector_rows(int(positions[0]), int(positions[-1]) + 1)[positions - positions[0]]


def _brand_parts(parts: dict, sims: np.ndarray, own: np.ndarray, same_brand: np.ndarray, counts: np.ndarray,
                 groups: np.ndarray) -> None:
    """Brand scores of one chunk: its article left out (kept brand), its brand left out."""
    r = np.arange(len(own))
    others_of_brand = (same_brand & (counts[None, :] > 0)).sum(1) - 1  # the brand's other articles
    kept = sims.copy()
    kept[r, own] = -np.inf
    kept = kept[(others_of_brand > 0) & (groups[own] != None)]  # noqa: E711
    kept_own = own[(others_of_brand > 0) & (groups[own] != None)]  # noqa: E711
    if len(kept):
        top, arg = _top_with_articles(kept)
        parts["brand_present"].append(brand_scores(top, groups[arg]))
        parts["brand_right"].append(groups[arg[:, 0]] == groups[kept_own])
    gone = sims.copy()
    gone[same_brand] = -np.inf
    top, arg = _top_with_articles(gone)
    parts["brand_absent"].append(brand_scores(top, groups[arg]))


def _top_with_articles(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best cosines of each row (``[Q, m]``, best first) and their articles (``int [Q, m]``)."""
    top = top_scores(sims)
    arg = np.argsort(-sims, axis=1, kind="stable")[:, :top.shape[1]]
    return top, arg


def _histograms(scores: CalibrationScores) -> dict:
    """Counts of each kind of score on shared bins (for the stored record and the report)."""
    kinds = {k: v for k, v in vars(scores).items() if k != "brand_right" and len(v)}
    finite = np.concatenate([v[np.isfinite(v)] for v in kinds.values()])
    edges = np.histogram_bin_edges(finite, HISTOGRAM_BINS) if len(finite) else np.zeros(0)
    return {"edges": edges.round(6).tolist(),
            **{k: np.histogram(v[np.isfinite(v)], edges)[0].tolist() for k, v in kinds.items()}}


def calibrate(index: CatalogueIndex, target_far: float = 0.05, *, score: str = DEFAULT_SCORE, by: str = "article",
              max_photos: int = MAX_PHOTOS, seed: int = 0) -> Calibration:
    """The reject thresholds of ``index`` for a target false-accept rate (:func:`calibration_scores`).

    Raises:
        DataError: the catalogue is too small to calibrate, or has no article with two photos.
        InputError: ``target_far`` outside ``[0, 1)``; an unknown ``score``.
    """
    s = calibration_scores(index, score=score, by=by, max_photos=max_photos, seed=seed)
    return calibration_from(s, target_far, score=score, by=by, seed=seed)


def calibration_from(s: CalibrationScores, target_far: float, *, score: str = DEFAULT_SCORE, by: str = "article",
                     seed: int = 0) -> Calibration:
    """The thresholds for ``target_far`` from scores :func:`calibration_scores` made (cheap: a
    sort; the scores do not depend on the target).

    Raises:
        DataError: no present score (no article with two photos). InputError: a bad ``target_far``.
    """
    if not len(s.present):
        raise DataError("no article of the catalogue has two photos: nothing to calibrate the present scores on",
                        hint="add a second photo to some articles, or classify without a reject threshold")
    threshold = threshold_for_far(s.absent, target_far)
    brand = {}
    if len(s.brand_absent) and len(s.brand_present):
        t = threshold_for_far(s.brand_absent, target_far)
        named = s.brand_present >= t
        brand = dict(brand_threshold=t, brand_accepted=float(named.mean()),
                     brand_precision=float(s.brand_right[named].mean()) if named.any() else None)
    return Calibration(score=score, threshold=threshold, target_far=target_far,
                       present_accepted=float((s.present >= threshold).mean()), num_present=len(s.present),
                       num_absent=len(s.absent), by=by, seed=seed, histograms=_histograms(s), **brand)
