"""The ``fewshot`` command line (typer).

Every command takes ``--seed`` where randomness is involved and writes result files that
record the config, backbone, data split and package version. A :class:`~fewshot.errors.FewshotError`
is printed as ``error: ...`` with its fix, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

import typer
from rich.markup import escape

from .common import (DATA, OUTPUT, DataOpt, GroupFromOpt, LayoutOpt, NoProgressHidden, OverwriteOpt, _split_help, app,
                     echo_episodes, embedding_options, examples, handle_errors, log, one_line, tidy_help)
from .kinds import index_config, index_type_help, kind_options

if TYPE_CHECKING:
    from ..embed.options import EmbedOptions

__all__ = ["app", "main", "handle_errors"]

#: help panels of single commands
EPISODES, RERANK, OPEN_SET, INDEX_PANEL, RAY, SPLIT = ("Episodes", "Re-ranking", "Open set", "Index", "Cluster (Ray)",
                                                      "Split")
#: the paths the examples use: the Grocery data of ../shared and the protocol file of this repository
GROCERY, UNSEEN = "../shared/data/grocery-store-dataset", "splits/grocery-unseen.json"


#: the flag of each re-ranking option (``fewshot.index.rerank.RerankOptions``; a test keeps them equal)
RERANK_FLAGS = {"kind": "--rerank", "k": "--rerank-k", "alpha": "--rerank-alpha", "k1": "--rerank-k1",
                "k2": "--rerank-k2", "lam": "--rerank-lambda"}


@app.command(epilog=examples(
    f"fewshot evaluate --data {GROCERY} --split test --out runs/eval-test",
    f"fewshot evaluate --data {GROCERY} --split-file {UNSEEN} --model runs/triplet --out runs/eval-triplet",
    f"fewshot evaluate --data {GROCERY} --split-file {UNSEEN} --open-set --out runs/open-set"))
@handle_errors(flags=RERANK_FLAGS)
@embedding_options
def evaluate(
    data: str = DataOpt,
    split: Optional[str] = typer.Option(None, "--split", rich_help_panel=DATA, help=_split_help("test") + " With --split-file: the class part (train|val|test; default test)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", rich_help_panel=DATA, help="Class-disjoint protocol JSON (e.g. splits/grocery-unseen.json)."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=EPISODES, min=0, max=2**32 - 1, help="Seed for episodes, the retrieval grid and the --open-set draws."),
    episodes: int = typer.Option(1000, "--episodes", rich_help_panel=EPISODES, min=1, help="Episodes per N-way K-shot setting (a 95% CI is reported from 30)."),
    queries: int = typer.Option(5, "--queries", rich_help_panel=EPISODES, min=1, help="Query images per class in each episode."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    out: Path = typer.Option(..., "--out", rich_help_panel=OUTPUT, help="Output folder: metrics.json, report.md, retrieval_grid.png."),
    overwrite: bool = OverwriteOpt,
    open_set: bool = typer.Option(False, "--open-set", rich_help_panel=OPEN_SET, help="Also measure the reject option (needs --split-file): the part's articles halved at random into known (in the catalogue) and absent ones; AUROC and FPR@95TPR of each open-set score, the false accepts at the calibrated threshold, brand fallback; roc.png, oscr.png, open_set_scores.png."),
    open_set_draws: int = typer.Option(20, "--open-set-draws", rich_help_panel=OPEN_SET, min=1, help="With --open-set: random halvings of the articles (seeded by --seed); figures are averaged over them."),
    target_far: float = typer.Option(0.05, "--target-far", rich_help_panel=OPEN_SET, help="With --open-set: the false-accept rate the reject thresholds are calibrated for, as `fewshot classify --reject auto --target-far`."),
    rerank: str = typer.Option("none", "--rerank", rich_help_panel=RERANK, help="Re-rank the gallery ranking before the retrieval figures: none | qe (alpha query expansion) | dba (database-side augmentation) | dba-qe | k-reciprocal (needs --split-file)."),
    rerank_k: int = typer.Option(5, "--rerank-k", rich_help_panel=RERANK, min=1, help="qe: gallery neighbours added to the query; dba: neighbours averaged, the image itself included."),
    rerank_alpha: float = typer.Option(1.0, "--rerank-alpha", rich_help_panel=RERANK, min=0.0, help="qe / dba: a neighbour weighs max(cosine, 0)**alpha."),
    rerank_k1: int = typer.Option(20, "--rerank-k1", rich_help_panel=RERANK, min=1, help="k-reciprocal: neighbourhood size k1."),
    rerank_k2: int = typer.Option(6, "--rerank-k2", rich_help_panel=RERANK, min=1, help="k-reciprocal: local query expansion k2."),
    rerank_lambda: float = typer.Option(0.3, "--rerank-lambda", rich_help_panel=RERANK, min=0.0, max=1.0, help="k-reciprocal: weight of the original distance."),
    transductive: str = typer.Option("none", "--transductive", rich_help_panel=EPISODES, help="How episodes are classified: none (nearest prototype) | centre (nearest prototype after SimpleShot centring on the gallery mean) | bdcspn (prototype rectification) | tim (information maximisation) | paddle (soft k-means with a class-share prior, for query sets that show a few of the classes). The last three use each episode's queries together; bdcspn's and tim's gains need queries spread over the classes (see --query-imbalance)."),
    query_imbalance: Optional[float] = typer.Option(None, "--query-imbalance", rich_help_panel=EPISODES, help="Episodes with imbalanced query sets: the balanced protocol's classes and support, and up to N x --queries queries split by class shares drawn from Dirichlet(A) (e.g. 2; smaller is more imbalanced), each class giving at most the query photos it has."),
    whiten: bool = typer.Option(False, "--whiten", rich_help_panel=RERANK, help="Whiten the gallery and the queries by the gallery's within-article covariance (fitted on its labelled photos, Ledoit-Wolf shrinkage; needs --split-file) for the retrieval figures, and each --open-set catalogue by its own: the directions in which photos of one article vary count less. A --model run's training photos are pooled in (its whitening prior, written by fewshot train since 0.10.0). Episodes stay unwhitened."),
    *, emb: "EmbedOptions",
) -> None:
    """Retrieval mAP / MAP@R / P@1 / Recall@k and episodic accuracy of a backbone or trained run.

    With --open-set also how well it tells photos of catalogue articles from photos of absent ones."""
    from ..evaluation import EvalConfig, check_open_set, evaluate as run_evaluate

    cfg = EvalConfig(data=data, split=split, split_file=str(split_file) if split_file else None,
                     part=split or "test", group_from=group_from, layout=layout, seed=seed, episodes=episodes,
                     n_query=queries, open_set=open_set, open_set_draws=open_set_draws, target_far=target_far,
                     rerank={"kind": rerank, "k": rerank_k, "alpha": rerank_alpha, "k1": rerank_k1, "k2": rerank_k2,
                             "lam": rerank_lambda},
                     transductive=transductive, query_imbalance=query_imbalance, whiten=whiten, embed=emb)
    check_open_set(cfg)
    metrics = run_evaluate(cfg, out, overwrite=overwrite)
    rr = metrics["config"]["rerank"]
    typer.echo(f"mAP {metrics['map']:.4f}  MAP@R {metrics['map_at_r']:.4f}  P@1 {metrics['precision_at_1']:.4f}  "
               f"R@5 {metrics['recall_at_k']['5']:.4f}  queries {metrics['num_queries']} "
               f"(skipped {metrics['num_skipped_queries']})"
               + ("" if rr["kind"] == "none" else f"  [gallery re-ranked: {rr['kind']}]")
               + ("" if not whiten else "  [gallery whitened" + _pooled(metrics["config"]["whiten"]) + ": episodes are not]"))
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


@app.command("index", epilog=examples(
    f"fewshot index --data {GROCERY} --split train --out runs/grocery-index",
    f"fewshot index --data {GROCERY} --catalogue iconic --model runs/triplet --out runs/grocery-iconic",
    f"fewshot index --data {GROCERY} --split train --index-type ivfpq --nlist 64 --out runs/grocery-ivfpq --overwrite"))
@handle_errors
@kind_options()
@embedding_options
def index_cmd(
    data: str = DataOpt,
    split: Optional[str] = typer.Option(None, "--split", rich_help_panel=DATA, help="Image split used as the catalogue. " + _split_help("train")),
    catalogue: Optional[str] = typer.Option(None, "--catalogue", rich_help_panel=DATA, help="'iconic': the Grocery studio images, one per article."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    out: Path = typer.Option(..., "--out", rich_help_panel=OUTPUT, help="Index folder to write (atomically); never one that holds other files or the --data images."),
    overwrite: bool = OverwriteOpt,
    index_type: str = typer.Option("auto", "--index-type", rich_help_panel=INDEX_PANEL, help=index_type_help()),
    check: bool = typer.Option(True, "--check/--no-check", rich_help_panel=OUTPUT, help="Check the catalogue at the end and warn of its defects (as `fewshot check`, without writing a report)."),
    whiten: bool = typer.Option(False, "--whiten", rich_help_panel=INDEX_PANEL, help="Whiten the catalogue by its photos' within-article covariance (Ledoit-Wolf shrinkage), fitted here and kept in the index: every later query and enrolment is whitened by it. Needs articles with two or more photos. A --model run's training photos are pooled in (its whitening prior, written by fewshot train since 0.10.0). Grocery, frozen: top-1 0.599 -> 0.720."),
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
                      overwrite=overwrite, ann_config=ann, layout=layout, whiten=whiten)
    typer.echo(f"indexed {len(idx)} images of {len(idx.articles)} articles into {one_line(out)} ({idx.ann.kind} index"
               + (", whitened" + _pooled(idx.whitening.describe()) + ")" if idx.whitening is not None else ")"))
    _echo_calibration(idx)
    kept = idx.config.get("kept_enrolled")
    if kept:
        typer.echo(f"kept {kept['images']} photos of {kept['articles']} article(s) enrolled through the service "
                   f"(re-embedded with this model; they stay in {one_line(enrolled_dir(out))})"
                   + (f"; {len(kept['unreadable'])} unreadable photo(s) left out" if kept["unreadable"] else ""))
    if check:
        _warn_defects(idx, out)


def _pooled(whiten: dict | None) -> str:
    """``", the run's N training photos of M articles pooled in"`` for a whitening with a prior."""
    from ..index.whiten import prior_note

    note = prior_note((whiten or {}).get("prior"))
    return f", {note}" if note else ""


def _warn_defects(idx, out: Path) -> None:
    """The catalogue check's findings as warnings (counts and the first few), no files written."""
    from ..catalogue.check import check_catalogue
    from ..catalogue.check_report import summary_lines

    lines = summary_lines(check_catalogue(idx))
    for line in lines:
        log.warning("catalogue check: %s", one_line(line))
    if lines:
        log.warning("details and pictures: fewshot check --index %s", one_line(out))


@app.command("export", epilog=examples("fewshot export --index runs/grocery-index --out runs/grocery-photos",
                                       "fewshot index --data runs/grocery-photos/manifest.csv --out runs/grocery-index-2"))
@handle_errors
def export_cmd(
    index: Path = typer.Option(..., "--index", rich_help_panel=DATA, help="Index folder written by `fewshot index` (enrolled articles included)."),
    out: Path = typer.Option(..., "--out", rich_help_panel=OUTPUT, help="Folder to write: <group>/<article>/photos plus manifest.csv (a new folder, or an earlier export with --overwrite)."),
    overwrite: bool = OverwriteOpt,
    no_progress: bool = NoProgressHidden,
) -> None:
    """Copy every article's photos out of an index (enrolled ones too), as a tree that `fewshot index --data` reads back."""
    from ..catalogue import export_index

    summary = export_index(index, out, overwrite=overwrite)
    typer.echo(f"exported {summary['images']} photos of {summary['articles']} articles to {one_line(out)}")
    typer.echo(f"build an index of them again: fewshot index --data {one_line(out / 'manifest.csv')} --out NEW_INDEX"
               + (" --whiten" if summary["whitened"] else "") + ("" if summary["tree_exact"] else "  (the manifest keeps the exact labels; some are not "
                                                     "usable as folder names, so the tree shows them changed)"))
    if summary["missing"]:
        shown = ", ".join(map(one_line, summary["missing"][:5])) + (" ..." if len(summary["missing"]) > 5 else "")
        typer.echo(f"error: {len(summary['missing'])} catalogue photo(s) are not on disk and were not exported: "
                   f"{shown}", err=True)
        raise typer.Exit(1)


def _echo_calibration(idx) -> None:
    """Say the reject threshold `fewshot index` calibrated (or why there is none)."""
    from ..catalogue import Rejector

    rejector = Rejector.for_index(idx)  # calibrated by the save already: read from memory
    if rejector.calibration is not None:
        typer.echo(f"reject threshold for 'unknown': {rejector.calibration.summary()}")


@app.command(epilog=examples(
    f"fewshot embed --data {GROCERY} --split test --out runs/grocery-test.safetensors",
    f"fewshot embed --data {GROCERY} --model runs/triplet --tta flip --out runs/triplet.npz",
    f"fewshot embed --data {GROCERY} --out runs/grocery.safetensors --distributed ray --ray-address auto"))
@handle_errors(flags={"address": "--ray-address"})
@embedding_options
def embed(
    data: str = DataOpt,
    split: Optional[str] = typer.Option(None, "--split", rich_help_panel=DATA, help="The dataset's image split (train|val|test), or 'all' (default: every image)."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    out: Path = typer.Option(..., "--out", rich_help_panel=OUTPUT, help="Output file: .safetensors or .npz."),
    overwrite: bool = OverwriteOpt,
    distributed: Optional[str] = typer.Option(None, "--distributed", rich_help_panel=RAY, help=escape('Embed on a cluster back-end: ray (Ray Data; pip install -e ".[scale]"). Results go to the embedding store as they come, so an interrupted run resumes where it stopped.')),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", rich_help_panel=RAY, help="With --distributed ray: the cluster to join (e.g. auto, HOST:6379, ray://HOST:10001); default: a local Ray for this run, shut down at the end."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", rich_help_panel=RAY, min=1, help="With --distributed ray: actors, one model each (default: the CPUs / --ray-cpus-per-worker)."),
    ray_cpus: int = typer.Option(1, "--ray-cpus-per-worker", rich_help_panel=RAY, min=1, help="With --distributed ray: CPUs per actor (its forward-pass threads unless --threads)."),
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


@app.command("split", epilog=examples(
    f"fewshot split --data {GROCERY} --out runs/grocery-split.json",
    "fewshot split --data ../shared/data/omniglot/images_background_small1 --by class --seed 1 "
    "--out runs/omniglot-split.json",
    f"fewshot split --data {GROCERY} --fractions 0.6 0.1 0.3 --out runs/grocery-split.json --overwrite"))
@handle_errors
def split_cmd(
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", rich_help_panel=OUTPUT, help="The split file to write (JSON), for `fewshot train --split-file` and `evaluate --split-file`."),
    by: str = typer.Option("group", "--by", rich_help_panel=SPLIT, help="group: keep each group's (brand's) articles in one part, so test brands are unseen too | class: split single articles."),
    fractions: Tuple[float, float, float] = typer.Option((0.5, 0.15, 0.35), "--fractions", rich_help_panel=SPLIT, help="train val test shares of the articles (normalised to sum 1)."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=SPLIT, min=0, help="Shuffling seed (same seed, same split)."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=OUTPUT, help="Replace --out when it is a split file written earlier (nothing else is replaced)."),
    no_progress: bool = NoProgressHidden,
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


@app.command(epilog=examples("fewshot backbones"))
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


#: the top-level help's panels of commands, in the order listed (the main job first)
COMMAND_PANELS = {"Catalogue": ("index", "classify", "check", "export", "serve"),
                  "Evaluate and train": ("evaluate", "split", "train", "methods", "embed"),
                  "Set-up": ("backbones", "datasets")}


def _register_subcommands() -> None:
    """Register the commands of the other modules, then list every command in its panel, in the
    order of :data:`COMMAND_PANELS` (a command it does not name comes last, under "Commands")."""
    from . import datasets as _datasets

    app.add_typer(_datasets.app, name="datasets", rich_help_panel="Set-up")
    from . import check as _check  # noqa: F401  (registers `fewshot check`)
    from . import classify as _classify  # noqa: F401  (registers `fewshot classify`)
    from . import serve as _serve  # noqa: F401  (registers `fewshot serve`; FastAPI is imported on use)
    from . import train as _train  # noqa: F401  (registers `fewshot train` and `fewshot methods`)

    order = [name for names in COMMAND_PANELS.values() for name in names]
    panel = {name: title for title, names in COMMAND_PANELS.items() for name in names}

    def name_of(info) -> str:
        return info.name or info.callback.__name__.replace("_", "-")

    app.registered_commands.sort(key=lambda info: order.index(name_of(info)) if name_of(info) in order else len(order))
    for info in app.registered_commands:
        info.rich_help_panel = panel.get(name_of(info))
    tidy_help(app)
    tidy_help(_datasets.app)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
