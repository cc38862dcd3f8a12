"""Evaluation metrics: retrieval (mAP, MAP@R, Precision@1, Recall@k) and episodic accuracy."""

from fewshot.metrics.episodic import (
    MIN_EPISODES_FOR_CI,
    EpisodicResult,
    episodic_accuracy,
    episodic_by_group,
    format_accuracy,
    prototype_classifier,
)
from fewshot.metrics.retrieval import RetrievalReport, nearest_neighbors, retrieval_metrics

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
