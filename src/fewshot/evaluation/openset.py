"""Open-set evaluation (issue 29): how well a catalogue tells photos of its own articles from
photos of articles it does not hold, on a class-disjoint split.

The protocol (the one of the reference probe ``shared/tools/openset_probe.py``): the classes of
the split's part (``classes``, in the split file's order) are halved at random ``draws`` times,
``rng = np.random.default_rng(seed)`` and per draw ``known = sorted(rng.permutation(classes)[:n // 2])``,
into *known* articles, whose gallery photos make the catalogue, and *absent* articles; the
queries are the query photos of all of them. Each draw runs the product path of ``fewshot classify
--reject auto``: a :class:`~fewshot.index.CatalogueIndex` of the known articles' gallery photos,
its reject threshold calibrated on the catalogue alone (:func:`fewshot.catalogue.reject.Rejector.for_index`,
for each registered score), the queries classified with ``top_k=SCORE_DEPTH`` and answered by
:func:`fewshot.catalogue.reject.answers`.

Measured per draw, then summarised over the draws (mean, population sd, min, max; a value a draw
cannot define, e.g. a precision of nothing named, is left out of its summary):

* every score (the registered open-set scores, and ``knn1`` / ``knn5``: the cosine of the k-th
  nearest catalogue image, the k-NN score of Sun et al. 2022): AUROC and FPR@95TPR
  (:func:`fewshot.metrics.openset.openset_metrics`), and its ROC and OSCR curves (Dhamija et al.
  2018) on the common false-accept grid :data:`FPR_GRID`, averaged over the draws vertically: at
  each grid value, the mean over draws of the best true-accept rate (ROC) or correct-and-accepted
  rate (OSCR) reached at a false-accept rate at most that value;
* every registered score at its calibrated threshold (the operating point): the realised
  false-accept rate on absent photos, the share of known photos accepted, and accepted with the
  right article, the share of the catalogue's own photos the calibration accepted;
* the top-1 accuracy of known photos (best prototype);
* the brand fallback of each registered score: of the absent-article photos whose brand has
  articles in the catalogue, the share given a brand ("unknown article, brand X") and the share
  of those given the right one (also pooled over draws); of the absent photos of brands the
  catalogue lacks, the share given a brand (always wrong);
* per brand of the query, for the default score: AUROC (mean over the draws where the brand has
  both known and absent photos), realised false-accept rate and known accepted-and-right, pooled
  over draws (photos accepted / photos).

With ``whiten=True`` each draw's catalogue is built as ``fewshot index --whiten`` builds one: a
:class:`~fewshot.index.CatalogueIndex` holding a whitening fitted on that catalogue's photos alone
(:mod:`fewshot.index.whiten`), which whitens the queries too; classification, calibration and
every score then happen in the whitened space, and the thresholds come from
:func:`fewshot.catalogue.whitened.whitened_calibration_scores` (photos scored in fits made
without their article).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..catalogue.calibrate import MIN_ARTICLES, rival_cosines
from ..catalogue.reject import DEFAULT_TARGET_FAR, Rejector, answers, check_target_far, prediction_arrays
from ..catalogue.scores import DEFAULT_SCORE, OPEN_SCORES, SCORE_DEPTH, open_scores, with_rivals
from ..catalogue.whitened import WHITEN_FOLDS, check_whitenable
from ..index.whiten import WithinStats, fit_whitening
from ..checks import as_embeddings, as_list, positive_int
from ..errors import DataError, InputError
from ..index import CatalogueIndex
from ..metrics.openset import openset_metrics, oscr_curve

__all__ = ["evaluate_open_set", "draw_known", "usable_classes", "KNN_K", "FPR_GRID", "DEFAULT_DRAWS",
           "NO_BRAND", "stats"]

log = logging.getLogger("fewshot")

DEFAULT_DRAWS = 20
#: the k of the k-NN image scores (``knn1``, ``knn5``)
KNN_K = (1, 5)
#: the false-accept rates the averaged ROC and OSCR curves are read at
FPR_GRID = np.unique(np.r_[np.linspace(0.0, 1.0, 101), np.geomspace(1e-3, 1e-2, 7)])
#: the per-brand key of photos without a brand
NO_BRAND = "(no brand)"


def draw_known(classes: Sequence[str], draws: int, seed: int) -> list[list[str]]:
    """The known articles of each draw: ``sorted(rng.permutation(classes)[:len(classes) // 2])``
    with one ``numpy.random.default_rng(seed)`` for all draws (the reference probe's rule)."""
    rng = np.random.default_rng(seed)
    pool = np.array(list(classes), dtype=object)
    return [sorted(str(c) for c in rng.permutation(pool)[: len(pool) // 2]) for _ in range(draws)]


def usable_classes(classes: Sequence[str], gallery_labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(kept, dropped)``: the ``classes`` (order kept) with gallery photos, and those without
    (as known articles they would have nothing in the catalogue)."""
    have = set(gallery_labels)
    kept = [c for c in classes if c in have]
    return kept, [c for c in classes if c not in have]


def stats(values: Sequence[float]) -> dict:
    """``{mean, sd, min, max, draws}`` of the finite ``values`` (sd: population, ``ddof=0``);
    ``None`` figures when none is finite."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": None, "sd": None, "min": None, "max": None, "draws": 0}
    return {"mean": float(v.mean()), "sd": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "draws": int(len(v))}


def _share(mask: np.ndarray, of: np.ndarray) -> float:
    """``mean(mask[of])``, NaN when ``of`` selects nothing."""
    return float(mask[of].mean()) if of.any() else float("nan")


@dataclass
class _Sets:
    """The checked inputs: query rows of the classes, the gallery, the groups as object arrays."""

    q: np.ndarray
    q_labels: np.ndarray
    q_groups: np.ndarray
    g: np.ndarray
    g_labels: np.ndarray
    g_groups: np.ndarray
    classes: list[str]
    dropped: list[str] = field(default_factory=list)
    g_digests: np.ndarray | None = None  # the SHA-256 of each gallery photo's file (None: not known)


@dataclass
class _Draw:
    """One draw's raw results: per query, whether its article is known, whether its best article
    is right; each score (``float64 [Q]``); per registered score its threshold, what the catalogue's
    calibration accepted, and per query accepted / accepted-and-right / brand named / brand right."""

    known: list[str]
    is_known: np.ndarray
    right: np.ndarray
    groups: np.ndarray  # the brand of each query (``None``: none)
    known_brand: np.ndarray  # the query's brand has articles in the catalogue
    scores: dict[str, np.ndarray]
    thresholds: dict[str, float] = field(default_factory=dict)
    catalogue_accepted: dict[str, float] = field(default_factory=dict)
    decided: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _inputs(query_vectors, query_labels, query_groups, gallery_vectors, gallery_labels, gallery_groups,
            classes, gallery_digests=None) -> _Sets:
    q = as_embeddings(query_vectors, "query_vectors")
    g = as_embeddings(gallery_vectors, "gallery_vectors")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_vectors have dimension {q.shape[1]}, gallery_vectors {g.shape[1]}")
    ql = np.array([str(x) for x in as_list(query_labels, len(q), "query_labels")], dtype=object)
    qg = np.array(as_list(query_groups, len(q), "query_groups", "groups"), dtype=object)
    gl = np.array([str(x) for x in as_list(gallery_labels, len(g), "gallery_labels")], dtype=object)
    gg = np.array(as_list(gallery_groups, len(g), "gallery_groups", "groups"), dtype=object)
    kept, dropped = usable_classes([str(c) for c in as_list(classes, None, "classes")], gl.tolist())
    if dropped:
        log.warning("open set: %d class(es) have no gallery photo and are left out of the draws: %s",
                    len(dropped), ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
    if len(kept) // 2 < MIN_ARTICLES:
        raise DataError(f"open-set evaluation needs at least {2 * MIN_ARTICLES} articles with gallery photos "
                        f"(half of them known, and a catalogue of {MIN_ARTICLES} or more to calibrate its reject "
                        f"threshold), got {len(kept)}",
                        hint="evaluate a larger part of the split (e.g. split='test'), or make a split with more "
                             "articles in it (fewshot split --fractions)")
    rows = np.isin(ql, kept)
    if not rows.any():
        raise DataError("no query photo belongs to the classes of the open-set protocol",
                        hint="check that the queries and the split file are of the same dataset")
    gal = np.isin(gl, kept)
    gd = None if gallery_digests is None else np.array(as_list(gallery_digests, len(g), "gallery_digests", "digests"),
                                                       dtype=object)[gal]
    return _Sets(q[rows], ql[rows], qg[rows], g[gal], gl[gal], gg[gal], kept, dropped, gd)


def _knn_scores(index: CatalogueIndex, q: np.ndarray) -> dict[str, np.ndarray]:
    """``knn{k}``: the cosine of each query's k-th nearest catalogue image (the last one found
    when the catalogue has fewer than k images)."""
    found = index.search(q, max(KNN_K))
    out = {}
    for k in KNN_K:
        out[f"knn{k}"] = np.array([row[min(k, len(row)) - 1].score for row in found], dtype=np.float64)
    return out


def _run_draw(s: _Sets, known: list[str], target_far: float, product: list[str], whiten: bool = False,
              prior: WithinStats | None = None) -> _Draw:
    """Build the catalogue of ``known`` (whitened by its own fit with ``whiten``, its thresholds
    then calibrated as :mod:`fewshot.catalogue.whitened` says), classify every query, score and
    answer it."""
    cat = np.isin(s.g_labels, known)
    labels, groups = s.g_labels[cat].tolist(), s.g_groups[cat].tolist()
    paths = [f"gallery:{i}" for i in np.flatnonzero(cat)]
    digests = None if s.g_digests is None else s.g_digests[cat].tolist()
    whitening = None
    if whiten:  # as `fewshot index --whiten` builds it: the queries and the calibration then follow
        try:
            whitening = fit_whitening(s.g[cat], labels, digests, prior)
        except DataError as e:
            raise _whiten_error(known, int(cat.sum()), e) from None
    index = CatalogueIndex.build(s.g[cat], labels, groups, paths, {}, digests=digests, whitening=whitening)
    rejectors = {n: Rejector.for_index(index, "auto", target_far=target_far, score=n, warn=False) for n in product}
    preds = index.classify(s.q, top_k=SCORE_DEPTH)
    rivals = rival_cosines(index, s.q)
    top = with_rivals(prediction_arrays(preds)[0], rivals)
    best = np.array([p[0].label for p in preds], dtype=object)
    brands = {g for g in s.g_groups[cat] if g is not None}
    is_known = np.isin(s.q_labels, known)
    d = _Draw(known=known, is_known=is_known, right=best == s.q_labels, groups=s.q_groups,
              known_brand=np.array([g is not None and g in brands for g in s.q_groups], bool),
              scores={name: open_scores(top, name) for name in product})
    d.scores.update(_knn_scores(index, s.q))
    for name, rejector in rejectors.items():
        if rejector.calibration is None:  # pragma: no cover - the inputs check rules this out
            raise DataError(f"the catalogue of draw {known} could not be calibrated")
        said = answers(rejector, preds, rivals)
        accepted = np.array([not a.unknown for a in said], bool)
        named = np.array([a.brand is not None for a in said], bool)
        d.thresholds[name] = float(rejector.threshold)
        d.catalogue_accepted[name] = rejector.calibration.present_accepted
        d.decided[name] = {"accepted": accepted, "accepted_right": accepted & d.right, "brand_named": named,
                           "brand_right": named & (np.array([a.brand for a in said], dtype=object) == s.q_groups)}
    return d


def _whiten_error(known: list[str], photos: int, e: DataError) -> DataError:
    """The error of a draw whose catalogue, or one of its calibration folds, cannot be whitened."""
    return DataError(f"open set with whitening: the catalogue of a draw ({len(known)} known articles, {photos} "
                     f"gallery photos) or one of its {WHITEN_FOLDS} calibration folds cannot be whitened: {e.message}",
                     hint=f"every draw keeps half of the articles and each fold fit all but one {WHITEN_FOLDS}th of "
                          "those: give more articles two or more gallery photos, or leave whiten off",
                     options=("whiten",))


def check_open_set_whitening(classes: Sequence[str], gallery_labels: Sequence[str], draws: int, seed: int) -> None:
    """Refuse, from the labels alone, an open-set protocol with ``whiten=True`` that a draw's
    catalogue or one of its calibration folds could not fit (:func:`check_whitenable`), before
    anything is embedded; the draws are those :func:`evaluate_open_set` makes.

    Raises:
        DataError: naming the draw, with the fix (``options``: ``whiten``).
    """
    labels = [str(x) for x in gallery_labels]
    for known in draw_known(usable_classes([str(c) for c in classes], labels)[0], draws, seed):
        kept = set(known)
        mine = [x for x in labels if x in kept]
        try:
            check_whitenable(mine)
        except DataError as e:
            raise _whiten_error(known, len(mine), e) from None


def _on_grid(fpr: np.ndarray, y: np.ndarray, grid: np.ndarray = FPR_GRID) -> np.ndarray:
    """The best ``y`` reached at a false-accept rate at most each grid value (``fpr`` and ``y``
    non-decreasing, as :func:`oscr_curve` returns them); 0 below the first point."""
    at = np.searchsorted(fpr, grid + 1e-12, side="right") - 1
    return np.where(at >= 0, y[np.maximum(at, 0)], 0.0)


def _score_row(d: _Draw, name: str) -> dict:
    """AUROC, FPR@95TPR, ROC and OSCR on the grid of one score in one draw."""
    sc, k = d.scores[name], d.is_known
    rep = openset_metrics(sc[k], sc[~k])
    fpr, tpr = oscr_curve(sc[k], np.ones(int(k.sum()), bool), sc[~k])
    fpr_c, ccr = oscr_curve(sc[k], d.right[k], sc[~k])
    return {"auroc": rep.auroc, "fpr_at_95tpr": rep.fpr_at_95tpr, "roc": _on_grid(fpr, tpr),
            "oscr": _on_grid(fpr_c, ccr)}


def _operating_row(d: _Draw, name: str) -> dict:
    """What the calibrated threshold of one score did in one draw."""
    x, k = d.decided[name], d.is_known
    absent_kb = ~k & d.known_brand
    absent_ub = ~k & ~d.known_brand & np.array([g is not None for g in d.groups], bool)
    return {"threshold": d.thresholds[name], "realised_far": _share(x["accepted"], ~k),
            "known_accepted": _share(x["accepted"], k), "known_accepted_right": _share(x["accepted_right"], k),
            "catalogue_accepted": d.catalogue_accepted[name],
            "brand_named": _share(x["brand_named"], absent_kb),
            "brand_precision": _share(x["brand_right"], absent_kb & x["brand_named"]),
            "unknown_brand_named": _share(x["brand_named"], absent_ub),
            "counts": {"absent_known_brand": int(absent_kb.sum()), "named": int((absent_kb & x["brand_named"]).sum()),
                       "named_right": int((absent_kb & x["brand_right"]).sum()),
                       "absent_unknown_brand": int(absent_ub.sum()),
                       "unknown_brand_named": int((absent_ub & x["brand_named"]).sum())}}


def _per_brand(draws: list[_Draw], name: str) -> dict:
    """Per brand of the query, for score ``name``: photos, AUROC (mean over the draws where the
    brand has known and absent photos), realised false-accept rate and known accepted-and-right
    (pooled over the draws)."""
    acc: dict[str, dict] = {}
    for d in draws:
        keys = np.array([NO_BRAND if g is None else str(g) for g in d.groups], dtype=object)
        x, sc = d.decided[name], d.scores[name]
        for b in np.unique(keys):
            mine = keys == b
            kn, ab = mine & d.is_known, mine & ~d.is_known
            a = acc.setdefault(str(b), {"known": 0, "absent": 0, "accepted_right": 0, "false_accepts": 0, "auroc": []})
            a["known"] += int(kn.sum())
            a["absent"] += int(ab.sum())
            a["accepted_right"] += int(x["accepted_right"][kn].sum())
            a["false_accepts"] += int(x["accepted"][ab].sum())
            if kn.any() and ab.any():
                a["auroc"].append(openset_metrics(sc[kn], sc[ab]).auroc)
    return {b: {"known_photos": a["known"], "absent_photos": a["absent"],
                "auroc": stats(a["auroc"])["mean"], "auroc_draws": len(a["auroc"]),
                "realised_far": a["false_accepts"] / a["absent"] if a["absent"] else None,
                "known_accepted_right": a["accepted_right"] / a["known"] if a["known"] else None}
            for b, a in sorted(acc.items())}


def _histogram(draws: list[_Draw], name: str, bins: int = 40) -> dict:
    """Score ``name`` of known and of absent photos, pooled over the draws, on shared bins, with
    the calibrated thresholds of the draws (mean, min, max)."""
    known = np.concatenate([d.scores[name][d.is_known] for d in draws])
    absent = np.concatenate([d.scores[name][~d.is_known] for d in draws])
    both = np.r_[known, absent]
    edges = np.histogram_bin_edges(both[np.isfinite(both)], bins)
    t = [d.thresholds[name] for d in draws]
    return {"score": name, "edges": edges.round(6).tolist(), "known": np.histogram(known, edges)[0].tolist(),
            "absent": np.histogram(absent, edges)[0].tolist(), "threshold": stats(t)}


def _pooled(rows: list[dict]) -> dict:
    """The brand fallback pooled over the draws (photos named / photos), ``None`` for 0 / 0."""
    c = {k: sum(r["counts"][k] for r in rows) for k in rows[0]["counts"]}

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {**c, "brand_named": ratio(c["named"], c["absent_known_brand"]),
            "brand_precision": ratio(c["named_right"], c["named"]),
            "unknown_brand_named": ratio(c["unknown_brand_named"], c["absent_unknown_brand"])}


OPERATING_KEYS = ("threshold", "realised_far", "known_accepted", "known_accepted_right", "catalogue_accepted",
                  "brand_named", "brand_precision", "unknown_brand_named")


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _score_names(scores: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``(all scores, the registered ones)``; raises InputError for an unknown name or no registered one."""

    knn = [f"knn{k}" for k in KNN_K]
    names = list(scores) if scores is not None else [*OPEN_SCORES.names(), *knn]
    unknown = [n for n in names if n not in OPEN_SCORES and n not in knn]
    product = [n for n in names if n in OPEN_SCORES]
    if unknown or not product:
        raise InputError(f"open-set scores {names} " + (f"include unknown {unknown}" if unknown else
                                                         "have none of the catalogue's (it needs one to calibrate)"),
                         hint=f"choose among {', '.join(OPEN_SCORES.names() + knn)}", options=("scores",))
    return list(dict.fromkeys(names)), product


def evaluate_open_set(query_vectors: np.ndarray, query_labels: Sequence[str], query_groups: Sequence[str | None],
                      gallery_vectors: np.ndarray, gallery_labels: Sequence[str],
                      gallery_groups: Sequence[str | None], classes: Sequence[str], *, draws: int = DEFAULT_DRAWS,
                      seed: int = 0, target_far: float = DEFAULT_TARGET_FAR,
                      scores: Sequence[str] | None = None, whiten: bool = False,
                      gallery_digests: Sequence[str | None] | None = None,
                      whiten_prior: WithinStats | None = None) -> dict:
    """The open-set protocol of the module docstring on embeddings already computed.

    Args:
        query_vectors, gallery_vectors: ``float32 [Q, D]`` / ``[G, D]`` (normalised here).
        query_labels, query_groups, gallery_labels, gallery_groups: article and brand (``None``:
            none) of each row. Queries and gallery photos of other classes are ignored.
        classes: the articles to halve, in the split file's order (the draws depend on it); those
            without gallery photos are left out (``protocol.dropped_classes``, with a warning).
        draws, seed: how many random halvings, and the seed of the one generator they share.
        target_far: the false-accept rate the thresholds are calibrated for, in ``(0, 1)``.
        scores: the scores to compare (default: every registered open-set score, then ``knn1`` and
            ``knn5``); the operating point is measured for the registered ones.
        whiten: each draw's catalogue whitened by a fit on its own photos
            (:func:`fewshot.index.whiten.fit_whitening`), the queries with it; absent articles'
            photos never enter the fit.
        whiten_prior: with ``whiten``, the model's whitening prior (its training photos'
            statistics, :mod:`fewshot.index.prior`) pooled into each draw's fit, as
            ``fewshot index --whiten`` pools it.
        gallery_digests: optional SHA-256 of each gallery photo's file, which each draw's
            catalogue keeps as `fewshot index` does (a byte-identical copy counts once in a fit).

    Returns:
        a JSON-ready dict: ``protocol``, ``default_score``, ``scores`` (per score: ``auroc`` and
        ``fpr_at_95tpr`` summaries, ``oscr_area``), ``operating_point`` (per registered score: a
        summary of each of :data:`OPERATING_KEYS`, and ``pooled`` brand counts), ``top1_known``,
        ``per_brand`` (default score), ``curves`` (``fpr_grid``, mean ``roc`` / ``oscr`` per
        score), ``histogram`` (default score) and ``draws`` (each draw's known articles and
        figures). Summaries are ``{mean, sd, min, max, draws}`` over the draws.

    Raises:
        DataError: fewer than ``2 * MIN_ARTICLES`` classes with gallery photos, or no query of them.
        InputError: an unknown score, or none of the registered ones; a bad ``target_far``.
        TypeError / ValueError: bad arrays or lengths, ``draws < 1``, ``seed < 0``.
    """
    draws, seed = positive_int(draws, "draws"), positive_int(seed, "seed", minimum=0)
    far = check_target_far(target_far)
    names, product = _score_names(scores)
    default = DEFAULT_SCORE if DEFAULT_SCORE in product else product[0]
    s = _inputs(query_vectors, query_labels, query_groups, gallery_vectors, gallery_labels, gallery_groups, classes,
                gallery_digests)
    done = [_run_draw(s, known, far, product, whiten, whiten_prior) for known in draw_known(s.classes, draws, seed)]
    by_score = {n: [_score_row(d, n) for d in done] for n in names}
    by_op = {n: [_operating_row(d, n) for d in done] for n in product}
    top1 = [_share(d.right, d.is_known) for d in done]
    curves = {"fpr_grid": FPR_GRID.round(6).tolist(),
              **{c: {n: np.mean([r[c] for r in rows], 0).round(5).tolist() for n, rows in by_score.items()}
                 for c in ("roc", "oscr")}}
    return {
        "protocol": {"classes": len(s.classes), "known_per_draw": len(s.classes) // 2, "draws": draws, "seed": seed,
                     "target_far": far, "queries": int(len(s.q)), "gallery_images": int(len(s.g)),
                     "whiten": bool(whiten),
                     "whiten_prior": whiten_prior.describe() if whiten and whiten_prior is not None else None,
                     "dropped_classes": s.dropped,
                     "summaries": "mean, population sd, min and max over the draws",
                     "curves": "vertical average over the draws on fpr_grid (best rate at a FAR at most each value)"},
        "default_score": default,
        "scores": {n: {"auroc": stats([r["auroc"] for r in rows]),
                       "fpr_at_95tpr": stats([r["fpr_at_95tpr"] for r in rows]),
                       "oscr_area": float(np.trapezoid(curves["oscr"][n], FPR_GRID)),
                       "calibrated": n in product} for n, rows in by_score.items()},
        "operating_point": {n: {**{k: stats([r[k] for r in rows]) for k in OPERATING_KEYS}, "pooled": _pooled(rows)}
                            for n, rows in by_op.items()},
        "top1_known": stats(top1),
        "per_brand": _per_brand(done, default),
        "curves": curves,
        "histogram": _histogram(done, default),
        "draws": [{"known": d.known, "top1_known": _num(t),
                   "auroc": {n: _num(by_score[n][i]["auroc"]) for n in names},
                   "fpr_at_95tpr": {n: _num(by_score[n][i]["fpr_at_95tpr"]) for n in names},
                   **{k: {n: _num(by_op[n][i][k]) for n in product}
                      for k in ("threshold", "realised_far", "known_accepted_right")}}
                  for i, (d, t) in enumerate(zip(done, top1))],
    }
