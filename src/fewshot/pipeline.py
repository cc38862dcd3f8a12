"""The main jobs as functions: evaluate a model, export embeddings, split a dataset.

This layer sits before :mod:`fewshot.cli` / :mod:`fewshot.serve`: it wires data loading,
embedding, metrics and the PNG reports together, so that the CLI stays thin. The catalogue
jobs (index, classify, export) are :mod:`fewshot.catalogue`.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .version import __version__
from .data.fetch import resolve_data
from .data.loaders import load_dataset
from .data.records import Dataset
from .data.splits import ClassSplit, check_fractions, make_class_split, protocol_sets
from .embed import DEFAULT_BATCH_SIZE, Embeddings
from .embed.distributed import RayOptions, ray_embed_dataset
from .errors import DataError
from .io import atomic_dir, atomic_write_json, atomic_write_text, check_output
from .model import EmbeddingModel
from .methods.runs import load_embedding_model
from .metrics import MIN_EPISODES_FOR_CI, episodic_accuracy, nearest_neighbors, retrieval_metrics
from .viz import embedding_map, retrieval_grid

log = logging.getLogger("fewshot")

EPISODE_SETTINGS = (("5way1shot", 5, 1), ("5way5shot", 5, 5))
DEFAULT_IMAGE_SIZE = 224
#: ``--split all``: every image, whatever image splits the dataset has
ALL_SPLITS = "all"


@dataclass
class EmbedOptions:
    """How images are turned into embeddings (shared by every command)."""

    backbone: str | None = "efficientnet_lite0"
    model_dir: str | None = None
    #: input side in pixels; ``None`` = 224 for a backbone, the run's own size with ``model_dir``
    image_size: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = 0
    cache_dir: str | None = None
    strict: bool = False
    progress: bool = True
    #: ``auto`` | ``torch`` | ``onnx`` (:mod:`fewshot.embed.runtime`)
    runtime: str = "auto"
    #: ONNX Runtime threads; ``None`` = ``torch.get_num_threads()``
    threads: int | None = None
    #: test-time augmentation: ``none`` | ``flip`` (:class:`~fewshot.backbones.FlipAverage`)
    tta: str = "none"
    #: embed on Ray Data (:mod:`fewshot.embed.distributed`); ``None`` = in this process
    distributed: RayOptions | None = None

    def model(self) -> EmbeddingModel:
        """The backbone at ``image_size``, or the run in ``model_dir`` at its own size (a
        different ``image_size`` given with a run is reported and ignored)."""
        if self.model_dir is None:
            return load_embedding_model(self.backbone, None, self.image_size or DEFAULT_IMAGE_SIZE, tta=self.tta)
        model = load_embedding_model(self.backbone, self.model_dir, tta=self.tta)
        size = model.backbone.image_size
        if self.image_size is not None and self.image_size != size:
            log.warning("--image-size %d ignored: run %s was trained at %d px and is used at that size",
                        self.image_size, self.model_dir, size)
        return model

    def embed(self, model: EmbeddingModel, dataset: Dataset) -> Embeddings:
        if self.distributed is not None:
            emb = ray_embed_dataset(dataset, model.backbone, options=self.distributed, strict=self.strict,
                                    batch_size=self.batch_size, cache_dir=self.cache_dir, progress=self.progress,
                                    runtime=self.runtime, threads=self.threads)
            emb.vectors = model.transform(emb.vectors)
            return emb
        return model.embed(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                           cache_dir=self.cache_dir, strict=self.strict, progress=self.progress,
                           runtime=self.runtime, threads=self.threads)


@dataclass
class EvalConfig:
    """Everything `fewshot evaluate` needs; recorded in ``metrics.json`` under ``config``.

    Attributes:
        data: dataset path (or a fetched dataset's name).
        split: the dataset's own image split (leave-one-out within it) when no split file;
            ``None`` = ``test`` when the dataset has image splits, else all its images;
            ``"all"`` = every image.
        split_file / part: a class-disjoint protocol (:mod:`fewshot.data.splits`); queries
            and gallery then follow its cross-visit rule for the classes of ``part``.
        episodes, n_query: episodic evaluation size (``n_query`` queries per class).
    """

    data: str
    split: str | None = None
    split_file: str | None = None
    part: str = "test"
    group_from: str | None = None
    #: how a folder tree is read (:data:`fewshot.data.LAYOUTS`)
    layout: str = "auto"
    seed: int = 0
    episodes: int = 1000
    n_query: int = 5
    grid_queries: int = 8
    embed: EmbedOptions = field(default_factory=EmbedOptions)


def environment() -> dict:
    """Package version, torch version and thread count, for result files."""
    return {"fewshot_version": __version__, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def load_data(data: str, split: str | None = None, group_from: str | None = None,
              strict: bool = False, *, default_split: str | None = None, layout: str = "auto") -> Dataset:
    """Resolve ``data`` (path or fetched dataset name) and load it.

    Args:
        split: an image split name (``train``, ``val``, ``test``, ...), ``"all"`` for every
            image, or ``None`` for the command's ``default_split``.
        default_split: the split used when ``split`` is ``None`` and the dataset has image
            splits; a dataset without image splits (a plain folder tree, a CSV without a
            ``split`` column) then uses all its images. ``None`` = all images.
        layout: how a folder tree is read (``--layout``, :func:`fewshot.data.load_dataset`).

    Raises:
        DataError: an unknown split (the message lists the dataset's splits), or a dataset
            with image splits but none called ``default_split``.
    """
    root = resolve_data(data)
    if split not in (None, ALL_SPLITS):
        return load_dataset(root, split=split, group_from=group_from, strict=strict, layout=layout)
    dataset = load_dataset(root, split=None, group_from=group_from, strict=strict, layout=layout)
    if split == ALL_SPLITS or default_split is None:
        return dataset
    available = sorted({r.split for r in dataset.records if r.split is not None})
    if not available:
        log.info("%s has no image splits: using all %d images", root, len(dataset))
        return dataset
    if default_split not in available:
        raise DataError(f"{root} has image splits {', '.join(available)} but no '{default_split}' split",
                        hint=f"pass --split {available[0]} (one of: {', '.join(available)}) or --split all")
    dataset.records = [r for r in dataset.records if r.split == default_split]
    dataset.split = default_split
    return dataset


def load_protocol(data: str, split_file: str | Path, group_from: str | None = None,
                  strict: bool = False, layout: str = "auto") -> tuple[Dataset, ClassSplit]:
    """Every image of ``data`` and the class split of ``split_file`` (classes it names that the
    data lacks are named in a warning); :func:`protocol_sets` then gives each part's images."""
    dataset = load_data(data, ALL_SPLITS, group_from, strict, layout=layout)
    class_split = ClassSplit.load(split_file)
    warn_unknown_classes(class_split, dataset, split_file)
    return dataset, class_split


def evaluation_sets(cfg: EvalConfig) -> tuple[Dataset, Dataset | None, dict]:
    """``(queries, gallery or None for leave-one-out, protocol description)``."""
    if cfg.split_file:
        dataset, class_split = load_protocol(cfg.data, cfg.split_file, cfg.group_from, cfg.embed.strict, cfg.layout)
        return split_protocol_sets(dataset, class_split, cfg.split_file, cfg.part)
    dataset = load_data(cfg.data, cfg.split, cfg.group_from, cfg.embed.strict, default_split="test",
                        layout=cfg.layout)
    return dataset, None, leave_one_out_protocol(dataset)


def split_protocol_sets(dataset: Dataset, class_split: ClassSplit, split_file: str | Path,
                        part: str) -> tuple[Dataset, Dataset, dict]:
    """``(queries, gallery, protocol description)`` of the classes of ``part`` of a class split."""
    queries, gallery = protocol_sets(dataset, class_split, part)
    protocol = {"mode": "query_vs_gallery", "split_file": str(split_file), "part": part,
                "split_name": class_split.name, "classes": len(set(queries.labels) | set(gallery.labels)),
                "query_split": class_split.query_split, "gallery_split": class_split.gallery_split}
    return queries, gallery, protocol


def leave_one_out_protocol(dataset: Dataset) -> dict:
    """The protocol description of a leave-one-out evaluation within ``dataset``."""
    return {"mode": "leave_one_out", "split": dataset.split or ALL_SPLITS}


def check_evaluable(query_labels: list[str], gallery_labels: list[str] | None, name: str) -> None:
    """Refuse an evaluation whose numbers would be empty or true by construction.

    Leave-one-out (``gallery_labels`` is ``None``) needs a class with two or more images;
    query vs gallery needs a query whose class is in the gallery. Either needs two or more
    classes to rank among (with one class every retrieved item is relevant: mAP 1.0).

    Raises:
        DataError: naming ``name`` and what it lacks.
    """
    from collections import Counter

    ref = Counter(gallery_labels if gallery_labels is not None else query_labels)
    need = 1 if gallery_labels is not None else 2
    if not any(ref.get(lab, 0) >= need for lab in set(query_labels)):
        what = ("every class has a single image, and leave-one-out needs two or more per class"
                if gallery_labels is None else "no query's class is in the gallery")
        raise DataError(f"no query of {name} has a relevant item to retrieve: {what}",
                        hint="add photos (at least 2 per article), or evaluate other data")
    if len(ref) < 2:
        raise DataError(f"{name} has a single class ({next(iter(ref))}): every retrieved item would be "
                        "relevant, so mAP, MAP@R and P@1 would be 1.0 by construction",
                        hint="evaluate on data with at least two classes (articles)")


def data_protection(data: str, *datasets: Dataset | None) -> dict:
    """``check_output`` arguments that keep an output away from the input data: the image
    files of ``datasets``, the manifest file, and the data folder itself."""
    root = resolve_data(data)
    inputs: list[str | Path] = [p for ds in datasets if ds is not None for p in ds.paths]
    if root.is_file():
        inputs.append(root)
    return {"inputs": inputs, "input_roots": [root] if root.is_dir() else []}


def is_evaluation_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`evaluate` (``metrics.json`` with a config)."""
    try:
        metrics = json.loads((Path(path) / "metrics.json").read_text(encoding="utf-8"))
        return isinstance(metrics, dict) and "fewshot_version" in metrics.get("config", {})
    except (OSError, ValueError, AttributeError):
        return False


EVALUATION_FILES = frozenset({"metrics.json", "report.md", "retrieval_grid.png", "embedding_map.png"})


def evaluate(cfg: EvalConfig, out: str | Path | None = None,
             model: EmbeddingModel | None = None, *, overwrite: bool = False) -> dict:
    """Retrieval and episodic metrics of a model on a dataset; optionally written to ``out``.

    Writes the folder ``out`` atomically: ``metrics.json`` (keys: map, map_at_r,
    precision_at_1, recall_at_k, map_at_k, num_queries, num_skipped_queries, episodes,
    per_group, config), ``report.md``, ``retrieval_grid.png`` and ``embedding_map.png`` (a
    2-D t-SNE or PCA map of the query embeddings, coloured by group).

    Args:
        overwrite: replace ``out`` when it holds an earlier evaluation (any other existing,
            non-empty ``out`` is refused).

    Returns:
        the metrics dictionary written to ``metrics.json``.

    Raises:
        DataError: the data cannot give a meaningful result (:func:`check_evaluable`), or
            ``out`` is not a place this command may write.
    """
    queries, gallery, protocol = evaluation_sets(cfg)
    return evaluate_sets(cfg, queries, gallery, protocol, out, model, overwrite=overwrite)


def evaluate_sets(cfg: EvalConfig, queries: Dataset, gallery: Dataset | None, protocol: dict,
                  out: str | Path | None = None, model: EmbeddingModel | None = None, *,
                  overwrite: bool = False) -> dict:
    """:func:`evaluate` on query and gallery sets already chosen (``gallery`` ``None`` =
    leave-one-out within ``queries``); ``protocol`` describes how, for ``metrics.json``."""
    name = f"{cfg.data}" + (f" ({protocol['part']} classes)" if gallery is not None else "")
    check_evaluable(queries.labels, gallery.labels if gallery is not None else None, name)
    if out is not None:
        check_output(out, what="fewshot evaluation", is_ours=is_evaluation_dir, overwrite=overwrite,
                     owned=EVALUATION_FILES.__contains__, **data_protection(cfg.data, queries, gallery))
    model = model or cfg.embed.model()
    q = cfg.embed.embed(model, queries)
    g = cfg.embed.embed(model, gallery) if gallery is not None else None
    check_evaluable(q.labels, g.labels if g is not None else None, f"the readable images of {name}")
    report = retrieval_metrics(q.vectors, q.labels, g.vectors if g else None, g.labels if g else None,
                               query_groups=q.groups)
    metrics = report.to_dict()
    if report.num_skipped_queries:
        warn_single_image_classes(q, g)
    metrics["episodes"] = episode_metrics(cfg, model, q, g)
    skipped = [(str(p), r) for p, r in q.skipped + (g.skipped if g else [])]
    metrics["config"] = {
        "data": str(cfg.data), "dataset": queries.name,
        "split": protocol.get("split") if not cfg.split_file else None,
        "protocol": protocol, "model": model.describe(), "image_size": model.backbone.image_size,
        "seed": cfg.seed, "episodes": cfg.episodes, "n_query": cfg.n_query,
        "similarity": "cosine", "num_images": len(q.dataset) + (len(g.dataset) if g else 0),
        "skipped_images": skipped, **environment()}
    if out is not None:
        write_evaluation(metrics, q, g, Path(out), cfg)
    return metrics


def episode_metrics(cfg: EvalConfig, model: EmbeddingModel, q: Embeddings, g: Embeddings | None) -> dict:
    """N-way K-shot accuracy for each of :data:`EPISODE_SETTINGS` (``accuracy`` ``None`` with an
    ``error`` where the data has too few classes or images for it)."""
    episodes = {}
    for key, n_way, k_shot in EPISODE_SETTINGS:
        support = g if g is not None else q
        try:
            res = episodic_accuracy(
                support.vectors, support.labels, n_way=n_way, k_shot=k_shot, n_query=cfg.n_query,
                episodes=cfg.episodes, seed=cfg.seed,
                query_embeddings=q.vectors if g is not None else None,
                query_labels=q.labels if g is not None else None,
                classifier=model.episode_classifier)
            episodes[key] = {"accuracy": res.accuracy, "ci95": res.ci95, "episodes": res.episodes,
                             "n_way": n_way, "k_shot": k_shot, "n_query": cfg.n_query}
        except DataError as exc:
            log.warning("%s episodes skipped: %s", key, exc.message)
            episodes[key] = {"accuracy": None, "ci95": None, "error": exc.message}
    return episodes


def warn_single_image_classes(q: Embeddings, g: Embeddings | None) -> list[str]:
    """Log once which classes cannot be retrieval queries (no other image of the class to find)."""
    from collections import Counter

    ref = Counter(g.labels) if g is not None else Counter(q.labels)
    need = 1 if g is not None else 2
    lonely = sorted({lab for lab in q.labels if ref.get(lab, 0) < need})
    if lonely:
        shown = ", ".join(lonely[:10]) + (f" and {len(lonely) - 10} more" if len(lonely) > 10 else "")
        log.warning("%d class(es) have no other image to retrieve, so their images are kept in the "
                    "gallery but not used as queries: %s", len(lonely), shown)
    return lonely


def write_evaluation(metrics: dict, q: Embeddings, g: Embeddings | None, out: Path,
                     cfg: EvalConfig) -> None:
    """Write metrics.json, report.md, retrieval_grid.png and embedding_map.png as the folder ``out`` (atomically:
    a failure leaves the previous folder as it was)."""
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "report.md", render_report(metrics))
        _write_grid(metrics, q, g, tmp, cfg)
        embedding_map(q.vectors, q.labels, q.groups, tmp / "embedding_map.png", seed=cfg.seed,
                      title=f"{metrics['config']['model']['method']} - {metrics['config']['dataset']}: query embeddings")


def _write_grid(metrics: dict, q: Embeddings, g: Embeddings | None, out: Path, cfg: EvalConfig) -> None:
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(q.vectors), size=min(cfg.grid_queries, len(q.vectors)), replace=False))
    ref_vectors = g.vectors if g is not None else q.vectors
    scores, idx = nearest_neighbors(q.vectors[pick], ref_vectors, k=5 if g is not None else 6)
    if g is None:  # leave-one-out: drop each query itself from its own results
        keep = idx != pick[:, None]
        scores = np.stack([row[m][:5] for row, m in zip(scores, keep)])
        idx = np.stack([row[m][:5] for row, m in zip(idx, keep)])
    ref = g if g is not None else q
    retrieval_grid([q.dataset.records[i].path for i in pick], [q.labels[i] for i in pick],
                   [[ref.dataset.records[j].path for j in row] for row in idx],
                   [[ref.labels[j] for j in row] for row in idx], scores.tolist(),
                   out / "retrieval_grid.png",
                   title=f"{metrics['config']['model']['method']} - {metrics['config']['dataset']}: top-5 (green = same article)")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(e: dict) -> str:
    if e.get("accuracy") is None:
        return "-"
    return f"+- {e['ci95']:.3f}" if e.get("ci95") is not None else f"n/a (fewer than {MIN_EPISODES_FOR_CI} episodes)"


def _runtime_note(runtimes: list[dict] | None) -> str:
    """``; forward pass: onnx`` (or why torch ran instead); empty when all was cached."""
    if not runtimes:
        return "; forward pass: none (every embedding came from the cache)" if runtimes is not None else ""
    used = ", ".join(sorted({r["runtime"] for r in runtimes}))
    notes = [r["notice"] for r in runtimes if r.get("notice")]
    return f"; forward pass: {used}" + (f" ({notes[0]})" if notes else "")


def render_report(metrics: dict) -> str:
    """A Markdown report: headline table, episodic accuracy, per-group table."""
    c = metrics["config"]
    lines = [f"# Evaluation: {c['model']['method']} on {c['dataset']}", "",
             f"- model: `{c['model']['backbone']['name']}` at {c['image_size']} px"
             + (f", run `{c['model']['model_dir']}`" if c['model']['model_dir'] else " (frozen)")
             + (", each image embedded with its mirror image (`--tta flip`)"
                if c['model']['backbone'].get('tta', 'none') != 'none' else "")
             + _runtime_note(c['model'].get('runtimes')),
             f"- protocol: {c['protocol']['mode']}" + (f", split `{c['split']}`" if c.get("split") else "")
             + (f", split file `{c['protocol'].get('split_file')}` part `{c['protocol'].get('part')}`"
                if c['protocol'].get('split_file') else ""),
             f"- queries: {metrics['num_queries']} (skipped: {metrics['num_skipped_queries']} whose class has no other image)",
             f"- seed {c['seed']}, fewshot {c['fewshot_version']}", "",
             "| mAP | MAP@R | P@1 | R@1 | R@5 | R@10 | mAP@10 |", "|---|---|---|---|---|---|---|",
             f"| {_fmt(metrics['map'])} | {_fmt(metrics['map_at_r'])} | {_fmt(metrics['precision_at_1'])} | "
             f"{_fmt(metrics['recall_at_k'].get('1'))} | {_fmt(metrics['recall_at_k'].get('5'))} | "
             f"{_fmt(metrics['recall_at_k'].get('10'))} | {_fmt(metrics['map_at_k'].get('10'))} |", "",
             "| episodes | accuracy | 95% CI |", "|---|---|---|"]
    for key, e in metrics["episodes"].items():
        lines.append(f"| {key} ({c['episodes']} episodes, {c['n_query']} queries/class) | "
                     f"{_fmt(e.get('accuracy'))} | {_ci(e)} |")
    lines += ["", "![retrieval grid](retrieval_grid.png)", "",
              "Embedding map (queries; colour = group): [embedding_map.png](embedding_map.png)", "",
              "![embedding map](embedding_map.png)"]
    if metrics.get("per_group"):
        lines += ["", "## Per group", "", "| group | queries | mAP | MAP@R | P@1 |", "|---|---|---|---|---|"]
        for grp, v in sorted(metrics["per_group"].items()):
            lines.append(f"| {grp} | {v.get('num_queries', '')} | {_fmt(v['map'])} | {_fmt(v['map_at_r'])} | "
                         f"{_fmt(v['precision_at_1'])} |")
    return "\n".join(lines) + "\n"


def warn_unknown_classes(split: ClassSplit, dataset: Dataset, split_file: str | Path) -> list[str]:
    """Log the classes a split file names that the dataset does not have (a typo or another
    dataset's split); returns them."""
    present = set(dataset.labels)
    missing = sorted(c for c in split.train + split.val + split.test if c not in present)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        log.warning("%d class(es) of %s are not in %s and are left out: %s", len(missing), split_file,
                    dataset.name, shown)
    return missing


__all__ = ["make_split", "SplitSummary", "is_split_file", "evaluate_sets", "split_protocol_sets",
           "leave_one_out_protocol", "EmbedOptions", "EvalConfig", "evaluate", "render_report", "environment",
           "load_data", "check_evaluable", "export_embeddings", "warn_unknown_classes"]


def is_embeddings_file(path: Path) -> bool:
    """Whether ``path`` is a file written by :func:`export_embeddings` (it records a config)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if not {"config", "embeddings", "labels", "paths"} <= set(z.files):
                    return False
                config = json.loads(str(z["config"]))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as fh:
                meta = fh.metadata() or {}
            if not {"config", "labels", "paths"} <= set(meta):
                return False
            config = json.loads(meta["config"])
        else:
            return False
        return isinstance(config, dict) and "fewshot_version" in config
    except Exception:  # not readable as ours: treat as somebody else's file
        return False


def export_embeddings(data: str, out: str | Path, *, split: str | None = None, group_from: str | None = None,
                      embed: EmbedOptions | None = None, overwrite: bool = False,
                      layout: str = "auto") -> tuple[int, int]:
    """Embed a dataset and write vectors, labels, groups and paths (``.safetensors`` or ``.npz``).

    The safetensors file holds ``embeddings`` (``float32 [N, E]``) and its metadata holds the
    JSON lists ``labels``, ``groups``, ``paths`` and ``config``. Returns ``(N, E)``.

    Args:
        split: an image split, ``"all"`` or ``None`` (all images).
        layout: how a folder tree is read (``--layout``, :func:`fewshot.data.load_dataset`).
        overwrite: replace ``out`` when it is an embeddings file this function wrote; any
            other existing file is refused.

    Raises:
        DataError: bad data or split, an output name that is neither ``.safetensors`` nor
            ``.npz``, or an ``out`` that may not be written (checked before embedding).
    """
    from safetensors.numpy import save_file

    from .io import atomic_path

    out = Path(out)
    if out.suffix not in (".npz", ".safetensors"):
        raise DataError(f"unknown output format '{out.suffix}' for {out}", hint="use a .safetensors or .npz file name")
    embed = embed or EmbedOptions()
    dataset = load_data(data, split, group_from, embed.strict, layout=layout)
    check_output(out, what="fewshot embeddings file", is_ours=is_embeddings_file, overwrite=overwrite,
                 **data_protection(data, dataset))
    model = embed.model()
    emb = embed.embed(model, dataset)
    labels, groups = emb.labels, emb.groups
    paths = [str(p) for p in emb.dataset.paths]
    config = {"data": str(data), "split": dataset.split or ALL_SPLITS, "model": model.describe(),
              "model_digest": model.weights_digest(), **environment()}
    if embed.distributed is not None:
        config["distributed"] = embed.distributed.describe()
    with atomic_path(out) as tmp:
        if out.suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, embeddings=emb.vectors, labels=np.array(labels),
                         groups=np.array(["" if g is None else g for g in groups]), paths=np.array(paths),
                         config=np.array(json.dumps(config)))
        else:
            save_file({"embeddings": np.ascontiguousarray(emb.vectors)}, str(tmp),
                      metadata={"labels": json.dumps(labels), "groups": json.dumps(groups),
                                "paths": json.dumps(paths), "config": json.dumps(config)})
    return emb.vectors.shape[0], emb.vectors.shape[1]


#: a val part needs this many classes with 2+ images for a meaningful val MAP@R each epoch
MIN_VAL_CLASSES = 5
#: train and test parts need this many classes with 2+ images (pairs to learn from; a ranking)
MIN_PART_CLASSES = 2


@dataclass
class SplitSummary:
    """What :func:`make_split` made: the split and, per part, its classes, groups and images."""

    split: ClassSplit
    parts: dict[str, dict[str, int]]
    path: Path | None = None


def is_split_file(path: Path) -> bool:
    """Whether ``path`` is a class split JSON that fewshot wrote (``"format": "fewshot.class_split"``)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("format") == "fewshot.class_split"
    except (OSError, ValueError, AttributeError):
        return False


def make_split(data: str, out: str | Path | None = None, *, by: str = "group",
               fractions: tuple[float, float, float] = (0.5, 0.15, 0.35), seed: int = 0,
               group_from: str | None = None, overwrite: bool = False, layout: str = "auto") -> SplitSummary:
    """Split a dataset's classes into class-disjoint train / val / test parts (``fewshot split``).

    Args:
        data: dataset path (folder tree, CSV) or a fetched dataset's name.
        out: the JSON file to write (``None``: only return the split); an existing file is
            replaced only when it is a split file and ``overwrite`` is set.
        by: ``"group"`` keeps every group's (brand's) classes in one part; ``"class"``
            splits single classes.
        fractions: (train, val, test) shares of the classes (normalised to sum 1).
        seed: the shuffling seed (:func:`fewshot.data.make_class_split`).
        layout: how a folder tree is read (``--layout``, :func:`fewshot.data.load_dataset`).

    Returns:
        a :class:`SplitSummary` (classes, groups and images per part).

    Raises:
        DataError: an unknown ``by``; ``by="group"`` on data without groups; bad fractions
            (NaN, infinite, negative, all zero, or a sum that overflows; checked before the
            data is read);
            or a part too small to use (val: fewer than :data:`MIN_VAL_CLASSES` classes with
            2+ images; train or test: fewer than :data:`MIN_PART_CLASSES`), with the fix.
        FewshotError: ``out`` exists and is not a split file we may replace.
    """
    if by not in ("group", "class"):
        raise DataError(f"unknown --by {by!r}", hint="use --by group (whole brands per part) or --by class")
    check_fractions(fractions, "--fractions")
    dataset = load_data(data, ALL_SPLITS, group_from, layout=layout)
    if out is not None:
        check_output(out, what="fewshot split", is_ours=is_split_file, overwrite=overwrite,
                     **data_protection(data, dataset))
    if by == "group" and all(g is None for g in dataset.groups):
        raise DataError(f"{data} has no groups (brands) to keep together",
                        hint="use --by class, give groups with --group-from, or use a Brand/Article/photo folder tree")
    split = make_class_split(dataset, fractions, seed, keep_groups_together=(by == "group"),
                             name=Path(out).stem if out is not None else None)
    parts = _split_parts(split, dataset)
    _check_split_parts(parts, by, fractions)
    path = split.save(out) if out is not None else None
    return SplitSummary(split, parts, path)


def _split_parts(split: ClassSplit, dataset: Dataset) -> dict[str, dict[str, int]]:
    counts = Counter(dataset.labels)
    group_of = dict(zip(dataset.labels, dataset.groups))
    out = {}
    for part in ("train", "val", "test"):
        classes = split.classes_of(part)
        out[part] = {"classes": len(classes), "groups": len({group_of.get(c) for c in classes} - {None}),
                     "images": sum(counts[c] for c in classes),
                     "classes_with_2_images": sum(counts[c] >= 2 for c in classes)}
    return out


def _check_split_parts(parts: dict[str, dict[str, int]], by: str, fractions) -> None:
    for part, need in (("train", MIN_PART_CLASSES), ("val", MIN_VAL_CLASSES), ("test", MIN_PART_CLASSES)):
        have = parts[part]["classes_with_2_images"]
        if have >= need:
            continue
        total = sum(p["classes"] for p in parts.values())
        hint = (f"give {part} a larger share (--fractions, now {' '.join(f'{f:g}' for f in fractions)})"
                + (", or split single classes with --by class (fewer, larger brands make uneven parts)"
                   if by == "group" else "")
                + (f"; with {total} classes in all, the data may simply be too small for three parts"
                   if total < 3 * MIN_VAL_CLASSES else ""))
        raise DataError(f"the {part} part would have {have} class(es) with 2+ images; it needs at least {need}"
                        + (" for a meaningful val MAP@R each epoch" if part == "val" else ""), hint=hint)
