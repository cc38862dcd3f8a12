"""Few-shot methods: each one file behind :class:`~fewshot.methods.base.EmbeddingModel`.

The shared pieces: :mod:`.heads` (projection heads), :mod:`.runs` (the RUN_DIR format:
``config.json`` + ``model.safetensors``), :mod:`.base` (the embedding model used by
evaluate / index / classify / embed).
"""

from .base import EmbeddingModel
from .runs import load_embedding_model

__all__ = ["EmbeddingModel", "load_embedding_model"]
