"""The embedding model that :class:`~fewshot.embed.options.EmbedOptions` name.

Here rather than beside the options: loading a training run needs the RUN_DIR format
(:mod:`fewshot.methods.runs`), a layer above :mod:`fewshot.embed`.
"""

from __future__ import annotations

import logging

from ..embed.options import DEFAULT_IMAGE_SIZE, EmbedOptions
from ..model import EmbeddingModel
from .runs import load_embedding_model

log = logging.getLogger("fewshot")

__all__ = ["model_from_options"]


def model_from_options(options: EmbedOptions) -> EmbeddingModel:
    """The backbone at ``image_size``, or the run in ``model_dir`` at its own size (a
    different ``image_size`` given with a run is reported and ignored).

    Raises:
        CheckpointError: the run cannot be loaded, or its backbone is not ``backbone``.
        BackboneError: an unknown backbone or test-time augmentation.
    """
    if options.model_dir is None:
        return load_embedding_model(options.backbone, None, options.image_size or DEFAULT_IMAGE_SIZE,
                                    tta=options.tta)
    model = load_embedding_model(options.backbone, options.model_dir, tta=options.tta)
    size = model.backbone.image_size
    if options.image_size is not None and options.image_size != size:
        log.warning("--image-size %d ignored: run %s embeds at %d px (its test size, in its config.json)",
                    options.image_size, options.model_dir, size)
    return model
