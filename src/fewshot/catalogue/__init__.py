"""The catalogue: one :class:`Catalogue` for the Python API, the CLI and the service.

* :mod:`~fewshot.catalogue.catalogue`: :class:`Catalogue` (build, classify, search, add / remove
  and save in memory; open, enrol / delete durably and compact for a long-lived writer).
* :mod:`~fewshot.catalogue.spec`: :class:`EmbedderSpec`, what embeds a catalogue, compared in
  one place.
* :mod:`~fewshot.catalogue.build`, :mod:`~fewshot.catalogue.classify`,
  :mod:`~fewshot.catalogue.export`: the jobs (``fewshot index``, ``classify``, ``export``).
* :mod:`~fewshot.catalogue.store`: the index folder (the only module that writes one), with
  :mod:`~fewshot.catalogue.formats` (its files) and :mod:`~fewshot.catalogue.journal` (its changes).
* :mod:`~fewshot.catalogue.scores`, :mod:`~fewshot.catalogue.calibrate`,
  :mod:`~fewshot.catalogue.reject`: open set, "none of these": scores, a threshold calibrated
  on the catalogue alone, and the answer "unknown" (with a brand when it is sure of one).
* :mod:`~fewshot.catalogue.labels`, :mod:`~fewshot.catalogue.inputs`: what a catalogue accepts.
"""

from __future__ import annotations

from .build import build_index, index_embeddings
from .catalogue import Catalogue
from .classify import ClassifyResult, check_transductive, classification_accuracy, classify_embedded, classify_paths
from .calibrate import Calibration, calibrate
from .export import export_index
from .reject import Answer, Rejector
from .scores import OPEN_SCORES, open_scores
from .spec import EmbedderSpec, model_for_index
from .store import load_index, save_index

__all__ = ["Answer", "Calibration", "OPEN_SCORES", "Rejector", "calibrate", "open_scores", "Catalogue", "ClassifyResult", "EmbedderSpec", "build_index", "classification_accuracy",
           "check_transductive", "classify_embedded", "classify_paths", "export_index", "index_embeddings", "load_index",
           "model_for_index", "save_index"]
