"""The Markdown report of an evaluation (``report.md``), rendered from its ``metrics.json``."""

from __future__ import annotations

from ..index.whiten import prior_note
from ..metrics import MIN_EPISODES_FOR_CI
from .openset_report import render_open_set

__all__ = ["render_report"]


#: the report's words for each test-time augmentation
_TTA_NOTE = {"flip": ", each image embedded with its mirror image (`--tta flip`)",
             "scales": ", each image embedded at 7/9, 1 and 11/9 of its side (`--tta scales`)"}


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


def _lever_lines(c: dict) -> list[str]:
    """The report's lines on re-ranking and transductive episodes (none when both are off)."""
    lines = []
    rerank = c.get("rerank") or {"kind": "none"}
    if rerank["kind"] != "none":
        settings = ", ".join(f"{k} {v}" for k, v in rerank.items() if k != "kind")
        lines.append(f"- gallery ranking re-ranked by `{rerank['kind']}` ({settings}) before the retrieval figures; "
                     "the retrieval grid and the open-set section use the plain cosine ranking"
                     + ("; k-reciprocal ranks every query with the help of all the others" if rerank["kind"] ==
                        "k-reciprocal" else ""))
    if c.get("whiten"):
        w = c["whiten"]
        pooled = prior_note(w.get("prior"))
        lines.append(f"- gallery and queries whitened by the gallery's within-article covariance ({w['photos']} photos "
                     f"of {w['articles']} articles{', ' + pooled if pooled else ''}, Ledoit-Wolf shrinkage "
                     f"{w['shrinkage']:.3f}) for the retrieval "
                     "figures and the grid" + (", and each open-set catalogue by its own"
                                               + (" (the same training photos pooled in)" if pooled else "")
                                               if c.get("open_set") else "")
                     + "; the episodes are not whitened")
    if c.get("transductive", "none") != "none":
        lines.append(f"- episodes classified transductively (`{c['transductive']}`): each episode's queries "
                     "help classify each other; the gain holds only when queries are spread over the classes")
    if c.get("query_imbalance") is not None:
        lines.append(f"- imbalanced query sets: class shares drawn from Dirichlet({c['query_imbalance']}) "
                     "(Veilleux et al. 2021)")
    return lines


def _trained_lines(c: dict) -> list[str]:
    """Loud lines when the run trained on some of the evaluated classes (``trained_classes_evaluated``)
    or queries are copies of gallery photos (``queries_in_gallery``)."""
    n, copies = c.get("trained_classes_evaluated") or 0, c.get("queries_in_gallery") or 0
    return ([f"- **NOT HELD OUT: the run trained on {n} of the evaluated classes**; these figures are not "
             "those of unseen classes"] if n else []) + \
           ([f"- **OPTIMISTIC: {copies} queries are byte-identical copies of gallery photos** (each finds its own "
             "copy)"] if copies else [])


def render_report(metrics: dict) -> str:
    """A Markdown report: headline table, episodic accuracy, per-group table, the open-set section."""
    c = metrics["config"]
    lines = [f"# Evaluation: {c['model']['method']} on {c['dataset']}", "",
             f"- model: `{c['model']['backbone']['name']}` at {c['image_size']} px"
             + (f", run `{c['model']['model_dir']}`" if c['model']['model_dir'] else " (frozen)")
             + _TTA_NOTE.get(c['model']['backbone'].get('tta', 'none'), "")
             + _runtime_note(c['model'].get('runtimes')),
             f"- protocol: {c['protocol']['mode']}" + (f", split `{c['split']}`" if c.get("split") else "")
             + (f", split file `{c['protocol'].get('split_file')}` part `{c['protocol'].get('part')}`"
                if c['protocol'].get('split_file') else ""),
             f"- queries: {metrics['num_queries']} (skipped: {metrics['num_skipped_queries']} whose class has no other image)",
             *_trained_lines(c),
             *_lever_lines(c),
             f"- seed {c['seed']}, fewshot {c['fewshot_version']}", "",
             "| mAP | MAP@R | P@1 | R@1 | R@5 | R@10 | mAP@10 |", "|---|---|---|---|---|---|---|",
             f"| {_fmt(metrics['map'])} | {_fmt(metrics['map_at_r'])} | {_fmt(metrics['precision_at_1'])} | "
             f"{_fmt(metrics['recall_at_k'].get('1'))} | {_fmt(metrics['recall_at_k'].get('5'))} | "
             f"{_fmt(metrics['recall_at_k'].get('10'))} | {_fmt(metrics['map_at_k'].get('10'))} |", "",
             "| episodes | accuracy | 95% CI |", "|---|---|---|"]
    per = (f"{c['n_query']} queries/class" if c.get("query_imbalance") is None else
           f"up to {c['n_query']} x N queries per episode, Dirichlet({c['query_imbalance']}) class shares")
    for key, e in metrics["episodes"].items():
        lines.append(f"| {key} ({c['episodes']} episodes, {per}) | {_fmt(e.get('accuracy'))} | {_ci(e)} |")
    lines += ["", "![retrieval grid](retrieval_grid.png)", "",
              "Embedding map (queries; colour = group): [embedding_map.png](embedding_map.png)", "",
              "![embedding map](embedding_map.png)"]
    if metrics.get("per_group"):
        lines += ["", "## Per group", "", "| group | queries | mAP | MAP@R | P@1 |", "|---|---|---|---|---|"]
        for grp, v in sorted(metrics["per_group"].items()):
            lines.append(f"| {grp} | {v.get('num_queries', '')} | {_fmt(v['map'])} | {_fmt(v['map_at_r'])} | "
                         f"{_fmt(v['precision_at_1'])} |")
    if metrics.get("open_set"):
        lines += render_open_set(metrics["open_set"])
    return "\n".join(lines) + "\n"
