"""The Python API: the command-line jobs as functions and one :class:`Catalogue` class.

Habits borrowed from the libraries practitioners know: easyfsl's support-then-query
(``Catalogue.build`` on the support images, ``classify`` on the queries), scikit-learn's
fit/predict, pytorch-metric-learning's ``InferenceModel`` (``train_knn`` ~ ``build``,
``get_nearest_neighbors`` ~ ``search``). Worked examples, run as doctests by the test suite:
``docs/python-api.md``.

Images may be given as file paths, PIL images or ``uint8`` arrays (``[H, W, 3]`` RGB or
``[H, W]`` grey), always as a list (one path is ``[path]``). Paths are embedded through the
on-disk embedding cache and recognised when they are catalogue images (leave-one-out); images
in memory are embedded directly.

Misuse is refused before any work, naming the argument: a wrong type is a ``TypeError`` (a
path where a :class:`~fewshot.data.Dataset` is expected says how to load it), a wrong value a
``ValueError`` (:class:`~fewshot.errors.InputError`, also a ``DataError``, for labels and
image arrays: the same rules as the service, :mod:`fewshot.catalogue.labels`).

:class:`Catalogue` is :class:`fewshot.catalogue.Catalogue`, the one catalogue the CLI and the
service use too; the argument checks are :mod:`fewshot.catalogue.inputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .backbones import Backbone
from .catalogue import Catalogue
from .catalogue.inputs import ImageLike, as_dataset, as_model, as_path
from .checks import as_bool, positive_int
from .data.records import Dataset
from .model import EmbeddingModel
from .data.protocol import ALL_SPLITS, leave_one_out_protocol, load_data, split_protocol_sets
from .embed.options import EmbedOptions
from .evaluation import EvalConfig, check_open_set, evaluate_sets
from .evaluation.levers import check_levers

__all__ = ["load_dataset", "create_backbone", "load_model", "Catalogue", "evaluate", "train", "ImageLike"]


def load_dataset(path: str | Path, *, split: str | None = None, group_from: str | None = None,
                 layout: str = "auto") -> Dataset:
    """Load a folder tree (``root/<article>/*.jpg`` or ``root/<brand>/<article>/*.jpg``), a CSV
    manifest, or a fetched dataset's name (``"grocery"``); ``split`` selects a dataset's own
    image split (``None``: every image). ``layout`` says how a folder tree is read: ``"auto"``
    (refuses a tree of mixed depth, naming the folders), ``"class"`` or ``"group/class"``
    (:func:`fewshot.data.load_dataset`).

    Raises:
        DataError: a missing path, an unknown split, an empty dataset, a mixed-depth tree (with the fix).
        TypeError / ValueError: ``path`` is not a path or name, an unknown ``layout``.
    """
    return load_data(str(as_path(path, "path")), split or ALL_SPLITS, group_from, layout=layout)


def create_backbone(name: str = "efficientnet_lite0", *, image_size: int = 224, pretrained: bool = True,
                    tta: str = "none") -> EmbeddingModel:
    """A frozen pretrained backbone as an embedding model (``fewshot backbones`` lists names);
    ``tta="flip"`` embeds each image as the mean over it and its mirror image
    (:class:`~fewshot.backbones.FlipAverage`), ``tta="scales"`` as the mean over it at three
    sides (:class:`~fewshot.backbones.ScaleAverage`).

    Raises:
        BackboneError: an unknown name or ``tta``, a missing optional package or weights, an
            image size out of range.
        TypeError: ``name`` is not a ``str``, ``image_size`` not an integer.
    """
    from .methods.runs import load_embedding_model

    if not isinstance(name, str):
        raise TypeError(f"name must be a backbone name (str; `fewshot backbones` lists them), not {type(name).__name__}")
    image_size = positive_int(image_size, "image_size")
    return load_embedding_model(name, None, image_size, pretrained=pretrained, tta=tta)


def load_model(run_dir: str | Path, *, tta: str = "none") -> EmbeddingModel:
    """The model a ``fewshot train`` run saved (fine-tuned backbone + head, at its image size),
    with test-time augmentation ``tta`` (as :func:`create_backbone`).

    Raises:
        CheckpointError: not a complete run folder, or damaged weights.
        BackboneError: an unknown ``tta``.
        TypeError / ValueError: ``run_dir`` is not a path (``None`` is not the default backbone:
            that is :func:`create_backbone`).
    """
    from .methods.runs import load_embedding_model

    return load_embedding_model(None, as_path(run_dir, "run_dir"), tta=tta)


def evaluate(model: EmbeddingModel | Backbone, dataset: Dataset, *, split_file: str | Path | None = None,
             part: str = "test", episodes: int = 1000, n_query: int = 5, seed: int = 0, runtime: str = "auto",
             out: str | Path | None = None, overwrite: bool = False, open_set: bool = False,
             open_set_draws: int = 20, target_far: float = 0.05, rerank: Any = "none", transductive: str = "none",
             query_imbalance: float | None = None, whiten: bool = False) -> dict[str, Any]:
    """Retrieval metrics (mAP, MAP@R, P@1, Recall@k, per group) and N-way K-shot accuracy.

    Without ``split_file``: leave-one-out within ``dataset``. With it: the classes of ``part``,
    queries against their gallery (:func:`fewshot.data.protocol_sets`). ``out``: also write
    ``metrics.json``, ``report.md`` and the PNGs there.

    ``open_set=True`` (needs ``split_file``) adds the ``open_set`` section
    (:func:`fewshot.evaluation.openset.evaluate_open_set`): the articles of ``part`` halved at
    random ``open_set_draws`` times (seeded by ``seed``) into known ones, in the catalogue, and
    absent ones; AUROC and FPR@95TPR of each open-set score, and what the threshold calibrated
    for ``target_far`` does (false accepts, known photos accepted and right, brand fallback).

    ``rerank`` re-ranks the gallery before the retrieval figures (needs ``split_file``): a kind
    (``"qe"``, ``"dba"``, ``"dba-qe"``, ``"k-reciprocal"``), a dict of
    :class:`fewshot.index.rerank.RerankOptions` fields or an instance. ``transductive`` picks the
    episodes' classifier (``"none"``, ``"centre"``, ``"bdcspn"``, ``"tim"``, ``"paddle"``;
    :mod:`fewshot.methods.transductive`), ``query_imbalance`` draws imbalanced query sets
    (Dirichlet concentration, e.g. 2), where transductive classifiers can lose to ``"none"``.
    ``whiten=True`` (needs ``split_file``) whitens the gallery and the queries by the gallery's
    within-article covariance for the retrieval figures, and each open-set catalogue by its own
    (:mod:`fewshot.index.whiten`); the episodes stay unwhitened.

    Returns:
        the metrics record (the dict ``metrics.json`` holds).

    Raises:
        DataError: data that cannot give a meaningful number (one class, one image per class).
        TypeError: ``model`` is not a model, ``dataset`` not a :class:`Dataset` (a path says
            how to load it), ``episodes`` / ``seed`` not integers, ``open_set`` / ``whiten`` not
            ``True`` / ``False``, paths that are not paths.
        ValueError: ``episodes < 1``, ``seed < 0``, ``open_set_draws < 1``, ``open_set`` without
            ``split_file``, ``target_far`` outside (0, 1), an unknown ``rerank`` / ``transductive``,
            ``rerank`` or ``whiten`` without ``split_file``. All checked before anything is embedded.
    """
    from .data.splits import ClassSplit

    model, dataset = as_model(model), as_dataset(dataset)
    episodes, seed = positive_int(episodes, "episodes"), positive_int(seed, "seed", minimum=0)
    n_query = positive_int(n_query, "n_query")
    open_set_draws = positive_int(open_set_draws, "open_set_draws")
    open_set, whiten = as_bool(open_set, "open_set"), as_bool(whiten, "whiten")
    split_file = as_path(split_file, "split_file") if split_file is not None else None
    out = as_path(out, "out") if out is not None else None
    cfg = EvalConfig(data=str(dataset.root or dataset.name), split_file=str(split_file) if split_file else None,
                     part=part, seed=seed, episodes=episodes, n_query=n_query, open_set=open_set,
                     open_set_draws=open_set_draws, target_far=target_far, rerank=rerank, transductive=transductive,
                     query_imbalance=query_imbalance, whiten=whiten, embed=EmbedOptions(runtime=runtime, progress=False))
    check_open_set(cfg)
    check_levers(rerank, transductive, query_imbalance, gallery=split_file is not None, model_classifier=False,
                 whiten=whiten)
    if split_file is None:
        return evaluate_sets(cfg, dataset, None, leave_one_out_protocol(dataset), out, model, overwrite=overwrite)
    queries, gallery, protocol = split_protocol_sets(dataset, ClassSplit.load(split_file), split_file, part)
    return evaluate_sets(cfg, queries, gallery, protocol, out, model, overwrite=overwrite)


def train(config: Any) -> Any:
    """Train a method (``config``: a :class:`fewshot.training.TrainConfig`, e.g. from
    ``fewshot.training.make_config("triplet", data=..., split_file=..., out=...)``);
    returns the :class:`fewshot.training.RunResult` (best epoch, metrics, history).

    Raises:
        TypeError: ``config`` is not a ``TrainConfig`` (the message says how to make one).
    """
    from .training import TrainConfig, train as _train

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, not {type(config).__name__}: make one with "
                        "fewshot.training.make_config('triplet', data=..., split_file=..., out=...)")
    return _train(config)
