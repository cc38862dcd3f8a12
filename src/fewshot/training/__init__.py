"""One training loop for every method: ``train(TrainConfig) -> RunResult``.

What :func:`train` does, in order (every file is written into ``RUN_DIR.partial``, see
:func:`staging_dir`, which replaces ``RUN_DIR`` only when training completes; nothing is
written before the arguments, the data and :meth:`Method.check_data` have been checked):

1. Loads the dataset and the class split (``cfg.split_file``): training uses *every* image of
   the split's train classes (:func:`~fewshot.data.protocol.dataset_for`); validation uses the val
   classes under the cross-visit rule (:func:`~fewshot.data.protocol.protocol_sets`: queries from
   the test photos, gallery from the train photos).
2. Embeds those images with the frozen backbone (cached on disk: a second run embeds nothing).
3. Builds the method (:mod:`fewshot.methods.base`: its own options, the episode shape and its
   head) and the optimizer (:mod:`.optim`: Adam, the learning rates of its parameter groups, the
   warm-up and schedule); a head with ``"centre": true`` gets the mean L2-normalised training
   embedding as its centre. Seeds torch and numpy.
4. Validates epoch 0 (before any step), so the curves start at the frozen baseline, then runs
   epochs: each epoch iterates ``method.epoch_batches(train, rng)`` with a per-epoch seeded
   ``rng`` and takes one optimizer step per batch on the method's loss
   (``loss_from(embeddings, batch)``, or ``loss(batch)``); then validates (val mAP, MAP@R, Precision@1 with
   :func:`~fewshot.metrics.retrieval_metrics`, and N-way K-shot episodic accuracy with
   ``val_episodes`` episodes and :meth:`Method.episode_classifier`).
5. Keeps the best epoch by val MAP@R (``RUN_DIR/config.json`` + ``model.safetensors`` via
   :func:`~fewshot.methods.runs.save_run`, atomically) and stops after ``patience`` epochs without
   improvement (with ``train_on_val``, whose val classes also train, the last epoch and no
   early stop). With ``weight_average`` (``"ema"`` or ``"swa"``, :mod:`.average`) what is
   validated and saved is an average of the trained weights, not the last ones.
6. Every epoch writes ``RUN_DIR/history.csv`` (epoch, train_loss, val_map, val_map_at_r,
   val_precision_at_1, val_episodic_acc, seconds), ``RUN_DIR/curves.png`` and, last,
   ``RUN_DIR/checkpoint.pt`` (atomic: head / method / fine-tuned backbone state, optimizer state,
   epoch, RNG states, history, best epoch, patience counter). ``cfg.resume`` continues from it
   and gives exactly the run an uninterrupted training would have given (every epoch's
   randomness is seeded from ``(seed, epoch)``); a finished run resumed with a larger
   ``epochs`` trains on (one that stopped early stays stopped).
7. Writes the run's whitening prior (:mod:`.prior`: the training photos embedded by the saved
   weights, their within-article statistics, ``RUN_DIR/whitening-prior.safetensors``), which
   every whitened catalogue made with the run pools in (:mod:`fewshot.index.prior`);
   :func:`add_whitening_prior` writes it for a run trained before 0.10.0.
8. Evaluates the best model on ``cfg.final_eval`` classes (default ``test``) with
   :func:`fewshot.evaluation.evaluate` into ``RUN_DIR/eval_<part>/``.

With ``fine_tune="last:N"`` the backbone's last ``N`` blocks train too, with ``"all"`` every
backbone parameter (:mod:`.finetune`), for every method: the siamese methods on augmented
image batches, the episodic ones on their episodes' support and query images. The backbone has
its own learning rate (``backbone_lr``, default ``lr``) that warms up linearly
over ``warmup_steps`` steps; its BatchNorm stays in eval mode unless ``bn="train"`` (or a
backbone trained from scratch, ``pretrained=False``). Validation then re-embeds the val images
with the current backbone every epoch, and the saved run holds the backbone's weights (its
embeddings are cached under a digest of them). CUDA is used when present (``device="auto"``),
with bfloat16 autocast; on 2 CPU cores a Grocery ``last:2`` epoch takes about 2 minutes
(docs/guides/training.md, "Fine-tuning the feature extractor").

This module sits above the evaluation layer: it uses the metrics (and, for the final evaluation,
:mod:`fewshot.evaluation`), which nothing below it imports.

Distributed training (:mod:`.distributed`): :func:`train_distributed` (``fewshot train --nproc N``)
and torchrun (``torchrun --nproc_per_node=N -m fewshot train ...``) run the same loop in N
processes with DistributedDataParallel, each embedding a slice of every batch; the run equals
the one-process run on the same batches (every method that declares
:attr:`~fewshot.methods.base.Method.data_parallel`: contrastive, triplet, protonet; MAML is refused).

Parts: :mod:`.config` (:class:`TrainConfig`: every loop setting declared once, its checks),
:mod:`.defaults` (:func:`make_config`: the defaults that depend on other settings),
:mod:`.loop` (:func:`train` and the epoch loop), :mod:`.setup` (what a run builds first),
:mod:`.optim` (optimizer, learning-rate policy, the step), :mod:`.data` (train / val sets),
:mod:`.validate` (each epoch's validation), :mod:`.finetune` (the trainable backbone parameters
on augmented images), :mod:`.checkpoint` (the run folder: RUN_DIR.partial, history, curves,
checkpoints, ``resume``), :mod:`.state` (the loop's state and its checkpoint),
:mod:`.parallel` (the data-parallel step), :mod:`.distributed` (several processes),
:mod:`.average` (the weight average: EMA or SWA), :mod:`.prior` (the whitening prior).
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT, HISTORY_FIELDS, read_history, staging_dir
from .config import TrainConfig
from .defaults import config_keys, make_config
from .distributed import train_distributed
from .loop import RunResult, train
from .prior import add_whitening_prior

__all__ = ["train", "train_distributed", "RunResult", "HISTORY_FIELDS", "CHECKPOINT", "read_history",
           "staging_dir", "TrainConfig", "make_config", "config_keys", "add_whitening_prior"]
