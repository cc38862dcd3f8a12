"""Build a catalogue index: embed a dataset, keep what the folder being replaced holds.

:func:`build_index` is ``fewshot index``: it loads the catalogue's images, embeds them
(:func:`index_embeddings`, which records the :class:`~fewshot.catalogue.spec.EmbedderSpec`)
and saves the folder. Rebuilding a folder (``--overwrite``, a retrained model) keeps the photos
enrolled through the service: :func:`previous_index` reads them from the old folder and
:func:`keep_enrolled` re-embeds them with the new model (:func:`add_enrolled`); articles of the
old folder that the new index lacks are named (``config["dropped_articles"]``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..data.fetch import resolve_data
from ..data.loaders import load_grocery_catalogue
from ..data.records import Dataset, ImageRecord
from ..embed import Embeddings
from ..errors import CheckpointError, DataError
from ..index import AnnConfig, CatalogueIndex
from ..index.ann import resolve as resolve_ann
from ..index.prior import load_prior
from ..index.whiten import distinct_labels, fit_whitening
from ..checks import as_bool
from ..io import claimed_output
from ..model import EmbeddingModel
from ..data.protocol import ALL_SPLITS, data_protection, load_data
from ..embed.options import EmbedOptions
from ..methods.from_options import model_from_options
from ..version import environment
from .formats import INDEX_FILES, is_index_dir
from .spec import EmbedderSpec
from .whitened import check_whitenable
from .store import ENROLLED_DIR, EnrolledArticle, enrolled_articles, load_index, save_index

__all__ = ["EmbedRecords", "Previous", "add_enrolled", "build_index", "index_embeddings", "keep_enrolled",
           "previous_index"]

log = logging.getLogger("fewshot")


def build_index(data: str, out: str | Path, *, split: str | None = None, catalogue: str | None = None,
                group_from: str | None = None, embed: EmbedOptions | None = None,
                model: EmbeddingModel | None = None, overwrite: bool = False,
                ann_config: AnnConfig | None = None, layout: str = "auto", whiten: bool = False) -> CatalogueIndex:
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
        whiten: fit a catalogue whitening on the catalogue's photos (:mod:`fewshot.index.whiten`)
            and keep it in the index: every later query and enrolment is whitened by it.

    Raises:
        DataError: bad data, split or catalogue; an ``out`` that may not be written; index
            options that do not fit the catalogue; ``whiten`` on a catalogue with too few
            articles of two or more photos. Checked before anything is embedded or written.
    """
    whiten = as_bool(whiten, "whiten")
    embed = embed or EmbedOptions()
    root = resolve_data(data)
    if catalogue == "iconic":
        if split is not None or group_from is not None or layout != "auto":
            raise DataError("catalogue='iconic' takes the 81 Grocery studio images: split, group_from and "
                            "layout do not apply to it", hint="drop split / group_from / layout, or drop "
                            "catalogue", options=("catalogue", "split", "group_from", "layout"))
        dataset = load_grocery_catalogue(root)
    elif catalogue not in (None, "", "images"):
        raise DataError(f"unknown catalogue '{catalogue}'", hint="use catalogue='iconic', or leave it out",
                        options=("catalogue",))
    else:
        dataset = load_data(data, split, group_from, embed.strict, default_split="train", layout=layout)
    if whiten:
        check_whitenable(dataset.labels)
    with claimed_output(out, writer := object(), what="fewshot index", is_ours=is_index_dir, overwrite=overwrite,
                        owned=INDEX_FILES.__contains__, **data_protection(data, dataset)):
        enrolled = previous_index(out)
        if enrolled.whitened and not whiten:
            log.warning("the index being replaced was whitened (--whiten); this one will not be: add --whiten to keep "
                        "the whitening")
        model = model or model_from_options(embed)
        ann_config = resolve_ann(ann_config or AnnConfig(), len(dataset), model.dim)
        index = index_embeddings(model, embed.embed(model, dataset), data, catalogue, ann_config, whiten=whiten)
        keep_enrolled(index, enrolled, model, embed)
        save_index(index, out, owner=writer)
    return index


def index_embeddings(model: EmbeddingModel, emb: Embeddings, data: str | Path, catalogue: str | None = None,
                     ann_config: AnnConfig | None = None, *, whiten: bool = False) -> CatalogueIndex:
    """A :class:`CatalogueIndex` of embedded images, with the config that
    :class:`~fewshot.catalogue.spec.EmbedderSpec` needs to find (and check) its model again;
    ``whiten``: whitened by a fit on them (:func:`fewshot.index.whiten.fit_whitening`).

    Raises:
        DataError: ``whiten`` and too few photos that vary within an article (read images only:
            an unreadable photo may leave too few).
    """
    whitening = None
    if whiten:  # checked again on the photos read, byte-identical copies counted once
        check_whitenable(distinct_labels(emb.labels, emb.digests or None))
        whitening = fit_whitening(emb.vectors, emb.labels, emb.digests or None,
                                  load_prior(model, emb.labels, emb.digests or None))
    config = {"data": str(Path(data).resolve()) if Path(data).exists() else str(data),
              "split": (emb.dataset.split or ALL_SPLITS) if catalogue != "iconic" else None,
              "catalogue": catalogue or "images", "model": model.describe(), **EmbedderSpec.of(model).to_config(),
              "skipped_images": [(str(p), r) for p, r in emb.skipped], **environment()}
    return CatalogueIndex.build(emb.vectors, emb.labels, emb.groups, [str(p) for p in emb.dataset.paths], config,
                                digests=emb.digests, ann_config=ann_config, whitening=whitening)


class Previous(NamedTuple):
    """What the index folder a rebuild replaces holds: its enrolled articles, and all its labels."""

    enrolled: list[EnrolledArticle]
    articles: list[str]
    whitened: bool = False


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
        old = load_index(folder)
        return Previous(enrolled_articles(old, folder), list(old.articles), old.whitening is not None)
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


#: ``embed(records) -> (vectors float32 [M, E], kept positions into records, digests per kept)``
EmbedRecords = Callable[[list[ImageRecord]], tuple[np.ndarray, list[int], list[str | None]]]


def add_enrolled(index: CatalogueIndex, articles: Sequence[EnrolledArticle],
                 embed: EmbedRecords) -> tuple[int, int, list[str]]:
    """Add the enrolled photos of ``articles`` to ``index``, embedded by ``embed``; an article
    already in ``index`` (from the data) gets the photos under its own group.

    Returns:
        ``(articles added to, photos added, unreadable photos as "path: reason")``.
    """
    records = [ImageRecord(f, a.label, a.group) for a in articles for f in a.files]
    rel = [p for a in articles for p in a.paths]
    if not records:
        return 0, 0, []
    vectors, kept, digests = embed(records)
    bad = sorted(set(range(len(records))) - set(kept))
    by_label: dict[str, list[int]] = {}
    for row, k in enumerate(kept):
        by_label.setdefault(records[k].label, []).append(row)
    for label, rows in by_label.items():
        group = index.article_group(label) if index.has_article(label) else records[kept[rows[0]]].group
        index.add_article(label, group, vectors[rows], [rel[kept[r]] for r in rows],
                          digests=[digests[r] for r in rows])
    return len(by_label), len(kept), [str(records[k].path) for k in bad]
