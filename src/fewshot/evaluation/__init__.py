"""Evaluation: the metrics of a model on a dataset, written as an evaluation folder.

Public API::

    from fewshot.evaluation import EvalConfig, EmbedOptions, evaluate, evaluate_sets, render_report
    from fewshot.evaluation import export_embeddings  # `fewshot embed`

Parts: :mod:`.run` (``fewshot evaluate``: query and gallery sets, embeddings, retrieval and
episodic metrics, the folder it writes), :mod:`.openset` (``fewshot evaluate --open-set``:
:func:`evaluate_open_set`, known / absent articles drawn from a class-disjoint split) and
:mod:`.openset_report` (its report section and PNGs), :mod:`.report` (``report.md``), :mod:`.export`
(``fewshot embed``: the embeddings file, whose format is :mod:`fewshot.embed.export`).
:class:`~fewshot.embed.options.EmbedOptions` (``EvalConfig.embed``) is exported here too.
"""

from ..embed.options import EmbedOptions
from .export import export_embeddings
from .openset import evaluate_open_set
from .report import render_report
from .run import (EPISODE_SETTINGS, EVALUATION_FILES, EvalConfig, check_open_set, episode_metrics, evaluate,
                  evaluate_sets, evaluation_sets, is_evaluation_dir, open_set_metrics, warn_single_image_classes,
                  write_evaluation)

__all__ = ["EPISODE_SETTINGS", "EVALUATION_FILES", "EmbedOptions", "EvalConfig", "check_open_set", "episode_metrics",
           "evaluate", "evaluate_open_set", "evaluate_sets", "evaluation_sets", "export_embeddings",
           "is_evaluation_dir", "open_set_metrics", "render_report", "warn_single_image_classes", "write_evaluation"]
