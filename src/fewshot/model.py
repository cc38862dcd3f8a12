"""The embedding model every command uses (layer ``model``, between ``embed`` and ``methods``): a backbone, optionally followed by a trained head.

``--backbone NAME`` gives a frozen pretrained backbone; ``--model RUN_DIR`` gives the backbone
and head a training run saved (see :mod:`fewshot.methods.runs`). Backbone embeddings are
cached on disk (:mod:`fewshot.embed`), so a head trained on frozen features re-embeds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .backbones import Backbone
from .backbones.base import weights_digest
from .data.records import Dataset
from .embed import Embeddings, ForwardChoice, LazyForward, apply_head, check_runtime, embed_dataset, embed_paths, make_forward

class EpisodeClassifier(Protocol):
    """How a model classifies the queries of one N-way episode (the default is the nearest
    cosine prototype; a MAML run adapts on the support set first).

    ``classifier(support_x float32 [N*K, E], support_y int64 [N*K], query_x float32 [N*Q, E],
    n_way) -> int64 [N*Q]`` predicted way indices (a tensor or array).
    """

    def __call__(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                 n_way: int) -> torch.Tensor: ...


@dataclass
class EmbeddingModel:
    """Backbone + optional head: images -> ``float32 [N, E]`` embeddings.

    Attributes:
        backbone: the feature extractor (frozen unless a run fine-tuned it).
        head: maps backbone embeddings ``[B, D]`` to ``[B, E]``; ``None`` = identity.
        run_dir: the training run this came from, if any.
        run_config: that run's config (method, head, protocol, seed, ...).
        episode_classifier: a method-specific N-way classifier for episodic evaluation
            (MAML adapts on the support set); ``None`` = nearest prototype.
    """

    backbone: Backbone
    head: nn.Module | None = None
    run_dir: Path | None = None
    run_config: dict = field(default_factory=dict)
    episode_classifier: EpisodeClassifier | None = None
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)
    _forwards: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Output embedding dimension ``E``."""
        if self.head is None:
            return self.backbone.dim
        return int(self.head(torch.zeros(1, self.backbone.dim)).shape[-1])

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Backbone embeddings ``float32 [N, D]`` -> model embeddings ``float32 [N, E]``."""
        return vectors if self.head is None else apply_head(self.head, vectors)

    def forward(self, runtime: str = "auto", threads: int | None = None,
                cache_dir: str | Path | None = None) -> ForwardChoice:
        """The backbone's forward pass on ``runtime`` (:func:`fewshot.embed.make_forward`),
        made once per setting and reused (an ONNX session loads in about 0.3 s)."""
        key = (runtime, threads, str(cache_dir) if cache_dir else None, self.backbone.cache_key)
        if key not in self._forwards:
            self._forwards[key] = make_forward(self.backbone, runtime, threads=threads, cache_dir=cache_dir)
        return self._forwards[key]

    def _lazy_forward(self, runtime: str, threads: int | None, cache_dir) -> LazyForward:
        """A forward that is made on its first batch (nothing is exported when all is cached)."""
        check_runtime(runtime)
        return LazyForward(lambda: self.forward(runtime, threads, cache_dir).forward)

    def embed(self, dataset: Dataset, *, runtime: str = "auto", threads: int | None = None, **kwargs) -> Embeddings:
        """Embed a dataset (kwargs go to :func:`fewshot.embed.embed_dataset`)."""
        forward = self._lazy_forward(runtime, threads, kwargs.get("cache_dir"))
        emb = embed_dataset(dataset, self.backbone, forward=forward, **kwargs)
        emb.vectors = self.transform(emb.vectors)
        return emb

    def embed_paths(self, paths: Sequence[str | Path], *, runtime: str = "auto", threads: int | None = None,
                    **kwargs):
        """Embed files; returns ``(vectors [M, E], ok_indices, failures, num_cached)``."""
        forward = self._lazy_forward(runtime, threads, kwargs.get("cache_dir"))
        vectors, ok, failures, cached = embed_paths(paths, self.backbone, forward=forward, **kwargs)
        return self.transform(vectors), ok, failures, cached

    def runtimes_used(self) -> list[dict]:
        """What embedded with this model so far: runtime asked for, runtime used, any notice."""
        return [{"requested": c.requested, "runtime": c.runtime, "notice": c.notice, **c.details}
                for c in self._forwards.values()]

    def weights_digest(self) -> str:
        """:func:`weights_digest` of every tensor that shapes the embeddings (backbone + head).

        An index records it, so that a run retrained after the index was built is detected
        (:class:`fewshot.catalogue.EmbedderSpec`). Computed once per model (about 50 ms for
        EfficientNet-Lite0).
        """
        if self._digest is None:
            state = {f"backbone.{k}": v for k, v in self.backbone.model.state_dict().items()}
            if self.head is not None:
                state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
            self._digest = weights_digest(state)
        return self._digest

    def describe(self) -> dict:
        """JSON-ready description for result files."""
        return {"backbone": self.backbone.describe(),
                "model_dir": str(self.run_dir) if self.run_dir else None,
                "method": self.run_config.get("method", "frozen"),
                "embedding_dim": self.dim,
                "episode_classifier": _describe_classifier(self.episode_classifier),
                "runtimes": self.runtimes_used()}


def _describe_classifier(classifier: EpisodeClassifier | None) -> dict:
    """How episodes are classified: nearest cosine prototype unless the run set its own."""
    if classifier is None:
        return {"kind": "nearest_prototype", "distance": "cosine"}
    described = getattr(classifier, "describe", None)
    if isinstance(described, dict):
        return dict(described)
    return {"kind": getattr(classifier, "__name__", type(classifier).__name__)}
