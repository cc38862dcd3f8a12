"""The training run's data: train items (cached backbone embeddings) and the val sets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
import numpy as np
import torch

from ..backbones import Backbone, create_backbone
from ..data.records import Dataset
from ..data import ClassSplit, dataset_for, protocol_sets
from ..embed import Embeddings, embed_dataset
from ..embed.options import EmbedOptions
from ..errors import DataError, FewshotError
from ..methods import TrainData
from .config import TrainConfig

log = logging.getLogger("fewshot")


# --------------------------------------------------------------------------- data
@dataclass
class RunData:
    """A run's data: the backbone, the class split, the train items (:class:`TrainData`, cached
    embeddings) and their dataset, and the embedded val queries and gallery."""

    backbone: Backbone
    split: ClassSplit
    train: TrainData
    train_set: Dataset
    val_q: Embeddings
    val_g: Embeddings


def _embed(dataset: Dataset, backbone: Backbone, cfg: TrainConfig) -> Embeddings:
    return embed_dataset(dataset, backbone, batch_size=cfg.embed_batch_size, num_workers=cfg.workers,
                         cache_dir=cfg.cache_dir, progress=cfg.progress, runtime=cfg.runtime)


def run_split(cfg: TrainConfig) -> tuple[Dataset, ClassSplit]:
    """``cfg``'s dataset and class split as the run trains on them: with ``cfg.train_on_val`` the
    split's ``train`` holds the val classes too."""
    from ..data.protocol import load_protocol

    dataset, split = load_protocol(cfg.data, cfg.split_file, cfg.group_from, layout=cfg.layout)
    if cfg.train_on_val:  # the val classes train too; they still give the (no longer held-out) val figures
        split = replace(split, train=sorted({*split.train, *split.val}))
    return dataset, split


def run_embed_options(cfg: TrainConfig, run_dir: str | Path, tta: str) -> EmbedOptions:
    """How a finished run embeds after training (its final evaluation, its whitening prior): the
    run's own weights and test size, with ``cfg``'s batch size, workers, cache and runtime."""
    return EmbedOptions(backbone=None, model_dir=str(run_dir), image_size=None, batch_size=cfg.embed_batch_size,
                        num_workers=cfg.workers, cache_dir=cfg.cache_dir, progress=cfg.progress,
                        runtime=cfg.runtime, threads=torch.get_num_threads(), tta=tta)


def load_run_data(cfg: TrainConfig) -> RunData:
    """Load ``cfg``'s dataset and split, and embed the train and val images (cached); with
    ``cfg.train_on_val`` the split's ``train`` holds the val classes too.

    Raises:
        DataError: no split file, fewer than two train classes, or a val part too small to validate on.
    """
    if not cfg.split_file:
        raise DataError("training needs a class split (train / val classes)",
                        hint="set split_file=FILE (e.g. splits/grocery-unseen.json)", options=("split_file",))
    dataset, split = run_split(cfg)
    train_set = dataset_for(dataset, split, "train")
    val_q_set, val_g_set = protocol_sets(dataset, split, "val")
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, image_size=cfg.image_size)
    test_size = _test_size(cfg, backbone)
    tr = _embed(train_set, backbone, cfg)
    names = sorted(set(tr.labels))
    if len(names) < 2:
        raise DataError(f"the train classes of {cfg.split_file} have {len(names)} readable class(es)",
                        hint="training needs at least two classes")
    _check_validation(val_q_set, val_g_set, cfg)
    if test_size != backbone.image_size:  # the trained model embeds at its test size, validation too
        backbone.preprocess = replace(backbone.preprocess, image_size=test_size)
    index = {n: i for i, n in enumerate(names)}
    train = TrainData(x=torch.from_numpy(np.ascontiguousarray(tr.vectors)),
                      y=torch.tensor([index[lab] for lab in tr.labels], dtype=torch.int64),
                      label_names=names, groups=list(tr.groups), paths=[str(p) for p in tr.dataset.paths])
    return RunData(backbone, split, train, tr.dataset, _embed(val_q_set, backbone, cfg),
                 _embed(val_g_set, backbone, cfg))


def _test_size(cfg: TrainConfig, backbone: Backbone) -> int:
    """:meth:`TrainConfig.embed_size`, where the backbone embeds at that side as at its training
    side; a default test size falls back to the training side where it does not (``conv4``).

    Raises:
        FewshotError: an explicit ``test_image_size`` the backbone cannot embed at.
    """
    size = cfg.embed_size()
    if size == backbone.image_size or backbone.embeds_at(size):
        return size
    if cfg.test_image_size is None:
        log.info("%s embeds a %d-px photo to another length than a %d-px one (no global pooling): the run embeds "
                 "at its training size", cfg.backbone, size, backbone.image_size)
        return backbone.image_size
    raise FewshotError(f"test_image_size={size}: {cfg.backbone} cannot embed a {size}-px photo as it does a "
                       f"{backbone.image_size}-px one", hint=f"use --test-image-size {backbone.image_size} (the "
                       "--image-size), or a backbone with global pooling", options=("test_image_size",))


def with_rotated_classes(train: TrainData, rotations: int) -> TrainData:
    """``train`` with each class repeated at ``rotations`` (2..4) multiples of 90 degrees, each
    rotation a class of its own (Santoro et al. 2016; Vinyals et al. 2016, section 4.1.1).

    Layout (shared with :func:`~fewshot.methods.augment.rotated_copies`): item ``r * N + i`` is
    item ``i`` turned ``r`` x 90 degrees, of class ``r * C + y[i]``, named ``"<name> @<r*90>"``
    for ``r >= 1``. ``x`` (the unrotated initial features, used only for a head's centre) and
    ``groups`` / ``paths`` are repeated.

    Returns:
        a new :class:`TrainData` of ``rotations * N`` items and ``rotations * C`` classes.
    """
    n_cls = train.num_classes
    names = list(train.label_names) + [f"{name} @{r * 90}" for r in range(1, rotations) for name in train.label_names]
    return TrainData(x=train.x.repeat(rotations, 1),
                     y=torch.cat([train.y + r * n_cls for r in range(rotations)]),
                     label_names=names, groups=list(train.groups) * rotations,
                     paths=list(train.paths) * rotations)


def _check_validation(val_q: Dataset, val_g: Dataset, cfg: TrainConfig) -> None:
    """Refuse a val part on which validation is empty or true by construction (one class:
    val MAP@R 1.0 whatever the model); warn when it has few classes."""
    from ..data.protocol import check_evaluable

    try:
        check_evaluable(val_q.labels, val_g.labels, f"the val classes of {cfg.split_file}")
    except DataError as exc:
        raise DataError(f"validation would be meaningless: {exc.message}",
                        hint="give the split file's val part at least 2 classes (5 or more is better) "
                             "with photos for both queries and gallery") from None
    usable = set(val_q.labels) & set(val_g.labels)
    if len(usable) < 5 and not cfg.train_on_val:  # with train_on_val val MAP@R picks nothing
        log.warning("only %d val classes: val MAP@R (which picks the best epoch) is noisy; "
                    "5 or more val classes are better", len(usable))
