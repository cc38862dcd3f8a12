"""Open-set metrics: how well a score separates photos of catalogue articles ("known") from
photos of articles the catalogue does not hold ("unknown", absent).

Every function takes scores where higher means "more likely a catalogue article" (e.g. the best
prototype cosine) as ``float`` arrays ``[N]``:

* :func:`openset_metrics` -> :class:`OpenSetReport`: AUROC (``sklearn.metrics.roc_auc_score``,
  known photos as positives) and FPR@95TPR (the share of unknown photos accepted at the
  threshold that accepts 95% of the known ones, the 5% quantile of their scores).
* :func:`threshold_for_far`: the lowest threshold whose false-accept rate (the share of unknown
  scores at or above it) is at most a target, e.g. 5%.
* :func:`oscr_curve`: the open-set classification rate curve of Dhamija et al. (2018): for each
  threshold, the share of known photos accepted *and* correctly classified (CCR) against the
  share of unknown photos accepted (FPR).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = ["OpenSetReport", "openset_metrics", "oscr_curve", "threshold_for_far", "TPR_FOR_FPR"]

#: the share of known photos accepted at the threshold where FPR@95TPR is read
TPR_FOR_FPR = 0.95


@dataclass(frozen=True)
class OpenSetReport:
    """``auroc``: probability that a known photo scores above an unknown one (ties count half);
    ``fpr_at_95tpr``: share of unknown photos accepted at the threshold that accepts 95% of the
    known ones (``threshold_at_95tpr``); ``num_known`` / ``num_unknown``: the photos scored."""

    auroc: float
    fpr_at_95tpr: float
    threshold_at_95tpr: float
    num_known: int
    num_unknown: int

    def as_dict(self) -> dict:
        return {"auroc": self.auroc, "fpr_at_95tpr": self.fpr_at_95tpr,
                "threshold_at_95tpr": self.threshold_at_95tpr, "num_known": self.num_known,
                "num_unknown": self.num_unknown}


def _scores(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as float64 ``[N]``, N >= 1, all finite."""
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != 1 or len(out) == 0:
        raise InputError(f"{name} must be a non-empty 1-d array of scores, got shape {out.shape}",
                         hint="pass one score per photo")
    if not np.isfinite(out).all():
        raise InputError(f"{name} holds {int((~np.isfinite(out)).sum())} non-finite score(s)",
                         hint="drop the photos whose score is NaN or infinite")
    return out


def openset_metrics(known: np.ndarray, unknown: np.ndarray) -> OpenSetReport:
    """AUROC and FPR@95TPR of a score for "a catalogue article or not".

    Args:
        known: scores ``[K]`` of photos whose article is in the catalogue (higher = more known).
        unknown: scores ``[U]`` of photos whose article is absent.

    Raises:
        InputError: an empty or non-1-d array, or non-finite scores.
    """
    from sklearn.metrics import roc_auc_score

    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    threshold = float(np.quantile(known, 1.0 - TPR_FOR_FPR))
    return OpenSetReport(auroc=float(roc_auc_score(truth, np.r_[known, unknown])),
                         fpr_at_95tpr=float((unknown >= threshold).mean()), threshold_at_95tpr=threshold,
                         num_known=len(known), num_unknown=len(unknown))


def threshold_for_far(unknown: np.ndarray, target_far: float) -> float:
    """The lowest score value ``t`` with ``mean(unknown >= t) <= target_far``: accepting scores at
    or above ``t`` accepts at most that share of the unknown photos (exactly it when the scores allow).

    Args:
        unknown: scores ``[U]`` of photos whose article is absent.
        target_far: the false-accept rate wanted, in ``[0, 1)``.

    Returns:
        a score; above every unknown score (by the smallest step a float64 has) when
        ``target_far * U < 1``.

    Raises:
        InputError: ``target_far`` outside ``[0, 1)``, or bad scores.
    """
    unknown = _scores(unknown, "unknown")
    if not 0.0 <= target_far < 1.0:
        raise InputError(f"target false-accept rate {target_far} is not in [0, 1)", hint="use e.g. 0.05 for 5%")
    allowed = int(np.floor(target_far * len(unknown) + 1e-9))  # unknown photos that may be accepted
    ordered = np.sort(unknown)
    values = np.unique(ordered)
    accepted = len(ordered) - np.searchsorted(ordered, values, side="left")  # scores >= each value
    fits = accepted <= allowed  # False ... False True ... True (fewer accepted as the value grows)
    if not fits.any():  # even the highest score alone is too many (or none may be accepted)
        return float(np.nextafter(ordered[-1], np.inf))
    return float(values[fits.argmax()])


def oscr_curve(known: np.ndarray, known_correct: np.ndarray, unknown: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The open-set classification rate curve (Dhamija et al. 2018, "Reducing Network Agnostophobia").

    Args:
        known: scores ``[K]`` of photos of catalogue articles.
        known_correct: bool ``[K]``, whether each was given the right article.
        unknown: scores ``[U]`` of photos of absent articles.

    Returns:
        ``(fpr, ccr)``, float64 ``[T]`` each, one point per distinct threshold from the highest
        score down (both non-decreasing): the share of unknown photos accepted and the share of
        known photos accepted with the right article.

    Raises:
        InputError: bad scores, or ``known_correct`` not of ``known``'s length.
    """
    known, unknown = _scores(known, "known"), _scores(unknown, "unknown")
    correct = np.asarray(known_correct, dtype=bool)
    if correct.shape != known.shape:
        raise InputError(f"known_correct has shape {correct.shape}, known {known.shape}",
                         hint="pass one True/False per known photo")
    thresholds = np.unique(np.r_[known, unknown])[::-1]
    fpr = (unknown[None, :] >= thresholds[:, None]).mean(1)
    ccr = ((known[None, :] >= thresholds[:, None]) & correct[None, :]).mean(1)
    return fpr, ccr
