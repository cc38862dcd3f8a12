"""Few-shot methods: each one file behind :class:`~fewshot.methods.base.Method`.

The shared pieces: :mod:`.method` (the method contract and the ``METHODS`` registry),
:mod:`.functional` (prototypes and distances, shared with the metrics), :mod:`.heads`
(projection heads), :mod:`.runs` (the RUN_DIR format: ``config.json`` + ``model.safetensors``),
:mod:`.base` (the embedding model used by evaluate / index / classify / embed).

Importing this package registers the built-in methods (one import line per method file).
"""

from . import maml, protonet, siamese  # noqa: F401  (register contrastive, triplet, protonet, maml, fomaml)
from ..model import EmbeddingModel
from .base import METHODS, get_method, list_methods, register_method
from .runs import load_embedding_model

__all__ = ["EmbeddingModel", "load_embedding_model", "METHODS", "get_method", "list_methods", "register_method"]
