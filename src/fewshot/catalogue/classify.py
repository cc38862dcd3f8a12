"""Classify photos against a catalogue index: one step after embedding, for the API, the CLI and the service.

However the photos were embedded (files through the embedding cache, images in memory, uploads
batched by the service), :func:`classify_embedded` classifies them: it finds the catalogue
images with each query's content (same SHA-256), leaves them out of the query's ranking when
asked (leave-one-out: a catalogue image would find itself with score 1.0), and returns one
:class:`ClassifyResult` per query. :func:`classify_paths` embeds files first (``fewshot
classify``); :func:`classification_accuracy` scores results against known labels.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..index import CatalogueIndex, Prediction, check_classify
from ..index.ranking import BATCH_TRANSDUCTIVE, TRANSDUCTIVE_CANDIDATES
from ..model import EmbeddingModel
from ..embed.options import EmbedOptions
from .calibrate import rival_cosines
from .reject import SCORE_DEPTH, Answer, Rejector, _short, answers, parse_reject

log = logging.getLogger("fewshot")

__all__ = ["ClassifyResult", "check_transductive", "classification_accuracy", "classify_embedded", "classify_paths"]


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
    #: the decision with a reject option (``None``: classified without one)
    answer: Answer | None = None

    @property
    def unknown(self) -> bool:
        """Rejected: not confidently any catalogue article (``answer.article == "unknown"``)."""
        return self.answer is not None and self.answer.unknown

    def to_dict(self) -> dict:
        d = {"image": self.image, "predictions": [p.to_dict() for p in self.predictions]}
        if self.answer is not None:
            d["answer"] = self.answer.to_dict()
        if self.in_catalogue:
            d["in_catalogue"] = True
        if self.error:
            d["error"] = self.error
        return d


def check_transductive(transductive: object, mode: str, reject: object) -> str:
    """``transductive`` once it can be used with ``mode`` and ``reject`` (call it before embedding).

    ``reject``: the reject option as given (``"none"`` is the only one a batch takes, even where
    ``"auto"`` would fall back to it) or a :class:`Rejector` (then it must have no threshold).

    Raises:
        InputError: not one of :data:`~fewshot.index.ranking.BATCH_TRANSDUCTIVE`; or a transductive
            batch in ``nearest`` mode or with a reject option (a threshold judges each photo by its
            own prototype scores, not a batch's answers).
    """
    if transductive not in BATCH_TRANSDUCTIVE:
        raise InputError(f"transductive={_short(transductive)} cannot classify a batch of photos",
                         hint="use none or paddle (bdcspn and tim assume the photos cover the articles: on one "
                              "article's photos BD-CSPN got 2.5-5.4% right; they are for `fewshot evaluate`)",
                         options=("transductive",))
    if transductive == "none":
        return "none"
    if mode != "prototype":
        raise InputError(f"transductive='{transductive}' classifies by the articles' prototypes, not with "
                         f"mode='{mode}'", hint="use mode='prototype'", options=("transductive", "mode"))
    said = reject.threshold is None if isinstance(reject, Rejector) else parse_reject(reject) == "none"
    if not said:
        raise InputError(f"transductive='{transductive}' answers every photo with an article, and a reject threshold "
                         "judges each photo alone", hint="use reject='none'", options=("transductive", "reject"))
    return str(transductive)


def _catalogue_photos(own: Sequence[Sequence[int]], names: Sequence[str]) -> None:
    """Refuse a transductive batch that holds catalogue images (``own``: each photo's catalogue
    copies, :meth:`CatalogueIndex.find_images`): each would find itself, and pull its article's
    prototype toward the batch.

    Raises:
        InputError: naming up to three of them.
    """
    found = [name for name, same in zip(names, own) if same]
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise InputError(f"{len(found)} of the {len(names)} photos are catalogue images (same file content): a "
                         f"transductive batch would find them ({shown})",
                         hint="classify photos that are not in the catalogue, or use transductive='none'",
                         options=("transductive",))


def _warn_copies(digests: Sequence[str | None]) -> None:
    """Say how many photos of a transductive batch are copies of another of its photos."""
    known = [d for d in digests if d is not None]
    copies = len(known) - len(set(known))
    if copies:
        log.warning("%d of the %d photos of the batch are copies of another of its photos (same file content): "
                    "each copy counts in the batch", copies, len(digests))


def classify_embedded(index: CatalogueIndex, vectors: np.ndarray, digests: Sequence[str | None],
                      names: Sequence[str], *, top_k: int = 5, mode: str = "prototype",
                      leave_one_out: bool = True, rejector: Rejector | None = None,
                      transductive: str = "none") -> list[ClassifyResult]:
    """Classify embedded queries: ``vectors float32 [Q, E]``, each query's file SHA-256 in
    ``digests`` (``None``: unknown, an image in memory) and its name in ``names``.

    With ``leave_one_out`` a query's identical catalogue copies are left out of its ranking
    (nearest mode: those images; prototype mode: their share of the article's prototype) and
    the result is flagged ``in_catalogue``; either way ``same_images`` lists them. With a
    ``rejector`` each result gets an ``answer`` (:mod:`fewshot.catalogue.reject`): "unknown" when
    the open-set score of its best prototypes is under the threshold (in ``nearest`` mode too:
    whether a photo shows a catalogue article is judged on the prototypes, where it was calibrated,
    and the answer is the best prototype's article, which the nearest-image ranking may put lower).

    ``transductive="paddle"`` classifies the queries together (:meth:`CatalogueIndex.transductive_first`):
    each result's first article, and its answer, is the batch's; needs ``mode="prototype"``, no
    reject threshold and queries that are not catalogue images.

    Raises:
        ValueError / TypeError: a bad ``top_k`` or ``mode`` (:func:`fewshot.index.check_classify`).
        InputError: a bad ``transductive`` (:func:`check_transductive`), or catalogue images
            among the queries of a transductive batch.
        CheckpointError: query dimension differs from the index's.
    """
    transductive = check_transductive(transductive, mode, rejector)
    own = index.find_images(digests)
    if transductive != "none":
        _catalogue_photos(own, names)
        _warn_copies(digests)
    exclude = own if leave_one_out else None
    depth = max(top_k, SCORE_DEPTH) if rejector is not None and mode == "prototype" else top_k
    depth = max(depth, TRANSDUCTIVE_CANDIDATES) if transductive != "none" else depth
    preds = index.classify(vectors, top_k=depth, mode=mode, exclude=exclude) if len(own) else []
    if transductive != "none" and len(preds):  # the batch's answer first: the scores read it
        preds = index.transductive_first(vectors, preds, transductive)
    said: list[Answer | None] = [None] * len(preds)
    if rejector is not None and len(preds):
        scored = preds if mode == "prototype" else index.classify(vectors, SCORE_DEPTH, "prototype", exclude)
        said = list(answers(rejector, scored, rival_cosines(index, vectors)))  # nearest mode too: the prototype's article, which the score vouches for
    if transductive != "none":
        said = [None if a is None else replace(a, transductive=transductive) for a in said]
    return [ClassifyResult(name, pred[:top_k], None, in_catalogue=leave_one_out and bool(same),
                           left_out=[index.labels[j] for j in same] if leave_one_out else [], same_images=same,
                           answer=a)
            for name, pred, same, a in zip(names, preds, own, said)]


def classify_paths(index: CatalogueIndex, model: EmbeddingModel, paths: list[Path], *, top_k: int = 5,
                   mode: str = "prototype", embed: EmbedOptions | None = None,
                   leave_one_out: bool = True, rejector: Rejector | None = None,
                   transductive: str = "none") -> list[ClassifyResult]:
    """Classify image files against an index; unreadable files get an ``error`` instead
    (``rejector``, ``transductive``: as :func:`classify_embedded`; the readable files are one batch).

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
    check_transductive(transductive, mode, rejector)
    embed = embed or EmbedOptions()
    digests = read_digests(paths)
    if transductive != "none":  # before anything is embedded
        _catalogue_photos(index.find_images(digests[0]), [str(p) for p in paths])
    vectors, ok, failures, _ = model.embed_paths(paths, batch_size=embed.batch_size,
                                                 num_workers=embed.num_workers, cache_dir=embed.cache_dir,
                                                 progress=embed.progress and len(paths) > 16, digests=digests,
                                                 runtime=embed.runtime, threads=embed.threads)
    done = classify_embedded(index, vectors, [digests[0][i] for i in ok], [str(paths[i]) for i in ok],
                             top_k=top_k, mode=mode, leave_one_out=leave_one_out, rejector=rejector,
                             transductive=transductive)
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
        catalogue images, scored leave-one-out), "num_not_in_catalogue", "num_no_other_image"}``
        (top-1 / top-k of the ranked articles, whatever the reject option said), and with a reject
        threshold ``"accepted"`` / ``"accepted_right"`` (shares of the scored queries answered
        with an article / with the right one) and ``"not_in_catalogue_accepted"`` (the share of
        queries of absent articles given an article: the false-accept rate).
    """
    counts = Counter(index.labels) if index is not None else None
    scored, absent, alone, absent_accepted = [], 0, 0, 0
    for r, t in zip(results, truth):
        if r.error:
            continue
        if counts is not None and counts.get(t, 0) == 0:
            absent += 1
            absent_accepted += r.answer is not None and not r.unknown
        elif counts is not None and counts[t] - r.left_out.count(t) <= 0:
            alone += 1
        else:
            scored.append((r, t))
    n = len(scored)
    top1 = sum(1 for r, t in scored if r.predictions and r.predictions[0].label == t)
    topk = sum(1 for r, t in scored if any(p.label == t for p in r.predictions[:top_k]))
    out = {"top1": top1 / n if n else float("nan"), "topk": topk / n if n else float("nan"),
           "num_images": n, "num_catalogue_images": sum(r.in_catalogue for r, _ in scored),
           "num_not_in_catalogue": absent, "num_no_other_image": alone}
    if any(r.answer is not None and r.answer.threshold is not None for r, _ in scored):
        right = sum(1 for r, t in scored if not r.unknown and r.answer and r.answer.article == t)
        out.update(accepted=sum(not r.unknown for r, _ in scored) / n, accepted_right=right / n,
                   not_in_catalogue_accepted=absent_accepted / absent if absent else float("nan"))
    return out
