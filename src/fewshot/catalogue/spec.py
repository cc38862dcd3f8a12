"""What embeds a catalogue: :class:`EmbedderSpec`, recorded in an index's metadata and compared
in one place.

An index is only usable with the model that embedded its images: the same backbone at the same
image size, the same trained run (unchanged since: its weights digest), the same test-time
augmentation. :meth:`EmbedderSpec.of` reads that from a model, :meth:`EmbedderSpec.of_index`
from an index's metadata (the JSON keys of every fewshot version, so old indexes load),
:meth:`EmbedderSpec.load` makes the model again (refusing a run that changed) and
:meth:`EmbedderSpec.check` refuses a model given in its place that cannot embed for the index.
Nothing here depends on the runtime (torch or ONNX) that runs the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones import TTA_MODES
from ..errors import CheckpointError
from ..index import CatalogueIndex
from ..methods.runs import load_embedding_model
from ..model import EmbeddingModel
from ..version import __version__

__all__ = ["DEFAULT_BACKBONE", "DEFAULT_IMAGE_SIZE", "EmbedderSpec", "model_for_index"]

log = logging.getLogger("fewshot")

#: the backbone an index records when it records none (fewshot 0.1.0)
DEFAULT_BACKBONE = "efficientnet_lite0"
#: the image size an index records when it records none (the backbones' default input side)
DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class EmbedderSpec:
    """How a catalogue's images were embedded, independent of the runtime.

    Attributes:
        backbone: the backbone's name (:func:`fewshot.backbones.create_backbone`).
        image_size: its input side in pixels.
        run_dir: the ``fewshot train`` run (absolute path), ``None`` for a frozen backbone.
        tta: test-time augmentation (:data:`~fewshot.backbones.TTA_MODES`).
        weights_digest: :meth:`~fewshot.model.EmbeddingModel.weights_digest` of the weights that
            shape the embeddings; ``None`` when unknown (an index of fewshot before 0.1.1).
        dim: the embedding dimension ``E`` (``None`` when unknown).
        data, built_by: where the catalogue came from and the fewshot version that recorded
            the spec, for messages only (not compared).
    """

    backbone: str = DEFAULT_BACKBONE
    image_size: int = DEFAULT_IMAGE_SIZE
    run_dir: str | None = None
    tta: str = "none"
    weights_digest: str | None = None
    dim: int | None = None
    data: str = field(default="DATA", compare=False)
    built_by: str = field(default=__version__, compare=False)

    @classmethod
    def of(cls, model: EmbeddingModel) -> "EmbedderSpec":
        """The spec of ``model`` (its weights digest computed once per model, about 50 ms)."""
        return cls(backbone=model.backbone.name, image_size=model.backbone.image_size,
                   run_dir=str(Path(model.run_dir).resolve()) if model.run_dir else None,
                   tta=model.backbone.tta, weights_digest=model.weights_digest(), dim=model.dim)

    @classmethod
    def of_index(cls, index: CatalogueIndex) -> "EmbedderSpec":
        """The spec an index recorded in its ``config`` (``"none"`` test-time augmentation for an
        index of fewshot 0.1.0, which had none)."""
        cfg = index.config
        tta = str(((cfg.get("model") or {}).get("backbone") or {}).get("tta", "none"))
        return cls(backbone=cfg.get("backbone", DEFAULT_BACKBONE),
                   image_size=int(cfg.get("image_size", DEFAULT_IMAGE_SIZE)),
                   run_dir=cfg.get("model_dir"), tta=tta, weights_digest=cfg.get("model_digest"), dim=index.dim,
                   data=cfg.get("data", "DATA"), built_by=cfg.get("fewshot_version", "< 0.1.1"))

    def to_config(self) -> dict:
        """The keys an index's ``config`` records (beside ``model``, the model's description,
        which holds the test-time augmentation): ``image_size``, ``backbone``, ``model_dir``,
        ``model_digest``."""
        return {"image_size": self.image_size, "backbone": self.backbone, "model_dir": self.run_dir,
                "model_digest": self.weights_digest}

    def load(self, where: str | Path | None = None) -> EmbeddingModel:
        """The embedding model this spec describes (same backbone, size, run and test-time
        augmentation); ``where``: the index folder, for messages.

        Raises:
            CheckpointError: an unknown test-time augmentation (a newer fewshot recorded it), a
                run that is gone or damaged, or one retrained since (its weights digest differs
                from the recorded one), so that new embeddings would not be comparable.
        """
        name = f"index {where}" if where is not None else "the index"
        if self.tta not in TTA_MODES:
            raise CheckpointError(f"{name} was built with test-time augmentation {self.tta!r}, which this fewshot "
                                  f"{__version__} does not know (a newer version built it?)",
                                  hint=f"rebuild the index: {self._rebuild(where, self.run_dir, tta=False)}")
        try:
            model = load_embedding_model(self.backbone, self.run_dir, self.image_size, tta=self.tta)
        except CheckpointError as exc:
            if not self.run_dir:
                raise
            raise CheckpointError(f"the run behind {name} cannot be loaded: {exc.message}",
                                  hint=f"restore {self.run_dir}, or rebuild the index with another run: "
                                       f"{self._rebuild(where, 'RUN_DIR')}") from None
        self._check_digest(model, name, where)
        return model

    def _check_digest(self, model: EmbeddingModel, name: str, where: str | Path | None) -> None:
        if self.weights_digest is None:
            log.warning("%s records no model digest (built by fewshot %s): cannot check that its model is "
                        "unchanged; rebuild it with `fewshot index ... --overwrite` to pin it", name,
                        self.built_by)
        elif self.weights_digest != model.weights_digest():
            source = f"run {self.run_dir}" if self.run_dir else f"backbone {self.backbone}"
            raise CheckpointError(
                f"the model behind {name} has changed since it was built ({source}: weights digest "
                f"{self.weights_digest} when indexed, {model.weights_digest()} now); its catalogue vectors and new "
                "query embeddings would not be comparable",
                hint=f"rebuild the index with the current model: {self._rebuild(where, self.run_dir)}")

    def _rebuild(self, where: str | Path | None, run: str | None, *, tta: bool = True) -> str:
        """The command that builds the index again (with run ``run``, and this spec's ``--tta``)."""
        flag = f"--tta {self.tta} " if tta and self.tta != "none" else ""
        return (f"fewshot index --data {self.data} " + (f"--model {run} " if run else "")
                + f"{flag}--out {where or 'INDEX'} --overwrite")

    def check(self, model: EmbeddingModel, where: str | Path) -> None:
        """Refuse ``model`` in place of the one this spec describes when its embeddings cannot be
        compared with the catalogue's: another dimension, or another test-time augmentation.

        Raises:
            CheckpointError: naming both values.
        """
        if self.dim is not None and model.dim != self.dim:
            raise CheckpointError(
                f"the model gives {model.dim}-dimensional embeddings but index {where} "
                f"has {self.dim}", hint="serve the index with the model it was built with")
        if model.backbone.tta != self.tta:
            raise CheckpointError(
                f"the model embeds with test-time augmentation {model.backbone.tta!r} but index "
                f"{where} was built with {self.tta!r}",
                hint="serve the index with the model it was built with (leave model out to use it)")


def model_for_index(index: CatalogueIndex, where: str | Path | None = None) -> EmbeddingModel:
    """The embedding model ``index`` was built with (:meth:`EmbedderSpec.load` of its spec).

    Raises:
        CheckpointError: as :meth:`EmbedderSpec.load`.
    """
    return EmbedderSpec.of_index(index).load(where)
