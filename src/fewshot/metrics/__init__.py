"""Evaluation metrics: retrieval (mAP, MAP@R, Precision@1, Recall@k) and episodic accuracy.

Parts: :mod:`.retrieval` (the metrics and exact nearest neighbours), :mod:`.ranking` (the ranks
of relevant items), :mod:`.retrieval_report` (``RetrievalReport``), :mod:`.episodic`.
"""

from fewshot.metrics.episodic import (
    MIN_EPISODES_FOR_CI,
    EpisodicResult,
    episodic_accuracy,
    episodic_by_group,
    format_accuracy,
    prototype_classifier,
)
from fewshot.metrics.retrieval import nearest_neighbors, retrieval_metrics
from fewshot.metrics.retrieval_report import RetrievalReport

__all__ = [
    "EpisodicResult",
    "MIN_EPISODES_FOR_CI",
    "format_accuracy",
    "RetrievalReport",
    "episodic_accuracy",
    "episodic_by_group",
    "nearest_neighbors",
    "prototype_classifier",
    "retrieval_metrics",
]
