"""Classify photos against a catalogue index: one step after embedding, for the API, the CLI and the service.

However the photos were embedded (files through the embedding cache, images in memory, uploads
batched by the service), :func:`classify_embedded` classifies them: it finds the catalogue
images with each query's content (same SHA-256), leaves them out of the query's ranking when
asked (leave-one-out: a catalogue image would find itself with score 1.0), and returns one
:class:`ClassifyResult` per query. :func:`classify_paths` embeds files first (``fewshot
classify``); :func:`classification_accuracy` scores results against known labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..index import CatalogueIndex, Prediction, check_classify
from ..model import EmbeddingModel
from ..embed.options import EmbedOptions

__all__ = ["ClassifyResult", "classification_accuracy", "classify_embedded", "classify_paths"]


@dataclass
class ClassifyResult:
    """One classified image (``error`` set and ``predictions`` empty when it could not be read).

    ``in_catalogue``: the image's content is a catalogue image's; it was then classified with
    its identical catalogue copies left out (leave-one-out).
    """

    image: str
    predictions: list[Prediction]
    error: str | None = None
    in_catalogue: bool = False
    #: labels of the catalogue copies left out of this query's ranking (leave-one-out)
    left_out: list[str] = field(default_factory=list, repr=False)
    #: positions of the catalogue images with this image's content (left out or not), valid
    #: until the index changes
    same_images: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {"image": self.image, "predictions": [p.to_dict() for p in self.predictions]}
        if self.in_catalogue:
            d["in_catalogue"] = True
        if self.error:
            d["error"] = self.error
        return d


def classify_embedded(index: CatalogueIndex, vectors: np.ndarray, digests: Sequence[str | None],
                      names: Sequence[str], *, top_k: int = 5, mode: str = "prototype",
                      leave_one_out: bool = True) -> list[ClassifyResult]:
    """Classify embedded queries: ``vectors float32 [Q, E]``, each query's file SHA-256 in
    ``digests`` (``None``: unknown, an image in memory) and its name in ``names``.

    With ``leave_one_out`` a query's identical catalogue copies are left out of its ranking
    (nearest mode: those images; prototype mode: their share of the article's prototype) and
    the result is flagged ``in_catalogue``; either way ``same_images`` lists them.

    Raises:
        ValueError / TypeError: a bad ``top_k`` or ``mode`` (:func:`fewshot.index.check_classify`).
        CheckpointError: query dimension differs from the index's.
    """
    own = index.find_images(digests)
    exclude = own if leave_one_out else None
    preds = index.classify(vectors, top_k=top_k, mode=mode, exclude=exclude) if len(own) else []
    return [ClassifyResult(name, pred, None, in_catalogue=leave_one_out and bool(same),
                           left_out=[index.labels[j] for j in same] if leave_one_out else [], same_images=same)
            for name, pred, same in zip(names, preds, own)]


def classify_paths(index: CatalogueIndex, model: EmbeddingModel, paths: list[Path], *, top_k: int = 5,
                   mode: str = "prototype", embed: EmbedOptions | None = None,
                   leave_one_out: bool = True) -> list[ClassifyResult]:
    """Classify image files against an index; unreadable files get an ``error`` instead.

    A query whose bytes are those of a catalogue image (same SHA-256) would find itself
    (score 1.0). With ``leave_one_out`` (default) its identical catalogue copies are left
    out of its ranking (nearest mode: those images; prototype mode: their share of the
    article's prototype) and the result is flagged ``in_catalogue``.

    Raises:
        ValueError: ``top_k < 1`` or an unknown ``mode`` (checked before anything is embedded).
        TypeError: ``top_k`` is not a number.
    """
    from ..embed import read_digests

    top_k = check_classify(top_k, mode)
    embed = embed or EmbedOptions()
    digests = read_digests(paths)
    vectors, ok, failures, _ = model.embed_paths(paths, batch_size=embed.batch_size,
                                                 num_workers=embed.num_workers, cache_dir=embed.cache_dir,
                                                 progress=embed.progress and len(paths) > 16, digests=digests,
                                                 runtime=embed.runtime, threads=embed.threads)
    done = classify_embedded(index, vectors, [digests[0][i] for i in ok], [str(paths[i]) for i in ok],
                             top_k=top_k, mode=mode, leave_one_out=leave_one_out)
    by_pos = dict(zip(ok, done))
    return [by_pos.get(i) or ClassifyResult(str(p), [], failures.get(i)) for i, p in enumerate(paths)]


def classification_accuracy(results: list[ClassifyResult], truth: list[str], top_k: int,
                            index: CatalogueIndex | None = None) -> dict:
    """Top-1 and top-k accuracy of classified images against their true labels.

    Unreadable images are skipped, and so are queries that cannot be right: with ``index``,
    those whose article is not in the catalogue, or whose article has no catalogue image left
    once the query's own copy is left out (as leave-one-out retrieval skips them).

    Returns:
        ``{"top1", "topk", "num_images", "num_catalogue_images" (scored queries that are
        catalogue images, scored leave-one-out), "num_not_in_catalogue", "num_no_other_image"}``.
    """
    counts = Counter(index.labels) if index is not None else None
    scored, absent, alone = [], 0, 0
    for r, t in zip(results, truth):
        if r.error:
            continue
        if counts is not None and counts.get(t, 0) == 0:
            absent += 1
        elif counts is not None and counts[t] - r.left_out.count(t) <= 0:
            alone += 1
        else:
            scored.append((r, t))
    n = len(scored)
    top1 = sum(1 for r, t in scored if r.predictions and r.predictions[0].label == t)
    topk = sum(1 for r, t in scored if any(p.label == t for p in r.predictions[:top_k]))
    return {"top1": top1 / n if n else float("nan"), "topk": topk / n if n else float("nan"),
            "num_images": n, "num_catalogue_images": sum(r.in_catalogue for r, _ in scored),
            "num_not_in_catalogue": absent, "num_no_other_image": alone}
