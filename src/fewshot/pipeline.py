"""The main jobs as functions: evaluate a model, build a catalogue index, classify photos.

This layer sits after :mod:`fewshot.index` and before :mod:`fewshot.cli` / :mod:`fewshot.serve`:
it wires data loading, embedding, metrics, the index and the PNG reports together, so that
the CLI and the service stay thin.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data.fetch import resolve_data
from .data.loaders import load_dataset, load_grocery_catalogue
from .data.records import Dataset
from .data.splits import ClassSplit, protocol_sets
from .embed import Embeddings
from .errors import DataError
from .index import CatalogueIndex, Prediction
from .io import atomic_write_json, atomic_write_text
from .methods.base import EmbeddingModel, load_embedding_model
from .metrics import episodic_accuracy, nearest_neighbors, retrieval_metrics
from .viz import retrieval_grid

log = logging.getLogger("fewshot")

EPISODE_SETTINGS = (("5way1shot", 5, 1), ("5way5shot", 5, 5))


@dataclass
class EmbedOptions:
    """How images are turned into embeddings (shared by every command)."""

    backbone: str | None = "efficientnet_lite0"
    model_dir: str | None = None
    image_size: int = 224
    batch_size: int = 32
    num_workers: int = 0
    cache_dir: str | None = None
    strict: bool = False
    progress: bool = True

    def model(self) -> EmbeddingModel:
        return load_embedding_model(self.backbone, self.model_dir, self.image_size)

    def embed(self, model: EmbeddingModel, dataset: Dataset) -> Embeddings:
        return model.embed(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                           cache_dir=self.cache_dir, strict=self.strict, progress=self.progress)


@dataclass
class EvalConfig:
    """Everything `fewshot evaluate` needs; recorded in ``metrics.json`` under ``config``.

    Attributes:
        data: dataset path (or a fetched dataset's name).
        split: the dataset's own image split (leave-one-out within it) when no split file.
        split_file / part: a class-disjoint protocol (:mod:`fewshot.data.splits`); queries
            and gallery then follow its cross-visit rule for the classes of ``part``.
        episodes, n_query: episodic evaluation size (``n_query`` queries per class).
    """

    data: str
    split: str | None = "test"
    split_file: str | None = None
    part: str = "test"
    group_from: str | None = None
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
              strict: bool = False) -> Dataset:
    """Resolve ``data`` (path or fetched dataset name) and load it."""
    return load_dataset(resolve_data(data), split=split, group_from=group_from, strict=strict)


def evaluation_sets(cfg: EvalConfig) -> tuple[Dataset, Dataset | None, dict]:
    """``(queries, gallery or None for leave-one-out, protocol description)``."""
    if cfg.split_file:
        dataset = load_data(cfg.data, None, cfg.group_from, cfg.embed.strict)
        class_split = ClassSplit.load(cfg.split_file)
        queries, gallery = protocol_sets(dataset, class_split, cfg.part)
        protocol = {"mode": "query_vs_gallery", "split_file": str(cfg.split_file), "part": cfg.part,
                    "split_name": class_split.name, "classes": len(set(queries.labels) | set(gallery.labels)),
                    "query_split": class_split.query_split, "gallery_split": class_split.gallery_split}
        return queries, gallery, protocol
    dataset = load_data(cfg.data, cfg.split, cfg.group_from, cfg.embed.strict)
    return dataset, None, {"mode": "leave_one_out", "split": cfg.split}


def evaluate(cfg: EvalConfig, out: str | Path | None = None,
             model: EmbeddingModel | None = None) -> dict:
    """Retrieval and episodic metrics of a model on a dataset; optionally written to ``out``.

    Writes ``out/metrics.json`` (keys: map, map_at_r, precision_at_1, recall_at_k, map_at_k,
    num_queries, num_skipped_queries, episodes, per_group, config), ``out/report.md`` and
    ``out/retrieval_grid.png``.

    Returns:
        the metrics dictionary written to ``metrics.json``.
    """
    model = model or cfg.embed.model()
    queries, gallery, protocol = evaluation_sets(cfg)
    q = cfg.embed.embed(model, queries)
    g = cfg.embed.embed(model, gallery) if gallery is not None else None
    report = retrieval_metrics(q.vectors, q.labels, g.vectors if g else None, g.labels if g else None,
                               query_groups=q.groups)
    metrics = report.to_dict()
    if report.num_skipped_queries:
        warn_single_image_classes(q, g)
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
    metrics["episodes"] = episodes
    skipped = [(str(p), r) for p, r in q.skipped + (g.skipped if g else [])]
    metrics["config"] = {
        "data": str(cfg.data), "dataset": queries.name, "split": cfg.split if not cfg.split_file else None,
        "protocol": protocol, "model": model.describe(), "image_size": model.backbone.image_size,
        "seed": cfg.seed, "episodes": cfg.episodes, "n_query": cfg.n_query,
        "similarity": "cosine", "num_images": len(q.dataset) + (len(g.dataset) if g else 0),
        "skipped_images": skipped, **environment()}
    if out is not None:
        write_evaluation(metrics, q, g, Path(out), cfg)
    return metrics


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
    """Write metrics.json, report.md and retrieval_grid.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", render_report(metrics))
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


def render_report(metrics: dict) -> str:
    """A Markdown report: headline table, episodic accuracy, per-group table."""
    c = metrics["config"]
    lines = [f"# Evaluation: {c['model']['method']} on {c['dataset']}", "",
             f"- model: `{c['model']['backbone']['name']}` at {c['image_size']} px"
             + (f", run `{c['model']['model_dir']}`" if c['model']['model_dir'] else " (frozen)"),
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
                     f"{_fmt(e.get('accuracy'))} | +- {_fmt(e.get('ci95'))} |")
    if metrics.get("per_group"):
        lines += ["", "## Per group", "", "| group | queries | mAP | MAP@R | P@1 |", "|---|---|---|---|---|"]
        for grp, v in sorted(metrics["per_group"].items()):
            lines.append(f"| {grp} | {v.get('num_queries', '')} | {_fmt(v['map'])} | {_fmt(v['map_at_r'])} | "
                         f"{_fmt(v['precision_at_1'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- index / classify
def build_index(data: str, out: str | Path, *, split: str | None = "train", catalogue: str | None = None,
                group_from: str | None = None, embed: EmbedOptions | None = None,
                model: EmbeddingModel | None = None) -> CatalogueIndex:
    """Embed a catalogue and save it as an index folder.

    Args:
        data: dataset path or name.
        split: the image split used as the catalogue (ignored with ``catalogue="iconic"``).
        catalogue: ``"iconic"`` = the Grocery studio images (one per article) instead.
    """
    embed = embed or EmbedOptions()
    model = model or embed.model()
    root = resolve_data(data)
    if catalogue == "iconic":
        dataset = load_grocery_catalogue(root)
    elif catalogue not in (None, "", "images"):
        raise DataError(f"unknown catalogue '{catalogue}'", hint="use --catalogue iconic, or leave it out")
    else:
        dataset = load_dataset(root, split=split, group_from=group_from, strict=embed.strict)
    emb = embed.embed(model, dataset)
    config = {"data": str(data), "split": split if catalogue != "iconic" else None,
              "catalogue": catalogue or "images", "model": model.describe(),
              "image_size": model.backbone.image_size, "backbone": model.backbone.name,
              "model_dir": str(Path(model.run_dir).resolve()) if model.run_dir else None,
              "skipped_images": [(str(p), r) for p, r in emb.skipped], **environment()}
    index = CatalogueIndex.build(emb.vectors, emb.labels, emb.groups,
                                 [str(p) for p in emb.dataset.paths], config)
    index.save(out)
    return index


def model_for_index(index: CatalogueIndex) -> EmbeddingModel:
    """The embedding model an index was built with (same backbone, size and run)."""
    cfg = index.config
    return load_embedding_model(cfg.get("backbone", "efficientnet_lite0"), cfg.get("model_dir"),
                                int(cfg.get("image_size", 224)))


@dataclass
class ClassifyResult:
    """One classified image (``error`` set and ``predictions`` empty when it could not be read)."""

    image: str
    predictions: list[Prediction]
    error: str | None = None

    def to_dict(self) -> dict:
        d = {"image": self.image, "predictions": [p.to_dict() for p in self.predictions]}
        if self.error:
            d["error"] = self.error
        return d


def classify_paths(index: CatalogueIndex, model: EmbeddingModel, paths: list[Path], *, top_k: int = 5,
                   mode: str = "prototype", embed: EmbedOptions | None = None) -> list[ClassifyResult]:
    """Classify image files against an index; unreadable files get an ``error`` instead."""
    embed = embed or EmbedOptions()
    vectors, ok, failures, _ = model.embed_paths(paths, batch_size=embed.batch_size,
                                                 num_workers=embed.num_workers, cache_dir=embed.cache_dir,
                                                 progress=embed.progress and len(paths) > 16)
    preds = index.classify(vectors, top_k=top_k, mode=mode) if len(ok) else []
    by_pos = dict(zip(ok, preds))
    return [ClassifyResult(str(p), by_pos.get(i, []), failures.get(i)) for i, p in enumerate(paths)]


__all__ = ["EmbedOptions", "EvalConfig", "evaluate", "build_index", "classify_paths", "ClassifyResult",
           "model_for_index", "render_report", "environment"]


def classification_accuracy(results: list[ClassifyResult], truth: list[str], top_k: int) -> dict:
    """Top-1 and top-k accuracy of classified images against their true labels (unreadable skipped)."""
    scored = [(r, t) for r, t in zip(results, truth) if not r.error]
    n = len(scored)
    top1 = sum(1 for r, t in scored if r.predictions and r.predictions[0].label == t)
    topk = sum(1 for r, t in scored if any(p.label == t for p in r.predictions[:top_k]))
    return {"top1": top1 / n if n else float("nan"), "topk": topk / n if n else float("nan"),
            "num_images": n}


def export_embeddings(data: str, out: str | Path, *, split: str | None = None, group_from: str | None = None,
                      embed: EmbedOptions | None = None) -> tuple[int, int]:
    """Embed a dataset and write vectors, labels, groups and paths (``.safetensors`` or ``.npz``).

    The safetensors file holds ``embeddings`` (``float32 [N, E]``) and its metadata holds the
    JSON lists ``labels``, ``groups``, ``paths`` and ``config``. Returns ``(N, E)``.
    """
    import json

    from safetensors.numpy import save_file

    from .io import atomic_path

    embed = embed or EmbedOptions()
    model = embed.model()
    emb = embed.embed(model, load_data(data, split, group_from, embed.strict))
    out = Path(out)
    labels, groups = emb.labels, emb.groups
    paths = [str(p) for p in emb.dataset.paths]
    config = {"data": str(data), "split": split, "model": model.describe(), **environment()}
    with atomic_path(out) as tmp:
        if out.suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, embeddings=emb.vectors, labels=np.array(labels),
                         groups=np.array(["" if g is None else g for g in groups]), paths=np.array(paths),
                         config=np.array(json.dumps(config)))
        elif out.suffix == ".safetensors":
            save_file({"embeddings": np.ascontiguousarray(emb.vectors)}, str(tmp),
                      metadata={"labels": json.dumps(labels), "groups": json.dumps(groups),
                                "paths": json.dumps(paths), "config": json.dumps(config)})
        else:
            raise DataError(f"unknown output format '{out.suffix}' for {out}", hint="use a .safetensors or .npz file name")
    return emb.vectors.shape[0], emb.vectors.shape[1]
