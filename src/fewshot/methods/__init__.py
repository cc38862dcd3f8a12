"""Few-shot methods: each one file behind :class:`~fewshot.methods.base.Method`.

The shared pieces: :mod:`.base` (the method contract: :class:`Method`, :class:`TrainData`,
:class:`IndexBatch`, :class:`EpisodeSpec`), :mod:`.registry` (the ``METHODS`` registry and each
method's options), :mod:`.functional` (prototypes and distances, shared with the metrics),
:mod:`.heads` (projection heads), :mod:`.adapt` (MAML's inner loop), :mod:`.runs` (the RUN_DIR
format: ``config.json`` + ``model.safetensors``).

Importing this package registers the built-in methods (one import line per method file).
"""

from . import arcface, maml, multisimilarity, protonet, proxyanchor, siamese  # noqa: F401  (register them all)
from ..model import EmbeddingModel
from ..options import option
from .base import EpisodeSpec, EpisodicOptions, IndexBatch, Method, NoOptions, TrainData
from .registry import METHODS, get_method, list_methods, method_options, register_method
from .runs import load_embedding_model

__all__ = ["EmbeddingModel", "load_embedding_model", "METHODS", "get_method", "list_methods", "register_method",
           "method_options", "Method", "TrainData", "IndexBatch", "EpisodeSpec", "EpisodicOptions", "NoOptions",
           "option"]
