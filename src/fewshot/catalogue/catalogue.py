"""One :class:`Catalogue`: articles with their photos, embedded and indexed, for the Python API,
the CLI and the service.

A catalogue is an in-memory index (:class:`~fewshot.index.CatalogueIndex`) with the model that
embeds for it (checked against the index's :class:`~fewshot.catalogue.spec.EmbedderSpec`) and,
once loaded or saved, its folder (:mod:`fewshot.catalogue.store`). Changes are made in two ways:

* in memory, written by the next :meth:`Catalogue.save` (the Python API: ``add`` / ``remove``);
* durably, one journal entry each, for a long-lived writer that opened the folder with
  :meth:`Catalogue.open` and holds its writer lock until :meth:`Catalogue.close` (the service:
  ``enrol`` / ``delete``, then ``compact``). Reads and changes of a shared catalogue take
  :attr:`Catalogue.lock`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backbones import Backbone
from ..checks import as_bool, positive_int
from ..data.records import Dataset
from ..embed import read_digests
from ..errors import FewshotError, ImageReadError, InputError
from ..index import AnnConfig, CatalogueIndex, Neighbor, check_classify
from ..index.rerank import search_rerank
from ..io import atomic_write_bytes, claimed_output, writer_lock
from ..model import EmbeddingModel
from ..embed.options import EmbedOptions
from .check import CheckReport, check_catalogue
from .build import index_embeddings, keep_enrolled, previous_index
from .classify import ClassifyResult, check_transductive, classify_embedded, classify_paths
from .formats import INDEX_FILES, is_index_dir
from .inputs import ImageLike, as_dataset, as_model, as_path, embed_images, image_list, to_pil
from .journal import Change
from .labels import clean_label, normalize_label, resolve_group
from .reject import DEFAULT_TARGET_FAR, Rejector
from .scores import DEFAULT_SCORE
from .spec import EmbedderSpec
from .whitened import check_whitenable
from .store import (ENROLLED_DIR, UPLOAD_DIR, append_change, check_unchanged, drop_leftovers, enrolled_name,
                    journal_length, load_index, remove_written, save_index, write_durably)

__all__ = ["Catalogue"]

log = logging.getLogger("fewshot")


@dataclass
class Catalogue:
    """Articles with their photos, embedded and indexed: classify and search new photos; enrol
    and remove articles.

    Build it from a dataset (``Catalogue.build(model, dataset)``), grow it (``add`` / ``remove``),
    keep it (``save`` / ``Catalogue.load``: the same folder ``fewshot index`` writes, so
    ``fewshot classify --index`` and ``fewshot serve --index`` use it too).

    Attributes:
        model: the embedding model (backbone + head).
        index: the catalogue index (FAISS inner product on L2-normalised embeddings).
        runtime: the forward pass (``auto`` | ``torch`` | ``onnx``).
        lock: taken by the users of a shared catalogue (a service) around reads and changes.
    """

    model: EmbeddingModel
    index: CatalogueIndex
    runtime: str = "auto"
    cache_dir: str | None = None
    #: PNG bytes of the images added from memory, by the path they get in the saved folder
    #: (``enrolled/<article>/<id>.png``), written there by the next :meth:`save`
    unsaved: dict[str, bytes] = field(default_factory=dict, repr=False)
    #: opened read-only (:meth:`open`): nothing is written into the folder
    read_only: bool = field(default=False, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    #: the writer lock of the folder :meth:`open` holds, and the owner the store's writes name
    _writer: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False, compare=False)
    _owner: object = field(default_factory=object, repr=False, compare=False)

    @classmethod
    def build(cls, model: EmbeddingModel | Backbone, dataset: Dataset, *, runtime: str = "auto",
              cache_dir: str | None = None, progress: bool = False, index_type: str = "auto",
              whiten: bool = False, **index_options: Any) -> "Catalogue":
        """Embed every image of ``dataset`` (its label = the article, its group = the brand).

        ``index_type`` is a registered index kind (:func:`fewshot.index.kinds.list_kinds`) or
        ``"auto"``; ``index_options`` are that kind's options (e.g. ``nprobe=32`` for ivfpq).
        ``whiten``: fit a catalogue whitening on the dataset's photos (:mod:`fewshot.index.whiten`),
        kept by the catalogue: every query and every photo added later is whitened by it, and the
        scores are cosines of whitened vectors (on Grocery's frozen 81-article catalogue, top-1
        of the test photos 0.599 -> 0.720). A trained run's own training photos are pooled into
        the fit when the run holds them (:mod:`fewshot.index.prior`).

        Raises:
            DataError: no image of the dataset could be read.
            TypeError: ``model`` is not a model, ``dataset`` not a :class:`Dataset` (a path says
                how to load it: ``fewshot.load_dataset(PATH)``).
            DataError: an unknown index kind; ``whiten`` with too few articles of two or more
                photos. InputError: an option the kind does not have, or a value out of range.
        """
        model, dataset = as_model(model), as_dataset(dataset)
        ann_config = AnnConfig(index_type, **index_options)
        if as_bool(whiten, "whiten"):
            check_whitenable(dataset.labels)
        opts = EmbedOptions(runtime=runtime, cache_dir=cache_dir, progress=progress)
        index = index_embeddings(model, opts.embed(model, dataset), dataset.root or dataset.name,
                                 ann_config=ann_config, whiten=whiten)
        return cls(model, index, runtime, cache_dir)

    @property
    def whitened(self) -> bool:
        """Whether the catalogue was built with ``whiten=True`` (its scores are whitened cosines)."""
        return self.index.whitening is not None

    @property
    def articles(self) -> list[str]:
        """The article labels, in the order they were added, except that removing an article
        moves the last one into its place (the index changes one prototype row per removal)."""
        return list(self.index.articles)

    def __len__(self) -> int:
        """Number of catalogue images."""
        return len(self.index)

    def add(self, label: str, images: Sequence[ImageLike], *, group: str | None = None) -> int:
        """Enrol images of an article (new or existing); returns how many were added. The label
        and group are stored as :func:`fewshot.catalogue.labels.clean_label` gives them (NFC,
        surrounding whitespace removed), under the rules the service applies.

        Raises:
            InputError (a ``ValueError`` and a ``DataError``): an empty or unusable label or
                group (``.code`` ``"empty_enrolment"`` / ``"invalid_label"``), an existing
                article with another group (``"group_conflict"``), no images.
            TypeError: ``label`` / ``group`` not a ``str``, ``images`` not a list of images.
            ImageReadError / InputError: an image that cannot be used.
            Nothing is added when anything is raised.
        """
        label = clean_label(label, "label")
        group = resolve_group(self.index, label, clean_label(group, "group", required=False))
        images = image_list(images)
        if not images:
            raise InputError(f"no images given for article {label!r}", hint="pass one or more images",
                             code="empty_enrolment")
        vectors, digests, names = embed_images(self.model, images, runtime=self.runtime, cache_dir=self.cache_dir)
        pending = {}
        for i, x in enumerate(images):  # an image from memory is kept as a PNG file, so a saved folder has it
            if not isinstance(x, Path):
                buf = io.BytesIO()
                to_pil(x, f"images[{i}]").save(buf, "PNG")
                names[i] = enrolled_name(label, ".png")
                pending[names[i]], digests[i] = buf.getvalue(), hashlib.sha256(buf.getvalue()).hexdigest()
        self.index.add_article(label, group, vectors, names, digests=digests)
        self.unsaved.update(pending)
        return len(vectors)

    def remove(self, label: str) -> int:
        """Remove every image of an article; returns how many were removed.

        Raises:
            KeyError: no such article. TypeError: ``label`` is not a ``str``.
            InputError: ``label`` is the only article left (a catalogue cannot be empty).
        """
        if not isinstance(label, str):
            raise TypeError(f"label must be a str, not {type(label).__name__} ({label!r})")
        label = normalize_label(label)  # as add stored it
        if self.index.has_article(label) and len(self.index.articles) == 1:
            raise InputError(f"'{label}' is the only article left; a catalogue cannot be empty",
                             hint="add another article first", code="last_article")
        return self.index.remove_article(label)

    def classify(self, images: Sequence[ImageLike], top_k: int = 5, mode: str = "prototype", *,
                 reject: str | float = "auto", target_far: float = DEFAULT_TARGET_FAR,
                 open_score: str = DEFAULT_SCORE, transductive: str = "none") -> list[ClassifyResult]:
        """The ``top_k`` articles of each image, best first (``result.predictions[i].label``,
        ``.group``, ``.score`` = cosine similarity), and the answer (``result.answer.article``:
        the best article, or ``"unknown"`` when the photo is not confidently a catalogue article;
        ``result.answer.brand`` then names a confident brand). A path that is itself a catalogue
        image is classified with its own copy left out (``result.in_catalogue``); in a whitened
        catalogue its scores stay optimistic, since the whitening was fitted on it.

        ``reject``: ``"auto"`` (the threshold calibrated on this catalogue for ``target_far``
        false accepts, :func:`fewshot.catalogue.calibrate.calibrate`; a catalogue too small to
        calibrate answers every photo, with a warning), ``"none"`` or a threshold on
        ``open_score`` (:mod:`fewshot.catalogue.scores`).

        ``transductive="paddle"`` classifies the images together, as one batch (PADDLE, Martin et
        al. 2022, :meth:`fewshot.index.CatalogueIndex.transductive_first`): each result's first
        article and ``answer.article`` are the batch's choice, the other articles follow by cosine.
        It needs ``reject="none"`` and ``mode="prototype"``, and refuses catalogue images (same
        file content). Grocery's test photos (docs/measurements.md, "Classifying photos
        together"): against one studio image per article (81) with the default run, top-1 0.520 ->
        0.593; in batches of 5 articles' photos against the main job's catalogue, 0.604 -> 0.769
        (frozen); all 2,485 photos in one batch against the frozen, unwhitened catalogue, 0.599 ->
        0.562 (a loss).

        Raises:
            ImageReadError / InputError: an image that cannot be used; a bad ``reject``,
                ``target_far``, ``open_score`` or ``transductive``; catalogue images in a
                transductive batch.
            TypeError: ``images`` is not a list of images (one path is ``[path]``), ``top_k`` not
                an integer. ValueError: ``top_k < 1``, an unknown ``mode``.
        """
        images = image_list(images)
        top_k = check_classify(top_k, mode)
        check_transductive(transductive, mode, reject)
        rejector = self.rejector(reject, target_far, open_score)
        if all(isinstance(x, Path) for x in images):
            opts = EmbedOptions(runtime=self.runtime, cache_dir=self.cache_dir, progress=False)
            results = classify_paths(self.index, self.model, images, top_k=top_k, mode=mode, embed=opts,
                                     rejector=rejector, transductive=transductive)
            bad = next((r for r in results if r.error), None)
            if bad is not None:
                raise ImageReadError(bad.image, bad.error or "unreadable")
            return results
        vectors, digests, names = embed_images(self.model, images, runtime=self.runtime, cache_dir=self.cache_dir)
        return classify_embedded(self.index, vectors, digests, names, top_k=top_k, mode=mode, rejector=rejector,
                                 transductive=transductive)

    def rejector(self, reject: str | float = "auto", target_far: float = DEFAULT_TARGET_FAR,
                 open_score: str = DEFAULT_SCORE) -> Rejector:
        """The reject decision of this catalogue as it is now (:meth:`Rejector.for_index`)."""
        return Rejector.for_index(self.index, reject, target_far=target_far, score=open_score)

    def check(self, **levels: Any) -> "CheckReport":
        """What would make this catalogue answer wrongly: the same photo under two articles,
        near duplicates, likely mislabels, articles the model cannot tell apart, single-photo
        articles (:func:`fewshot.catalogue.check.check_catalogue`; ``levels``: its options).

        Raises:
            DataError: a level out of range."""
        return check_catalogue(self.index, **levels)

    def search(self, images: Sequence[ImageLike], k: int = 5, *, rerank: Any = "none") -> list[list[Neighbor]]:
        """The ``k`` nearest catalogue images of each image (``.path``, ``.label``, ``.group``,
        ``.score``: the cosine, of whitened vectors in a whitened catalogue), best first.

        ``rerank``: ``"none"``, ``"qe"`` (alpha query expansion), ``"dba"`` (database-side
        augmentation) or ``"dba-qe"`` (both; Radenovic et al. 2018), or a dict of
        :class:`fewshot.index.rerank.RerankOptions` fields: the 100 nearest images re-ranked
        (:func:`fewshot.index.rerank.rerank_shortlist`; ``.score`` is then the re-ranked cosine).
        On Grocery's unseen articles ``dba-qe`` raised the image ranking's MAP@R from 0.564 to
        0.682 and cost 0.6 points of P@1 (docs/benchmarks.md).

        Raises:
            TypeError: ``images`` is not a list of images, ``k`` not an integer.
            ValueError: ``k < 1``. ImageReadError / InputError: an image that cannot be used.
            FewshotError: an unknown ``rerank``, or ``"k-reciprocal"`` (evaluation only).
        """
        k = positive_int(k, "k")
        search_rerank(rerank)
        vectors, _, _ = embed_images(self.model, images, runtime=self.runtime, cache_dir=self.cache_dir)
        return self.index.search(vectors, k, rerank=rerank)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the catalogue as an index folder, atomically.

        Replacing another index folder keeps the articles enrolled there through the service
        (re-embedded with this catalogue's model, and added to this catalogue too).

        Raises:
            FewshotError: ``path`` exists and is not an index folder we may replace
                (``overwrite`` replaces an earlier index, nothing else).
            FolderBusyError: another writer (a service) holds ``path``.
            TypeError / ValueError: ``path`` is not a path.
        """
        path = as_path(path, "path")
        own = self.folder is not None and Path(self.folder).resolve() == Path(path).resolve()
        if own:
            self._check_writable("save into")
        writer = self._owner if own and not self.read_only else object()  # open() holds its lock already
        with claimed_output(path, writer, "Catalogue.save", what="fewshot index", is_ours=is_index_dir,
                            overwrite=overwrite, owned=INDEX_FILES.__contains__, option="path",
                            overwrite_flag="overwrite=True"):
            if not own:  # replacing another index folder: its enrolled articles come along, re-embedded
                keep_enrolled(self.index, previous_index(path), self.model,
                              EmbedOptions(runtime=self.runtime, cache_dir=self.cache_dir, progress=False))
            return self._save_into(Path(path), writer)

    def _save_into(self, path: Path, owner: object) -> Path:
        """Write the images added from memory, then the index, into ``path`` (its writer lock
        held by ``owner``); refuses a folder changed since it was read before writing anything."""
        check_unchanged(self.index, path)
        self._write_unsaved(path)
        saved = save_index(self.index, path, owner=owner)
        self.unsaved.clear()
        return saved

    def _check_writable(self, what: str) -> None:
        """Refuse a change of the folder of a catalogue opened with ``read_only=True``."""
        if self.read_only:
            raise FewshotError(f"this catalogue of {self.folder} was opened read-only: it cannot {what} its folder",
                               hint="open it with Catalogue.open(folder) (read_only=False) to change it")

    def _write_unsaved(self, path: Path) -> None:
        """Write the images added from memory (still in the index) as PNG files under
        ``path/enrolled/``, where the save takes them from (new file names: nothing is replaced;
        a failed save leaves files that no index references, which the service removes)."""
        alive = set(self.index.paths)
        for rel, data in self.unsaved.items():
            if rel in alive:
                atomic_write_bytes(path / rel, data)

    @classmethod
    def load(cls, path: str | Path, *, runtime: str = "auto") -> "Catalogue":
        """Open an index folder (``save`` or ``fewshot index``) with the model it was built with.

        Raises:
            CheckpointError: a missing or damaged folder, or a model that changed since.
            BackboneError: an unknown ``runtime`` (checked here, not at the first classify).
            TypeError / ValueError: ``path`` is not a path.
        """
        from ..embed import check_runtime

        path = as_path(path, "path")
        check_runtime(runtime)
        index = load_index(path)
        return cls(EmbedderSpec.of_index(index).load(path), index, runtime)

    # ------------------------------------------------------------------ a long-lived writer (the service)
    @classmethod
    def open(cls, folder: str | Path, *, model: EmbeddingModel | None = None, runtime: str = "auto",
             read_only: bool = False, holder: str = "fewshot serve", compact_after: int | None = None) -> "Catalogue":
        """The catalogue of index folder ``folder`` for a long-lived user (a service), holding the
        folder's writer lock (named ``holder`` to others) until :meth:`close`. Removes what an
        interrupted change left, and compacts the folder when its journal holds ``compact_after``
        entries or more. ``read_only``: no lock, nothing written (:meth:`enrol`,
        :meth:`delete`, :meth:`compact` and a :meth:`save` into the folder refuse).

        ``model``: the model to embed with (default: the index's own, :meth:`EmbedderSpec.load`);
        one given is checked against the index (:meth:`EmbedderSpec.check`).

        Raises:
            CheckpointError: the folder is missing or damaged, its model changed since it was
                built, or ``model`` cannot embed for it.
            FolderBusyError: another writer holds the folder.
        """
        folder = Path(folder).resolve()
        writer, owner = contextlib.ExitStack(), object()
        if not folder.is_dir():  # say so as a missing index, before a lock file is made beside it
            load_index(folder)
        if not read_only:  # the one writer of this folder until close()
            writer.enter_context(writer_lock(folder, holder, owner=owner))
        try:
            index = load_index(folder)
            spec = EmbedderSpec.of_index(index)
            if model is None:
                model = spec.load(folder)
            else:
                spec.check(model, folder)
            self = cls(model, index, runtime, read_only=read_only, _writer=writer, _owner=owner)
            if not read_only:
                self._tidy(compact_after)
        except BaseException:
            writer.close()
            raise
        return self

    def _tidy(self, compact_after: int | None) -> None:
        removed = drop_leftovers(self.index, self.folder)
        if removed:
            log.warning("removed %d file(s) left by an interrupted change in %s", removed, self.folder)
        if compact_after is not None and journal_length(self.folder) >= compact_after:
            self.compact()

    def close(self) -> None:
        """Release the folder's writer lock (:meth:`open`)."""
        self._writer.close()

    @property
    def folder(self) -> Path | None:
        """The index folder this catalogue was loaded from or last saved to."""
        return self.index.folder

    def scratch(self, what: str) -> tempfile.TemporaryDirectory:
        """A private temporary folder for the files of one change or query in progress, inside
        ``INDEX_DIR/.uploads`` (not the system's temporary folder: what a killed request leaves
        there is removed by the next :meth:`open`); the system's for a read-only catalogue."""
        if self.read_only:  # nothing may be written beside the index
            return tempfile.TemporaryDirectory(prefix=f"fewshot-{what}-")
        (self.folder / UPLOAD_DIR).mkdir(exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=f"{what}-", dir=self.folder / UPLOAD_DIR)

    def enrol(self, label: str, group: str | None, vectors: np.ndarray,
              photos: Sequence[tuple[Path, str]]) -> list[str]:
        """Add photos of an article durably: each ``(file, suffix)`` is stored as
        ``enrolled/<article>/<id><suffix>`` (fsync'ed), then one journal entry with their
        ``vectors float32 [n, E]`` is appended, then the change is made in memory; on any failure
        the stored photos are removed again and nothing changed. The caller holds :attr:`lock`
        and has checked ``label`` and ``group`` (:mod:`fewshot.catalogue.labels`).

        Returns:
            the photos' paths as the index keeps them (relative to the folder, which can move).

        Raises:
            OSError: a photo or the entry could not be written. FolderBusyError: see :meth:`open`.
            FewshotError: the catalogue was opened read-only.
        """
        self._check_writable("enrol into")
        new_files = [(src, self.folder / enrolled_name(label, suffix)) for src, suffix in photos]
        paths = [dst.relative_to(self.folder).as_posix() for _, dst in new_files]
        change = Change("add", label, group, vectors, paths, read_digests([s for s, _ in new_files])[0])
        write_durably(self.folder, new_files,
                      lambda: append_change(self.index, self.folder, change, owner=self._owner))
        return paths

    def delete(self, label: str) -> list[str]:
        """Remove an article durably (one journal entry), then delete its enrolled photos (a crash
        in between only leaves files that the next :meth:`open` removes). The caller holds
        :attr:`lock` and has checked that the article exists and is not the last one.

        Returns:
            the paths of its images.

        Raises:
            FewshotError: the catalogue was opened read-only.
        """
        self._check_writable("delete from")
        paths = self.index.article_paths(label)
        append_change(self.index, self.folder, Change("remove", label), owner=self._owner)
        for p in paths:
            if self.is_enrolled(p):
                remove_written(self.folder, self.photo_file(p))
        return paths

    def compact(self) -> None:
        """Rewrite the folder without its journal, as one atomic folder write; the enrolled photos
        the index still references go along, those of removed articles are dropped."""
        self._check_writable("compact")
        with self.lock:
            self._save_into(self.folder, self._owner)
        log.info("compacted index %s (%d images)", self.folder, len(self.index))

    def photo_file(self, path: str) -> Path:
        """The file of catalogue image ``path`` (an enrolled photo's path is relative to the folder)."""
        p = Path(path)
        return p if p.is_absolute() else self.folder / p

    def is_enrolled(self, path: str) -> bool:
        """Whether catalogue image ``path`` is a photo enrolled into the folder (``enrolled/``)."""
        return self.photo_file(path).is_relative_to(self.folder / ENROLLED_DIR)
