"""The Python API: the command-line jobs as functions and one :class:`Catalogue` class.

Habits borrowed from the libraries practitioners know: easyfsl's support-then-query
(``Catalogue.build`` on the support images, ``classify`` on the queries), scikit-learn's
fit/predict, pytorch-metric-learning's ``InferenceModel`` (``train_knn`` ~ ``build``,
``get_nearest_neighbors`` ~ ``search``). Worked examples, run as doctests by the test suite:
``docs/python-api.md``.

Images may be given as file paths, PIL images or ``uint8`` arrays (``[H, W, 3]`` RGB or
``[H, W]`` grey). Paths are embedded through the on-disk embedding cache and recognised when
they are catalogue images (leave-one-out); images in memory are embedded directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from .backbones import Backbone
from .data.records import Dataset
from .errors import DataError, ImageReadError
from .index import INDEX_FILES, CatalogueIndex, Neighbor, is_index_dir
from .io import check_output
from .model import EmbeddingModel
from .pipeline import (ALL_SPLITS, ClassifyResult, EmbedOptions, EvalConfig, classify_paths, evaluate_sets,
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
    """
    return load_data(str(path), split or ALL_SPLITS, group_from, layout=layout)


def create_backbone(name: str = "efficientnet_lite0", *, image_size: int = 224, pretrained: bool = True,
                    tta: str = "none") -> EmbeddingModel:
    """A frozen pretrained backbone as an embedding model (``fewshot backbones`` lists names);
    ``tta="flip"`` embeds each image as the mean over it and its mirror image
    (:class:`~fewshot.backbones.FlipAverage`).

    Raises:
        BackboneError: an unknown name or ``tta``, a missing optional package or weights.
    """
    from .methods.runs import load_embedding_model

    return load_embedding_model(name, None, image_size, pretrained=pretrained, tta=tta)


def load_model(run_dir: str | Path, *, tta: str = "none") -> EmbeddingModel:
    """The model a ``fewshot train`` run saved (fine-tuned backbone + head, at its image size),
    with test-time augmentation ``tta`` (as :func:`create_backbone`).

    Raises:
        CheckpointError: not a complete run folder, or damaged weights.
        BackboneError: an unknown ``tta``.
    """
    from .methods.runs import load_embedding_model

    return load_embedding_model(None, run_dir, tta=tta)


def _as_model(model: EmbeddingModel | Backbone) -> EmbeddingModel:
    return model if isinstance(model, EmbeddingModel) else EmbeddingModel(model)


def _to_pil(image: Image.Image | np.ndarray, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise DataError(f"{where} is an array of dtype {a.dtype} and shape {a.shape}",
                        hint="give uint8 arrays [H, W, 3] (RGB) or [H, W] (grey), PIL images, or file paths")
    return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).convert("RGB")


def embed_images(model: EmbeddingModel, images: Sequence[ImageLike], *, runtime: str = "auto",
                 cache_dir: str | None = None) -> tuple[np.ndarray, list[str | None], list[str]]:
    """Embed mixed images: ``(vectors float32 [N, E], digests (SHA-256 of files, None for images
    in memory), names)``.

    Raises:
        ImageReadError: a path that is not a readable image (the message names it).
        DataError: an array that is not an image.
    """
    from .embed import read_digests

    images = list(images)
    names = [str(Path(x).resolve()) if isinstance(x, (str, Path)) else f"<image {i}>" for i, x in enumerate(images)]
    file_pos = [i for i, x in enumerate(images) if isinstance(x, (str, Path))]
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
    on_disk = set(file_pos)
    mem = [i for i in range(len(images)) if i not in on_disk]
    if mem:
        import torch

        from .embed import DEFAULT_BATCH_SIZE

        forward = model.forward(runtime, None, cache_dir).forward
        for start in range(0, len(mem), DEFAULT_BATCH_SIZE):
            rows = mem[start:start + DEFAULT_BATCH_SIZE]
            batch = torch.stack([model.backbone.preprocess(_to_pil(images[i], names[i])) for i in rows])
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

    @classmethod
    def build(cls, model: EmbeddingModel | Backbone, dataset: Dataset, *, runtime: str = "auto",
              cache_dir: str | None = None, progress: bool = False) -> "Catalogue":
        """Embed every image of ``dataset`` (its label = the article, its group = the brand).

        Raises:
            DataError: no image of the dataset could be read.
        """
        model = _as_model(model)
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
        """Enrol images of an article (new or existing); returns how many were added.

        Raises:
            ImageReadError / DataError: an image that cannot be used (nothing is added then).
        """
        if not images:
            raise DataError(f"no images given for article {label!r}", hint="pass one or more images")
        vectors, digests, names = embed_images(self.model, images, runtime=self.runtime, cache_dir=self.cache_dir)
        self.index.add_article(label, group, vectors, names, digests=digests)
        return len(vectors)

    def remove(self, label: str) -> int:
        """Remove every image of an article; returns how many were removed.

        Raises:
            KeyError: no such article.
        """
        return self.index.remove_article(label)

    def classify(self, images: Sequence[ImageLike], top_k: int = 5, mode: str = "prototype") -> list[ClassifyResult]:
        """The ``top_k`` articles of each image, best first (``result.predictions[i].label``,
        ``.group``, ``.score`` = cosine similarity). A path that is itself a catalogue image is
        classified with its own copy left out (``result.in_catalogue``).

        Raises:
            ImageReadError / DataError: an image that cannot be used; ValueError: bad top_k / mode.
        """
        images = list(images)
        if all(isinstance(x, (str, Path)) for x in images):
            opts = EmbedOptions(runtime=self.runtime, cache_dir=self.cache_dir, progress=False)
            results = classify_paths(self.index, self.model, [Path(x) for x in images], top_k=top_k, mode=mode,
                                     embed=opts)
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
        ``.score``), best first."""
        vectors, _, _ = embed_images(self.model, list(images), runtime=self.runtime, cache_dir=self.cache_dir)
        return self.index.search(vectors, k)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the catalogue as an index folder, atomically.

        Raises:
            FewshotError: ``path`` exists and is not an index folder we may replace
                (``overwrite`` replaces an earlier index, nothing else).
        """
        check_output(path, what="fewshot index", is_ours=is_index_dir, overwrite=overwrite,
                     owned=INDEX_FILES.__contains__, option="path", overwrite_flag="overwrite=True")
        return self.index.save(path)

    @classmethod
    def load(cls, path: str | Path, *, runtime: str = "auto") -> "Catalogue":
        """Open an index folder (``save`` or ``fewshot index``) with the model it was built with.

        Raises:
            CheckpointError: a missing or damaged folder, or a model that changed since.
        """
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
    """
    from .data.splits import ClassSplit

    model = _as_model(model)
    cfg = EvalConfig(data=str(dataset.root or dataset.name), split_file=str(split_file) if split_file else None,
                     part=part, seed=seed, episodes=episodes, embed=EmbedOptions(runtime=runtime, progress=False))
    if split_file is None:
        return evaluate_sets(cfg, dataset, None, leave_one_out_protocol(dataset), out, model, overwrite=overwrite)
    queries, gallery, protocol = split_protocol_sets(dataset, ClassSplit.load(split_file), split_file, part)
    return evaluate_sets(cfg, queries, gallery, protocol, out, model, overwrite=overwrite)


def train(config: Any) -> Any:
    """Train a method (``config``: a :class:`fewshot.methods.base.TrainConfig`, e.g. from
    ``fewshot.methods.base.make_config("triplet", data=..., split_file=..., out=...)``);
    returns the :class:`fewshot.training.RunResult` (best epoch, metrics, history)."""
    from .training import train as _train

    return _train(config)
