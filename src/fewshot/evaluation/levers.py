"""The ranking levers of an evaluation (issue 30): re-ranking the gallery, transductive episodes.

:func:`check_levers` refuses settings that do not apply before anything is embedded;
:func:`ranked_report` gives the retrieval metrics of the (re-ranked) gallery ranking;
:func:`episode_inputs` the episode classifier and vectors of the ``transductive`` setting.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np

from ..embed import Embeddings
from ..errors import FewshotError, InputError
from ..index.vectors import l2_normalize
from ..index.rerank import RerankOptions, rerank_scores, rerank_vectors
from ..methods.transductive import TRANSDUCTIVE, centre, transductive_classifier
from ..metrics import RetrievalReport, ranking_metrics, retrieval_metrics
from ..model import EpisodeClassifier

__all__ = ["TRANSDUCTIVE_CHOICES", "adapts", "check_levers", "ranked_report", "episode_inputs"]

#: ``transductive`` settings of an evaluation: the classifiers, and ``centre`` (SimpleShot's centring)
TRANSDUCTIVE_CHOICES = ("none", "centre", *TRANSDUCTIVE[1:])


def check_levers(rerank: Any, transductive: str, query_imbalance: float | None, *, gallery: bool,
                 model_classifier: bool, whiten: bool = False) -> RerankOptions:
    """The checked re-ranking options; refuses levers where they do not apply.

    Args:
        gallery: whether the evaluation has a gallery (``False``: leave-one-out within the queries).
        model_classifier: whether the model's episode classifier adapts to each task (MAML's,
            marked ``adapts``; :func:`adapts`); a prototype classifier (protonet's) may be replaced.
        whiten: whether the gallery is to be whitened (:mod:`fewshot.index.whiten`), which needs one.

    Raises:
        InputError / FewshotError: naming ``rerank``, ``transductive``, ``query_imbalance`` or ``whiten``.
    """
    try:
        opts = RerankOptions.from_value(rerank)
    except FewshotError as exc:
        raise InputError(exc.message, hint=exc.hint, options=("rerank", *exc.options)) from None
    if opts.kind != "none" and not gallery:
        raise InputError(f"rerank={opts.kind!r} re-ranks a gallery, and this evaluation is leave-one-out within "
                         "one set of images", hint="pass split_file (queries against a gallery), or rerank='none'",
                         options=("rerank", "split_file"))
    if whiten and not gallery:
        raise InputError("whiten=True fits the whitening on a gallery's labelled photos, and this evaluation is "
                         "leave-one-out within one set of images",
                         hint="pass split_file (queries against a gallery), or leave whiten off",
                         options=("whiten", "split_file"))
    if transductive not in TRANSDUCTIVE_CHOICES:
        raise InputError(f"unknown option transductive = {transductive!r}",
                         hint=f"use one of: {', '.join(TRANSDUCTIVE_CHOICES)}", options=("transductive",))
    if transductive != "none" and model_classifier:
        raise InputError(f"transductive={transductive!r} replaces the episode classifier, and this model's adapts "
                         "to each task (a MAML run)", hint="leave transductive='none' for a MAML run",
                         options=("transductive",))
    if query_imbalance is not None and (isinstance(query_imbalance, bool) or not isinstance(query_imbalance, Real)
                                        or not (query_imbalance > 0 and np.isfinite(query_imbalance))):
        raise InputError(f"query_imbalance = {query_imbalance!r} is not a positive number",
                         hint="use e.g. query_imbalance=2 (Dirichlet concentration; smaller is more imbalanced)",
                         options=("query_imbalance",))
    return opts


def adapts(classifier: EpisodeClassifier | None) -> bool:
    """Whether an episode classifier adapts to each task (MAML's), so no transductive one may replace it."""
    return bool(getattr(classifier, "adapts", False))


def ranked_report(rerank: RerankOptions, q: Embeddings, g: Embeddings | None) -> RetrievalReport:
    """Retrieval metrics of the gallery ranking, re-ranked by ``rerank`` (``g`` ``None``: leave-one-out).
    The vector re-rankings go through the chunked :func:`retrieval_metrics`; k-reciprocal's
    ``[Q, G]`` distances (at most :data:`~fewshot.index.rerank.MAX_K_RECIPROCAL` images) through
    :func:`ranking_metrics`."""
    if rerank.kind == "none" or g is None:
        return retrieval_metrics(q.vectors, q.labels, g.vectors if g else None, g.labels if g else None,
                                 query_groups=q.groups)
    if rerank.kind == "k-reciprocal":
        return ranking_metrics(rerank_scores(q.vectors, g.vectors, rerank), q.labels, g.labels,
                               query_groups=q.groups)
    qv, gv = rerank_vectors(q.vectors, g.vectors, rerank)
    return retrieval_metrics(qv, q.labels, gv, g.labels, query_groups=q.groups)


def episode_inputs(transductive: str, model_classifier: EpisodeClassifier | None, support: np.ndarray,
                   queries: np.ndarray | None) -> tuple[EpisodeClassifier | None, np.ndarray, np.ndarray | None]:
    """``(classifier, support vectors, query vectors)`` for the episodes: ``centre`` centres both
    on the support pool's (the catalogue's) mean of unit vectors; the others pick the classifier."""
    if transductive == "centre":
        mean = l2_normalize(support).mean(axis=0)
        return None, centre(support, mean), None if queries is None else centre(queries, mean)
    if transductive == "none":
        return model_classifier, support, queries
    return transductive_classifier(transductive), support, queries
