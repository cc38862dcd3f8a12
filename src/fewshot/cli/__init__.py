"""The ``fewshot`` command line (typer).

Every command takes ``--seed`` where randomness is involved and writes result files that
record the config, backbone, data split and package version. A :class:`~fewshot.errors.FewshotError`
is printed as ``error: ...`` with its fix, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import typer
from rich.markup import escape

from .common import (BatchOpt, CacheOpt, DataOpt, GroupFromOpt, LayoutOpt, NoProgressOpt, OverwriteOpt, RuntimeOpt,
                     ThreadsOpt, WorkersOpt, _split_help, apply_runtime, app, echo_episodes, embedding_options, err_console,
                     handle_errors, json_line, log, one_line)
from .kinds import index_config, index_type_help, kind_options

if TYPE_CHECKING:
    from ..embed.options import EmbedOptions

__all__ = ["app", "main", "handle_errors"]


#: the flag of each re-ranking option (``fewshot.index.rerank.RerankOptions``; a test keeps them equal)
RERANK_FLAGS = {"kind": "--rerank", "k": "--rerank-k", "alpha": "--rerank-alpha", "k1": "--rerank-k1",
                "k2": "--rerank-k2", "lam": "--rerank-lambda"}


@app.command()
@handle_errors(flags=RERANK_FLAGS)
@embedding_options
def evaluate(
    data: str = DataOpt,
    split: Optional[str] = typer.Option(None, "--split", help=_split_help("test") + " With --split-file: the class part (train|val|test; default test)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Class-disjoint protocol JSON (e.g. splits/grocery-unseen.json)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for episodes, the retrieval grid and the --open-set draws."),
    episodes: int = typer.Option(1000, "--episodes", min=1, help="Episodes per N-way K-shot setting (a 95% CI is reported from 30)."),
    queries: int = typer.Option(5, "--queries", min=1, help="Query images per class in each episode."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    out: Path = typer.Option(..., "--out", help="Output folder: metrics.json, report.md, retrieval_grid.png."),
    overwrite: bool = OverwriteOpt,
    open_set: bool = typer.Option(False, "--open-set", help="Also measure the reject option (needs --split-file): the part's articles halved at random into known (in the catalogue) and absent ones; AUROC and FPR@95TPR of each open-set score, the false accepts at the calibrated threshold, brand fallback; roc.png, oscr.png, open_set_scores.png."),
    open_set_draws: int = typer.Option(20, "--open-set-draws", min=1, help="With --open-set: random halvings of the articles (seeded by --seed); figures are averaged over them."),
    target_far: float = typer.Option(0.05, "--target-far", help="With --open-set: the false-accept rate the reject thresholds are calibrated for, as `fewshot classify --reject auto --target-far`."),
    rerank: str = typer.Option("none", "--rerank", help="Re-rank the gallery ranking before the retrieval figures: none | qe (alpha query expansion) | dba (database-side augmentation) | dba-qe | k-reciprocal (needs --split-file)."),
    rerank_k: int = typer.Option(5, "--rerank-k", min=1, help="qe: gallery neighbours added to the query; dba: neighbours averaged, the image itself included."),
    rerank_alpha: float = typer.Option(1.0, "--rerank-alpha", min=0.0, help="qe / dba: a neighbour weighs max(cosine, 0)**alpha."),
    rerank_k1: int = typer.Option(20, "--rerank-k1", min=1, help="k-reciprocal: neighbourhood size k1."),
    rerank_k2: int = typer.Option(6, "--rerank-k2", min=1, help="k-reciprocal: local query expansion k2."),
    rerank_lambda: float = typer.Option(0.3, "--rerank-lambda", min=0.0, max=1.0, help="k-reciprocal: weight of the original distance."),
    transductive: str = typer.Option("none", "--transductive", help="How episodes are classified: none (nearest prototype) | centre (nearest prototype after SimpleShot centring on the gallery mean) | bdcspn (prototype rectification) | tim (information maximisation). The last two use each episode's queries together: their gains need queries spread over the classes (see --query-imbalance)."),
    query_imbalance: Optional[float] = typer.Option(None, "--query-imbalance", help="Episodes with imbalanced query sets: the balanced protocol's classes and support, and up to N x --queries queries split by class shares drawn from Dirichlet(A) (e.g. 2; smaller is more imbalanced), each class giving at most the query photos it has."),
    *, emb: "EmbedOptions",
) -> None:
    """Retrieval mAP / MAP@R / P@1 / Recall@k and episodic accuracy of a backbone or trained run
    (with --open-set: how well it tells photos of catalogue articles from photos of absent ones)."""
    from ..evaluation import EvalConfig, check_open_set, evaluate as run_evaluate

    cfg = EvalConfig(data=data, split=split, split_file=str(split_file) if split_file else None,
                     part=split or "test", group_from=group_from, layout=layout, seed=seed, episodes=episodes,
                     n_query=queries, open_set=open_set, open_set_draws=open_set_draws, target_far=target_far,
                     rerank={"kind": rerank, "k": rerank_k, "alpha": rerank_alpha, "k1": rerank_k1, "k2": rerank_k2,
                             "lam": rerank_lambda},
                     transductive=transductive, query_imbalance=query_imbalance, embed=emb)
    check_open_set(cfg)
    metrics = run_evaluate(cfg, out, overwrite=overwrite)
    rr = metrics["config"]["rerank"]
    typer.echo(f"mAP {metrics['map']:.4f}  MAP@R {metrics['map_at_r']:.4f}  P@1 {metrics['precision_at_1']:.4f}  "
               f"R@5 {metrics['recall_at_k']['5']:.4f}  queries {metrics['num_queries']} "
               f"(skipped {metrics['num_skipped_queries']})"
               + ("" if rr["kind"] == "none" else f"  [gallery re-ranked: {rr['kind']}]"))
    echo_episodes(metrics["episodes"])
    if transductive != "none" or query_imbalance is not None:
        typer.echo(f"episodes: {transductive}" + (
            f", imbalanced queries (Dirichlet {query_imbalance})" if query_imbalance is not None else ", balanced queries")
            + ("; transductive gains assume queries spread over the classes" if transductive in ("bdcspn", "tim") else ""))
    if "open_set" in metrics:
        from ..evaluation.openset_report import OPEN_SET_FILES, summary_lines

        for line in summary_lines(metrics["open_set"]):
            typer.echo(line)
    typer.echo(f"wrote {one_line(out)}/metrics.json, report.md, retrieval_grid.png, embedding_map.png"
               + ("".join(f", {f}" for f in OPEN_SET_FILES) if "open_set" in metrics else ""))


@app.command("index")
@handle_errors
@kind_options()
@embedding_options
def index_cmd(
    data: str = DataOpt,
    split: Optional[str] = typer.Option(None, "--split", help="Image split used as the catalogue. " + _split_help("train")),
    catalogue: Optional[str] = typer.Option(None, "--catalogue", help="'iconic': the Grocery studio images, one per article."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    out: Path = typer.Option(..., "--out", help="Index folder to write (atomically); never one that holds other files or the --data images."),
    overwrite: bool = OverwriteOpt,
    index_type: str = typer.Option("auto", "--index-type", help=index_type_help()),
    check: bool = typer.Option(True, "--check/--no-check", help="Check the catalogue at the end and warn of its defects (as `fewshot check`, without writing a report)."),
    *, emb: "EmbedOptions", kind_opts: dict,
) -> None:
    """Embed a catalogue (a few labelled photos per article) into a FAISS index.

    The index type's options are under its own heading (a flag of another type is refused).
    At the end the catalogue is checked (`fewshot check`) and its defects are shown as warnings.
    """
    from ..catalogue import build_index
    from ..catalogue.store import enrolled_dir

    ann = index_config(index_type, kind_opts)
    idx = build_index(data, out, split=split, catalogue=catalogue, group_from=group_from, embed=emb,
                      overwrite=overwrite, ann_config=ann, layout=layout)
    typer.echo(f"indexed {len(idx)} images of {len(idx.articles)} articles into {one_line(out)} ({idx.ann.kind} index)")
    _echo_calibration(idx)
    kept = idx.config.get("kept_enrolled")
    if kept:
        typer.echo(f"kept {kept['images']} photos of {kept['articles']} article(s) enrolled through the service "
                   f"(re-embedded with this model; they stay in {one_line(enrolled_dir(out))})"
                   + (f"; {len(kept['unreadable'])} unreadable photo(s) left out" if kept["unreadable"] else ""))
    if check:
        _warn_defects(idx, out)


def _warn_defects(idx, out: Path) -> None:
    """The catalogue check's findings as warnings (counts and the first few), no files written."""
    from ..catalogue.check import check_catalogue
    from ..catalogue.check_report import summary_lines

    lines = summary_lines(check_catalogue(idx))
    for line in lines:
        log.warning("catalogue check: %s", one_line(line))
    if lines:
        log.warning("details and pictures: fewshot check --index %s", one_line(out))


@app.command("export")
@handle_errors
def export_cmd(
    index: Path = typer.Option(..., "--index", help="Index folder written by `fewshot index` (enrolled articles included)."),
    out: Path = typer.Option(..., "--out", help="Folder to write: <group>/<article>/photos plus manifest.csv (a new folder, or an earlier export with --overwrite)."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Copy every article's photos out of an index (enrolled ones too), as a tree that `fewshot index --data` reads back."""
    from ..catalogue import export_index

    summary = export_index(index, out, overwrite=overwrite)
    typer.echo(f"exported {summary['images']} photos of {summary['articles']} articles to {one_line(out)}")
    typer.echo(f"build an index of them again: fewshot index --data {one_line(out / 'manifest.csv')} --out NEW_INDEX"
               + ("" if summary["tree_exact"] else "  (the manifest keeps the exact labels; some are not "
                                                     "usable as folder names, so the tree shows them changed)"))
    if summary["missing"]:
        shown = ", ".join(map(one_line, summary["missing"][:5])) + (" ..." if len(summary["missing"]) > 5 else "")
        typer.echo(f"error: {len(summary['missing'])} catalogue photo(s) are not on disk and were not exported: "
                   f"{shown}", err=True)
        raise typer.Exit(1)


def _expand_images(items: List[Path]) -> list[Path]:
    from ..data.images import is_image_file

    paths: list[Path] = []
    for item in items:
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p))
        else:
            paths.append(item)
    return paths


@app.command()
@handle_errors
@kind_options(search=True)
def classify(
    images: Optional[List[Path]] = typer.Argument(None, help="Image files or folders of images."),
    index: Path = typer.Option(..., "--index", help="Index folder written by `fewshot index`."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Articles to list per image."),
    mode: str = typer.Option("prototype", "--mode", help="prototype (article mean) or nearest (best image)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    data: Optional[str] = typer.Option(None, "--data", help="Classify a labelled dataset instead of IMAGES and report top-1 / top-k accuracy."),
    split: Optional[str] = typer.Option(None, "--split", help="With --data: the image split to classify (e.g. test; default: every image)."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    summary_only: bool = typer.Option(False, "--summary-only", help="With --data: print only the accuracy summary."),
    reject: str = typer.Option("auto", "--reject", help="Answer 'unknown' for photos of no catalogue article. auto: below the threshold calibrated on the catalogue for --target-far; none: always the best article; a number: that threshold on --open-score."),
    target_far: float = typer.Option(0.05, "--target-far", help="With --reject auto: the share of photos of absent articles that may be given an article (false accepts), e.g. 0.05; lower rejects more."),
    open_score: str = typer.Option("relative", "--open-score", help="The score judged for 'unknown': relative (best minus half the second best cosine), cosine, margin or softmax."),
    batch_size: int = BatchOpt, workers: int = WorkersOpt, cache_dir: Optional[Path] = CacheOpt,
    no_progress: bool = NoProgressOpt, runtime: str = RuntimeOpt, threads: Optional[int] = ThreadsOpt,
    *, kind_opts: dict,
) -> None:
    """Say which article each photo shows, or 'unknown' when it shows none of them (top-k with
    cosine scores). Exits 1 if any image is bad.

    With --reject auto (the default) the threshold is calibrated on the catalogue itself for
    --target-far false accepts; a rejected photo keeps its nearest articles, and is given its
    brand when the brand alone is confident. With --data, every image of the dataset (split) is classified and the top-1 / top-k
    accuracy against its known label is printed at the end. A photo that is itself a
    catalogue image (same file content) is classified with its own catalogue copy left out
    (leave-one-out), and the summary says how many there were.
    """
    from ..catalogue import classify_paths, load_index, model_for_index
    from ..errors import DataError
    from ..embed.options import EmbedOptions

    if mode not in ("prototype", "nearest"):
        raise typer.BadParameter(f"{mode!r}: use prototype or nearest", param_hint="--mode")
    apply_runtime(runtime, threads)
    cat = load_index(index).with_search(**kind_opts)
    truth: list[str] | None = None
    if data is not None:
        from ..data.protocol import load_data

        if images:
            raise typer.BadParameter("give image files or --data, not both", param_hint="IMAGES")

        dataset = load_data(data, split, group_from, layout=layout)
        paths, truth = dataset.paths, dataset.labels
    else:
        if split is not None or layout != "auto":
            raise typer.BadParameter("--split and --layout need --data", param_hint="--split / --layout")
        paths = _expand_images(images or [])
    if not paths:
        raise DataError("no images given", hint="pass image files or folders that contain images, or --data")
    model = model_for_index(cat, index)
    rejector = _rejector(cat, reject, target_far, open_score)
    opts = EmbedOptions(batch_size=batch_size, num_workers=workers, cache_dir=str(cache_dir) if cache_dir else None,
                        progress=not no_progress, runtime=runtime, threads=threads)
    results = classify_paths(cat, model, paths, top_k=top_k, mode=mode, embed=opts, rejector=rejector)
    bad = _print_results(results, as_json, summary_only and truth is not None)
    _report_catalogue_queries(results, cat)
    if truth is not None:
        _echo_accuracy(results, truth, cat, top_k, mode, as_json, data)
    if bad:
        err_console.print(f"{bad} of {len(results)} image(s) could not be read", highlight=False)
        raise typer.Exit(1)


def _echo_calibration(idx) -> None:
    """Say the reject threshold `fewshot index` calibrated (or why there is none)."""
    from ..catalogue import Rejector

    rejector = Rejector.for_index(idx)  # calibrated by the save already: read from memory
    if rejector.calibration is not None:
        typer.echo(f"reject threshold for 'unknown': {rejector.calibration.summary()}")


def _rejector(cat, reject: str, target_far: float, open_score: str):
    """The reject decision for ``classify``, said on stderr before the results."""
    from ..catalogue import Rejector

    rejector = Rejector.for_index(cat, reject, target_far=target_far, score=open_score)
    if rejector.calibration is not None:
        log.info("reject: %s", rejector.calibration.summary())
    elif rejector.threshold is not None:
        log.info("reject: %s score < %s (a threshold given by hand: its false-accept rate is not known)",
                 open_score, rejector.threshold)
    return rejector


def _echo_accuracy(results, truth: list[str], cat, top_k: int, mode: str, as_json: bool, data: str) -> None:
    """The ``--data`` summary (a JSON object with ``--json``); queries that cannot be right are
    counted apart, with a warning, not as errors."""
    from ..catalogue import classification_accuracy
    from ..errors import DataError

    acc = classification_accuracy(results, truth, top_k, cat)
    skipped = acc["num_not_in_catalogue"] + acc["num_no_other_image"]
    if skipped:
        log.warning("%d image(s) not scored: %d of an article the catalogue does not have, %d whose article "
                    "has no other catalogue image once its own copy is left out", skipped,
                    acc["num_not_in_catalogue"], acc["num_no_other_image"])
    if not acc["num_images"]:
        raise DataError(f"no image of {data} can be scored against the catalogue ({len(results)} classified, "
                        f"{skipped} of articles it lacks or cannot retrieve, the rest unreadable)",
                        hint="classify photos of the catalogue's articles (see the warnings above)")
    if as_json:
        typer.echo(json_line({"summary": {**acc, f"top{top_k}": acc["topk"], "top_k": top_k, "mode": mode,
                                           "articles": len(cat.articles)}}))
        return
    typer.echo(f"top-1 accuracy {acc['top1']:.4f}  top-{top_k} accuracy {acc['topk']:.4f}  "
               f"({acc['num_images']} images, {len(cat.articles)} articles, mode {mode})  "
               f"catalogue images among them: {_in_catalogue(acc['num_catalogue_images'])}"
               + (f"  not scored: {skipped}" if skipped else ""))
    if "accepted" in acc:
        absent = acc["not_in_catalogue_accepted"]
        typer.echo(f"reject option: {acc['accepted']:.4f} of these answered with an article, "
                   f"{acc['accepted_right']:.4f} with the right one (top-1 above ignores the reject option)"
                   + (f"; photos of articles not in the catalogue given an article: {absent:.4f}" if absent == absent else ""))


def _print_results(results, as_json: bool, summary_only: bool) -> int:
    """Print each result (or only errors with ``summary_only``); returns how many were bad.

    One image is one line: ``PATH<TAB>label (score), ...`` or ``error: PATH: reason`` on
    stderr, with paths and labels through :func:`~fewshot.cli.common.one_line` (a newline or
    tab in a file name is printed escaped); ``--json`` lines through ``json_line``."""
    bad = 0
    for r in results:
        if r.error:
            bad += 1
            err_console.print(f"[red]error:[/] {escape(one_line(r.image))}: {escape(one_line(r.error))}",
                              highlight=False)
            if as_json:
                typer.echo(json_line(r.to_dict()))
            continue
        if summary_only:
            continue
        if as_json:
            typer.echo(json_line(r.to_dict()))
        else:
            preds = ", ".join(f"{one_line(p.label)} ({p.score:.3f})" for p in r.predictions)
            said = f"{one_line(r.answer.text())}\t" if r.answer is not None and r.answer.threshold is not None else ""
            typer.echo(f"{one_line(r.image)}\t{said}{preds}" + ("\t[catalogue image: own copy left out]" if r.in_catalogue else ""))
    return bad


def _in_catalogue(n: int) -> str:
    return f"{n} (scored leave-one-out: own catalogue copy left out)" if n else "0"


def _report_catalogue_queries(results, cat) -> None:
    """Say loudly how many queries were catalogue images (each would otherwise find itself)."""
    n = sum(r.in_catalogue for r in results)
    if n:
        log.warning("%d of %d photos are catalogue images (same file content): each was classified "
                    "with its own catalogue copy left out (leave-one-out), so it cannot find itself", n,
                    len(results))
    elif cat.digests and all(d is None for d in cat.digests):
        log.warning("this index records no image digests (built by an older fewshot): photos that are "
                    "catalogue images cannot be recognised and would find themselves; rebuild the index "
                    "with `fewshot index ... --overwrite`")


@app.command()
@handle_errors(flags={"address": "--ray-address"})
@embedding_options
def embed(
    data: str = DataOpt,
    split: Optional[str] = typer.Option(None, "--split", help="The dataset's image split (train|val|test), or 'all' (default: every image)."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    out: Path = typer.Option(..., "--out", help="Output file: .safetensors or .npz."),
    overwrite: bool = OverwriteOpt,
    distributed: Optional[str] = typer.Option(None, "--distributed", help="Embed on a cluster back-end: ray (Ray Data; pip install -e \".[scale]\"). Results go to the embedding store as they come, so an interrupted run resumes where it stopped."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --distributed ray: the cluster to join (e.g. auto, HOST:6379, ray://HOST:10001); default: a local Ray for this run, shut down at the end."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", min=1, help="With --distributed ray: actors, one model each (default: the CPUs / --ray-cpus-per-worker)."),
    ray_cpus: int = typer.Option(1, "--ray-cpus-per-worker", min=1, help="With --distributed ray: CPUs per actor (its forward-pass threads unless --threads)."),
    *, emb: "EmbedOptions",
) -> None:
    """Export embeddings with their labels, groups and paths."""
    from ..evaluation import export_embeddings

    emb.distributed = _ray_options(distributed, ray_address, ray_workers, ray_cpus, emb)
    n, d = export_embeddings(data, out, split=split, group_from=group_from, embed=emb, overwrite=overwrite,
                             layout=layout)
    typer.echo(f"wrote {n} x {d} embeddings to {one_line(out)}")


def _ray_options(distributed: str | None, address: str | None, workers: int | None, cpus: int, emb: "EmbedOptions"):
    """``--distributed`` and its ``--ray-*`` options as :class:`~fewshot.embed.distributed.RayOptions`
    (``None`` = embed here), checked before anything is read or written."""
    from ..embed.distributed import RayOptions, check_distributed
    from ..errors import FewshotError

    if distributed is None:
        given = [flag for flag, v in (("--ray-address", address), ("--ray-workers", workers),
                                      ("--ray-cpus-per-worker", cpus != 1)) if v]
        if given:
            raise FewshotError(f"{', '.join(given)} need(s) --distributed ray", hint="add --distributed ray")
        return None
    check_distributed(distributed)
    if emb.num_workers:
        raise FewshotError("--workers (decode processes of a local run) does not apply to --distributed ray",
                           hint="use --ray-workers N (actors) and --ray-cpus-per-worker")
    return RayOptions(address=address, workers=workers, cpus_per_worker=cpus)


@app.command("split")
@handle_errors
def split_cmd(
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", help="The split file to write (JSON), for `fewshot train --split-file` and `evaluate --split-file`."),
    by: str = typer.Option("group", "--by", help="group: keep each group's (brand's) articles in one part, so test brands are unseen too | class: split single articles."),
    fractions: Tuple[float, float, float] = typer.Option((0.5, 0.15, 0.35), "--fractions", help="train val test shares of the articles (normalised to sum 1)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Shuffling seed (same seed, same split)."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out when it is a split file written earlier (nothing else is replaced)."),
) -> None:
    """Make class-disjoint train / val / test parts of a dataset, for training on unseen articles."""
    from ..data.make_split import make_split

    summary = make_split(data, out, by=by, fractions=fractions, seed=seed, group_from=group_from, overwrite=overwrite,
                         layout=layout)
    for part, c in summary.parts.items():
        groups = f" in {c['groups']} group(s)" if c["groups"] else ""
        typer.echo(f"{part:<5} {c['classes']:>5} classes{groups}, {c['images']:>6} images")
    unit = "whole groups per part" if by == "group" else "single classes"
    same = f" --layout {layout}" if layout != "auto" else ""  # the next commands must read the tree alike
    typer.echo(f"wrote {one_line(out)} ({unit}, seed {seed}); next: fewshot train --data {one_line(data)}{same} "
               f"--split-file {one_line(out)} --out RUN_DIR")


@app.command()
def backbones() -> None:
    """List the backbones: embedding dimension, default image size, where the weights come from."""
    from ..backbones import backbone_info

    rows = backbone_info()
    width = max(len(r.name) for r in rows)
    typer.echo(f"{'backbone':<{width}}  {'dim':>5}  {'size':>4}  status         weights")
    for r in rows:
        status = "ready" if r.available else "not installed"
        typer.echo(f"{r.name:<{width}}  {r.dim or 'model':>5}  {r.image_size or '-':>4}  {status:<13}  {r.weights}")
        if r.install:
            typer.echo(f"{'':<{width}}  {'':>5}  {'':>4}  {'':<13}  install: {r.install}")


def _register_subcommands() -> None:
    from . import datasets as _datasets

    app.add_typer(_datasets.app, name="datasets")
    from . import check as _check  # noqa: F401  (registers `fewshot check`)
    from . import serve as _serve  # noqa: F401  (registers `fewshot serve`; FastAPI is imported on use)
    from . import train as _train  # noqa: F401  (registers `fewshot train`)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
