"""What the Python API accepts, checked before any work: paths, models, datasets and images.

Images may be given as file paths, PIL images or ``uint8`` arrays (``[H, W, 3]`` RGB or
``[H, W]`` grey), always as a list (one path is ``[path]``). A wrong type is a ``TypeError`` (a
path where a :class:`~fewshot.data.Dataset` is expected says how to load it), a wrong value a
``ValueError`` (:class:`~fewshot.errors.InputError`, also a ``DataError``, for image arrays).
:func:`embed_images` embeds such a list: paths through the on-disk embedding cache, images in
memory directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from ..backbones import Backbone
from ..data.records import Dataset
from ..errors import ImageReadError, InputError
from ..model import EmbeddingModel

__all__ = ["ImageLike", "as_dataset", "as_model", "as_path", "embed_images", "image_list", "to_pil"]

#: what an image may be: a file path, a PIL image, or a uint8 array ``[H, W, 3]`` / ``[H, W]``
ImageLike = Union[str, Path, Image.Image, np.ndarray]
_IMAGES = "file paths, PIL images or uint8 arrays [H, W, 3] / [H, W]"


def as_path(value: object, name: str) -> Path:
    """``value`` as a :class:`Path`. Raises TypeError (not a str / path) or ValueError (empty)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or pathlib.Path), not {type(value).__name__} ({value!r})")
    if os.fspath(value) == "":
        raise ValueError(f"{name} is an empty path")
    return Path(value)


def as_model(model: object) -> EmbeddingModel:
    """``model`` as an :class:`EmbeddingModel` (a :class:`Backbone` is wrapped). Raises TypeError."""
    if isinstance(model, EmbeddingModel):
        return model
    if isinstance(model, Backbone):
        return EmbeddingModel(model)
    raise TypeError(f"model must be an embedding model, not {type(model).__name__}: make one with "
                    "fewshot.create_backbone(NAME) or fewshot.load_model(RUN_DIR)")


def as_dataset(dataset: object) -> Dataset:
    """``dataset`` itself when it is a :class:`Dataset`. Raises TypeError saying how to load one."""
    if isinstance(dataset, Dataset):
        return dataset
    how = (f"fewshot.load_dataset({os.fspath(dataset)!r})" if isinstance(dataset, (str, os.PathLike))
           else "fewshot.load_dataset(PATH)")
    raise TypeError(f"dataset must be a fewshot Dataset, not {type(dataset).__name__}: load it with {how}")


def image_list(images: object) -> list[ImageLike]:
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


def to_pil(image: Image.Image | np.ndarray, where: str) -> Image.Image:
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
    from ..embed import read_digests

    images = image_list(images)
    names = [str(Path(x).resolve()) if isinstance(x, Path) else f"<image {i}>" for i, x in enumerate(images)]
    file_pos = [i for i, x in enumerate(images) if isinstance(x, Path)]
    in_memory = {i: to_pil(x, f"images[{i}]") for i, x in enumerate(images) if not isinstance(x, Path)}
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

        from ..embed import DEFAULT_BATCH_SIZE

        forward = model.forward(runtime, None, cache_dir).forward
        for start in range(0, len(mem), DEFAULT_BATCH_SIZE):
            rows = mem[start:start + DEFAULT_BATCH_SIZE]
            batch = torch.stack([model.backbone.preprocess(in_memory[i]) for i in rows])
            vectors[rows] = model.transform(forward(batch))
    return vectors, digests, names
