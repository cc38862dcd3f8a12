"""The catalogue jobs as functions: build a catalogue index, classify photos against it, export it.

This layer sits after :mod:`fewshot.evaluation` and before :mod:`fewshot.training`: it wires data
loading (:mod:`fewshot.data.protocol`), embedding (:mod:`fewshot.embed.options`) and the index
together, so that the CLI and the service stay thin. (Evaluation, embedding export and
``fewshot split`` have moved to :mod:`fewshot.evaluation` and :mod:`fewshot.data.make_split`.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .version import __version__, environment
from .backbones import TTA_MODES
from .data.fetch import resolve_data
from .data.loaders import load_grocery_catalogue
from .data.protocol import ALL_SPLITS, data_protection, load_data
from .data.records import Dataset
from .embed import Embeddings
from .embed.options import DEFAULT_IMAGE_SIZE, EmbedOptions
from .errors import CheckpointError, DataError
from .index import ENROLLED_DIR, INDEX_FILES, AnnConfig, CatalogueIndex, Prediction, check_classify, is_index_dir
from .index.enrolled import (EnrolledArticle, add_enrolled, enrolled_articles, export_catalogue, export_foreign,
                             is_export_dir)
from .index.ann import resolve as resolve_ann
from .io import claimed_output
from .model import EmbeddingModel
from .methods.from_options import model_from_options
from .methods.runs import load_embedding_model

log = logging.getLogger("fewshot")


# --------------------------------------------------------------------------- index / classify
def build_index(data: str, out: str | Path, *, split: str | None = None, catalogue: str | None = None,
                group_from: str | None = None, embed: EmbedOptions | None = None,
                model: EmbeddingModel | None = None, overwrite: bool = False,
                ann_config: AnnConfig | None = None, layout: str = "auto") -> CatalogueIndex:
    """Embed a catalogue and save it as an index folder.

    Args:
        data: dataset path or name.
        split: the image split used as the catalogue (ignored with ``catalogue="iconic"``);
            ``None`` = ``train`` when the dataset has image splits, else all its images;
            ``"all"`` = every image.
        catalogue: ``"iconic"`` = the Grocery studio images (one per article) instead.
        overwrite: replace ``out`` when it is an index folder already. Any other existing,
            non-empty ``out`` is refused, and so is one that holds (or lies inside) the data.
        ann_config: the image index type (:class:`fewshot.index.AnnConfig`; default exact flat).
        layout: how a folder tree is read (``--layout``, :func:`fewshot.data.load_dataset`).

    Raises:
        DataError: bad data, split or catalogue; an ``out`` that may not be written; index
            options that do not fit the catalogue. Checked before anything is embedded or written.
    """
    embed = embed or EmbedOptions()
    root = resolve_data(data)
    if catalogue == "iconic":
        if split is not None or group_from is not None or layout != "auto":
            raise DataError("--catalogue iconic takes the 81 Grocery studio images: --split, --group-from and "
                            "--layout do not apply to it", hint="drop --split / --group-from / --layout, or drop "
                            "--catalogue")
        dataset = load_grocery_catalogue(root)
    elif catalogue not in (None, "", "images"):
        raise DataError(f"unknown catalogue '{catalogue}'", hint="use --catalogue iconic, or leave it out")
    else:
        dataset = load_data(data, split, group_from, embed.strict, default_split="train", layout=layout)
    with claimed_output(out, writer := object(), what="fewshot index", is_ours=is_index_dir, overwrite=overwrite,
                        owned=INDEX_FILES.__contains__, **data_protection(data, dataset)):
        enrolled = previous_index(out)
        model = model or model_from_options(embed)
        ann_config = resolve_ann(ann_config or AnnConfig(), len(dataset), model.dim)
        index = index_embeddings(model, embed.embed(model, dataset), data, catalogue, ann_config)
        keep_enrolled(index, enrolled, model, embed)
        index.save(out, owner=writer)
    return index


class Previous(NamedTuple):
    """What the index folder a rebuild replaces holds: its enrolled articles, and all its labels."""

    enrolled: list[EnrolledArticle]
    articles: list[str]


def _note_dropped(index: CatalogueIndex, old: list[str], enrolled: list[EnrolledArticle]) -> None:
    kept = {a.label for a in enrolled}
    dropped = [a for a in old if a not in kept and not index.has_article(a)]
    if dropped:
        index.config["dropped_articles"] = {"count": len(dropped), "first": dropped[:20]}
        log.warning("%d article(s) of the index being replaced are neither in the data nor enrolled through "
                    "the service, so the new index lacks them: %s%s (their photos were not touched; add them to the "
                    "data to keep them)", len(dropped), ", ".join(dropped[:5]), " ..." if len(dropped) > 5 else "")


def previous_index(folder: str | Path) -> Previous:
    """The enrolled articles and the labels of the index folder a rebuild is about to replace
    (none when ``folder`` is not an index).

    Raises:
        CheckpointError: the folder holds enrolled photos but its index cannot be read, so their
            articles cannot be known (nothing is written then).
    """
    folder = Path(folder)
    if not is_index_dir(folder):
        return Previous([], [])
    try:
        old = CatalogueIndex.load(folder)
        return Previous(enrolled_articles(old, folder), list(old.articles))
    except CheckpointError as exc:
        if not any(p.is_file() for p in (folder / ENROLLED_DIR).rglob("*")):
            return Previous([], [])
        raise CheckpointError(f"{folder} holds photos enrolled through the service, but its index cannot be "
                              f"read ({exc.message}), so a rebuild could not keep them",
                              hint=f"move {folder / ENROLLED_DIR} somewhere safe first, or restore the "
                                   "index folder and run `fewshot export` on it") from None


def keep_enrolled(index: CatalogueIndex, previous: Previous, model: EmbeddingModel,
                  embed: EmbedOptions) -> None:
    """Re-embed the enrolled photos of the folder being replaced with ``model`` into ``index``;
    record what was kept in ``index.config["kept_enrolled"]`` and the articles of the old folder
    that the new index lacks (neither in the data nor enrolled) in ``["dropped_articles"]``."""
    enrolled = previous.enrolled
    _note_dropped(index, previous.articles, enrolled)
    if not enrolled:
        return

    def run(records: list) -> tuple[np.ndarray, list[int], list[str | None]]:
        emb = embed.embed(model, Dataset(records, name="enrolled", source="enrolled"))
        where = {r.path: i for i, r in enumerate(records)}
        return emb.vectors, [where[r.path] for r in emb.dataset.records], list(emb.digests)

    articles, images, bad = add_enrolled(index, enrolled, run)
    index.config["kept_enrolled"] = {"articles": articles, "images": images, "unreadable": bad}
    if bad:
        log.warning("%d enrolled photo(s) could not be read and were left out: %s", len(bad), ", ".join(bad[:5]))


def export_index(index_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """``fewshot export``: copy every article's photos (from the data and enrolled through the
    service) out of an index as ``out/<group>/<article>/...`` plus ``out/manifest.csv``
    (:func:`fewshot.index.enrolled.export_catalogue`), so that ``fewshot index --data`` builds
    the same catalogue again, e.g. with another model.

    Raises:
        CheckpointError: the index cannot be read. FewshotError: ``out`` may not be written
            (an existing folder that is not an earlier export, or one inside the index).
    """
    index = CatalogueIndex.load(index_dir)
    with claimed_output(out, object(), what="fewshot export", is_ours=is_export_dir, overwrite=overwrite,
                        input_roots=[index_dir]):
        foreign = export_foreign(out) if is_export_dir(out) else []
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise DataError(f"--out {out} holds an earlier export and also files fewshot did not write there "
                            f"({shown}): refusing to replace it", hint="move those files out first (or enrol "
                            "added photos with `fewshot index --data`), or choose another --out")
        return export_catalogue(index, index_dir, out, environment())


def index_embeddings(model: EmbeddingModel, emb: Embeddings, data: str | Path, catalogue: str | None = None,
                     ann_config: AnnConfig | None = None) -> CatalogueIndex:
    """A :class:`CatalogueIndex` of embedded images, with the config that
    :func:`model_for_index` needs to find (and check) its model again."""
    config = {"data": str(Path(data).resolve()) if Path(data).exists() else str(data),
              "split": (emb.dataset.split or ALL_SPLITS) if catalogue != "iconic" else None,
              "catalogue": catalogue or "images", "model": model.describe(),
              "image_size": model.backbone.image_size, "backbone": model.backbone.name,
              "model_dir": str(Path(model.run_dir).resolve()) if model.run_dir else None,
              "model_digest": model.weights_digest(),
              "skipped_images": [(str(p), r) for p, r in emb.skipped], **environment()}
    return CatalogueIndex.build(emb.vectors, emb.labels, emb.groups, [str(p) for p in emb.dataset.paths], config,
                                digests=emb.digests, ann_config=ann_config)


def index_tta(config: dict) -> str:
    """The test-time augmentation an index's vectors were made with (``"none"`` for an index
    of fewshot 0.1.0, which had none)."""
    return str(((config.get("model") or {}).get("backbone") or {}).get("tta", "none"))


def model_for_index(index: CatalogueIndex, where: str | Path | None = None) -> EmbeddingModel:
    """The embedding model an index was built with (same backbone, size, run and test-time
    augmentation).

    Raises:
        CheckpointError: the run behind the index is gone, damaged, or was retrained since the
            index was built (its weights digest differs from the one the index recorded), so
            new query embeddings would not be comparable with the catalogue's vectors.
    """
    cfg = index.config
    name = f"index {where}" if where is not None else "the index"
    tta = index_tta(cfg)
    flag = f"--tta {tta} " if tta != "none" else ""
    if tta not in TTA_MODES:
        raise CheckpointError(f"{name} was built with test-time augmentation {tta!r}, which this fewshot "
                              f"{__version__} does not know (a newer version built it?)",
                              hint=f"rebuild the index: fewshot index --data {cfg.get('data', 'DATA')} "
                                   + (f"--model {cfg['model_dir']} " if cfg.get("model_dir") else "")
                                   + f"--out {where or 'INDEX'} --overwrite")
    try:
        model = load_embedding_model(cfg.get("backbone", "efficientnet_lite0"), cfg.get("model_dir"),
                                     int(cfg.get("image_size", DEFAULT_IMAGE_SIZE)), tta=tta)
    except CheckpointError as exc:
        if not cfg.get("model_dir"):
            raise
        raise CheckpointError(f"the run behind {name} cannot be loaded: {exc.message}",
                              hint=f"restore {cfg['model_dir']}, or rebuild the index with another run: "
                                   f"fewshot index --data {cfg.get('data', 'DATA')} --model RUN_DIR "
                                   f"{flag}--out {where or 'INDEX'} --overwrite") from None
    pinned = cfg.get("model_digest")
    if pinned is None:
        log.warning("%s records no model digest (built by fewshot %s): cannot check that its model is "
                    "unchanged; rebuild it with `fewshot index ... --overwrite` to pin it", name,
                    index.config.get("fewshot_version", "< 0.1.1"))
    elif pinned != model.weights_digest():
        source = f"run {cfg.get('model_dir')}" if cfg.get("model_dir") else f"backbone {cfg.get('backbone')}"
        raise CheckpointError(
            f"the model behind {name} has changed since it was built ({source}: weights digest "
            f"{pinned} when indexed, {model.weights_digest()} now); its catalogue vectors and new "
            "query embeddings would not be comparable",
            hint=f"rebuild the index with the current model: fewshot index --data {cfg.get('data', 'DATA')} "
                 + (f"--model {cfg['model_dir']} " if cfg.get("model_dir") else "")
                 + f"{flag}--out {where or 'INDEX'} --overwrite")
    return model


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

    def to_dict(self) -> dict:
        d = {"image": self.image, "predictions": [p.to_dict() for p in self.predictions]}
        if self.in_catalogue:
            d["in_catalogue"] = True
        if self.error:
            d["error"] = self.error
        return d


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
    from .embed import read_digests

    top_k = check_classify(top_k, mode)
    embed = embed or EmbedOptions()
    digests = read_digests(paths)
    vectors, ok, failures, _ = model.embed_paths(paths, batch_size=embed.batch_size,
                                                 num_workers=embed.num_workers, cache_dir=embed.cache_dir,
                                                 progress=embed.progress and len(paths) > 16, digests=digests,
                                                 runtime=embed.runtime, threads=embed.threads)
    own = index.find_images([digests[0][i] for i in ok]) if leave_one_out else [[] for _ in ok]
    preds = index.classify(vectors, top_k=top_k, mode=mode, exclude=own) if len(ok) else []
    by_pos = dict(zip(ok, zip(preds, own)))
    results = []
    for i, p in enumerate(paths):
        pred, mine = by_pos.get(i, ([], []))
        results.append(ClassifyResult(str(p), pred, failures.get(i), in_catalogue=bool(mine),
                                      left_out=[index.labels[j] for j in mine]))
    return results


__all__ = ["index_embeddings", "build_index", "classify_paths", "ClassifyResult", "model_for_index", "index_tta",
           "classification_accuracy", "export_index", "previous_index", "keep_enrolled", "Previous"]


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
    from collections import Counter

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
