"""`fewshot evaluate` as a function: retrieval and episodic metrics of a model on a dataset.

:func:`evaluate` picks the query and gallery sets (:mod:`fewshot.data.protocol`), embeds them
(:class:`~fewshot.embed.options.EmbedOptions`), computes the metrics (:mod:`fewshot.metrics`) and
writes the evaluation folder (``metrics.json``, ``report.md`` by :mod:`.report`, and the PNGs of
:mod:`fewshot.viz`) atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data.protocol import (check_evaluable, data_protection, leave_one_out_protocol, load_data, load_protocol,
                             split_protocol_sets)
from ..data.records import Dataset
from ..embed import Embeddings
from ..embed.options import EmbedOptions
from ..errors import DataError, InputError
from ..io import atomic_dir, atomic_write_json, atomic_write_text, claimed_output
from ..methods.from_options import model_from_options
from ..metrics import episodic_accuracy, nearest_neighbors
from ..model import EmbeddingModel
from ..version import environment
from ..viz import embedding_map, retrieval_grid
from ..catalogue.reject import check_target_far
from ..index.rerank import check_size
from ..index.prior import load_prior
from ..index.whiten import Whitening, WithinStats, check_spread, distinct_labels, fit_whitening
from .levers import adapts, check_levers, episode_inputs, ranked_report
from .openset import DEFAULT_DRAWS, check_open_set_whitening, evaluate_open_set
from .openset_report import OPEN_SET_FILES, write_open_set_plots
from .report import render_report

log = logging.getLogger("fewshot")

EPISODE_SETTINGS = (("5way1shot", 5, 1), ("5way5shot", 5, 5))

__all__ = [
    "EPISODE_SETTINGS",
    "EVALUATION_FILES",
    "EvalConfig",
    "check_open_set",
    "episode_metrics",
    "evaluate",
    "evaluate_sets",
    "evaluation_sets",
    "is_evaluation_dir",
    "open_set_metrics",
    "warn_single_image_classes",
    "write_evaluation",
]


@dataclass
class EvalConfig:
    """Everything `fewshot evaluate` needs; recorded in ``metrics.json`` under ``config``.

    Attributes:
        data: dataset path (or a fetched dataset's name).
        split: the dataset's own image split (leave-one-out within it) when no split file;
            ``None`` = ``test`` when the dataset has image splits, else all its images;
            ``"all"`` = every image.
        split_file / part: a class-disjoint protocol (:mod:`fewshot.data.protocol`); queries
            and gallery then follow its cross-visit rule for the classes of ``part``.
        episodes, n_query: episodic evaluation size (``n_query`` queries per class).
        open_set, open_set_draws, target_far: also run the open-set protocol
            (:mod:`.openset`; needs ``split_file``): ``open_set_draws`` random halvings of the
            part's articles (seeded by ``seed``), thresholds calibrated for ``target_far``.
        rerank: how the gallery ranking is re-ranked before the retrieval metrics
            (:class:`~fewshot.index.rerank.RerankOptions`, a kind name or a dict of its fields).
        transductive: the episodes' classifier (:data:`.levers.TRANSDUCTIVE_CHOICES`: ``none``,
            ``centre``, ``bdcspn``, ``tim``, ``paddle``; :mod:`fewshot.methods.transductive`).
        query_imbalance: ``None`` (balanced episodes) or the Dirichlet concentration of
            imbalanced query sets (:func:`fewshot.metrics.episodic_accuracy`).
        whiten: whiten the gallery and the queries by the gallery's within-article covariance
            (:mod:`fewshot.index.whiten`; needs ``split_file``) for the retrieval figures, and
            each open-set draw's catalogue by its own; the episodes stay unwhitened (a K-shot
            support set is all an episode may learn from).
    """

    data: str
    split: str | None = None
    split_file: str | None = None
    part: str = "test"
    group_from: str | None = None
    #: how a folder tree is read (:data:`fewshot.data.LAYOUTS`)
    layout: str = "auto"
    seed: int = 0
    episodes: int = 1000
    n_query: int = 5
    grid_queries: int = 8
    open_set: bool = False
    open_set_draws: int = DEFAULT_DRAWS
    target_far: float = 0.05
    rerank: Any = "none"
    transductive: str = "none"
    query_imbalance: float | None = None
    whiten: bool = False
    embed: EmbedOptions = field(default_factory=EmbedOptions)


def evaluation_sets(cfg: EvalConfig) -> tuple[Dataset, Dataset | None, dict]:
    """``(queries, gallery or None for leave-one-out, protocol description)``."""
    if cfg.split_file:
        dataset, class_split = load_protocol(cfg.data, cfg.split_file, cfg.group_from, cfg.embed.strict, cfg.layout)
        return split_protocol_sets(dataset, class_split, cfg.split_file, cfg.part)
    dataset = load_data(cfg.data, cfg.split, cfg.group_from, cfg.embed.strict, default_split="test",
                        layout=cfg.layout)
    return dataset, None, leave_one_out_protocol(dataset)


def is_evaluation_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`evaluate` (``metrics.json`` with a config)."""
    try:
        metrics = json.loads((Path(path) / "metrics.json").read_text(encoding="utf-8"))
        return isinstance(metrics, dict) and "fewshot_version" in metrics.get("config", {})
    except (OSError, ValueError, AttributeError):
        return False


EVALUATION_FILES = frozenset({"metrics.json", "report.md", "retrieval_grid.png", "embedding_map.png", *OPEN_SET_FILES})


def check_open_set(cfg: EvalConfig) -> None:
    """Refuse ``open_set`` without a class-disjoint split (it halves the articles of a part), or
    with a ``target_far`` that is not a rate, before anything is loaded or embedded.

    Raises:
        InputError: naming ``open_set`` and ``split_file``, or ``target_far``; ``open_set_draws``
            or ``target_far`` given without ``open_set``.
    """
    if not cfg.open_set:
        changed = [name for name, default in (("open_set_draws", DEFAULT_DRAWS), ("target_far", 0.05))
                   if getattr(cfg, name) != default]
        if changed:
            raise InputError(f"{' and '.join(changed)} only apply to the open-set protocol, and open_set is off",
                             hint="add open_set=True, or leave them out", options=(*changed, "open_set"))
        return
    check_target_far(cfg.target_far)
    if not cfg.split_file:
        raise InputError("open_set=True needs a class-disjoint split: the articles of one of its parts are halved "
                         "into known and absent ones, and split_file is not given",
                         hint="add split_file (e.g. splits/grocery-unseen.json; `fewshot split` makes one for "
                              "your data), or leave out open_set", options=("open_set", "split_file"))


def evaluate(cfg: EvalConfig, out: str | Path | None = None,
             model: EmbeddingModel | None = None, *, overwrite: bool = False) -> dict:
    """Retrieval and episodic metrics of a model on a dataset; optionally written to ``out``.

    Writes the folder ``out`` atomically: ``metrics.json`` (keys: map, map_at_r,
    precision_at_1, recall_at_k, map_at_k, num_queries, num_skipped_queries, episodes,
    per_group, config), ``report.md``, ``retrieval_grid.png`` and ``embedding_map.png`` (a
    2-D t-SNE or PCA map of the query embeddings, coloured by group).

    Args:
        overwrite: replace ``out`` when it holds an earlier evaluation (any other existing,
            non-empty ``out`` is refused).

    Returns:
        the metrics dictionary written to ``metrics.json``.

    Raises:
        DataError: the data cannot give a meaningful result (:func:`check_evaluable`), or
            ``out`` is not a place this command may write.
    """
    check_open_set(cfg)
    check_levers(cfg.rerank, cfg.transductive, cfg.query_imbalance, gallery=cfg.split_file is not None,
                 model_classifier=False, whiten=cfg.whiten)
    queries, gallery, protocol = evaluation_sets(cfg)
    return evaluate_sets(cfg, queries, gallery, protocol, out, model, overwrite=overwrite)


def evaluate_sets(cfg: EvalConfig, queries: Dataset, gallery: Dataset | None, protocol: dict,
                  out: str | Path | None = None, model: EmbeddingModel | None = None, *,
                  overwrite: bool = False) -> dict:
    """:func:`evaluate` on query and gallery sets already chosen (``gallery`` ``None`` =
    leave-one-out within ``queries``); ``protocol`` describes how, for ``metrics.json``."""
    check_open_set(cfg)
    if cfg.open_set and gallery is None:
        raise InputError("open_set=True needs query and gallery sets of a class-disjoint split, not leave-one-out",
                         hint="pass split_file", options=("open_set", "split_file"))
    name = f"{cfg.data}" + (f" ({protocol['part']} classes)" if gallery is not None else "")
    check_evaluable(queries.labels, gallery.labels if gallery is not None else None, name)
    claim = dict(what="fewshot evaluation", is_ours=is_evaluation_dir, overwrite=overwrite,
                 owned=EVALUATION_FILES.__contains__, **data_protection(cfg.data, queries, gallery))
    if out is not None:  # under the writer lock, which puts right what an interrupted write left
        with claimed_output(out, object(), **claim):
            pass
    model = model or model_from_options(cfg.embed)
    trained = warn_trained_classes(model, queries.labels)
    rerank = check_levers(cfg.rerank, cfg.transductive, cfg.query_imbalance, gallery=gallery is not None,
                          model_classifier=adapts(model.episode_classifier), whiten=cfg.whiten)
    check_size(rerank, len(queries), len(gallery) if gallery is not None else 0)
    if cfg.whiten and gallery is not None:  # before embedding: the labels say whether it can be fitted
        check_spread(np.unique(np.asarray(gallery.labels, dtype=object), return_counts=True)[1])
        if cfg.open_set:
            check_open_set_whitening(_open_set_classes(protocol), gallery.labels, cfg.open_set_draws, cfg.seed)
    q = cfg.embed.embed(model, queries)
    g = cfg.embed.embed(model, gallery) if gallery is not None else None
    check_evaluable(q.labels, g.labels if g is not None else None, f"the readable images of {name}")
    if cfg.whiten and cfg.open_set and g is not None:  # again on the photos read, copies counted once
        check_open_set_whitening(_open_set_classes(protocol), distinct_labels(g.labels, g.digests or None),
                                 cfg.open_set_draws, cfg.seed)
    copies = warn_queries_in_gallery(q, g)
    prior = load_prior(model, g.labels, g.digests or None) if cfg.whiten and g is not None else None
    rq, rg, whitening = whitened_sets(q, g, prior) if cfg.whiten else (q, g, None)
    report = ranked_report(rerank, rq, rg)
    metrics = report.to_dict()
    if report.num_skipped_queries:
        warn_single_image_classes(q, g)
    metrics["episodes"] = episode_metrics(cfg, model, q, g)
    if cfg.open_set and g is not None:
        metrics["open_set"] = open_set_metrics(cfg, protocol, q, g, prior)
    skipped = [(str(p), r) for p, r in q.skipped + (g.skipped if g else [])]
    metrics["config"] = {
        "data": str(cfg.data), "dataset": queries.name,
        "split": protocol.get("split") if not cfg.split_file else None,
        "protocol": protocol, "model": model.describe(), "image_size": model.backbone.image_size,
        "seed": cfg.seed, "episodes": cfg.episodes, "n_query": cfg.n_query, "open_set": cfg.open_set,
        "rerank": rerank.to_dict(), "transductive": cfg.transductive, "query_imbalance": cfg.query_imbalance,
        "whiten": whitening.describe() if whitening else None, "similarity": "cosine",
        "trained_classes_evaluated": trained, "queries_in_gallery": copies,
        "num_images": len(q.dataset) + (len(g.dataset) if g else 0),
        "skipped_images": skipped, **environment()}
    if out is not None:  # checked again under the folder's writer lock, which puts right an interrupted write
        with claimed_output(out, object(), **claim):
            write_evaluation(metrics, rq, rg, Path(out), cfg)
    return metrics


def whitened_sets(q: Embeddings, g: Embeddings, prior: WithinStats | None = None) -> tuple[Embeddings, Embeddings, Whitening]:
    """``q`` and ``g`` whitened by a fit on ``g``'s labelled photos (:func:`fit_whitening`, the
    model's training photos pooled in when ``prior`` is given: :mod:`fewshot.index.prior`), and the fit."""
    whitening = fit_whitening(g.vectors, g.labels, g.digests or None, prior)
    return (replace(q, vectors=whitening.apply(q.vectors)), replace(g, vectors=whitening.apply(g.vectors)),
            whitening)


def episode_metrics(cfg: EvalConfig, model: EmbeddingModel, q: Embeddings, g: Embeddings | None) -> dict:
    """N-way K-shot accuracy for each of :data:`EPISODE_SETTINGS` (``accuracy`` ``None`` with an
    ``error`` where the data has too few classes or images for it)."""
    episodes = {}
    support = g if g is not None else q
    classifier, s_vectors, q_vectors = episode_inputs(cfg.transductive, model.episode_classifier, support.vectors,
                                                      q.vectors if g is not None else None)
    for key, n_way, k_shot in EPISODE_SETTINGS:
        try:
            res = episodic_accuracy(
                s_vectors, support.labels, n_way=n_way, k_shot=k_shot, n_query=cfg.n_query,
                episodes=cfg.episodes, seed=cfg.seed, query_embeddings=q_vectors,
                query_labels=q.labels if g is not None else None, classifier=classifier,
                query_imbalance=cfg.query_imbalance)
            episodes[key] = {"accuracy": res.accuracy, "ci95": res.ci95, "episodes": res.episodes,
                             "n_way": n_way, "k_shot": k_shot, "n_query": cfg.n_query,
                             "transductive": cfg.transductive, "query_imbalance": cfg.query_imbalance}
        except DataError as exc:
            log.warning("%s episodes skipped: %s", key, exc.message)
            episodes[key] = {"accuracy": None, "ci95": None, "error": exc.message}
    return episodes


def _open_set_classes(protocol: dict) -> list[str]:
    """The part's articles in the split file's order (the open-set draws depend on it)."""
    from ..data.splits import ClassSplit

    return ClassSplit.load(protocol["split_file"]).classes_of(protocol["part"])


def open_set_metrics(cfg: EvalConfig, protocol: dict, q: Embeddings, g: Embeddings,
                     prior: WithinStats | None = None) -> dict:
    """The ``open_set`` section: :func:`evaluate_open_set` on the part's articles, in the split
    file's order (the draws depend on it); with ``cfg.whiten``, ``prior`` (the model's, for this
    gallery: ``fewshot.index.prior.load_prior(model, g.labels, g.digests)``, as :func:`evaluate_sets`
    reads it) is pooled into each draw's fit, as ``fewshot index --whiten`` pools it."""
    return evaluate_open_set(q.vectors, q.labels, q.groups, g.vectors, g.labels, g.groups,
                             _open_set_classes(protocol),
                             draws=cfg.open_set_draws, seed=cfg.seed, target_far=cfg.target_far, whiten=cfg.whiten,
                             gallery_digests=g.digests or None, whiten_prior=prior)


def warn_trained_classes(model: EmbeddingModel, labels: list[str]) -> int:
    """How many of the evaluated classes (``labels``) the model's run trained on (its config's
    ``protocol.train_classes``, the val classes included after ``train_on_val``); warns when any
    did, since their figures are then not of unseen classes. 0 for a frozen backbone."""
    protocol, evaluated = model.run_config.get("protocol") or {}, set(labels)
    seen = set(protocol.get("train_classes") or ()) & evaluated
    if seen:
        log.warning("%d of the %d evaluated classes were trained on by %s%s: these figures are not of unseen "
                    "classes (e.g. %s)", len(seen), len(evaluated), Path(model.run_dir).name if model.run_dir else "the model",
                    " (its val classes too: --train-on-val)"
                    if protocol.get("val_trained") and seen & set(protocol.get("val_classes") or ()) else "",
                    ", ".join(sorted(seen)[:3]))
    return len(seen)


def warn_queries_in_gallery(q: Embeddings, g: Embeddings | None) -> int:
    """How many queries are byte-identical copies of a gallery photo (same SHA-256); warns when
    any are, since each then finds its own copy. 0 without a gallery or digests."""
    if g is None or not q.digests or not g.digests:
        return 0
    gallery = {d for d in g.digests if d is not None}
    n = sum(d in gallery for d in q.digests if d is not None)
    if n:
        log.warning("%d of the %d queries are byte-identical copies of gallery photos: each finds its own copy, so "
                    "these figures are optimistic", n, len(q.digests))
    return n


def warn_single_image_classes(q: Embeddings, g: Embeddings | None) -> list[str]:
    """Log once which classes cannot be retrieval queries (no other image of the class to find)."""
    from collections import Counter

    ref = Counter(g.labels) if g is not None else Counter(q.labels)
    need = 1 if g is not None else 2
    lonely = sorted({lab for lab in q.labels if ref.get(lab, 0) < need})
    if lonely:
        shown = ", ".join(lonely[:10]) + (f" and {len(lonely) - 10} more" if len(lonely) > 10 else "")
        log.warning("%d class(es) have no other image to retrieve, so their images are kept in the "
                    "gallery but not used as queries: %s", len(lonely), shown)
    return lonely


def write_evaluation(metrics: dict, q: Embeddings, g: Embeddings | None, out: Path,
                     cfg: EvalConfig) -> None:
    """Write metrics.json, report.md, retrieval_grid.png and embedding_map.png as the folder ``out`` (atomically:
    a failure leaves the previous folder as it was)."""
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "report.md", render_report(metrics))
        _write_grid(metrics, q, g, tmp, cfg)
        embedding_map(q.vectors, q.labels, q.groups, tmp / "embedding_map.png", seed=cfg.seed,
                      title=f"{metrics['config']['model']['method']} - {metrics['config']['dataset']}: query embeddings")
        if "open_set" in metrics:
            write_open_set_plots(metrics["open_set"], tmp,
                                 f"{metrics['config']['model']['method']} - {metrics['config']['dataset']}")


def _write_grid(metrics: dict, q: Embeddings, g: Embeddings | None, out: Path, cfg: EvalConfig) -> None:
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(q.vectors), size=min(cfg.grid_queries, len(q.vectors)), replace=False))
    ref_vectors = g.vectors if g is not None else q.vectors
    scores, idx = nearest_neighbors(q.vectors[pick], ref_vectors, k=5 if g is not None else 6)
    if g is None:  # leave-one-out: drop each query itself from its own results
        keep = idx != pick[:, None]
        scores = np.stack([row[m][:5] for row, m in zip(scores, keep)])
        idx = np.stack([row[m][:5] for row, m in zip(idx, keep)])
    ref = g if g is not None else q
    retrieval_grid([q.dataset.records[i].path for i in pick], [q.labels[i] for i in pick],
                   [[ref.dataset.records[j].path for j in row] for row in idx],
                   [[ref.labels[j] for j in row] for row in idx], scores.tolist(),
                   out / "retrieval_grid.png",
                   title=f"{metrics['config']['model']['method']} - {metrics['config']['dataset']}: top-5 (green = same article)")
