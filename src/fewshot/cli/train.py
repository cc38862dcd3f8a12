"""``fewshot train``: train a method's head (and optionally the backbone: ``--fine-tune``) on a class split.

Registered on :data:`fewshot.cli.app` when :mod:`fewshot.cli` is imported.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, List, Optional

import typer
from rich.markup import escape

from ..errors import FewshotError
from .common import (DATA, MAX_THREADS, MODEL, OUTPUT, PERFORMANCE, LayoutOpt, app, apply_runtime, echo_episodes,
                     examples, handle_errors, one_line, positive, show_flags)
from .snapshot import TYPES, current

#: most processes of ``--nproc`` (:data:`fewshot.training.distributed.MAX_NPROC`; kept here so that
#: ``fewshot --help`` does not import torch)
MAX_NPROC = 64
#: the help panels of the loop's own options (the others are under TRAINING)
TRAINING, FINE_TUNING, EPISODES, FINAL, METHOD = ("Training", "Fine-tuning", "Episodes", "Final evaluation",
                                                  "Method options")
LOOP_PANELS = {**dict.fromkeys(("data", "split_file", "group_from"), DATA),
               **dict.fromkeys(("method", "backbone", "image_size", "head", "pretrained"), MODEL),
               **dict.fromkeys(("fine_tune", "fine_tune_blocks", "backbone_lr", "bn", "augment"), FINE_TUNING),
               **dict.fromkeys(("ways", "shots", "queries", "val_episodes"), EPISODES),
               **dict.fromkeys(("final_eval", "eval_episodes", "final_tta"), FINAL),
               **dict.fromkeys(("out", "overwrite", "progress"), OUTPUT),
               **dict.fromkeys(("device", "cache_dir", "workers", "micro_batch", "fold_bn", "embed_batch_size", "runtime"),
                                 PERFORMANCE)}
DATA_DIR, UNSEEN = "../shared/data/grocery-store-dataset", "splits/grocery-unseen.json"


def _train(
    opt: Optional[List[str]] = typer.Option(None, "--opt", rich_help_panel=METHOD, help="A method option as KEY=VALUE (repeatable), e.g. --opt inner_lr=0.3; checked against `fewshot methods METHOD`."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, rich_help_panel=PERFORMANCE, help="CPU threads of torch (training) and ONNX Runtime (embedding); default: torch's choice. On a machine busy with other work, 1 is often much faster for training on cached embeddings."),
    nproc: int = typer.Option(1, "--nproc", min=1, max=MAX_NPROC, rich_help_panel=PERFORMANCE, help="Train with N local processes (DistributedDataParallel: gloo on CPU, nccl with one GPU per process): each embeds a slice of every batch, and the run equals the one-process run on the same batches. contrastive, triplet and protonet; a contrastive / triplet --batch-size must be a multiple of N; --threads then counts per process (default: cores / N). Worth it when the backbone trains (--fine-tune) on several GPUs or many cores; with --fine-tune none the exchange of the head's gradients outweighs the work. Under torchrun (`torchrun --nproc_per_node=N -m fewshot train ...`) leave it out."),
    **given,
) -> None:
    """Train contrastive / triplet (or episodic) embeddings; keep the best epoch by val MAP@R (the last with --train-on-val).

    A method option (under "Method options", or --opt KEY=VALUE) applies to the methods its help names; `fewshot methods METHOD` lists one method's options.
    """
    apply_runtime(given["runtime"], threads)
    _train_run(given["method"], given, opt or [], nproc, threads)


def _train_run(method: str, given: dict[str, Any], pairs: list[str], nproc: int, threads: Optional[int]) -> None:
    """Build the config from the flags, train, and print the summary."""
    from ..training import make_config, train as run_train

    loop = _loop_values(given)
    options = _method_options(method, given, pairs, loop.get("epochs"))
    cfg = make_config(method, **{k: v for k, v in loop.items() if k != "method"}, options=options)
    result = _run(cfg, nproc, threads, run_train)
    if result is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return
    b = result.best_metrics
    kept = " kept (the val classes were trained on: these val figures are not held out)" if cfg.train_on_val else ""
    typer.echo(f"{'last' if cfg.train_on_val else 'best'} epoch {result.best_epoch} of {result.history[-1]['epoch']}"
               + (" (stopped early)" if result.stopped_early else "") + kept
               + f": val MAP@R {b['val_map_at_r']:.4f}  mAP {b['val_map']:.4f}  P@1 {b['val_precision_at_1']:.4f}"
               + f"  ({result.seconds:.1f} s)")
    rate = result.config.get("images_per_second")
    if rate is not None and cfg.fine_tuning:
        slices = result.config.get("micro_batch")
        typer.echo(f"training steps: {rate:.1f} images/s (median over the epochs; augmentation, forward"
                   + (f" in slices of {slices}" if slices else "") + ", backward and update; validation excluded)")
    elif rate is not None:
        typer.echo(f"training steps: {rate:.1f} embeddings/s (median over the epochs; head steps on the cached "
                   "embeddings; validation excluded)")
    if result.final_metrics is not None:
        m = result.final_metrics
        typer.echo(f"{cfg.final_eval} classes" + (f" (--tta {cfg.final_tta})" if cfg.final_tta != "none" else "")
                   + f": mAP {m['map']:.4f}  MAP@R {m['map_at_r']:.4f}  P@1 {m['precision_at_1']:.4f}")
        echo_episodes(m["episodes"])
    prior = (result.config or {}).get("whitening_prior")
    typer.echo(f"wrote {one_line(cfg.out)}/config.json, model.safetensors, history.csv, curves.png"
               + (f", {prior['file']} (the whitening prior: {prior['photos']:,} training photos of {prior['articles']} "
                  f"articles{_rivals(prior)})" if prior else ""))


def _rivals(prior: dict) -> str:
    """``", 53 articles as rivals"`` from what ``config.json`` records of a prior (``""``: none, before 0.11.0)."""
    return f", {prior['rivals']} articles as rivals" if prior.get("rivals") else ""


def _run(cfg, nproc: int, threads: Optional[int], run_train):
    """One process, ``--nproc N`` local processes, or this process's rank of a torchrun launch."""
    from ..training.distributed import launched_env, train_distributed, train_launched

    env = launched_env()
    if env is None:
        return train_distributed(cfg, nproc, threads=threads) if nproc > 1 else run_train(cfg)
    if nproc > 1:
        raise typer.BadParameter(f"torchrun already started {env[1]} processes: leave --nproc out under torchrun",
                                 param_hint="--nproc")
    try:
        return train_launched(cfg)
    except FewshotError:
        if env[0] != 0:  # every rank fails alike: rank 0 prints it
            raise typer.Exit(1)
        raise


# --------------------------------------------------------------------------- the loop's options
def _loop_fields() -> list:
    """The :class:`~fewshot.training.config.TrainConfig` fields declared as options (at run time:
    the flags and help come from :func:`~fewshot.cli.snapshot.current`)."""
    from ..training.config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata]


def loop_flags() -> list:
    """One ``inspect.Parameter`` (a typer option) per loop option, made from its declaration
    (:func:`fewshot.training.config.loop_option`, read through :mod:`fewshot.cli.snapshot`):
    flag, help, default (none shown where it depends on other settings), ``min`` / ``max``
    (``above=0``: the ``positive`` check), hidden; a path field takes a path, a parsed one
    text, an inverted boolean is a flag that turns it off. ``--layout`` is the option every
    command shares."""
    import inspect

    params = []
    for e in current("loop"):
        if e["name"] == "layout":
            params.append(inspect.Parameter("layout", inspect.Parameter.KEYWORD_ONLY, default=LayoutOpt, annotation=str))
            continue
        typ, panel = TYPES[e["type"]], LOOP_PANELS.get(e["name"], TRAINING)
        if typ is bool:
            default, annotation = typer.Option(False, e["flag"], help=e["help"], rich_help_panel=panel), bool
        else:
            value = ... if e.get("required") else None if e.get("unset") or e["default"] is None else e["default"]
            annotation = typ if value is not None else Optional[typ]
            limits = {k: e[k] for k in ("min", "max") if e.get(k) is not None}
            if e.get("above") == 0:
                limits["callback"] = positive
            default = typer.Option(value, e["flag"], help=escape(e["help"]), hidden=bool(e.get("hidden")),
                                   rich_help_panel=panel, **limits)
        params.append(inspect.Parameter(e["name"], inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def _loop_values(given: dict[str, Any]) -> dict[str, Any]:
    """The loop fields' values taken out of ``given`` (the command's keyword arguments): an
    inverted flag turned back, a parsed field parsed, a path as text; ``None`` = not given."""
    out = {}
    for f in _loop_fields():
        value, cli = given.pop(f.name), f.metadata["cli"]
        if cli.get("invert"):
            value = not value
        elif value is not None and cli.get("parse"):
            value = cli["parse"](value)
        elif value is not None and cli.get("path"):
            value = str(value)
        out[f.name] = value
    return out


def _loop_flag_names() -> dict[str, str]:
    return {e["name"]: e["flag"] for e in current("loop")}


def train_flags() -> dict[str, str]:
    """The train command's flag of each option whose flag is not its parameter's own: an
    inverted boolean as the value it sets (``pretrained=False``: ``--from-scratch``), and the
    methods' options (for :func:`~fewshot.cli.common.show_flags`)."""
    inverted = {f"{e['name']}=False": e["flag"] for e in current("loop") if e.get("invert")}
    return {**{k: f.flag for k, f in method_flags().items()}, **_loop_flag_names(), **inverted}


# --------------------------------------------------------------------------- method options
@dataclasses.dataclass
class _Flag:
    """One CLI flag made from the methods' option fields of the same name."""

    name: str
    flag: str
    type: type
    help: str
    methods: list[str] = dataclasses.field(default_factory=list)
    defaults: list[Any] = dataclasses.field(default_factory=list)
    helps: list[str] = dataclasses.field(default_factory=list)


def method_flags() -> dict[str, _Flag]:
    """Every option of every registered method, by field name (a flag serves every method
    whose :attr:`~fewshot.methods.base.Method.Config` has a field of that name; read through
    :mod:`fewshot.cli.snapshot`)."""
    out: dict[str, _Flag] = {}
    for name, options in current("methods").items():
        for o in options:
            flag = out.setdefault(o["name"], _Flag(o["name"], o["flag"], TYPES[o["type"]], o["help"]))
            flag.methods.append(name)
            flag.defaults.append(o["default"])
            flag.helps.append(o["help"])
    return out


def _flag_help(f: _Flag) -> str:
    """The flag's help: what it does (per method where the methods differ), which methods take
    it, and their defaults (parentheses, not brackets: typer's help renders rich markup)."""
    if len(set(f.helps)) == 1 and len({repr(d) for d in f.defaults}) == 1:
        return f"{f.helps[0]} ({', '.join(f.methods)}; default {f.defaults[0]!r})"
    return " ".join(f"{m}: {h.rstrip('.')} (default {d!r})." for m, h, d in zip(f.methods, f.helps, f.defaults))


def _method_options(method: str, given: dict[str, Any], pairs: list[str], epochs: int | None) -> dict[str, Any]:
    """The method's options from its flags and ``--opt KEY=VALUE``; a flag of another method is
    a usage error naming the method's own options."""
    from ..methods import get_method, method_options

    flags = method_flags()
    own = {f.name for f in dataclasses.fields(get_method(method).Config)}
    options: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in own:
            raise typer.BadParameter(f"does not apply to --method {method} (it is an option of "
                                     f"{', '.join(flags[key].methods)}); options of {method}: "
                                     f"{', '.join(sorted(own)) or 'none'}", param_hint=flags[key].flag)
        options[key] = value
    from_opt: set[str] = set()
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in own:
            raise typer.BadParameter(f"{pair!r}: use KEY=VALUE with KEY one of {', '.join(sorted(own)) or 'none'} "
                                     f"(see `fewshot methods {method}`)", param_hint="--opt")
        if key in options:  # a second value for the same option: say which one, do not pick one
            twice = f"--opt {key}=... twice" if key in from_opt else f"{flags[key].flag} and --opt {key}=..."
            raise typer.BadParameter(f"{key} is given twice ({twice})", param_hint="--opt")
        options[key] = _parse(text.strip(), flags[key], "--opt")
        from_opt.add(key)
    if epochs is not None and get_method(method).episodic:
        # episodic methods count training in episodes: --epochs N is N epochs of episodes
        if "episodes" in options:
            raise typer.BadParameter("episodic methods count training in episodes: give --episodes or "
                                     "--epochs, not both", param_hint="--epochs")
        per_epoch = options.get("episodes_per_epoch", get_method(method).Config().episodes_per_epoch)
        options["episodes"] = epochs * per_epoch
    try:  # a value out of range is a usage error, like the loop's own options
        method_options(method, **options)
    except FewshotError as exc:
        exc = show_flags(exc, train_flags())
        raise typer.BadParameter(f"{exc.message} ({exc.hint})") from None
    return options


def _parse(text: str, flag: _Flag, hint: str) -> Any:
    try:
        if flag.type is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return flag.type(text)
    except ValueError:
        kind = {"int": "an integer", "float": "a number", "str": "a text"}.get(flag.type.__name__, flag.type.__name__)
        raise typer.BadParameter(f"{flag.name}={text!r} is not {kind}", param_hint=hint) from None


def _register_train() -> None:
    """``fewshot train``: one flag per loop field (:func:`loop_flags`), the command's own options
    above, plus one flag per method option (under "Method options")."""
    import inspect

    base = inspect.signature(_train)
    loop = loop_flags()
    params = [*loop, *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in base.parameters.values()
                       if p.kind != inspect.Parameter.VAR_KEYWORD)]
    annotations = dict(typing.get_type_hints(_train))
    annotations.update({p.name: p.annotation for p in loop})
    for f in method_flags().values():
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[f.type],
            default=typer.Option(None, f.flag, help=escape(_flag_help(f)), rich_help_panel=METHOD)))
        annotations[f.name] = Optional[f.type]
    _train.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
    _train.__annotations__ = annotations
    app.command("train", epilog=examples(
        f"fewshot train --data {DATA_DIR} --split-file {UNSEEN} --out runs/triplet",
        f"fewshot train --data {DATA_DIR} --split-file {UNSEEN} --method protonet --fine-tune none --out runs/protonet",
        "fewshot train --data ../shared/data/omniglot/images_background_small1 --split-file splits/omniglot-small1.json "
        "--method maml --backbone conv4 --from-scratch --fine-tune all --image-size 28 --augment none "
        "--class-rotations 4 --out runs/omniglot-maml"))(handle_errors(_train, flags=train_flags()))


@app.command("methods", epilog=examples("fewshot methods", "fewshot methods maml"))
def methods_cmd(name: Optional[str] = typer.Argument(None, help="A method: show only its options.")) -> None:
    """List the training methods with their options and defaults."""
    from ..methods import get_method, list_methods

    names = [name] if name else list_methods()
    loop = _loop_flag_names()
    flags = method_flags()
    for n in names:
        try:
            cls = get_method(n)
        except FewshotError as exc:
            raise typer.BadParameter(f"{exc.message} ({exc.hint})", param_hint="NAME") from None
        typer.echo(f"{n}: {cls.summary}" + ("  [episodic]" if cls.episodic else ""))
        for f in dataclasses.fields(cls.Config):
            typer.echo(f"    {flags[f.name].flag} (--opt {f.name}=...)  default {f.default!r}: "
                       f"{f.metadata.get('help', '')}")
        if cls.defaults:
            typer.echo(f"    loop defaults: {', '.join(f'{loop[k]} {v}' for k, v in cls.defaults.items())}")


_register_train()
