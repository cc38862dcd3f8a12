"""How images are turned into embeddings: the settings every command shares.

:class:`EmbedOptions` names the model (a backbone, or a training run) and how to run it
(batch size, decode workers, cache, runtime, test-time augmentation, Ray). Loading the model it
names needs the RUN_DIR format, a layer above this one:
:func:`fewshot.methods.from_options.model_from_options`. :meth:`EmbedOptions.embed` takes any
model with a backbone, ``transform`` and ``embed`` (:class:`fewshot.model.EmbeddingModel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..backbones import Backbone
from ..data.records import Dataset
from . import DEFAULT_BATCH_SIZE, Embeddings
from .distributed import RayOptions, ray_embed_dataset

#: input side in pixels of a backbone when no size is given
DEFAULT_IMAGE_SIZE = 224

__all__ = ["DEFAULT_IMAGE_SIZE", "EmbedOptions", "Embedder"]


class Embedder(Protocol):
    """What :meth:`EmbedOptions.embed` needs of a model (:class:`fewshot.model.EmbeddingModel`)."""

    backbone: Backbone

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Backbone embeddings ``float32 [N, D]`` -> model embeddings ``float32 [N, E]``."""

    def embed(self, dataset: Dataset, *, runtime: str = "auto", threads: int | None = None,
              **kwargs: Any) -> Embeddings:
        """The model embeddings of a dataset's readable images."""


@dataclass
class EmbedOptions:
    """How images are turned into embeddings (shared by every command)."""

    backbone: str | None = "efficientnet_lite0"
    model_dir: str | None = None
    #: input side in pixels; ``None`` = 224 for a backbone, the run's own size with ``model_dir``
    image_size: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = 0
    cache_dir: str | None = None
    strict: bool = False
    progress: bool = True
    #: ``auto`` | ``torch`` | ``onnx`` (:mod:`fewshot.embed.runtime`)
    runtime: str = "auto"
    #: ONNX Runtime threads; ``None`` = ``torch.get_num_threads()``
    threads: int | None = None
    #: test-time augmentation: ``none`` | ``flip`` | ``scales`` (:class:`~fewshot.backbones.FlipAverage`,
    #: :class:`~fewshot.backbones.ScaleAverage`)
    tta: str = "none"
    #: embed on Ray Data (:mod:`fewshot.embed.distributed`); ``None`` = in this process
    distributed: RayOptions | None = None

    def embed(self, model: Embedder, dataset: Dataset) -> Embeddings:
        """``dataset`` embedded by ``model`` with these settings: :class:`Embeddings` whose
        ``vectors`` are ``float32 [N, E]`` for the ``N`` readable images.

        Raises:
            DataError: with ``strict``, an unreadable image (and what
                :func:`fewshot.embed.embed_dataset` raises).
        """
        if self.distributed is not None:
            emb = ray_embed_dataset(dataset, model.backbone, options=self.distributed, strict=self.strict,
                                    batch_size=self.batch_size, cache_dir=self.cache_dir, progress=self.progress,
                                    runtime=self.runtime, threads=self.threads)
            emb.vectors = model.transform(emb.vectors)
            return emb
        return model.embed(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                           cache_dir=self.cache_dir, strict=self.strict, progress=self.progress,
                           runtime=self.runtime, threads=self.threads)
