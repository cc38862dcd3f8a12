"""``fewshot classify``: which article each photo shows (or 'unknown'), top-k with cosine scores,
or the accuracy of a labelled dataset against an index.

Registered on :data:`fewshot.cli.app` when :mod:`fewshot.cli` is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .common import (
    DATA,
    OUTPUT,
    BatchOpt,
    CacheOpt,
    GroupFromOpt,
    LayoutOpt,
    NoProgressOpt,
    RuntimeOpt,
    ThreadsOpt,
    WorkersOpt,
    app,
    apply_runtime,
    err_console,
    examples,
    handle_errors,
    json_line,
    log,
    one_line,
)
from .kinds import kind_options

#: the help panel of how a photo is answered
ANSWER = "Answer"
INDEX, GROCERY = "runs/grocery-index", "../shared/data/grocery-store-dataset"


def _expand_images(items: List[Path]) -> list[Path]:
    from ..data.images import is_image_file

    paths: list[Path] = []
    for item in items:
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p))
        else:
            paths.append(item)
    return paths


@app.command(epilog=examples(
    f"fewshot classify --index {INDEX} {GROCERY}/dataset/test/Fruit/Apple",
    f"fewshot classify --index {INDEX} --json --top-k 3 --target-far 0.01 {GROCERY}/dataset/test/Packages",
    f"fewshot classify --index {INDEX} --data {GROCERY} --split test --summary-only"))
@handle_errors
@kind_options(search=True)
def classify(
    images: Optional[List[Path]] = typer.Argument(None, help="Image files or folders of images."),
    index: Path = typer.Option(..., "--index", rich_help_panel=DATA, help="Index folder written by `fewshot index`."),
    top_k: int = typer.Option(5, "--top-k", rich_help_panel=ANSWER, min=1, help="Articles to list per image."),
    mode: str = typer.Option("prototype", "--mode", rich_help_panel=ANSWER, help="prototype (article mean) or nearest (best image)."),
    as_json: bool = typer.Option(False, "--json", rich_help_panel=OUTPUT, help="One JSON object per line."),
    data: Optional[str] = typer.Option(None, "--data", rich_help_panel=DATA, help="Classify a labelled dataset instead of IMAGES and report top-1 / top-k accuracy."),
    split: Optional[str] = typer.Option(None, "--split", rich_help_panel=DATA, help="With --data: the image split to classify (e.g. test; default: every image)."),
    group_from: Optional[str] = GroupFromOpt,
    layout: str = LayoutOpt,
    summary_only: bool = typer.Option(False, "--summary-only", rich_help_panel=OUTPUT, help="With --data: print only the accuracy summary."),
    reject: str = typer.Option("auto", "--reject", rich_help_panel=ANSWER, help="Answer 'unknown' for photos of no catalogue article. auto: below the threshold calibrated on the catalogue for --target-far; none: always the best article; a number: that threshold on --open-score."),
    target_far: float = typer.Option(0.05, "--target-far", rich_help_panel=ANSWER, help="With --reject auto: the share of photos of absent articles that may be given an article (false accepts), e.g. 0.05; lower rejects more."),
    open_score: str = typer.Option("relative", "--open-score", rich_help_panel=ANSWER, help="The score judged for 'unknown': relative (best minus half the second best cosine), cosine, margin or softmax."),
    transductive: str = typer.Option("none", "--transductive", rich_help_panel=ANSWER, help="none: each photo on its own. paddle: the photos given are classified together, as one batch (PADDLE: the articles' prototypes move toward the photos they draw); the first article listed is the batch's answer. Needs --reject none and --mode prototype; photos that are not catalogue images."),
    batch_size: int = BatchOpt, workers: int = WorkersOpt, cache_dir: Optional[Path] = CacheOpt,
    no_progress: bool = NoProgressOpt, runtime: str = RuntimeOpt, threads: Optional[int] = ThreadsOpt,
    *, kind_opts: dict,
) -> None:
    """Say which article each photo shows, or 'unknown' when it shows none (top-k, cosine scores).

    Exits 1 if any image is bad.
    With --reject auto (the default) the threshold is calibrated on the catalogue itself for
    --target-far false accepts; a rejected photo keeps its nearest articles, and is given its
    brand when the brand alone is confident. With --data, every image of the dataset (split) is classified and the top-1 / top-k
    accuracy against its known label is printed at the end. A photo that is itself a
    catalogue image (same file content) is classified with its own catalogue copy left out
    (leave-one-out), and the summary says how many there were.
    """
    from ..catalogue import classify_paths, load_index, model_for_index
    from ..embed.options import EmbedOptions
    from ..errors import DataError

    from ..catalogue import check_transductive
    from ..index.ranking import BATCH_TRANSDUCTIVE

    if mode not in ("prototype", "nearest"):
        raise typer.BadParameter(f"{mode!r}: use prototype or nearest", param_hint="--mode")
    if transductive not in BATCH_TRANSDUCTIVE:
        raise typer.BadParameter(f"{transductive!r}: use none or paddle (bdcspn and tim are for `fewshot evaluate`: "
                                 "they assume the photos cover the articles)", param_hint="--transductive")
    check_transductive(transductive, mode, reject)  # before the catalogue is calibrated
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
    results = classify_paths(cat, model, paths, top_k=top_k, mode=mode, embed=opts, rejector=rejector,
                             transductive=transductive)
    if transductive != "none":
        _report_batch(results, transductive)
    bad = _print_results(results, as_json, summary_only and truth is not None)
    _report_catalogue_queries(results, cat)
    if truth is not None:
        _echo_accuracy(results, truth, cat, top_k, mode, as_json, data)
    if bad:
        err_console.print(f"{bad} of {len(results)} image(s) could not be read", highlight=False)
        raise typer.Exit(1)


def _report_batch(results, transductive: str) -> None:
    """Say on stderr that the readable photos were one batch (copies are warned of by the library)."""
    done = sum(not r.error for r in results)
    if done:
        log.info("transductive (%s): the %d readable photo%s classified as one batch; each line's first article "
                 "is the batch's answer", transductive, done, " was" if done == 1 else "s were")


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
               f"catalogue images among them: {_in_catalogue(acc['num_catalogue_images'], cat)}"
               + (f"  not scored: {skipped}" if skipped else ""))
    if "accepted" in acc:
        absent = acc["not_in_catalogue_accepted"]
        typer.echo(f"reject option: {acc['accepted']:.4f} of these answered with an article, "
                   f"{acc['accepted_right']:.4f} with the right one (top-1 above ignores the reject option)"
                   + (f"; photos of articles not in the catalogue given an article: {absent:.4f}" if absent == absent else ""))


def _print_results(results, as_json: bool, summary_only: bool) -> int:
    """Print each result (or only errors with ``summary_only``); returns how many were bad.

    One image is one line: ``PATH<TAB>answer<TAB>label (score), ...`` or ``error: PATH: reason`` on
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
            said = _answer_column(r.answer, r.predictions)
            typer.echo(f"{one_line(r.image)}\t{said}{preds}" + ("\t[catalogue image: own copy left out]" if r.in_catalogue else ""))
    return bad


def _answer_column(answer, predictions) -> str:
    """The answer and a tab; an ``unknown`` answer says the open-set score it was judged on and the
    threshold it missed, e.g. ``unknown (relative 0.187 < 0.295)`` (the ranked articles beside it
    show cosines, another score). Without a threshold (``--reject none``) the answer is the best
    article (with ``--transductive``, the batch's), so the columns are the same in every mode."""
    if answer is None or answer.threshold is None:
        return f"{one_line(predictions[0].label)}\t" if predictions else "-\t"
    why = f" ({answer.score_name} {answer.score:.3f} < {answer.threshold:.3f})" if answer.unknown else ""
    return f"{one_line(answer.text())}{why}\t"


def _in_catalogue(n: int, cat) -> str:
    if not n:
        return "0"
    return f"{n} (scored leave-one-out: own catalogue copy left out" + (
        "; OPTIMISTIC: the index's whitening was fitted on them)" if cat.whitening is not None else ")")


def _report_catalogue_queries(results, cat) -> None:
    """Say loudly how many queries were catalogue images (each would otherwise find itself)."""
    n = sum(r.in_catalogue for r in results)
    if n:
        log.warning("%d of %d photos are catalogue images (same file content): each was classified "
                    "with its own catalogue copy left out (leave-one-out), so it cannot find itself", n,
                    len(results))
        if cat.whitening is not None:
            log.warning("the index is whitened by a fit made on its own photos, these %d among them: their scores, "
                        "answers and any accuracy over them are optimistic (on 20 Grocery articles of 6 photos, "
                        "top-1 1.000 for catalogue photos against 0.694 for new photos of the same articles); judge "
                        "a whitened catalogue on photos that are not in it", n)
    elif cat.digests and all(d is None for d in cat.digests):
        log.warning("this index records no image digests (built by an older fewshot): photos that are "
                    "catalogue images cannot be recognised and would find themselves; rebuild the index "
                    "with `fewshot index ... --overwrite`")
