"""The Python API: the command-line jobs as functions and one :class:`Catalogue` class.

Habits borrowed from the libraries practitioners know: easyfsl's support-then-query
(``Catalogue.build`` on the support images, ``classify`` on the queries), scikit-learn's
fit/predict, pytorch-metric-learning's ``InferenceModel`` (``train_knn`` ~ ``build``,
``get_nearest_neighbors`` ~ ``search``). Worked examples, run as doctests by the test suite:
``docs/python-api.md``.

Images may be given as file paths, PIL images or ``uint8`` arrays (``[H, W, 3]`` RGB or
``[H, W]`` grey), always as a list (one path is ``[path]``). Paths are embedded through the
on-disk embedding cache and recognised when they are catalogue images (leave-one-out); images
in memory are embedded directly.

Misuse is refused before any work, naming the argument: a wrong type is a ``TypeError`` (a
path where a :class:`~fewshot.data.Dataset` is expected says how to load it), a wrong value a
``ValueError`` (:class:`~fewshot.errors.InputError`, also a ``DataError``, for labels and
image arrays: the same rules as the service, :mod:`fewshot.index.labels`).
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from .backbones import Backbone
from .checks import positive_int
from .data.records import Dataset
from .errors import ImageReadError, InputError
from .index import ENROLLED_DIR, INDEX_FILES, CatalogueIndex, Neighbor, check_classify, is_index_dir
from .index.enrolled import slug
from .index.labels import clean_label, normalize_label, resolve_group
from .io import atomic_write_bytes, claimed_output
from .model import EmbeddingModel
from .pipeline import (ALL_SPLITS, ClassifyResult, EmbedOptions, EvalConfig, classify_paths, evaluate_sets,
                       keep_enrolled, previous_index,
                       index_embeddings, leave_one_out_protocol, load_data, model_for_index, split_protocol_sets)

#: what an image may be: a file path, a PIL image, or a uint8 array ``[H, W, 3]`` / ``[H, W]``
ImageLike = Union[str, Path, Image.Image, np.ndarray]

__all__ = ["load_dataset", "create_backbone", "load_model", "Catalogue", "evaluate", "train", "ImageLike"]


def load_dataset(path: str | Path, *, split: str | None = None, group_from: str | None = None,
                 layout: str = "auto") -> Dataset:
    """Load a folder tree (``root/<article>/*.jpg`` or ``root/<brand>/<article>/*.jpg``), a CSV
    manifest, or a fetched dataset's name (``"grocery"``); ``split`` selects a dataset's own
    image split (``None``: every image). ``layout`` says how a folder tree is read: ``"auto"``
    (refuses a tree of mixed depth, naming the folders), ``"class"`` or ``"group/class"``
    (:func:`fewshot.data.load_dataset`).

    Raises:
        DataError: a missing path, an unknown split, an empty dataset, a mixed-depth tree (with the fix).
        TypeError / ValueError: ``path`` is not a path or name, an unknown ``layout``.
    """
    return load_data(str(_as_path(path, "path")), split or ALL_SPLITS, group_from, layout=layout)


def create_backbone(name: str = "efficientnet_lite0", *, image_size: int = 224, pretrained: bool = True,
                    tta: str = "none") -> EmbeddingModel:
    """A frozen pretrained backbone as an embedding model (``fewshot backbones`` lists names);
    ``tta="flip"`` embeds each image as the mean over it and its mirror image
    (:class:`~fewshot.backbones.FlipAverage`).

    Raises:
        BackboneError: an unknown name or ``tta``, a missing optional package or weights, an
            image size out of range.
        TypeError: ``name`` is not a ``str``, ``image_size`` not an integer.
    """
    from .methods.runs import load_embedding_model

    if not isinstance(name, str):
        raise TypeError(f"name must be a backbone name (str; `fewshot backbones` lists them), not {type(name).__name__}")
    image_size = positive_int(image_size, "image_size")
    return load_embedding_model(name, None, image_size, pretrained=pretrained, tta=tta)


def load_model(run_dir: str | Path, *, tta: str = "none") -> EmbeddingModel:
    """The model a ``fewshot train`` run saved (fine-tuned backbone + head, at its image size),
    with test-time augmentation ``tta`` (as :func:`create_backbone`).

    Raises:
        CheckpointError: not a complete run folder, or damaged weights.
        BackboneError: an unknown ``tta``.
        TypeError / ValueError: ``run_dir`` is not a path (``None`` is not the default backbone:
            that is :func:`create_backbone`).
    """
    from .methods.runs import load_embedding_model

    return load_embedding_model(None, _as_path(run_dir, "run_dir"), tta=tta)


# --------------------------------------------------------------------------- argument checks
_IMAGES = "file paths, PIL images or uint8 arrays [H, W, 3] / [H, W]"


def _as_path(value: object, name: str) -> Path:
    """``value`` as a :class:`Path`. Raises TypeError (not a str / path) or ValueError (empty)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or pathlib.Path), not {type(value).__name__} ({value!r})")
    if os.fspath(value) == "":
        raise ValueError(f"{name} is an empty path")
    return Path(value)


def _as_model(model: object) -> EmbeddingModel:
    if isinstance(model, EmbeddingModel):
        return model
    if isinstance(model, Backbone):
        return EmbeddingModel(model)
    raise TypeError(f"model must be an embedding model, not {type(model).__name__}: make one with "
                    "fewshot.create_backbone(NAME) or fewshot.load_model(RUN_DIR)")


def _as_dataset(dataset: object) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    how = (f"fewshot.load_dataset({os.fspath(dataset)!r})" if isinstance(dataset, (str, os.PathLike))
           else "fewshot.load_dataset(PATH)")
    raise TypeError(f"dataset must be a fewshot Dataset, not {type(dataset).__name__}: load it with {how}")


def _image_list(images: object) -> list[ImageLike]:
    """``images`` as a list whose items are paths (as :class:`Path`), PIL images or arrays.

    Raises:
        TypeError: one image instead of a list (a str would be read character by character,
            an array row by row), something that is not a list, or an item of another type.
    """
    single = isinstance(images, (str, bytes, os.PathLike, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim < 4)
    if images is None or single or not hasattr(images, "__iter__"):
        shown = f" {images!r}" if isinstance(images, (str, os.PathLike)) else ""
        raise TypeError(f"images must be a list of images ({_IMAGES}), not a single {type(images).__name__}{shown}"
                        ": pass [image] (a str would be read character by character)")
    items = list(images)
    for i, x in enumerate(items):
        if not isinstance(x, (str, os.PathLike, Image.Image, np.ndarray)):
            raise TypeError(f"images[{i}] is of type {type(x).__name__}: an image is one of {_IMAGES}")
    return [Path(x) if isinstance(x, (str, os.PathLike)) else x for x in items]


def _to_pil(image: Image.Image | np.ndarray, where: str) -> Image.Image:
    """An RGB PIL image of an image in memory.

    Raises:
        InputError: an array of another dtype or shape, or an image without pixels.
    """
    a = image if isinstance(image, Image.Image) else np.asarray(image)
    if isinstance(a, np.ndarray) and (a.dtype != np.uint8 or a.ndim not in (2, 3)
                                      or (a.ndim == 3 and a.shape[2] not in (1, 3, 4))):
        raise InputError(f"{where} is an array of dtype {a.dtype} and shape {a.shape}",
                         hint=f"give {_IMAGES}")
    width, height = a.size if isinstance(a, Image.Image) else (a.shape[1], a.shape[0])
    if width == 0 or height == 0:
        raise InputError(f"{where} is an empty image ({width}x{height} pixels): there is nothing to embed",
                         hint="give images with pixels")
    if isinstance(a, Image.Image):
        return a.convert("RGB")
    return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).convert("RGB")


def embed_images(model: EmbeddingModel, images: Sequence[ImageLike], *, runtime: str = "auto",
                 cache_dir: str | None = None) -> tuple[np.ndarray, list[str | None], list[str]]:
    """Embed mixed images: ``(vectors float32 [N, E], digests (SHA-256 of files, None for images
    in memory), names)``.

    Raises:
        ImageReadError: a path that is not a readable image (the message names it).
        InputError: an array that is not an image, an image without pixels (checked first).
        TypeError: ``images`` is not a list of images.
    """
    from .embed import read_digests

    images = _image_list(images)
    names = [str(Path(x).resolve()) if isinstance(x, Path) else f"<image {i}>" for i, x in enumerate(images)]
    file_pos = [i for i, x in enumerate(images) if isinstance(x, Path)]
    in_memory = {i: _to_pil(x, f"images[{i}]") for i, x in enumerate(images) if not isinstance(x, Path)}
    vectors = np.zeros((len(images), model.dim), np.float32)
    digests: list[str | None] = [None] * len(images)
    if file_pos:
        paths = [Path(images[i]) for i in file_pos]
        found = read_digests(paths)
        v, ok, failures, _ = model.embed_paths(paths, digests=found, runtime=runtime, cache_dir=cache_dir,
                                               progress=False)
        if failures:
            j, reason = next(iter(failures.items()))
            raise ImageReadError(paths[j], reason)
        for row, j in zip(v, ok):
            vectors[file_pos[j]], digests[file_pos[j]] = row, found[0][j]
    mem = sorted(in_memory)
    if mem:
        import torch

        from .embed import DEFAULT_BATCH_SIZE

        forward = model.forward(runtime, None, cache_dir).forward
        for start in range(0, len(mem), DEFAULT_BATCH_SIZE):
            rows = mem[start:start + DEFAULT_BATCH_SIZE]
            batch = torch.stack([model.backbone.preprocess(in_memory[i]) for i in rows])
            vectors[rows] = model.transform(forward(batch))
    return vectors, digests, names


@dataclass
class Catalogue:
    """Articles with their photos, embedded and indexed: classify and search new photos.

    Build it from a dataset (``Catalogue.build(model, dataset)``), grow it (``add`` / ``remove``),
    keep it (``save`` / ``Catalogue.load``: the same folder ``fewshot index`` writes, so
    ``fewshot classify --index`` and ``fewshot serve --index`` use it too).

    Attributes:
        model: the embedding model (backbone + head).
        index: the catalogue index (FAISS inner product on L2-normalised embeddings).
        runtime: the forward pass (``auto`` | ``torch`` | ``onnx``).
    """

    model: EmbeddingModel
    index: CatalogueIndex
    runtime: str = "auto"
    cache_dir: str | None = None
    #: PNG bytes of the images added from memory, by the path they get in the saved folder
    #: (``enrolled/<article>/<id>.png``), written there by the next :meth:`save`
    unsaved: dict[str, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: EmbeddingModel | Backbone, dataset: Dataset, *, runtime: str = "auto",
              cache_dir: str | None = None, progress: bool = False) -> "Catalogue":
        """Embed every image of ``dataset`` (its label = the article, its group = the brand).

        Raises:
            DataError: no image of the dataset could be read.
            TypeError: ``model`` is not a model, ``dataset`` not a :class:`Dataset` (a path says
                how to load it: ``fewshot.load_dataset(PATH)``).
        """
        model, dataset = _as_model(model), _as_dataset(dataset)
        opts = EmbedOptions(runtime=runtime, cache_dir=cache_dir, progress=progress)
        index = index_embeddings(model, opts.embed(model, dataset), dataset.root or dataset.name)
        return cls(model, index, runtime, cache_dir)

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
        and group are stored as :func:`fewshot.index.labels.clean_label` gives them (NFC,
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
        images = _image_list(images)
        if not images:
            raise InputError(f"no images given for article {label!r}", hint="pass one or more images",
                             code="empty_enrolment")
        vectors, digests, names = embed_images(self.model, images, runtime=self.runtime, cache_dir=self.cache_dir)
        pending = {}
        for i, x in enumerate(images):  # an image from memory is kept as a PNG file, so a saved folder has it
            if not isinstance(x, Path):
                buf = io.BytesIO()
                _to_pil(x, f"images[{i}]").save(buf, "PNG")
                names[i] = f"{ENROLLED_DIR}/{slug(label)}/{uuid.uuid4().hex[:12]}.png"
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

    def classify(self, images: Sequence[ImageLike], top_k: int = 5, mode: str = "prototype") -> list[ClassifyResult]:
        """The ``top_k`` articles of each image, best first (``result.predictions[i].label``,
        ``.group``, ``.score`` = cosine similarity). A path that is itself a catalogue image is
        classified with its own copy left out (``result.in_catalogue``).

        Raises:
            ImageReadError / InputError: an image that cannot be used.
            TypeError: ``images`` is not a list of images (one path is ``[path]``), ``top_k`` not
                an integer. ValueError: ``top_k < 1``, an unknown ``mode``.
        """
        images = _image_list(images)
        top_k = check_classify(top_k, mode)
        if all(isinstance(x, Path) for x in images):
            opts = EmbedOptions(runtime=self.runtime, cache_dir=self.cache_dir, progress=False)
            results = classify_paths(self.index, self.model, images, top_k=top_k, mode=mode, embed=opts)
            bad = next((r for r in results if r.error), None)
            if bad is not None:
                raise ImageReadError(bad.image, bad.error or "unreadable")
            return results
        vectors, digests, names = embed_images(self.model, images, runtime=self.runtime, cache_dir=self.cache_dir)
        own = self.index.find_images(digests)
        preds = self.index.classify(vectors, top_k=top_k, mode=mode, exclude=own)
        return [ClassifyResult(n, p, None, in_catalogue=bool(o), left_out=[self.index.labels[j] for j in o])
                for n, p, o in zip(names, preds, own)]

    def search(self, images: Sequence[ImageLike], k: int = 5) -> list[list[Neighbor]]:
        """The ``k`` nearest catalogue images of each image (``.path``, ``.label``, ``.group``,
        ``.score``), best first.

        Raises:
            TypeError: ``images`` is not a list of images, ``k`` not an integer.
            ValueError: ``k < 1``. ImageReadError / InputError: an image that cannot be used.
        """
        k = positive_int(k, "k")
        vectors, _, _ = embed_images(self.model, images, runtime=self.runtime, cache_dir=self.cache_dir)
        return self.index.search(vectors, k)

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
        path = _as_path(path, "path")
        with claimed_output(path, writer := object(), "Catalogue.save", what="fewshot index", is_ours=is_index_dir,
                            overwrite=overwrite, owned=INDEX_FILES.__contains__, option="path",
                            overwrite_flag="overwrite=True"):
            if self.index.folder is None or Path(self.index.folder).resolve() != Path(path).resolve():
                # replacing another index folder: its enrolled articles come along, re-embedded
                keep_enrolled(self.index, previous_index(path), self.model,
                              EmbedOptions(runtime=self.runtime, cache_dir=self.cache_dir, progress=False))
            self._write_unsaved(Path(path))
            saved = self.index.save(path, owner=writer)
            self.unsaved.clear()
            return saved

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
        from .embed import check_runtime

        path = _as_path(path, "path")
        check_runtime(runtime)
        index = CatalogueIndex.load(path)
        return cls(model_for_index(index, path), index, runtime)


def evaluate(model: EmbeddingModel | Backbone, dataset: Dataset, *, split_file: str | Path | None = None,
             part: str = "test", episodes: int = 1000, seed: int = 0, runtime: str = "auto",
             out: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Retrieval metrics (mAP, MAP@R, P@1, Recall@k, per group) and N-way K-shot accuracy.

    Without ``split_file``: leave-one-out within ``dataset``. With it: the classes of ``part``,
    queries against their gallery (:func:`fewshot.data.protocol_sets`). ``out``: also write
    ``metrics.json``, ``report.md`` and the PNGs there.

    Returns:
        the metrics record (the dict ``metrics.json`` holds).

    Raises:
        DataError: data that cannot give a meaningful number (one class, one image per class).
        TypeError: ``model`` is not a model, ``dataset`` not a :class:`Dataset` (a path says
            how to load it), ``episodes`` / ``seed`` not integers, paths that are not paths.
        ValueError: ``episodes < 1``, ``seed < 0``. All checked before anything is embedded.
    """
    from .data.splits import ClassSplit

    model, dataset = _as_model(model), _as_dataset(dataset)
    episodes, seed = positive_int(episodes, "episodes"), positive_int(seed, "seed", minimum=0)
    split_file = _as_path(split_file, "split_file") if split_file is not None else None
    out = _as_path(out, "out") if out is not None else None
    cfg = EvalConfig(data=str(dataset.root or dataset.name), split_file=str(split_file) if split_file else None,
                     part=part, seed=seed, episodes=episodes, embed=EmbedOptions(runtime=runtime, progress=False))
    if split_file is None:
        return evaluate_sets(cfg, dataset, None, leave_one_out_protocol(dataset), out, model, overwrite=overwrite)
    queries, gallery, protocol = split_protocol_sets(dataset, ClassSplit.load(split_file), split_file, part)
    return evaluate_sets(cfg, queries, gallery, protocol, out, model, overwrite=overwrite)


def train(config: Any) -> Any:
    """Train a method (``config``: a :class:`fewshot.training.TrainConfig`, e.g. from
    ``fewshot.training.make_config("triplet", data=..., split_file=..., out=...)``);
    returns the :class:`fewshot.training.RunResult` (best epoch, metrics, history).

    Raises:
        TypeError: ``config`` is not a ``TrainConfig`` (the message says how to make one).
    """
    from .training import TrainConfig, train as _train

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, not {type(config).__name__}: make one with "
                        "fewshot.training.make_config('triplet', data=..., split_file=..., out=...)")
    return _train(config)
