"""The training-method contract: :class:`TrainConfig`, :class:`TrainData`, :class:`Method`, registry.

A *method* says what one training step computes; :mod:`fewshot.training` does the rest,
once for every method (data loading, cached embeddings, the epoch loop, validation, history,
best-epoch selection, early stopping, checkpoints, ``--resume``, saving the run).

Writing a method
----------------

Subclass :class:`Method`, set ``name``, register it, and implement two things::

    @register_method("mymethod")
    class MyMethod(Method):
        name = "mymethod"

        def epoch_batches(self, train, rng):          # what one epoch iterates
            ...                                        # e.g. episodes, or index batches
        def loss(self, batch):                         # scalar loss of one batch
            z = self.embed(self.features(batch.idx))   # [B, E], L2-normalised
            ...

* :meth:`Method.features` maps training-item indices to backbone features ``[B, D]``: the
  cached frozen embeddings, or, when fine-tuning (``fine_tune="last:N"`` or ``"all"``), a
  forward pass of the trainable backbone over augmented images, with gradients. A method
  never needs to know which. (A method that runs the backbone itself, e.g. full-network MAML,
  uses :meth:`Method.inputs` and :attr:`Method.backbone`.)
* :meth:`Method.embed` applies the projection head (``self.head``): ``[B, D] -> [B, E]``.
* Episodic methods (prototypical networks, MAML) set ``episodic = True`` and yield
  :class:`~fewshot.data.episodes.Episode` objects from :meth:`Method.episode_sampler`; the
  trainer then reports episodic validation accuracy with :meth:`Method.episode_classifier`.
* State beyond the head (e.g. MAML's N-way output-layer initialisation) lives in
  :meth:`Method.extra_parameters` (trained) and is saved with :meth:`Method.extra_tensors` /
  restored with :meth:`Method.load_extra_tensors`; it is stored as ``method.*`` tensors beside
  the ``head.*`` tensors in ``RUN_DIR/model.safetensors``.
* :meth:`Method.attach` is called when a run is loaded (:func:`fewshot.methods.runs.load_run`):
  the default rebuilds the method from the saved config, loads its extra tensors, and sets the
  model's ``episode_classifier`` from :meth:`Method.episode_classifier`.

Built-in names: ``contrastive`` and ``triplet`` (:mod:`.siamese`), ``protonet`` (:mod:`.protonet`),
``maml`` and ``fomaml`` (:mod:`.maml`); :mod:`fewshot.methods` imports those modules, so they are
registered whenever a method module is used.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
from torch import nn

from ..data.episodes import EpisodeSampler
from ..errors import DataError, FewshotError
from ..options import option
from ..registry import Registry
from ..model import EpisodeClassifier
from .heads import ProjectionHead

__all__ = ["TrainConfig", "TrainData", "Method", "IndexBatch", "register_method", "get_method",
           "list_methods", "make_config", "config_keys", "option", "parse_fine_tune", "BACKBONE_LR_FACTOR", "method_options", "EpisodicOptions", "NoOptions", "DEFAULT_HEAD", "HEAD_PRESETS", "resolve_head_spec"]

#: The default head: an identity-initialised linear map on centred features (1280 -> 1280 for
#: EfficientNet-Lite), L2-normalised. Training starts exactly at the frozen (centred) ranking and
#: moves from there; see the README for why this beats an MLP on unseen classes.
DEFAULT_HEAD: dict[str, Any] = {"kind": "linear", "centre": True}

#: ``--head`` presets (``in_dim`` is filled in from the backbone).
HEAD_PRESETS: dict[str, dict[str, Any]] = {
    "linear": {"kind": "linear", "centre": True},
    "mlp": {"kind": "mlp", "hidden_dim": 512, "out_dim": 256, "centre": False, "dropout": 0.0},
}


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class EpisodicOptions:
    """Options of every episodic method (prototypical networks, MAML)."""

    episodes: int = option(2000, "Training episodes in all (--epochs N means N x --episodes-per-epoch); "
                           "200 when fine-tuning all, 300 with last:N, unless given.", min=1)
    episodes_per_epoch: int = option(100, "Training episodes between validations.", min=1)


@dataclass
class TrainConfig:
    """Everything one training run needs; recorded in ``RUN_DIR/config.json`` (``train_config``).

    The fields are the training loop's; what only one method reads lives in ``options``, an
    instance of that method's :attr:`Method.Config` (e.g. MAML's inner learning rate).

    Attributes:
        method: registered method name (``contrastive``, ``triplet``, ``protonet``, ``maml``, ``fomaml``).
        data: dataset path or fetched dataset name.
        split_file: class-split JSON (:class:`~fewshot.data.splits.ClassSplit`): training uses
            every image of its train classes; validation its val classes (cross-visit queries
            vs gallery, :func:`~fewshot.data.splits.protocol_sets`).
        out: RUN_DIR.
        backbone, image_size: the (frozen unless ``fine_tune``) feature extractor.
        seed: seeds torch, numpy and the samplers; the same seed gives the same run.
        epochs: maximum epochs (episodic methods count ``options.episodes`` instead);
            ``patience``: stop after this many epochs without a better validation MAP@R
            (0 = never stop early).
        lr, weight_decay: Adam (``lr`` is the head's and the method's learning rate).
        fine_tune: which backbone parameters train (:func:`parse_fine_tune`): ``"none"`` (head
            on cached frozen features), ``"last:N"`` (also the backbone's own last ``N`` blocks,
            :meth:`~fewshot.backbones.Backbone.trainable_tail`), or ``"all"`` (every backbone
            parameter); ``"last"`` means ``"last:<fine_tune_blocks>"``. The backbone then
            sees augmented images (``augment``), episodic methods their episodes' support and
            query images.
        fine_tune_blocks: ``N`` of a bare ``"last"`` (kept for runs of fewshot 0.1.0).
        backbone_lr: learning rate of the fine-tuned backbone parameters (``None`` =
            :data:`BACKBONE_LR_FACTOR` x ``lr``); ``warmup_steps``: it rises linearly from 0
            over the first this many optimizer steps (0 = no warm-up; ``None`` =
            :data:`WARMUP_STEPS`).
        lr_schedule: ``"constant"`` (every rate stays at its own after the warm-up) or
            ``"cosine"``: after the warm-up every group's rate follows a half cosine from its
            own down to 0 at the last planned step (``max_epochs`` x the steps of an epoch;
            Loshchilov and Hutter 2017, SGDR, eq. 5 without restarts).
        bn: BatchNorm of the fine-tuned backbone: ``"eval"`` keeps the pretrained running
            statistics (batches of a few articles would corrupt them), ``"train"`` uses batch
            statistics and updates them, ``"auto"`` = ``"eval"`` for a pretrained backbone and
            ``"train"`` for one trained from scratch.
        pretrained: start from the backbone's pretrained weights; ``False`` trains it from a
            seeded random initialisation (needs ``fine_tune="all"``; e.g. ``conv4``).
        augment: ``"standard"`` (random resized crop, flip, colour jitter:
            :func:`~fewshot.methods.augment.augment`) or ``"none"`` (the plain resized image,
            e.g. for handwriting, where a flip changes the character).
        class_rotations: ``R`` in 1..4: each train class also appears rotated by 90, 180, ...
            degrees (the first ``R`` multiples of 90), each rotation a class of its own, so the
            train part has ``R`` times its classes (1 = off). The Omniglot protocol of Santoro
            et al. 2016 and Vinyals et al. 2016 (Matching Networks, section 4.1.1) uses 4; it
            needs fine-tuning (the rotated images go through the backbone).
        head: :class:`~fewshot.methods.heads.ProjectionHead` spec (``in_dim`` filled in); ``None``
            = :data:`DEFAULT_HEAD`.
        ways, shots, queries: N-way K-shot Q-query episodes (episodic training and episodic
            validation).
        val_episodes: episodic validation episodes per epoch (0 = none).
        resume: continue from ``RUN_DIR/checkpoint.pt``; ``overwrite``: replace an existing run.
        group_from: group spec for datasets without groups (see ``load_dataset``).
        layout: how a folder tree is read: ``"auto"``, ``"class"`` or ``"group/class"`` (see
            ``load_dataset``).
        progress: show progress bars.
        device: ``"auto"`` (CUDA when available and fine-tuning, else CPU), ``"cpu"``, ``"cuda"``.
        cache_dir, workers, embed_batch_size: embedding cache folder, decode workers, batch size.
        runtime: forward pass for the frozen embeddings, the final evaluation and, when
            fine-tuning on a CPU, each epoch's validation (an in-memory export of the current
            weights) (``auto`` | ``torch`` | ``onnx``, :mod:`fewshot.embed.runtime`); the
            training steps themselves run on torch.
        final_eval: class part evaluated with the best model at the end (``"test"``,
            ``"val"``, or ``"none"``), written to ``RUN_DIR/eval_<part>/``.
        eval_episodes: episodes per setting of that final evaluation.
        final_tta: test-time augmentation of that final evaluation only (``"none"`` |
            ``"flip"``, :data:`fewshot.backbones.TTA_MODES`); training, validation and the saved
            model are the same either way.
        options: the method's options (its :attr:`Method.Config`; ``None`` = its defaults).
    """

    method: str = "triplet"
    data: str = ""
    split_file: str = ""
    out: str = ""
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    seed: int = 0
    epochs: int = 30
    patience: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.0
    fine_tune: str = "none"
    fine_tune_blocks: int = 2
    backbone_lr: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str = "constant"
    bn: str = "auto"
    pretrained: bool = True
    augment: str = "standard"
    class_rotations: int = 1
    head: dict | None = None
    ways: int = 5
    shots: int = 5
    queries: int = 5
    val_episodes: int = 300
    resume: bool = False
    overwrite: bool = False
    group_from: str | None = None
    layout: str = "auto"
    progress: bool = True
    device: str = "auto"
    cache_dir: str | None = None
    workers: int = 0
    embed_batch_size: int = 32
    runtime: str = "auto"
    final_eval: str = "test"
    eval_episodes: int = 1000
    final_tta: str = "none"
    options: Any = None

    def __post_init__(self) -> None:
        if self.options is None or isinstance(self.options, dict):
            self.options = method_options(self.method, **(self.options or {}))
        mode, blocks = parse_fine_tune(self.fine_tune, self.fine_tune_blocks)
        if mode == "last":
            self.fine_tune, self.fine_tune_blocks = f"last:{blocks}", blocks
        else:
            self.fine_tune = mode

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
        method = data.get("method", cls.method)
        names = {f.name for f in fields(cls)} - {"options"}
        options = data.get("options")
        if options is None:
            options = legacy_options(method, data)
        return cls(**{k: v for k, v in data.items() if k in names}, options=dict(options))


#: default backbone learning rate relative to ``--lr`` when fine-tuning. Measured on the Grocery
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


def parse_fine_tune(value: str, blocks: int = 2) -> tuple[str, int]:
    """``--fine-tune`` value -> ``(mode, blocks)``: ``"none"``, ``"all"``, ``"last"`` (``blocks``
    blocks) or ``"last:N"`` (``N >= 1`` blocks). ``blocks`` is 0 unless the mode is ``"last"``.

    Raises:
        FewshotError: any other value, or ``N`` not a positive integer.
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
    raise FewshotError(f"unknown --fine-tune '{value}'",
                       hint="use --fine-tune none, --fine-tune last:N (N >= 1 blocks, e.g. last:2) or --fine-tune all")


def _options_class(method: str) -> type:
    return get_method(method).Config


def method_options(method: str, **given: Any) -> Any:
    """``method``'s :attr:`Method.Config` with ``given`` values (``None`` = its default).

    Raises:
        FewshotError: unknown method, an option the method does not have, or a value outside
            its ``min`` / ``choices`` (the message lists the method's options).
    """
    cls = _options_class(method)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        listed = ", ".join(known) or "none"
        raise FewshotError(f"method '{method}' has no option {', '.join(unknown)} (its options: {listed})",
                           hint=f"see `fewshot methods {method}`")
    opts = cls(**{k: v for k, v in given.items() if v is not None})
    check_options(method, opts)
    return opts


def check_options(method: str, opts: Any) -> None:
    """Enforce each option's ``min`` and ``choices`` (see :func:`option`).

    Raises:
        FewshotError: naming the option, its value and what is allowed.
    """
    for f in fields(opts):
        value, meta = getattr(opts, f.name), f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise FewshotError(f"{flag} {value}: method '{method}' needs a finite number",
                               hint=f"use e.g. {flag} {f.default}")
        if meta.get("min") is not None and value is not None and value < meta["min"]:
            raise FewshotError(f"{flag} {value}: method '{method}' needs at least {meta['min']}",
                               hint=f"use {flag} {meta['min']} or more (default {f.default})")
        if meta.get("choices") and value not in meta["choices"]:
            raise FewshotError(f"{flag} {value!r} is not an option of method '{method}'",
                               hint=f"use {flag} {' | '.join(meta['choices'])}")


def legacy_options(method: str, flat: dict[str, Any]) -> dict[str, Any]:
    """The options of a fewshot 0.1.0 ``train_config``, which kept them among the loop fields."""
    cls = _options_class(method)
    aliases = getattr(cls, "LEGACY_NAMES", {})
    out = {}
    for f in fields(cls):
        for key in (f.name, *[k for k, v in aliases.items() if v == f.name]):
            if flat.get(key) is not None:
                out[f.name] = flat[key]
    return out


def resolve_head_spec(head: dict | str | None, in_dim: int) -> dict[str, Any]:
    """A full :class:`ProjectionHead` spec: preset name or partial dict, ``in_dim`` filled in.

    ``"linear"`` keeps the dimension (``out_dim = in_dim``) unless the spec gives ``out_dim``.
    """
    if head is None:
        spec = dict(DEFAULT_HEAD)
    elif isinstance(head, str):
        if head not in HEAD_PRESETS:
            raise FewshotError(f"unknown head '{head}'", hint=f"use one of: {', '.join(HEAD_PRESETS)}")
        spec = dict(HEAD_PRESETS[head])
    else:
        spec = dict(head)
    spec["in_dim"] = int(in_dim)
    if spec.get("kind", "mlp") == "linear":
        spec.setdefault("out_dim", int(in_dim))
    return spec


@dataclass
class TrainData:
    """The training items of one run, as the method sees them.

    Attributes:
        x: float32 ``[N, D]`` backbone embeddings of the training images (cached, frozen
            backbone; with fine-tuning they are the *initial* features and only used for the
            head's centre).
        y: int64 ``[N]`` class index in ``0..C-1``.
        label_names: ``C`` class names (``label_names[y[i]]`` is the label of item ``i``).
        groups: ``N`` groups (brand / coarse class), ``None`` when unknown.
        paths: ``N`` image paths (for fine-tuning on images).
    """

    x: torch.Tensor
    y: torch.Tensor
    label_names: list[str]
    groups: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])


@dataclass
class IndexBatch:
    """A batch of training items: ``idx`` int64 ``[B]`` into :class:`TrainData`, ``y`` int64 ``[B]``."""

    idx: np.ndarray
    y: torch.Tensor


class Method:
    """Base class of training methods (see the module docstring for the contract).

    Args:
        cfg: the run's :class:`TrainConfig`.
        in_dim: backbone embedding dimension ``D``.

    Attributes:
        cfg, in_dim: as given.
        head: the projection head (:meth:`build_head`), ``[B, D] -> [B, E]`` L2-normalised.
        backbone: the partly trainable backbone module (``[B, 3, S, S] -> [B, D]``) when
            fine-tuning, set by the trainer; ``None`` otherwise.
        backbone_params: its trainable parameters (empty without fine-tuning).
        device: where tensors live (set by the trainer).
    """

    name: ClassVar[str] = ""
    #: one line for ``fewshot methods``: what the method is and its source
    summary: ClassVar[str] = ""
    #: the method's own options (a dataclass whose fields are made with :func:`option`); the
    #: CLI offers each as a flag, ``fewshot methods`` lists them, ``self.opts`` holds the values
    Config: ClassVar[type] = NoOptions
    #: method-specific defaults for the loop's :class:`TrainConfig` fields the user did not set
    #: (applied by :func:`make_config`), e.g. ``{"lr": 1e-3}``.
    defaults: ClassVar[dict[str, Any]] = {}
    #: episodic methods draw N-way K-shot episodes; the trainer then validates episodically
    #: with :meth:`episode_classifier` (others are validated with nearest prototypes too).
    episodic: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig, in_dim: int) -> None:
        self.cfg = cfg
        opts = cfg.options
        if not isinstance(opts, self.Config):  # e.g. a config made for another method
            opts = self.Config(**{k: v for k, v in asdict(opts).items() if k in {f.name for f in fields(self.Config)}})
        self.opts = opts
        self.in_dim = int(in_dim)
        self.device = torch.device("cpu")
        self.backbone: nn.Module | None = None
        self.backbone_params: list[nn.Parameter] = []
        self._features: Callable[[np.ndarray], torch.Tensor] | None = None
        self._inputs: Callable[[np.ndarray], torch.Tensor] | None = None
        self._warned = False
        self.head = self.build_head()

    # ------------------------------------------------------------------ model
    def build_head(self) -> nn.Module:
        """The projection head from ``cfg.head`` (default :data:`DEFAULT_HEAD`, or
        :data:`SCRATCH_HEAD` for a backbone trained from scratch)."""
        head = self.cfg.head if self.cfg.head is not None or self.cfg.pretrained else SCRATCH_HEAD
        return ProjectionHead(**resolve_head_spec(head, self.in_dim))

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the method beyond the head (default none)."""
        return []

    def trainable(self) -> list[nn.Parameter]:
        """Everything the optimizer updates: head, method parameters, fine-tuned backbone blocks
        (the parameters of :meth:`param_groups`, in order)."""
        return [p for group in self.param_groups() for p in group["params"]]

    def param_groups(self) -> list[dict[str, Any]]:
        """:meth:`trainable` as optimizer parameter groups: ``"head"`` (head and method
        parameters, ``cfg.lr``), then ``"backbone"`` (fine-tuned backbone parameters,
        :meth:`TrainConfig.backbone_learning_rate`) when there are any. The trainer's warm-up
        (``cfg.warmup_steps``) ramps the ``"backbone"`` group only."""
        head = [p for p in self.head.parameters() if p.requires_grad] + list(self.extra_parameters())
        groups = [{"params": head, "lr": float(self.cfg.lr), "name": "head"}]
        if self.backbone_params:
            groups.append({"params": list(self.backbone_params), "lr": self.cfg.backbone_learning_rate(),
                           "name": "backbone"})
        return groups

    def optimizer(self) -> torch.optim.Optimizer:
        """Adam (Kingma and Ba 2015) over :meth:`param_groups` with ``cfg.weight_decay``."""
        return torch.optim.Adam(self.param_groups(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def train_mode(self, training: bool) -> None:
        """Switch the head (and method modules) between training and evaluation mode.

        A fine-tuned backbone stays in eval mode (frozen BatchNorm statistics: batches of a few
        classes would corrupt them); its trainable weights still receive gradients.
        """
        self.head.train(training)

    def to(self, device: torch.device | str) -> "Method":
        """Move the head and method tensors to ``device``."""
        self.device = torch.device(device)
        self.head.to(self.device)
        for p in self.extra_parameters():
            p.data = p.data.to(self.device)
        return self

    def max_epochs(self) -> int:
        """Epochs the trainer runs at most: ``cfg.epochs``, or for episodic methods
        ``ceil(opts.episodes / opts.episodes_per_epoch)``."""
        if self.episodic:
            return int(math.ceil(self.opts.episodes / max(1, self.opts.episodes_per_epoch)))
        return int(self.cfg.epochs)

    # ------------------------------------------------------------------ data
    def bind(self, features: Callable[[np.ndarray], torch.Tensor],
             inputs: Callable[[np.ndarray], torch.Tensor] | None = None) -> None:
        """Set the sources of :meth:`features` and, when fine-tuning, :meth:`inputs` (called by
        the trainer)."""
        self._features = features
        self._inputs = inputs

    def features(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Backbone features ``float32 [B, D]`` of training items ``idx`` (int64 ``[B]``)."""
        if self._features is None:
            raise RuntimeError("Method.features used before the trainer bound a feature source")
        return self._features(np.asarray(idx, dtype=np.int64))

    def inputs(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Backbone inputs ``float32 [B, 3, S, S]`` (augmented, normalised) of training items
        ``idx``, for a method that runs :attr:`backbone` itself (``features(idx)`` is
        ``backbone(inputs(idx))``). Only when fine-tuning.

        Raises:
            FewshotError: the backbone is not fine-tuned (training runs on cached features).
        """
        if self._inputs is None:
            raise FewshotError("this method needs the backbone's input images, which only a fine-tuning run has",
                               hint="pass --fine-tune last:N or --fine-tune all")
        return self._inputs(np.asarray(idx, dtype=np.int64))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Head output: ``float32 [B, D] -> [B, E]`` (L2-normalised for :class:`ProjectionHead`)."""
        return self.head(features)

    def epoch_batches(self, train: TrainData, rng: np.random.Generator) -> Iterable[Any]:
        """What one epoch iterates (index batches, episodes, ...); ``rng`` is seeded per epoch."""
        raise NotImplementedError

    def steps_per_epoch(self, train: TrainData) -> int:
        """Optimizer steps in one epoch: the length of one :meth:`epoch_batches` (drawn with
        its own seeded generator, so no other random state moves)."""
        return sum(1 for _ in self.epoch_batches(train, np.random.default_rng(0)))

    def episode_sampler(self, train: TrainData, rng: np.random.Generator,
                        episodes: int | None = None) -> EpisodeSampler:
        """An N-way K-shot Q-query sampler over the training items, seeded from ``rng``.

        ``episodes`` defaults to ``opts.episodes_per_epoch``. Helper for episodic methods.
        """
        sampler = EpisodeSampler(train.y.tolist(), self.cfg.ways, self.cfg.shots, self.cfg.queries,
                                 episodes=episodes or self.opts.episodes_per_epoch,
                                 seed=int(rng.integers(0, 2**31 - 1)), names=train.label_names,
                                 warn=not self._warned)
        self._warned = True  # the classes left out are the same every epoch: say so once
        return sampler

    def check_data(self, train: TrainData) -> None:
        """Refuse training data on which this method cannot learn, with the reason and the fix.

        Called by the trainer before anything is written. The default checks episodic
        methods: N-way episodes need ``N >= 2`` (a 1-way episode is always right: loss 0)
        and ``N`` training classes with ``shots + queries`` images each.

        Raises:
            FewshotError: naming the options to change.
        """
        if not self.episodic:
            return
        cfg = self.cfg
        if cfg.ways < 2:
            raise FewshotError(f"--ways {cfg.ways}: an episode needs at least 2 classes (in a 1-way episode "
                               "every query is right, so the loss is 0 and nothing is learned)",
                               hint="use --ways 2 or more (default 5)")
        try:
            self.episode_sampler(train, np.random.default_rng(0), episodes=1)
        except DataError as exc:
            raise DataError(f"the train classes cannot make {cfg.ways}-way {cfg.shots}-shot episodes with "
                            f"{cfg.queries} queries: {exc.message}",
                            hint="lower --ways, --shots or --queries, or give the train classes more photos") from None

    def loss(self, batch: Any) -> torch.Tensor:
        """Scalar loss of one batch from :meth:`epoch_batches`."""
        raise NotImplementedError

    def step(self, batch: Any, optimizer: torch.optim.Optimizer) -> float:
        """One optimisation step (zero_grad, loss, backward, step); returns the loss value.

        Override for methods that step differently (e.g. several tasks per meta-batch).
        """
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    # ------------------------------------------------------------------ state
    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Method state saved as ``method.<key>`` in ``model.safetensors`` (default: none)."""
        return {}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_tensors` returned (keys without the ``method.`` prefix)."""
        if tensors:
            raise FewshotError(f"method '{self.name}' has no extra tensors, got {sorted(tensors)}",
                               hint="the run folder was mixed up; re-run training")

    def episode_classifier(self) -> EpisodeClassifier | None:
        """N-way classifier for episodic evaluation on head embeddings; ``None`` = nearest prototype."""
        return None

    @classmethod
    def attach(cls, model: Any, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Called when a run is loaded: restore method state and set ``model.episode_classifier``.

        Args:
            model: the :class:`~fewshot.model.EmbeddingModel` (its head already loaded).
            config: the run's ``config.json``.
            tensors: the ``method.*`` tensors, prefix removed.
        """
        if cls.episode_classifier is Method.episode_classifier and not tensors:
            return
        cfg = TrainConfig.from_dict(config.get("train_config", {}))
        method = cls(cfg, model.backbone.dim)
        if model.head is not None:
            method.head = model.head
        method.load_extra_tensors(tensors)
        method.train_mode(False)
        model.episode_classifier = method.episode_classifier()


# ---------------------------------------------------------------------- registry
#: every training method by name; the built-in modules register theirs when
#: :mod:`fewshot.methods` is imported
METHODS: Registry[type[Method]] = Registry("method", FewshotError)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` subclass under ``name`` (one class may take several).

    Raises:
        TypeError: not a :class:`Method` subclass.
        ValueError: ``name`` is already registered.
    """

    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) needs a Method subclass, got {cls!r}")
        return METHODS.add(name, cls)

    return wrap


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``.

    Raises:
        FewshotError: unknown name (the hint lists the registered ones).
    """
    return METHODS.get(name)


def make_config(method: str, **given: Any) -> TrainConfig:
    """A :class:`TrainConfig` for ``method``: field defaults, then the method's
    :attr:`Method.defaults`, then every ``given`` value that is not ``None``; without a
    ``fine_tune``, :data:`DEFAULT_FINE_TUNE`, and when fine-tuning, :data:`FINE_TUNE_LENGTH` /
    :data:`FINE_TUNE_EPISODES` for the loop lengths not given. A ``given`` key
    that is one of the method's options (its :attr:`Method.Config`) goes into ``options``.

    Raises:
        FewshotError: unknown method, an option of another method (not this one's), or a
            bad value.
        TypeError: a ``given`` key is neither a :class:`TrainConfig` field nor an option of any
            registered method.
    """
    loop = {f.name for f in fields(TrainConfig)} - {"options"}
    anyone = {f.name for m in list_methods() for f in fields(get_method(m).Config)}
    unknown = sorted(set(given) - loop - anyone - {"options"})
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
    values: dict[str, Any] = dict(get_method(method).defaults)
    values.update({k: v for k, v in given.items() if k in loop and v is not None})
    opts = dict(given.get("options") or {})
    opts.update({k: v for k, v in given.items() if k not in loop and k != "options" and v is not None})
    _fine_tune_defaults(method, values, opts)
    values["method"] = method
    values["options"] = method_options(method, **opts)
    return TrainConfig(**values)


#: what :func:`make_config` (and so ``fewshot train``) fine-tunes when neither ``fine_tune`` nor
#: the method's :attr:`Method.defaults` says; chosen from bench/quality_finetune.py (README,
#: "Fine-tuning the feature extractor"): on the unseen Grocery test classes ``all`` beat
#: ``last:2`` for every method (MAP@R triplet 0.563 vs 0.527, contrastive 0.555 vs 0.488,
#: protonet 0.577 vs 0.526, maml 0.562 vs 0.462) and peaked sooner
DEFAULT_FINE_TUNE = "all"
#: loop lengths when fine-tuning and the caller set none (every epoch runs the backbone forward
#: and backward, so the head-only defaults of 30 epochs / 2,000 episodes would take hours on CPU).
#: 4 epochs: every siamese run at its default rates peaked by epoch 3 (bench/quality_finetune.py:
#: triplet all 1, 2, 2, 3; contrastive all 1; last:2 2-3), and the 5th epoch put triplet's
#: default run over 20 minutes on 2 AMD EPYC cores (21.0 min, best epoch 3; 17.4 min for 4)
FINE_TUNE_LENGTH: dict[str, int] = {"epochs": 4, "patience": 2}
#: episodes of an episodic method when fine-tuning, by ``--fine-tune`` mode: ``all`` peaked
#: after 100-200 (protonet 15 min, maml 13 min for 200 on 2 cores), ``last:2`` after 300
FINE_TUNE_EPISODES: dict[str, int] = {"all": 200, "last": 300}


def _fine_tune_defaults(method: str, values: dict[str, Any], opts: dict[str, Any]) -> None:
    """Fill in :data:`DEFAULT_FINE_TUNE` and, when fine-tuning, the shorter loop lengths the
    caller did not set (in place)."""
    values.setdefault("fine_tune", DEFAULT_FINE_TUNE)
    mode = parse_fine_tune(values["fine_tune"], values.get("fine_tune_blocks", 2))[0]
    if mode == "none":
        return
    for key, value in FINE_TUNE_LENGTH.items():
        values.setdefault(key, value)
    if get_method(method).episodic and "episodes" in {f.name for f in fields(get_method(method).Config)}:
        opts.setdefault("episodes", FINE_TUNE_EPISODES[mode])


def config_keys(method: str) -> set[str]:
    """The keys :func:`make_config` takes for ``method``: the loop's fields and its options."""
    return ({f.name for f in fields(TrainConfig)} - {"options"}) | {f.name for f in fields(get_method(method).Config)}


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()
