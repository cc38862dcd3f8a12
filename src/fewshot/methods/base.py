"""The training-method contract: :class:`Method`, :class:`TrainData`, :class:`IndexBatch`, :class:`EpisodeSpec`.

A *method* says what one training step computes; :mod:`fewshot.training` does the rest,
once for every method (data loading, cached embeddings, the optimizer and its learning-rate
policy, the epoch loop, validation, history, best-epoch selection, early stopping,
checkpoints, ``resume``, saving the run, several processes).

Writing a method
----------------

Subclass :class:`Method`, set ``name``, register it (:func:`fewshot.methods.register_method`),
and say what one epoch iterates and where embedding happens::

    @register_method("mymethod")
    class MyMethod(Method):
        name = "mymethod"
        data_parallel = True                           # the loss needs nothing but items' embeddings

        def epoch_batches(self, train, rng):          # what one epoch iterates
            ...                                        # e.g. episodes, or index batches
        def items(self, batch):                        # which training items to embed, int64 [B]
            return batch.idx
        def loss_from(self, z, batch):                 # scalar loss from their embeddings [B, E]
            ...

* The trainer computes a batch's loss as :meth:`Method.loss`, by default
  ``loss_from(embed(features(items(batch))), batch)``. Several processes
  (:mod:`fewshot.training.parallel`) split the same computation: each embeds a slice of
  ``items(batch)``, the slices are gathered in order, every process computes ``loss_from``
  on all of them. A method whose loss is not that (MAML adapts per task in inner loops)
  overrides :meth:`Method.loss` and leaves ``data_parallel`` False: it trains in one process.
* :meth:`Method.features` maps training-item indices to backbone features ``[B, D]``: the
  cached frozen embeddings, or, when fine-tuning, a forward pass of the trainable backbone over
  augmented images, with gradients. A method never needs to know which. (A method that runs
  the backbone itself, e.g. full-network MAML, uses :meth:`Method.inputs` and
  :attr:`Method.backbone`.)
* :meth:`Method.embed` applies the projection head (``self.head``): ``[B, D] -> [B, E]``.
* A method receives its own options (``self.opts``, an instance of its :attr:`Method.Config`),
  the episode shape (``self.episodes``, :class:`EpisodeSpec`) and its head spec; the loop's
  other settings (learning rates, epochs, ...) are the trainer's. It does not build an
  optimizer: :meth:`Method.param_groups` says which parameters train (``"head"`` and
  ``"backbone"`` groups, optionally with an ``"lr_factor"``), and the trainer's Adam and
  learning-rate schedule (:mod:`fewshot.training.optim`) do the rest.
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

Built-in names: ``contrastive`` and ``triplet`` (:mod:`.siamese`), ``multisimilarity``, ``proxyanchor``,
``arcface`` (one module each), ``protonet`` (:mod:`.protonet`), ``maml`` and ``fomaml`` (:mod:`.maml`);
:mod:`fewshot.methods` imports those modules, so they are registered whenever a method module is
used. The registry is :mod:`.registry`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
from torch import nn

from ..data.episodes import EpisodeSampler
from ..errors import DataError, FewshotError
from ..model import EpisodeClassifier
from ..options import check_options, option
from .heads import ProjectionHead, resolve_head_spec

__all__ = ["TrainData", "Method", "IndexBatch", "EpisodeSpec", "EpisodicOptions", "NoOptions", "option"]


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class EpisodicOptions:
    """Options of every episodic method (prototypical networks, MAML)."""

    episodes: int = option(2000, "Training episodes in all (--epochs N means N x --episodes-per-epoch); "
                           "200 when fine-tuning all, 300 with last:N, unless given.", min=1)
    episodes_per_epoch: int = option(100, "Training episodes between validations.", min=1)


@dataclass(frozen=True)
class EpisodeSpec:
    """The shape of N-way K-shot Q-query episodes (episodic training and episodic validation).

    Attributes:
        ways: ``N`` classes per episode; shots: ``K`` support items per class; queries: ``Q``
            query items per class.
    """

    ways: int = 5
    shots: int = 5
    queries: int = 5

    @property
    def items(self) -> int:
        """Items of one episode: ``N * (K + Q)``."""
        return self.ways * (self.shots + self.queries)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EpisodeSpec":
        """From a run's ``train_config`` (its ``ways``, ``shots``, ``queries``; missing ones default)."""
        return cls(**{k: int(data[k]) for k in ("ways", "shots", "queries") if data.get(k) is not None})


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
        opts: the method's options, an instance of :attr:`Config` (``None`` = its defaults; an
            instance of another options class keeps the fields this one has).
        in_dim: backbone embedding dimension ``D``.
        episodes: the episode shape (``None`` = :class:`EpisodeSpec` defaults).
        head: the projection head spec (a preset name or a partial dict,
            :func:`~fewshot.methods.heads.resolve_head_spec`; ``None`` = the default head).
        fine_tuning: whether the trainer fine-tunes the backbone (some methods need it, e.g.
            MAML adapting the backbone in its inner loop).

    Attributes:
        opts, in_dim, episodes, fine_tuning: as given.
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
    #: method-specific defaults for the training loop's settings the user did not set
    #: (applied by :func:`fewshot.training.make_config`), e.g. ``{"lr": 1e-3}``.
    defaults: ClassVar[dict[str, Any]] = {}
    #: the same, only when the backbone trains (over ``FINE_TUNE_LENGTH``), e.g. ``{"epochs": 3}``
    fine_tune_defaults: ClassVar[dict[str, Any]] = {}
    #: episodic methods draw N-way K-shot episodes; the trainer then validates episodically
    #: with :meth:`episode_classifier` (others are validated with nearest prototypes too).
    episodic: ClassVar[bool] = False
    #: the loss is :meth:`loss_from` of the embeddings of :meth:`items` and nothing else, so
    #: several processes may each embed a slice of the items (:mod:`fewshot.training.parallel`)
    data_parallel: ClassVar[bool] = False
    #: the trainer's Adam may use PyTorch's fused kernel for this method (same update rule; on
    #: CPU about 10x faster for a 1280 x 1280 head, see :mod:`.protonet`)
    fused_adam: ClassVar[bool] = False

    def __init__(self, opts: Any = None, in_dim: int = 0, *, episodes: EpisodeSpec | None = None,
                 head: dict | str | None = None, fine_tuning: bool = False) -> None:
        if opts is None:
            opts = self.Config()
        elif not isinstance(opts, self.Config):  # e.g. options made for another method
            opts = self.Config(**{k: v for k, v in asdict(opts).items() if k in {f.name for f in fields(self.Config)}})
        self.opts = opts
        self.episodes = episodes or EpisodeSpec()
        self.head_spec = head
        self.fine_tuning = bool(fine_tuning)
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
        """The projection head from the ``head`` spec (default :data:`~fewshot.methods.heads.DEFAULT_HEAD`)."""
        return ProjectionHead(**resolve_head_spec(self.head_spec, self.in_dim))

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the method beyond the head (default none)."""
        return []

    def trainable(self) -> list[nn.Parameter]:
        """Everything the optimizer updates: head, method parameters, fine-tuned backbone blocks
        (the parameters of :meth:`param_groups`, in order)."""
        return [p for group in self.param_groups() for p in group["params"]]

    def param_groups(self) -> list[dict[str, Any]]:
        """:meth:`trainable` as named parameter groups, without learning rates (the trainer
        sets them, :func:`fewshot.training.optim.make_optimizer`): ``"head"`` (head and method
        parameters), then ``"backbone"`` (fine-tuned backbone parameters) when there are any.
        A method may add ``"lr_factor"`` to a group (its rate times the trainer's)."""
        head = [p for p in self.head.parameters() if p.requires_grad] + list(self.extra_parameters())
        groups: list[dict[str, Any]] = [{"params": head, "name": "head"}]
        if self.backbone_params:
            groups.append({"params": list(self.backbone_params), "name": "backbone"})
        return groups

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

    def max_epochs(self, epochs: int) -> int:
        """Epochs the trainer runs at most, given the loop's ``epochs``: :meth:`epochs_for` its options."""
        return type(self).epochs_for(self.opts, epochs)

    @classmethod
    def epochs_for(cls, opts: Any, epochs: int) -> int:
        """Epochs a run of this method with options ``opts`` runs at most, given the loop's
        ``epochs``: those, or for episodic methods ``ceil(opts.episodes / opts.episodes_per_epoch)``
        (the training loop's checks ask before a method exists)."""
        if cls.episodic:
            return int(math.ceil(opts.episodes / max(1, opts.episodes_per_epoch)))
        return int(epochs)

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
                               hint="set fine_tune='last:N' or fine_tune='all'", options=("fine_tune",))
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
        """An N-way K-shot Q-query sampler (:attr:`episodes`) over the training items, seeded
        from ``rng``. ``episodes`` defaults to ``opts.episodes_per_epoch``. Helper for episodic methods."""
        spec = self.episodes
        sampler = EpisodeSampler(train.y.tolist(), spec.ways, spec.shots, spec.queries,
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
            FewshotError: naming the options to change (``options``).
        """
        if not self.episodic:
            return
        spec = self.episodes
        if spec.ways < 2:
            raise FewshotError(f"ways={spec.ways}: an episode needs at least 2 classes (in a 1-way episode "
                               "every query is right, so the loss is 0 and nothing is learned)",
                               hint="use ways=2 or more (default 5)", options=("ways",))
        try:
            self.episode_sampler(train, np.random.default_rng(0), episodes=1)
        except DataError as exc:
            raise DataError(f"the train classes cannot make {spec.ways}-way {spec.shots}-shot episodes with "
                            f"{spec.queries} queries: {exc.message}",
                            hint="lower ways, shots or queries, or give the train classes more photos",
                            options=("ways", "shots", "queries")) from None

    # ------------------------------------------------------------------ the loss
    def items(self, batch: Any) -> np.ndarray:
        """The training items whose embeddings :meth:`loss_from` needs, in order: int64 ``[B]``."""
        raise NotImplementedError

    def loss_from(self, embeddings: torch.Tensor, batch: Any) -> torch.Tensor:
        """Scalar loss of ``batch`` given the head embeddings ``float32 [B, E]`` of
        :meth:`items` (row ``i`` is item ``items(batch)[i]``)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> torch.Tensor:
        """Scalar loss of one batch from :meth:`epoch_batches`:
        ``loss_from(embed(features(items(batch))), batch)``. A method that embeds otherwise
        overrides this (and is not :attr:`data_parallel`)."""
        return self.loss_from(self.embed(self.features(self.items(batch))), batch)

    @classmethod
    def check_parallel(cls, opts: Any, episodes: EpisodeSpec, world_size: int) -> None:
        """Refuse settings that ``world_size`` processes cannot split (called before any work).

        The default refuses a method that is not :attr:`data_parallel`, and an episode with fewer
        items than processes.

        Raises:
            FewshotError: naming the options to change (``options``; ``nproc`` is the number of processes).
        """
        if world_size <= 1:
            return
        if not cls.data_parallel:
            raise FewshotError(f"method {cls.name} cannot train in several processes: its loss is not computed "
                               "from one embedding of its batch's items (e.g. it adapts to every task in inner "
                               "loops), which distributed training does not split",
                               hint="train it in one process (nproc=1, or without torchrun)",
                               options=("method", "nproc"))
        if cls.episodic and episodes.items < world_size:
            raise FewshotError(f"an episode of {episodes.ways} x ({episodes.shots} + {episodes.queries}) items "
                               f"is too small to split over nproc={world_size}",
                               hint="use fewer processes or larger episodes", options=("nproc",))

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
    def legacy_options(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """The options of a fewshot 0.1.0 ``train_config``, which kept them among the loop
        fields (under their names, or the old names of :attr:`Config` ``.LEGACY_NAMES``)."""
        aliases = getattr(cls.Config, "LEGACY_NAMES", {})
        out = {}
        for f in fields(cls.Config):
            for key in (f.name, *[k for k, v in aliases.items() if v == f.name]):
                if flat.get(key) is not None:
                    out[f.name] = flat[key]
        return out

    @classmethod
    def options_from(cls, train_config: dict[str, Any]) -> Any:
        """The :attr:`Config` of a run's ``train_config`` (its ``options``, or a 0.1.0 run's
        flat fields), checked.

        Raises:
            FewshotError: a value outside an option's ``min`` / ``choices``.
        """
        given = train_config.get("options")
        given = cls.legacy_options(train_config) if given is None else given
        known = {f.name for f in fields(cls.Config)}
        opts = cls.Config(**{k: v for k, v in given.items() if k in known and v is not None})
        check_options(f"method '{cls.name}'", opts)
        return opts

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
        saved = config.get("train_config", {})
        method = cls(cls.options_from(saved), model.backbone.dim, episodes=EpisodeSpec.from_dict(saved),
                     head=saved.get("head"), fine_tuning=saved.get("fine_tune", "none") != "none")
        if model.head is not None:
            method.head = model.head
        method.load_extra_tensors(tensors)
        method.train_mode(False)
        model.episode_classifier = method.episode_classifier()
