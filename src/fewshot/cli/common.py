"""What every ``fewshot`` command shares: the typer app, error handling, common options.

Kept apart from :mod:`fewshot.cli` so that the command modules (``train``, ``serve``) and the
package ``__init__`` that registers them import it, and not each other.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import unicodedata
from pathlib import Path
from typing import Callable, Mapping, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import FewshotError
from .snapshot import current

#: the help panels that group a command's options (one order on every command)
DATA, MODEL, OUTPUT, PERFORMANCE = "Data", "Model", "Output", "Performance"


#: the longest line of an example in the help: 80 columns less rich's margins and a " \\"
EXAMPLE_WIDTH = 76


def examples(*commands: str) -> str:
    """A command's help epilog: two or three real commands, each wrapped at :data:`EXAMPLE_WIDTH`
    with shell line continuations, so that it copies and pastes as one command (a test parses
    each one as a command of this app). Help texts are rich markup: the commands are escaped."""
    return "[b]Examples[/b]\n\n" + "\n".join(escape(_wrap(c)) for c in commands)


def _wrap(command: str) -> str:
    """``command`` in lines of at most :data:`EXAMPLE_WIDTH`, continued with `` \\`` and
    indented, broken before an option or an argument (an option keeps its values on its line)."""
    units: list[str] = []
    for word in command.split(" "):
        if units and not word.startswith("-") and (
                len(units) == 1 or units[-1].startswith("-") and len(units[-1]) + len(word) < EXAMPLE_WIDTH - 4):
            units[-1] += " " + word  # the command's name, or an option's value
        else:
            units.append(word)
    lines = [units[0]]
    for unit in units[1:]:
        if len(lines[-1]) + 1 + len(unit) > EXAMPLE_WIDTH:
            lines.append("    " + unit)
        else:
            lines[-1] += " " + unit
    return " \\\n".join(lines)


def tidy_help(commands: typer.Typer) -> None:
    """Lay out the help of each command of ``commands`` alike: its docstring with the lines of
    each paragraph joined (rich help keeps a docstring's line breaks, which are the source's, not
    the terminal's), and its option panels in one order: Data, Model, the command's own, Output,
    Performance (typer shows panels in the order of their first option)."""
    import inspect

    rank = {DATA: 0, MODEL: 1, OUTPUT: 3, PERFORMANCE: 4}
    for info in commands.registered_commands:
        text = info.help or inspect.getdoc(info.callback) or ""
        info.help = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in text.split("\n\n"))
        sig = inspect.signature(info.callback)
        params = sorted(sig.parameters.values(), key=lambda p: -1 if not hasattr(p.default, "rich_help_panel")
                        else rank.get(p.default.rich_help_panel, 2))  # arguments first, in their order
        info.callback.__signature__ = sig.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                              for p in params])


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Few-shot product recognition: embed, evaluate (mAP), index and classify images.",
                  epilog=examples("fewshot datasets fetch grocery --mirror ../shared/data",
                                  "fewshot index --data grocery --split train --out runs/grocery-index",
                                  "fewshot classify --index runs/grocery-index --data grocery --split test --summary-only"))
err_console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("fewshot")


def _print_version(value: bool) -> None:
    if value:
        from ..version import __version__

        typer.echo(f"fewshot {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the package version and exit.")) -> None:
    """Few-shot product recognition: embed, evaluate (mAP), index and classify images."""


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    if not any(isinstance(h, RichHandler) for h in log.handlers):
        handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


#: library option names whose flag is not ``--name-with-dashes`` on any command; a key
#: ``name=value`` is a boolean value that a flag sets (:func:`show_flags`; ``pretrained=False``
#: is ``fewshot train``'s flag, named by hints about training)
OPTION_FLAGS = {"model_dir": "--model", "num_workers": "--workers",
                "progress=False": "--no-progress", "pretrained=False": "--from-scratch"}
#: an option's name where it is not part of a word, a path, a file name or a quoted value
#: (``split`` in ``split_file``, ``data/split``, ``split.json`` or ``'split'`` is not the option);
#: next to a quoted value it is prose (``no 'test' split``, ``unknown runtime 'gpu'``): a message
#: names an option with its value as ``option name = 'v'`` or ``name='v'``
_LEAD, _TRAIL = r"(?<![\w/.\\'-])(?<!' )", r"(?![\w/\\'-]|\.\w| ')"


def show_flags(exc: FewshotError, flags: Mapping[str, str] | None = None) -> FewshotError:
    """``exc`` with the options it names (:attr:`~fewshot.errors.FewshotError.options`, spelt as
    in Python) shown as a command's flags, in its message and hint.

    ``option ways = 1`` and ``ways=1`` become ``--ways 1`` (``split='all'``: ``--split all``), a
    bare ``ways`` becomes ``--ways``; a key ``name=value`` of ``flags`` is a boolean value its flag
    sets (``pretrained=False``: ``--from-scratch``), and ``name=True`` is the flag itself.

    Args:
        exc: the error, changed in place.
        flags: the command's flag of each option name where it is not ``--name-with-dashes``
            (over :data:`OPTION_FLAGS`).
    """
    if not exc.options:
        return exc
    flags = {**OPTION_FLAGS, **(flags or {})}
    for name in exc.options:
        flag = flags.get(name) or "--" + name.replace("_", "-")
        sets = {f"{name}={v}": flags[f"{name}={v}"] for v in (True, False) if f"{name}={v}" in flags}
        if not sets:  # a plain boolean flag sets True
            sets[f"{name}=True"] = flag
        for attr in ("message", "hint"):
            text = getattr(exc, attr)
            if not text:
                continue
            for spelt, on in sets.items():
                text = re.sub(_LEAD + re.escape(spelt) + _TRAIL, on, text)
            text = re.sub(_LEAD + re.escape(name) + r"='([\w./:+|-]+)'(?![\w'])", flag + r" \1", text)
            text = re.sub(r"(?:\boption )?" + _LEAD + re.escape(name) + r"(?: = |=)", flag + " ", text)
            setattr(exc, attr, re.sub(_LEAD + re.escape(name) + _TRAIL, flag, text))
    exc.args = (exc.message,)
    return exc


def command_flags(fn: Callable) -> dict[str, str]:
    """The flag of each option of a typer command, by parameter name, from its signature (a
    ``--on/--off`` boolean also as ``name=True`` / ``name=False``)."""
    import inspect

    out: dict[str, str] = {}
    for name, p in inspect.signature(fn).parameters.items():
        decls = [d for d in getattr(p.default, "param_decls", None) or () if d.startswith("--")]
        if not decls:
            continue
        on, _, off = decls[0].partition("/")
        out[name] = on
        if off:
            out[f"{name}=True"], out[f"{name}=False"] = on, off
    return out


def handle_errors(fn: Callable | None = None, *, flags: Mapping[str, str] | None = None) -> Callable:
    """Turn FewshotError into ``error: ...`` on stderr and exit code 1, each option it names
    shown as the command's flag (:func:`show_flags`; ``flags``: the command's exceptions to its
    parameters' own flags, e.g. an inverted boolean).

    Use as ``@handle_errors`` or ``handle_errors(fn, flags={...})``."""
    if fn is None:
        return functools.partial(handle_errors, flags=flags)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except FewshotError as exc:
            show_flags(exc, {**command_flags(fn), **(flags or {})})
            err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
            if exc.hint:
                err_console.print(f"  fix: {escape(exc.hint)}", highlight=False)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def _breaks_lines(c: str) -> bool:
    if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs"):
        return True
    if c.isascii():  # the common case: no import of the catalogue (and torch) to print a path
        return False
    from ..catalogue.labels import BIDI_CONTROLS

    return c in BIDI_CONTROLS


def one_line(text: object) -> str:
    """``text`` as one line of text output: control characters (newline, tab, ESC, ...), line
    and paragraph separators and bidirectional controls escaped as Python writes them
    (``\\n``, ``\\t``, ``\\x1b``, ``\\u2028``, ``\\u202e``), so that one image is always one
    line and a tab always separates columns. Other text (accents, spaces) is unchanged.

    Every per-line output that prints a path or a label goes through it (``--json`` output
    goes through :func:`json_line`)."""
    text = str(text)
    if not any(_breaks_lines(c) for c in text):
        return text
    return "".join(repr(c)[1:-1] if _breaks_lines(c) else c for c in text)


#: characters ``json.dumps(..., ensure_ascii=False)`` leaves raw that line readers split on
_JSON_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(obj: object) -> str:
    """``obj`` as one line of JSON (UTF-8 text kept readable): besides the newline and control
    characters JSON escapes anyway, U+2028, U+2029 and U+0085, which ``str.splitlines`` and
    some JSON-lines readers take as line ends, are written as ``\\uXXXX`` escapes."""
    text = json.dumps(obj, ensure_ascii=False)
    for raw, escaped in _JSON_LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    # a file name that is not UTF-8 reaches Python as lone surrogates: escaped, the line stays UTF-8
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def positive(value: float | None) -> float | None:
    """typer callback: a number that must be greater than 0 (``None`` = not given)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"{value} is not a finite number greater than 0")
    return value


# Shared option definitions -----------------------------------------------------------------
DataOpt = typer.Option(..., "--data", help="Dataset folder, CSV manifest, or a fetched dataset name (grocery, omniglot).", rich_help_panel=DATA)
BackboneOpt = typer.Option(None, "--backbone", help="Backbone name (default efficientnet_lite0); see `fewshot backbones`.", rich_help_panel=MODEL)
ModelOpt = typer.Option(None, "--model", help="A RUN_DIR written by `fewshot train` (backbone + trained head).", rich_help_panel=MODEL)
SizeOpt = typer.Option(None, "--image-size", min=16, max=1024, help="Input side in pixels (bilinear resize, no crop; default 224, or the run's own size with --model; EfficientNet needs 32 or more, conv4 16).", rich_help_panel=MODEL)
GroupFromOpt = typer.Option(None, "--group-from", help="Group (brand) from 'path:N', 'label:N' (dash field) or 'column:NAME'.", rich_help_panel=DATA)


def _layout_choice(value: str) -> str:
    """typer callback: one of :data:`fewshot.data.LAYOUTS`."""
    from ..data import LAYOUTS

    if value not in LAYOUTS:
        raise typer.BadParameter(f"{value!r}: use one of {', '.join(LAYOUTS)}")
    return value


LayoutOpt = typer.Option("auto", "--layout", callback=_layout_choice, help="How a folder tree is read: class (root/<article>/photo; sub-folders belong to the article) | group/class (root/<brand>/<article>/photo; photos lying directly in a brand folder are skipped, with a warning) | auto (whichever the tree is; a tree of mixed depth, e.g. stray photos in one brand folder, is refused with the folders named).", rich_help_panel=DATA)
StrictOpt = typer.Option(False, "--strict", help="Stop on the first unreadable image instead of skipping it.", rich_help_panel=DATA)
BatchOpt = typer.Option(current("embed_batch_size"), "--batch-size", min=1, help="Images per forward pass.", rich_help_panel=PERFORMANCE)
WorkersOpt = typer.Option(0, "--workers", min=0, help="Image-decoding worker processes (0 = one background thread of the main process, overlapping the forward pass).", rich_help_panel=PERFORMANCE)
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace --out when it holds an earlier result of this command (anything else is never replaced).", rich_help_panel=OUTPUT)
CacheOpt = typer.Option(None, "--cache-dir", help="Embedding cache folder (default $FEWSHOT_CACHE or ~/.cache/fewshot).", rich_help_panel=PERFORMANCE)
NoProgressOpt = typer.Option(False, "--no-progress", help="Hide progress bars.", rich_help_panel=OUTPUT)
#: ``--no-progress`` of a command that draws no progress bar: accepted (and ignored), so that one
#: script may pass it to every command that reads data
NoProgressHidden = typer.Option(False, "--no-progress", hidden=True, help="Accepted for scripts; draws no progress bar anyway.")
RuntimeOpt = typer.Option("auto", "--runtime", help="Forward pass: onnx (ONNX Runtime: about 3x the images/s of torch end to end on 2 CPU cores; the backbone is exported once and cached) | torch | auto (onnx on a CPU when onnxruntime is installed, else torch).", rich_help_panel=PERFORMANCE)
TtaOpt = typer.Option("none", "--tta", help="Test-time augmentation: none | flip (each embedding is the mean over the image and its mirror image: about +0.007 MAP@R for a fine-tuned Lite0 on Grocery's unseen articles, at twice the embedding time; not for text or handwriting, where a mirror image means something else) | scales (the mean over the image at 7/9, 1 and 11/9 of its side: +0.016 MAP@R over 3 seeds of the default fine-tuned run on Grocery's unseen articles, at 2.9 times the embedding time; not for conv4, whose embedding depends on the input side). An index records it, and classify and serve use the index's own.", rich_help_panel=MODEL)
#: more threads than this is a typo, not a setting (1,000,000 crashed ONNX Runtime)
MAX_THREADS = 256
ThreadsOpt = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="CPU threads of the forward pass (torch and ONNX Runtime; default: torch's choice, usually one per core).", rich_help_panel=PERFORMANCE)


def apply_runtime(runtime: str, threads: int | None) -> None:
    """Check ``--runtime`` (a clear error when onnxruntime is missing) and set ``--threads``."""
    from ..embed import check_runtime

    check_runtime(runtime)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _embed_options(backbone, model, image_size, batch_size, workers, cache_dir, strict, no_progress, runtime,
                   threads, tta):
    from ..backbones import check_tta
    from ..embed.options import EmbedOptions

    apply_runtime(runtime, threads)
    return EmbedOptions(backbone=backbone if (backbone or not model) else None,
                        model_dir=str(model) if model else None, image_size=image_size, batch_size=batch_size,
                        num_workers=workers, cache_dir=str(cache_dir) if cache_dir else None, strict=strict,
                        progress=not no_progress, runtime=runtime, threads=threads, tta=check_tta(tta))


#: the options of every command that embeds a dataset (name, annotation, typer option)
_EMBED_PARAMS = (("backbone", Optional[str], BackboneOpt), ("model", Optional[Path], ModelOpt),
                 ("image_size", Optional[int], SizeOpt), ("batch_size", int, BatchOpt),
                 ("workers", int, WorkersOpt), ("cache_dir", Optional[Path], CacheOpt),
                 ("strict", bool, StrictOpt), ("no_progress", bool, NoProgressOpt),
                 ("runtime", str, RuntimeOpt), ("threads", Optional[int], ThreadsOpt), ("tta", str, TtaOpt))


def embedding_options(fn: Callable) -> Callable:
    """Give a command the embedding options (``--backbone``, ``--model``, ``--image-size``,
    ``--batch-size``, ``--workers``, ``--cache-dir``, ``--strict``, ``--no-progress``,
    ``--runtime``, ``--threads``, ``--tta``) once:
    the command declares a keyword ``emb`` and receives them as one
    :class:`~fewshot.embed.options.EmbedOptions`."""
    import inspect

    sig = inspect.signature(fn)
    own = [p for name, p in sig.parameters.items() if name != "emb"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
             for name, ann, opt in _EMBED_PARAMS]
    names = [name for name, _, _ in _EMBED_PARAMS]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        emb = _embed_options(*(kwargs.pop(n) for n in names))
        return fn(emb=emb, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    hints = {k: eval(v, fn.__globals__) if isinstance(v, str) else v  # noqa: S307 - our own annotations
             for k, v in fn.__annotations__.items() if k != "emb"}
    wrapper.__annotations__ = {**hints, **{name: ann for name, ann, _ in _EMBED_PARAMS}}
    return wrapper


def _split_help(default: str) -> str:
    return (f"The dataset's image split (train|val|test), or 'all' for every image. Default: {default} "
            "when the dataset has image splits, else every image.")


def echo_episodes(episodes: dict) -> None:
    """One line per N-way K-shot setting: accuracy with its 95% CI (or why there is none)."""
    from ..metrics import format_accuracy

    for key, v in episodes.items():
        if v.get("accuracy") is not None:
            typer.echo(f"{key}: {format_accuracy(v['accuracy'], v.get('ci95'), v.get('episodes', 0))}")
        else:
            typer.echo(f"{key}: not measured ({v.get('error', 'too few classes or images')})")
