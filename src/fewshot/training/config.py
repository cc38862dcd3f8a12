"""The training loop's settings, declared once: :class:`TrainConfig`.

Every field is made with :func:`loop_option` (:func:`fewshot.options.option` plus what the
command line needs), so its default, help text, flag and allowed values live in one place:
``fewshot train`` generates one flag per field from this metadata (:mod:`fewshot.cli.train`),
and :func:`check_config` enforces it (``min``, ``max``, ``above``, ``choices``) before a run
writes anything, plus the few rules that tie fields together (small explicit functions below).
What one method reads lives in ``options``, an instance of that method's
:attr:`~fewshot.methods.base.Method.Config`. The rules for defaults that depend on other
settings (fine-tuning, a method's own defaults) are :func:`fewshot.training.defaults.make_config`'s.

Errors name the fields as Python spells them (``class_rotations=5``) and list them in
:attr:`~fewshot.errors.FewshotError.options`; the command line shows each as its flag.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..backbones import check_tta
from ..embed import DEFAULT_BATCH_SIZE, check_runtime
from ..errors import FewshotError
from ..methods import EpisodeSpec, Method, get_method, method_options
from ..methods.heads import ProjectionHead, parse_head, resolve_head_spec
from ..options import check_options, option

__all__ = ["TrainConfig", "loop_option", "check_config", "parse_fine_tune", "default_test_size", "TEST_SIZE_RATIO", "LR_SCHEDULES", "BACKBONE_LR_FACTOR",
           "WARMUP_STEPS", "SCRATCH_HEAD", "WEIGHT_AVERAGES", "EMA_DECAY", "SWA_START"]

#: ``lr_schedule`` values (:func:`fewshot.training.optim.lr_scheduler`)
LR_SCHEDULES = ("constant", "cosine")
#: default backbone learning rate relative to ``lr`` when fine-tuning. Measured on the Grocery
#: val classes (bench/quality_finetune.py, triplet, last:2, 5 epochs): equal rates (1e-4 / 1e-4)
#: reached val MAP@R 0.604 after 2 epochs and 0.619 at best; a backbone at a quarter of the head's
#: rate 0.594 after 5, a head at 4x the backbone's 0.577 after 2. The head is an identity map
#: (the frozen ranking), so it needs no faster rate; the warm-up guards the first steps.
BACKBONE_LR_FACTOR = 1.0
#: default linear warm-up of the backbone learning rate, in optimizer steps (about one epoch)
WARMUP_STEPS = 50
#: the head of a run whose backbone trains from scratch: centring on the mean embedding of the
#: random initial backbone would go stale as the backbone learns, so it is off
SCRATCH_HEAD: dict[str, Any] = {"kind": "linear", "centre": False}
#: ``weight_average`` values (:mod:`fewshot.training.average`)
WEIGHT_AVERAGES = ("none", "ema", "swa")
#: default decay of ``weight_average="ema"`` per optimizer step: the average spans about the last
#: 1 / (1 - d) = 100 steps, two epochs of a Grocery fine-tune (about 50 steps each, 4 epochs).
#: 0.999 (1,000 steps) would outlast such a run and keep the early weights in the average.
#: Not measured against accuracy yet.
EMA_DECAY = 0.99
#: default first epoch of ``weight_average="swa"``: epochs 2-4 of a 4-epoch fine-tune
SWA_START = 2


def loop_option(default: Any, help: str, *, flag: str | None = None, min: float | None = None,
                choices: tuple | None = None, max: float | None = None, above: float | None = None,
                **cli: Any) -> Any:
    """A field of :class:`TrainConfig`: :func:`fewshot.options.option` plus ``max`` (largest
    allowed value), ``above`` (values must be greater) and what the command line needs (``cli``
    metadata): ``required`` (no default on the command line), ``path`` (a file or folder),
    ``hidden``, ``invert`` (a boolean whose flag sets it to ``False``, e.g. ``--no-progress``),
    ``parse`` (a function from the flag's text to the value, e.g. :func:`parse_head`) and
    ``unset`` (the command line passes nothing unless the flag is given, because the default
    depends on other settings: the help text says it)."""
    base = option(default, help, flag=flag, min=min, choices=choices)
    return field(default=default, metadata={**base.metadata, "max": max, "above": above, "cli": cli})


@dataclass
class TrainConfig:
    """Everything one training run needs; recorded in ``RUN_DIR/config.json`` (``train_config``).

    Each field's help text is in its declaration below (``fewshot train --help`` shows it); the
    ones that need more words:

    Attributes:
        split_file: class-split JSON (:class:`~fewshot.data.splits.ClassSplit`): training uses
            every image of its train classes; validation its val classes (cross-visit queries
            vs gallery, :func:`~fewshot.data.protocol.protocol_sets`).
        seed: seeds torch, numpy and the samplers; the same seed gives the same run.
        epochs: maximum epochs (episodic methods count ``options.episodes`` instead).
        fine_tune: which backbone parameters train (:func:`parse_fine_tune`): ``"none"`` (head
            on cached frozen features), ``"last:N"`` (also the backbone's own last ``N`` blocks,
            :meth:`~fewshot.backbones.Backbone.trainable_tail`), or ``"all"``; ``"last"`` means
            ``"last:<fine_tune_blocks>"`` (kept for runs of fewshot 0.1.0).
        backbone_lr: ``None`` = :data:`BACKBONE_LR_FACTOR` x ``lr``; ``warmup_steps``: ``None`` =
            :data:`WARMUP_STEPS`.
        lr_schedule: ``"cosine"``: after the warm-up every group's rate follows a half cosine down
            to 0 at the last planned step (Loshchilov and Hutter 2017, SGDR, eq. 5 without restarts).
        class_rotations: the Omniglot protocol of Santoro et al. 2016 and Vinyals et al. 2016
            (Matching Networks, section 4.1.1) uses 4.
        weight_average: what each epoch validates and the best run saves
            (:mod:`fewshot.training.average`): the raw weights (``"none"``), their exponential
            moving average (``"ema"``, decay ``ema_decay``, ``None`` = :data:`EMA_DECAY`) or
            their stochastic weight average from epoch ``swa_start`` on (``"swa"``, ``None`` =
            :data:`SWA_START`).
        head: :class:`~fewshot.methods.heads.ProjectionHead` spec; ``None`` = the default head
            (:data:`SCRATCH_HEAD` for a backbone trained from scratch).
        runtime: forward pass for the frozen embeddings, the final evaluation and, when
            fine-tuning on a CPU, each epoch's validation (:mod:`fewshot.embed.runtime`).
        final_eval: class part evaluated with the best model at the end, into ``RUN_DIR/eval_<part>/``.
        options: the method's options (its :attr:`~fewshot.methods.base.Method.Config`; ``None``
            or a dict = its defaults / those values).
    """

    method: str = loop_option("arcface", "contrastive | triplet | multisimilarity | proxyanchor | arcface | protonet | "
                              "maml | fomaml (see `fewshot methods`).")
    data: str = loop_option("", "Dataset folder, CSV manifest, or a fetched dataset name.", required=True)
    split_file: str = loop_option("", "Class-disjoint protocol JSON (e.g. splits/grocery-unseen.json): train on its "
                                  "train classes, validate on its val classes.", required=True, path=True)
    out: str = loop_option("", "RUN_DIR: config.json, model.safetensors, history.csv, curves.png, checkpoint.pt.",
                           required=True, path=True)
    backbone: str = loop_option("efficientnet_lite0", "Backbone name.")
    image_size: int = loop_option(224, "Input side in pixels.", min=16, max=1024)
    test_image_size: int | None = loop_option(
        None, "Input side at which the trained model embeds: validation, the final evaluation and every later use "
        "(index, classify, serve). Default: when fine-tuning with --augment standard, --image-size x 9/7 rounded to "
        "a multiple of 32 (288 for 224: random resized crops show objects larger than whole photos do, Touvron et al. "
        "2019; test MAP@R +0.015 to +0.022 on Grocery), else --image-size; a backbone whose embedding depends on "
        "the input side (conv4) keeps --image-size.", min=16, max=1024, unset=True)
    seed: int = loop_option(0, "Seed of everything random (same seed, same run).", min=0, max=2**32 - 1)
    epochs: int = loop_option(30, "Maximum epochs (default 30, or when fine-tuning 3 for triplet and contrastive, 4 for the others; episodic methods: --epochs N "
                              "means N x --episodes-per-epoch episodes).", min=0, unset=True)
    patience: int = loop_option(5, "Stop after this many epochs without a better val MAP@R (default 2 when "
                                "fine-tuning, else 5; 0 = never).", min=0, unset=True)
    lr: float = loop_option(1e-4, "Adam learning rate (default 1e-4 unless the method sets its own).", above=0.0,
                            unset=True)
    weight_decay: float = loop_option(0.0, "Adam weight decay (default 0).", min=0.0, unset=True)
    fine_tune: str = loop_option(
        "none", "What of the backbone trains: all (every backbone parameter) | last:N (the backbone's last N "
        "blocks) | none (only the head, on cached embeddings: minutes instead of tens of minutes on a CPU). Default: "
        "the backbone's choice, for efficientnet_lite0 last:13 (the stem and the 3 blocks at 1/2 and 1/4 resolution "
        "stay frozen: as good as all, 1.25x faster), else all. Fine-tuning trains on augmented images and re-embeds the val images "
        "each epoch (docs/guides/training.md: its cost and gain).", unset=True)
    fine_tune_blocks: int = loop_option(2, "N of a bare --fine-tune last (fewshot 0.1.0's spelling; use last:N).",
                                        min=1, hidden=True, unset=True)
    backbone_lr: float | None = loop_option(None, "Learning rate of the fine-tuned backbone parameters (default: "
                                            "--lr; it warms up over --warmup-steps).", above=0.0, unset=True)
    warmup_steps: int | None = loop_option(None, "The backbone learning rate rises linearly over this many first "
                                           "steps (default 50; 0 = none).", min=0, unset=True)
    lr_schedule: str = loop_option("constant", "constant (the default) | cosine: after the warm-up every learning "
                                   "rate follows a half cosine down to 0 at the last planned step (--epochs).",
                                   choices=LR_SCHEDULES)
    bn: str = loop_option("auto", "BatchNorm of the fine-tuned backbone: eval (keep the pretrained statistics) | "
                          "train (batch statistics) | auto (eval, or train with --from-scratch).",
                          choices=("auto", "eval", "train"))
    pretrained: bool = loop_option(True, "Start the backbone from seeded random weights instead of pretrained ones "
                                   "(needs --fine-tune all; the only way for --backbone conv4).", flag="--from-scratch",
                                   invert=True)
    augment: str = loop_option("standard", "Fine-tuning images: standard (random resized crop, flip, colour jitter) "
                               "| none (the plain resized image, e.g. handwriting).", choices=("standard", "none"))
    class_rotations: int = loop_option(1, "1-4: each train class also trains rotated by 90, 180, 270 degrees, each "
                                       "rotation a new class (the Omniglot protocol uses 4; needs fine-tuning). "
                                       "1 = off.", min=1, max=4)
    head: dict | None = loop_option(None, "linear (identity-initialised, centred; default) | mlp (1280-512-256) | "
                                    "JSON spec.", parse=parse_head, unset=True)
    ways: int = loop_option(5, "N of N-way episodes (episodic methods and episodic validation; default 5).", min=2,
                            unset=True)
    shots: int = loop_option(5, "K support images per class (default 5).", min=1, unset=True)
    queries: int = loop_option(5, "Q query images per class (default 5).", min=1, unset=True)
    val_episodes: int = loop_option(300, "Episodic validation episodes per epoch (default 300; 0 = none).", min=0,
                                    unset=True)
    resume: bool = loop_option(False, "Continue the interrupted run in --out from its checkpoint.")
    overwrite: bool = loop_option(False, "Replace a run already in --out (only once the new run has trained).")
    group_from: str | None = loop_option(None, "Group (brand) from 'path:N', 'label:N' or 'column:NAME'.")
    layout: str = loop_option("auto", "How a folder tree is read: auto | class | group/class (see `load_dataset`).")
    progress: bool = loop_option(True, "Hide progress bars.", flag="--no-progress", invert=True)
    device: str = loop_option("auto", "auto | cpu | cuda.")
    cache_dir: str | None = loop_option(None, "Embedding cache folder (default $FEWSHOT_CACHE or ~/.cache/fewshot).",
                                        path=True)
    workers: int = loop_option(0, "Image-decoding worker processes.", min=0)
    micro_batch: int | None = loop_option(None, "Images per forward slice of a fine-tuning step; the loss still "
                                          "takes one backward over the whole batch, so the gradient is the same "
                                          "(default: the backbone's measured best on a CPU, 8 images of 224 px for "
                                          "EfficientNet-Lite, 1.9x the images/s of one forward of 64, fewer at a larger "
                                          "--image-size, more at a smaller; the whole batch on a GPU or "
                                          "with --bn train, whose batch statistics it would change).", min=1,
                                          unset=True)
    fold_bn: bool = loop_option(True, "Run each BatchNorm apart from its convolution in the training forward, as "
                                "fewshot 0.2.0 did (by default, with --bn eval, each BatchNorm, whose statistics are "
                                "frozen, is folded into the convolution before it: the same model to float rounding, "
                                "fewer passes over the activations; docs/benchmarks.md, part 11).", flag="--no-fold-bn",
                                invert=True)
    embed_batch_size: int = loop_option(DEFAULT_BATCH_SIZE, f"Images per forward pass when embedding (default "
                                        f"{DEFAULT_BATCH_SIZE}, as --batch-size of the other commands).", min=1,
                                        unset=True)
    runtime: str = loop_option("auto", "Forward pass of the frozen embeddings, the final evaluation and (fine-tuning "
                               "on a CPU) each epoch's validation: auto | onnx | torch (see `fewshot evaluate "
                               "--help`); the training steps run on torch.")
    final_eval: str = loop_option("test", "Class part evaluated with the best model at the end (test | val | none).",
                                  flag="--split", choices=("none", "test", "val", "train"))
    eval_episodes: int = loop_option(1000, "Episodes per setting in the final evaluation (default 1000).", min=1,
                                     unset=True)
    final_tta: str = loop_option("none", "Test-time augmentation of the final evaluation only: none | flip | scales (see "
                                 "`fewshot evaluate --help`). Training, validation and the saved model are the same "
                                 "either way; pass --tta again to `fewshot index` / `evaluate --model RUN_DIR`.",
                                 flag="--tta")
    weight_average: str = loop_option("none", "Validate and save an average of the trained weights instead of the "
                                      "last ones: none | ema (exponential moving average after every step, "
                                      "--ema-decay) | swa (equal average of the weights at the end of each epoch from "
                                      "--swa-start on; Izmailov et al. 2018). Default: swa when fine-tuning arcface or "
                                      "triplet (triplet's test MAP@R +0.012 over 3 seeds on Grocery), else none.",
                                      choices=WEIGHT_AVERAGES, unset=True)
    ema_decay: float | None = loop_option(None, "Decay of --weight-average ema per step, 0 < d < 1 (default 0.99: "
                                          "about the last 100 steps).", unset=True)
    swa_start: int | None = loop_option(None, "First epoch averaged by --weight-average swa (default 2).", min=1,
                                        unset=True)
    train_on_val: bool = loop_option(False, "Train on the val classes too, once a recipe is chosen: more classes to "
                                     "learn from (the default triplet run on Grocery's unseen test articles: MAP@R "
                                     "0.620 -> 0.645 over 3 seeds, 53 classes instead of 40). No held-out class is "
                                     "left to pick an epoch, so the run keeps its last one and never stops early "
                                     "(--patience has no effect); its val figures are then of trained classes, and "
                                     "only the final evaluation (--split test) is held out.")
    options: Any = None

    def __post_init__(self) -> None:
        if self.options is None or isinstance(self.options, dict):
            self.options = method_options(self.method, **(self.options or {}))
        mode, blocks = parse_fine_tune(self.fine_tune, self.fine_tune_blocks)
        if mode == "last":
            self.fine_tune, self.fine_tune_blocks = f"last:{blocks}", blocks
        else:
            self.fine_tune = mode

    def embed_size(self) -> int:
        """``test_image_size``, or its default (the field's help): :func:`default_test_size` when
        fine-tuning with ``augment == "standard"``, else ``image_size``."""
        if self.test_image_size is not None:
            return int(self.test_image_size)
        return default_test_size(self.image_size) if self.fine_tuning and self.augment == "standard" else int(self.image_size)

    @property
    def fine_tuning(self) -> bool:
        """Whether any backbone parameter trains (``fine_tune`` is not ``"none"``)."""
        return self.fine_tune != "none"

    def warmup(self) -> int:
        """``warmup_steps``, or :data:`WARMUP_STEPS` when it is ``None``."""
        return WARMUP_STEPS if self.warmup_steps is None else int(self.warmup_steps)

    def backbone_learning_rate(self) -> float:
        """``backbone_lr``, or :data:`BACKBONE_LR_FACTOR` x ``lr`` when it is ``None``."""
        return float(self.backbone_lr) if self.backbone_lr is not None else BACKBONE_LR_FACTOR * float(self.lr)

    def batchnorm_mode(self) -> str:
        """``bn`` resolved: ``"eval"`` or ``"train"`` (``"auto"``: train only from scratch)."""
        if self.bn == "auto":
            return "eval" if self.pretrained else "train"
        return self.bn

    def average_decay(self) -> float:
        """``ema_decay``, or :data:`EMA_DECAY` when it is ``None``."""
        return EMA_DECAY if self.ema_decay is None else float(self.ema_decay)

    def average_start(self) -> int:
        """``swa_start``, or :data:`SWA_START` when it is ``None`` (at most the run's last epoch:
        a run of one epoch then averages that epoch alone, the same as no average)."""
        if self.swa_start is not None:
            return int(self.swa_start)
        return max(1, min(SWA_START, get_method(self.method).epochs_for(self.options, self.epochs)))

    def episode_spec(self) -> EpisodeSpec:
        """The episode shape the method and episodic validation use (``ways``, ``shots``, ``queries``)."""
        return EpisodeSpec(int(self.ways), int(self.shots), int(self.queries))

    def head_spec(self) -> dict | None:
        """``head``, or :data:`SCRATCH_HEAD` for a backbone trained from scratch when ``head`` is ``None``."""
        return self.head if self.head is not None or self.pretrained else SCRATCH_HEAD

    def build_method(self, in_dim: int) -> Method:
        """The run's method, given only what it needs (its options, the episode shape, the head spec)."""
        return get_method(self.method)(self.options, in_dim, episodes=self.episode_spec(), head=self.head_spec(),
                                       fine_tuning=self.fine_tuning)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (``options`` as a dict)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        d["options"] = asdict(self.options)
        return copy.deepcopy(d)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from :meth:`to_dict` output; unknown keys are ignored (forward compatibility).

        A run of fewshot 0.1.0 kept the method's options among the loop's fields (e.g.
        ``inner_lr``, ``maml_init``); they are read from there.
        """
        data = dict(data or {})
        if "image_size" in data and "test_image_size" not in data:  # a run before 0.4.0 embeds at its training size
            data["test_image_size"] = data["image_size"]
        method = data.get("method", cls.method)
        names = {f.name for f in fields(cls)} - {"options"}
        options = data.get("options")
        if options is None:
            options = get_method(method).legacy_options(data)
        return cls(**{k: v for k, v in data.items() if k in names}, options=dict(options))


#: the default test size over the training size of a run fine-tuned on random resized crops
TEST_SIZE_RATIO = 9 / 7


def default_test_size(image_size: int) -> int:
    """The default input side at which a model fine-tuned on random resized crops of side
    ``image_size`` embeds: ``image_size x 9/7`` rounded to a multiple of 32 (224 -> 288, 260 -> 320;
    Touvron et al. 2019, "Fixing the train-test resolution discrepancy")."""
    return max(32, int(round(image_size * TEST_SIZE_RATIO / 32)) * 32)


def parse_fine_tune(value: str, blocks: int = 2) -> tuple[str, int]:
    """A ``fine_tune`` value -> ``(mode, blocks)``: ``"none"``, ``"all"``, ``"last"`` (``blocks``
    blocks) or ``"last:N"`` (``N >= 1`` blocks). ``blocks`` is 0 unless the mode is ``"last"``.

    Raises:
        FewshotError: any other value, or ``N`` not a positive integer (``options``: ``fine_tune``).
    """
    text = str(value).strip().lower()
    mode, sep, count = text.partition(":")
    if mode in ("none", "all") and not sep:
        return mode, 0
    if mode == "last":
        try:
            n = int(count) if sep else int(blocks)
        except ValueError:
            n = 0
        if n >= 1:
            return "last", n
    raise FewshotError(f"unknown option fine_tune = '{value}'",
                       hint="use fine_tune=none, fine_tune=last:N (N >= 1 blocks, e.g. last:2) or fine_tune=all",
                       options=("fine_tune",))


# --------------------------------------------------------------------------- checks
def check_config(cfg: TrainConfig) -> type[Method]:
    """Every check of ``cfg`` that needs no data: each field's declared ``min`` / ``max`` /
    ``above`` / ``choices``, then the rules between fields, then the embedding layer's checks of
    ``runtime`` and ``final_tta``. Called before a run writes anything.

    Returns:
        the method class of ``cfg.method``.

    Raises:
        FewshotError: naming the fields to change (in ``options``); an unknown method or runtime.
    """
    check_options("the training loop", cfg)
    _check_limits(cfg)
    _check_train_on_val(cfg)
    _check_fine_tune(cfg)
    _check_average(cfg)
    if not cfg.out:
        raise FewshotError("no output folder given", hint="pass out=RUN_DIR", options=("out",))
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise FewshotError(f"unknown option device = '{cfg.device}'", hint="use device=auto, cpu or cuda", options=("device",))
    check_runtime(cfg.runtime)  # the embedding layer's own checks of these two
    check_tta(cfg.final_tta)
    _check_head(cfg.head)
    return get_method(cfg.method)


def _check_train_on_val(cfg: TrainConfig) -> None:
    """``train_on_val`` needs a training epoch and a held-out final evaluation."""
    if cfg.train_on_val and cfg.epochs == 0:
        raise FewshotError("train_on_val with epochs=0 trains nothing", hint="give epochs=1 or more, or drop train_on_val",
                           options=("train_on_val", "epochs"))
    if cfg.train_on_val and cfg.final_eval == "val":
        raise FewshotError("train_on_val trains on the val classes, so a final evaluation of them would not be held out",
                           hint="use final_eval=test (or none)", options=("train_on_val", "final_eval"))


def _check_limits(cfg: TrainConfig) -> None:
    """The ``max`` and ``above`` of each field (:func:`loop_option`)."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None:  # check_options, run first, refused a value that is not a number
            continue
        if meta.get("max") is not None and value > meta["max"]:
            raise FewshotError(f"option {f.name} = {value}: the training loop needs at most {meta['max']}",
                               hint=f"use {f.name} = {meta['max']} or less (default {f.default})", options=(f.name,))
        if meta.get("above") is not None and not (math.isfinite(value) and value > meta["above"]):
            raise FewshotError(f"option {f.name} = {value}: the training loop needs a finite number greater than "
                               f"{meta['above']}", hint=f"e.g. {f.name} = {f.default or 2.5e-5}", options=(f.name,))


def _check_fine_tune(cfg: TrainConfig) -> None:
    """Backbone settings need a backbone that trains; one trained from scratch trains whole."""
    given = [name for name, on in (("backbone_lr", cfg.backbone_lr is not None), ("bn", cfg.bn != "auto"),
                                   ("augment", cfg.augment != "standard"),
                                   ("class_rotations", cfg.class_rotations != 1),
                                   ("warmup_steps", cfg.warmup_steps is not None),
                                   ("micro_batch", cfg.micro_batch is not None),
                                   ("fold_bn", not cfg.fold_bn)) if on]
    if given and not cfg.fine_tuning:
        raise FewshotError(f"{', '.join(given)} set(s) how the backbone trains, but fine_tune none keeps it frozen",
                           hint="drop " + ", ".join(given) + ", or pass fine_tune=last:N or all",
                           options=(*given, "fine_tune"))
    if cfg.micro_batch is not None and cfg.batchnorm_mode() == "train":
        raise FewshotError(f"micro_batch={cfg.micro_batch} would split each batch, but bn=train normalises with the "
                           "statistics of the whole batch (a slice's statistics would differ)",
                           hint="drop micro_batch (the whole batch runs in one forward with bn=train), or pass bn=eval",
                           options=("micro_batch", "bn"))
    if not cfg.pretrained and cfg.fine_tune != "all":
        raise FewshotError(f"pretrained=False trains {cfg.backbone} from random weights, so every backbone "
                           f"parameter must train, but fine_tune is '{cfg.fine_tune}'",
                           hint="set fine_tune=all", options=("pretrained", "fine_tune"))


def _check_average(cfg: TrainConfig) -> None:
    """``ema_decay`` belongs to ``weight_average="ema"``, ``swa_start`` to ``"swa"``; the decay
    lies strictly between 0 and 1, and the first averaged epoch is one the run trains."""
    given = [(name, kind) for name, kind in (("ema_decay", "ema"), ("swa_start", "swa"))
             if getattr(cfg, name) is not None and cfg.weight_average != kind]
    if given:
        names = [name for name, _ in given]
        applies = ", ".join(f"{name} applies to weight_average={kind} only" for name, kind in given)
        raise FewshotError(f"{applies}, but weight_average is {cfg.weight_average!r}",
                           hint="drop " + ", ".join(names) + f", or pass weight_average={given[0][1]}",
                           options=(*names, "weight_average"))
    decay = cfg.average_decay()
    if not 0.0 < decay < 1.0:
        raise FewshotError(f"option ema_decay = {cfg.ema_decay}: the decay must lie strictly between 0 and 1",
                           hint=f"e.g. ema_decay = {EMA_DECAY} (about the last 100 steps) or 0.999 (1,000)",
                           options=("ema_decay",))
    if cfg.weight_average == "swa":
        method = get_method(cfg.method)
        last = method.epochs_for(cfg.options, cfg.epochs)
        start = cfg.average_start()
        if start > last:
            length = ("episodes", "episodes_per_epoch") if method.episodic else ("epochs",)
            default = " (the default)" if cfg.swa_start is None else ""
            raise FewshotError(f"option swa_start = {start}{default} is after the run's last epoch ({last}): no "
                               "epoch would be averaged",
                               hint=f"use swa_start = {max(1, last)} or less, or train longer ({', '.join(length)})",
                               options=("swa_start", *length))


def _check_head(head: dict | None) -> None:
    """Build the head once at a nominal size, so that a bad ``head`` spec fails before any work."""
    try:
        ProjectionHead(**resolve_head_spec(head, 8))
    except (TypeError, ValueError) as exc:
        raise FewshotError(f"head={json.dumps(head)} is not a valid head ({exc})",
                           hint='use head=linear, head=mlp, or e.g. head=\'{"kind": "mlp", "hidden_dim": 512, '
                                '"out_dim": 256}\'', options=("head",)) from None
