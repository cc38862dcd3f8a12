"""Evaluation metrics: retrieval (mAP, MAP@R, Precision@1, Recall@k), episodic accuracy and open set.

Parts: :mod:`.retrieval` (the metrics and exact nearest neighbours), :mod:`.ranking` (the ranks
of relevant items), :mod:`.retrieval_report` (``RetrievalReport``), :mod:`.episodic`,
:mod:`.openset` (AUROC, FPR@95TPR, the threshold for a false-accept rate, the OSCR curve).
"""

from fewshot.metrics.episodic import (
    MIN_EPISODES_FOR_CI,
    EpisodicResult,
    episodic_accuracy,
    episodic_by_group,
    format_accuracy,
    prototype_classifier,
)
from fewshot.metrics.openset import OpenSetReport, openset_metrics, oscr_curve, threshold_for_far
from fewshot.metrics.retrieval import nearest_neighbors, ranking_metrics, retrieval_metrics
from fewshot.metrics.retrieval_report import RetrievalReport

__all__ = [
    "EpisodicResult",
    "MIN_EPISODES_FOR_CI",
    "format_accuracy",
    "OpenSetReport",
    "RetrievalReport",
    "episodic_accuracy",
    "episodic_by_group",
    "nearest_neighbors",
    "openset_metrics",
    "oscr_curve",
    "prototype_classifier",
    "ranking_metrics",
    "retrieval_metrics",
    "threshold_for_far",
]
