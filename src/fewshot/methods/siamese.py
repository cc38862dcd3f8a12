"""Siamese metric learning: contrastive loss and triplet margin loss, with miners.

* **Contrastive loss** (Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an
  Invariant Mapping", CVPR 2006): pulls same-article pairs together and pushes different-article
  pairs apart until they are past a margin. Here with the cosine similarity ``s`` of
  L2-normalised embeddings (``pytorch_metric_learning.losses.ContrastiveLoss`` with
  ``distance=CosineSimilarity()``): a positive pair costs ``relu(pos_margin - s)``, a negative pair
  ``relu(s - neg_margin)``; the mean is over the pairs with a non-zero loss.
* **Triplet margin loss** (Schroff, Kalenichenko and Philbin, "FaceNet: A Unified Embedding for
  Face Recognition and Clustering", CVPR 2015): for an anchor ``a``, a positive ``p`` (same
  article) and a negative ``n``, ``relu(s(a, n) - s(a, p) + margin)``
  (``pytorch_metric_learning.losses.TripletMarginLoss`` with ``CosineSimilarity``).

Miners (``--miner``), from ``pytorch_metric_learning.miners``, choose which pairs / triplets of
a batch enter the loss:

============  =============================================  ==========================================
``--miner``   triplet                                        contrastive
============  =============================================  ==========================================
``hard``      ``TripletMarginMiner("hard")``: triplets whose  ``BatchHardMiner``: per anchor the least
              negative is more similar than the positive      similar positive and the most similar
                                                             negative (Hermans et al. 2017), as pairs
``semihard``  ``TripletMarginMiner("semihard")``: negatives   ``MultiSimilarityMiner(epsilon=0.1)``:
              less similar than the positive but within the   negatives more similar than the anchor's
              margin (FaceNet's choice)                       hardest positive minus epsilon and
                                                             positives less similar than its hardest
                                                             negative plus epsilon (Wang et al. 2019)
``all``       ``TripletMarginMiner("all")``: every triplet     no miner: every pair of the batch
              that violates the margin
============  =============================================  ==========================================

Batches come from ``pytorch_metric_learning.samplers.MPerClassSampler``: ``batch_size`` items,
``m_per_class`` of each of ``batch_size / m_per_class`` classes, so every batch holds positives
for every anchor. One epoch is about one pass over the training items.

Tensor shapes: a batch is ``idx`` int64 ``[B]`` (training items) and ``y`` int64 ``[B]``;
:meth:`Method.features` gives ``[B, D]`` backbone features, the head ``[B, E]`` L2-normalised
embeddings, and the loss a scalar.

Defaults, chosen on the *val* classes of ``splits/grocery-unseen.json`` (see docs/guides/training.md): Adam
``lr=1e-4``, ``batch_size=64``, ``m_per_class=4``; triplet ``margin=0.1`` with ``semihard``
mining; contrastive ``pos_margin=0.8`` / ``neg_margin=0.3`` (``--pos-margin`` / ``--margin``)
with ``hard`` (batch-hard) mining.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from pytorch_metric_learning import distances, losses, miners, samplers
from pytorch_metric_learning.utils import common_functions as pml_common

from ..errors import FewshotError
from ..options import check_options
from .base import EpisodeSpec, IndexBatch, Method, TrainData, option
from .registry import register_method

log = logging.getLogger("fewshot")

__all__ = ["SiameseMethod", "ContrastiveMethod", "TripletMethod", "MINERS", "SiameseOptions", "TripletOptions",
           "ContrastiveOptions"]

MINERS = ("hard", "semihard", "all")


@contextlib.contextmanager
def _pml_random(seed: int) -> Iterator[None]:
    """Seed pytorch-metric-learning's module-level numpy RNG (used by MPerClassSampler), then restore it."""
    saved = pml_common.NUMPY_RANDOM
    pml_common.NUMPY_RANDOM = np.random.RandomState(seed)
    try:
        yield
    finally:
        pml_common.NUMPY_RANDOM = saved


@dataclass
class SiameseOptions:
    """Batches of the pair / triplet methods (pytorch-metric-learning's ``MPerClassSampler``)."""

    batch_size: int = option(64, "Items per batch.", min=4)
    m_per_class: int = option(4, "Images per class in a batch.", min=2)


@dataclass
class TripletOptions(SiameseOptions):
    """Options of ``triplet``."""

    margin: float = option(0.1, "Triplet margin on cosine similarity.", min=0.0)
    miner: str = option("semihard", "Which triplets enter the loss: hard | semihard | all.", choices=MINERS)


@dataclass
class ContrastiveOptions(SiameseOptions):
    """Options of ``contrastive``."""

    margin: float = option(0.3, "Negative margin on cosine similarity: less similar negatives cost nothing.",
                           min=-1.0)
    pos_margin: float = option(0.8, "Positive margin on cosine similarity: more similar positives cost nothing.",
                               min=-1.0)
    miner: str = option("hard", "Which pairs enter the loss: hard (batch-hard) | semihard | all.", choices=MINERS)


class SiameseMethod(Method):
    """Shared part of the pair / triplet methods: m-per-class batches, a loss and a miner.

    Subclasses set :attr:`Config`, :meth:`make_loss` and :meth:`make_miner`. Data-parallel:
    the miner and the loss see the embeddings of the whole batch, gathered from every process.
    """

    Config = SiameseOptions
    data_parallel = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_options(f"method '{self.name}'", self.opts)  # options made without method_options, e.g. a bad miner
        self.distance = distances.CosineSimilarity()
        self.loss_fn = self.make_loss()
        self.miner = self.make_miner()

    def make_loss(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_miner(self) -> Any:
        raise NotImplementedError

    def check_data(self, train: TrainData) -> None:
        """Refuse batch settings that do not fit and data without positive pairs.

        A contrastive or triplet loss learns from pairs of *different* photos of one article
        (anchor and positive): with fewer than two classes of 2+ photos every positive is the
        anchor itself, the loss is 0 and nothing is learned.

        Raises:
            FewshotError: naming the options or data to change.
        """
        self._check_batches(train)
        counts = np.bincount(train.y.numpy(), minlength=train.num_classes)
        several = int((counts >= 2).sum())
        if several < 2:
            raise FewshotError(
                f"{self.name} training needs positive pairs (two different photos of one article), but only "
                f"{several} of {train.num_classes} train classes have 2 or more photos: the loss would be 0 "
                "and nothing would be learned",
                hint="give the train classes at least 2 photos each (4 or more is better)")
        if several < train.num_classes:
            lonely = [train.label_names[c] for c in np.flatnonzero(counts < 2)]
            log.warning("%d of %d train classes have a single photo and give no positive pair: %s",
                        len(lonely), train.num_classes, ", ".join(lonely[:10]) + (" ..." if len(lonely) > 10 else ""))

    def _check_batches(self, train: TrainData) -> tuple[int, int]:
        m, bs = int(self.opts.m_per_class), int(self.opts.batch_size)
        n_classes = train.num_classes
        if m < 2 or bs < 2 * m or bs % m:
            raise FewshotError(f"batch size {bs} and m-per-class {m} do not fit",
                               hint="use m_per_class >= 2 and a batch_size that is a multiple of it "
                                    "(at least two classes per batch)", options=("batch_size", "m_per_class"))
        if bs > m * n_classes:
            raise FewshotError(f"batch size {bs} needs {bs // m} classes of {m} images, but training has "
                               f"{n_classes} classes",
                               hint=f"use batch_size <= {m * n_classes} (a multiple of {m})", options=("batch_size",))
        return m, bs

    def epoch_batches(self, train: TrainData, rng: np.random.Generator) -> list[IndexBatch]:
        """About one pass over the training items in MPerClassSampler batches.

        Returns:
            ``len(train) // batch_size`` (at least 1) :class:`IndexBatch` es of
            ``batch_size`` items, ``m_per_class`` per class.

        Raises:
            FewshotError: ``batch_size`` is not a multiple of ``m_per_class`` or exceeds
                ``m_per_class * classes``.
        """
        m, bs = self._check_batches(train)
        n_batches = max(1, len(train) // bs)
        labels = train.y.numpy()
        sampler = samplers.MPerClassSampler(labels, m=m, batch_size=bs, length_before_new_iter=n_batches * bs)
        with _pml_random(int(rng.integers(0, 2**31 - 1))):
            order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
        return [IndexBatch(idx=b, y=train.y[torch.from_numpy(b)]) for b in order.reshape(-1, bs)]

    def items(self, batch: IndexBatch) -> np.ndarray:
        """The batch's items, int64 ``[B]``."""
        return batch.idx

    def loss_from(self, embeddings: torch.Tensor, batch: IndexBatch) -> torch.Tensor:
        """Mined loss of one batch from its embeddings ``[B, E]``: a scalar."""
        y = batch.y.to(embeddings.device)
        tuples = self.miner(embeddings, y) if self.miner is not None else None
        return self.loss_fn(embeddings, y, tuples)

    @classmethod
    def check_parallel(cls, opts: Any, episodes: EpisodeSpec, world_size: int) -> None:
        """As :meth:`Method.check_parallel`; also refuses a ``batch_size`` that is not a multiple
        of ``world_size`` (every process embeds an equal slice of each batch).

        Raises:
            FewshotError: naming ``batch_size``, ``m_per_class`` and ``nproc`` (``options``).
        """
        super().check_parallel(opts, episodes, world_size)
        bs, m = int(opts.batch_size), int(opts.m_per_class)
        if world_size > 1 and bs % world_size:
            good = next(b for b in range(bs, bs * world_size + 1) if b % world_size == 0 and b % m == 0)
            raise FewshotError(f"batch_size={bs} does not split over nproc={world_size}: every process embeds an "
                               "equal slice of each batch",
                               hint=f"use a batch_size that is a multiple of {world_size} (and of m_per_class={m}), "
                                    f"e.g. batch_size={good}, or another nproc",
                               options=("batch_size", "m_per_class", "nproc"))


@register_method("contrastive")
class ContrastiveMethod(SiameseMethod):
    """Contrastive loss on pairs (Hadsell, Chopra, LeCun 2006) on cosine similarity.

    Options (:class:`ContrastiveOptions`): ``pos_margin`` (default 0.8): positives more similar
    than this cost nothing; ``margin`` (default 0.3): negatives less similar than this cost
    nothing; ``miner`` default ``"hard"``.
    """

    name = "contrastive"
    summary = "Siamese pairs with the contrastive loss (Hadsell, Chopra and LeCun 2006), batch-hard mining"
    Config = ContrastiveOptions
    #: its default fine-tuning runs peaked at epoch 1 (--fine-tune all) and 2 (last:2)
    fine_tune_defaults = {"epochs": 3}

    def make_loss(self) -> torch.nn.Module:
        self.margin, self.pos_margin = float(self.opts.margin), float(self.opts.pos_margin)
        return losses.ContrastiveLoss(pos_margin=self.pos_margin, neg_margin=self.margin,
                                      distance=self.distance)

    def make_miner(self) -> Any:
        if self.opts.miner == "hard":
            return miners.BatchHardMiner(distance=self.distance)
        if self.opts.miner == "semihard":
            return miners.MultiSimilarityMiner(epsilon=0.1, distance=self.distance)
        return None


@register_method("triplet")
class TripletMethod(SiameseMethod):
    """Triplet margin loss (Schroff et al. 2015, FaceNet) on cosine similarity; options
    (:class:`TripletOptions`): ``margin`` default 0.1, ``miner`` default ``"semihard"``."""

    name = "triplet"
    summary = "Siamese triplets with the triplet margin loss (Schroff et al. 2015), semi-hard mining"
    Config = TripletOptions
    #: every default fine-tuning run measured peaked by epoch 3 (best epochs 1, 1, 2, 2, 2, 3, 3,
    #: 3: --fine-tune all and last:13, seeds 0-2, 2026-12-02 to 12-05), so a 4th epoch is not run;
    #: the average of epochs 2 and 3 (swa) beat the best epoch by val over 3 seeds (test MAP@R at 288 px
    #: 0.617 / 0.627 / 0.617 against 0.601 / 0.601 / 0.625, 2026-12-05): it also ends the val's coin
    #: toss between epochs whose val MAP@R differ by 0.001
    fine_tune_defaults = {"epochs": 3, "weight_average": "swa"}

    def make_loss(self) -> torch.nn.Module:
        self.margin = float(self.opts.margin)
        return losses.TripletMarginLoss(margin=self.margin, distance=self.distance)

    def make_miner(self) -> Any:
        return miners.TripletMarginMiner(margin=self.margin, type_of_triplets=self.opts.miner,
                                         distance=self.distance)
