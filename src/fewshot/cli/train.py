"""``fewshot train``: train a method's head (and optionally the backbone: ``--fine-tune``) on a class split.

Registered on :data:`fewshot.cli.app` when :mod:`fewshot.cli` is imported.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, List, Optional

import typer

from ..errors import FewshotError
from .common import MAX_THREADS, LayoutOpt, app, apply_runtime, echo_episodes, handle_errors, one_line, positive

#: most processes of ``--nproc`` (:data:`fewshot.training.distributed.MAX_NPROC`; kept here so that
#: ``fewshot --help`` does not import torch)
MAX_NPROC = 64


def _head_spec(value: Optional[str]):
    """``linear`` / ``mlp`` preset names, or a JSON object (a ProjectionHead spec)."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("{"):
        from ..errors import FewshotError

        try:
            spec = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FewshotError(f"--head is not valid JSON ({exc.msg})",
                               hint='e.g. --head \'{"kind": "mlp", "out_dim": 256}\'') from None
        if not isinstance(spec, dict):
            raise FewshotError("--head JSON must be an object", hint='e.g. --head \'{"kind": "linear"}\'')
        return spec
    from ..methods.base import HEAD_PRESETS
    from ..errors import FewshotError

    if value not in HEAD_PRESETS:
        raise FewshotError(f"unknown --head '{value}'",
                           hint=f"use {' | '.join(HEAD_PRESETS)} or a JSON ProjectionHead spec")
    return dict(HEAD_PRESETS[value])


def _train(
    data: str = typer.Option(..., "--data", help="Dataset folder, CSV manifest, or a fetched dataset name."),
    split_file: Path = typer.Option(..., "--split-file", help="Class-disjoint protocol JSON (e.g. splits/grocery-unseen.json): train on its train classes, validate on its val classes."),
    method: str = typer.Option("triplet", "--method", help="contrastive | triplet | protonet | maml | fomaml (see `fewshot methods`)."),
    out: Path = typer.Option(..., "--out", help="RUN_DIR: config.json, model.safetensors, history.csv, curves.png, checkpoint.pt."),
    split: str = typer.Option("test", "--split", help="Class part evaluated with the best model at the end (test | val | none)."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="Backbone name."),
    image_size: int = typer.Option(224, "--image-size", min=16, max=1024, help="Input side in pixels."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=0, help="Maximum epochs (default 30, or 4 when fine-tuning; episodic methods: --epochs N means N x --episodes-per-epoch episodes)."),
    patience: Optional[int] = typer.Option(None, "--patience", min=0, help="Stop after this many epochs without a better val MAP@R (default 2 when fine-tuning, else 5; 0 = never)."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=positive, help="Adam learning rate (default 1e-4 unless the method sets its own)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", min=0.0, help="Adam weight decay (default 0)."),
    head: Optional[str] = typer.Option(None, "--head", help="linear (identity-initialised, centred; default) | mlp (1280-512-256) | JSON spec."),
    fine_tune: Optional[str] = typer.Option(None, "--fine-tune", help="What of the backbone trains: all (every backbone parameter; the default, measured best for every method) | last:N (the backbone's last N blocks) | none (only the head, on cached embeddings: minutes instead of tens of minutes on a CPU). Fine-tuning trains on augmented images and re-embeds the val images each epoch (README: its cost and gain)."),
    fine_tune_blocks: Optional[int] = typer.Option(None, "--fine-tune-blocks", min=1, hidden=True, help="N of a bare --fine-tune last (fewshot 0.1.0's spelling; use last:N)."),
    backbone_lr: Optional[float] = typer.Option(None, "--backbone-lr", callback=positive, help="Learning rate of the fine-tuned backbone parameters (default: --lr; it warms up over --warmup-steps)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", min=0, help="The backbone learning rate rises linearly over this many first steps (default 50; 0 = none)."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant (the default) | cosine: after the warm-up every learning rate follows a half cosine down to 0 at the last planned step (--epochs)."),
    bn: str = typer.Option("auto", "--bn", help="BatchNorm of the fine-tuned backbone: eval (keep the pretrained statistics) | train (batch statistics) | auto (eval, or train with --from-scratch)."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Start the backbone from seeded random weights instead of pretrained ones (needs --fine-tune all; the only way for --backbone conv4)."),
    augment: str = typer.Option("standard", "--augment", help="Fine-tuning images: standard (random resized crop, flip, colour jitter) | none (the plain resized image, e.g. handwriting)."),
    class_rotations: int = typer.Option(1, "--class-rotations", help="1-4: each train class also trains rotated by 90, 180, 270 degrees, each rotation a new class (the Omniglot protocol uses 4; needs fine-tuning). 1 = off."),
    ways: Optional[int] = typer.Option(None, "--ways", min=2, help="N of N-way episodes (episodic methods and episodic validation; default 5)."),
    shots: Optional[int] = typer.Option(None, "--shots", min=1, help="K support images per class (default 5)."),
    queries: Optional[int] = typer.Option(None, "--queries", min=1, help="Q query images per class (default 5)."),
    val_episodes: Optional[int] = typer.Option(None, "--val-episodes", min=0, help="Episodic validation episodes per epoch (default 300; 0 = none)."),
    eval_episodes: Optional[int] = typer.Option(None, "--eval-episodes", min=1, help="Episodes per setting in the final evaluation (default 1000)."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation of the final evaluation only: none | flip (see `fewshot evaluate --help`). Training, validation and the saved model are the same either way; pass --tta again to `fewshot index` / `evaluate --model RUN_DIR`."),
    opt: Optional[List[str]] = typer.Option(None, "--opt", help="A method option as KEY=VALUE (repeatable), e.g. --opt inner_lr=0.3; checked against `fewshot methods METHOD`."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed of everything random (same seed, same run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out (only once the new run has trained)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    group_from: Optional[str] = typer.Option(None, "--group-from", help="Group (brand) from 'path:N', 'label:N' or 'column:NAME'."),
    layout: str = LayoutOpt,
    embed_batch_size: Optional[int] = typer.Option(None, "--embed-batch-size", min=1, help="Images per forward pass when embedding (default 32)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Image-decoding worker processes."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Embedding cache folder (default $FEWSHOT_CACHE or ~/.cache/fewshot)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="CPU threads of torch (training) and ONNX Runtime (embedding); default: torch's choice. On a machine busy with other work, 1 is often much faster for training on cached embeddings."),
    runtime: str = typer.Option("auto", "--runtime", help="Forward pass of the frozen embeddings, the final evaluation and (fine-tuning on a CPU) each epoch's validation: auto | onnx | torch (see `fewshot evaluate --help`); the training steps run on torch."),
    nproc: int = typer.Option(1, "--nproc", min=1, max=MAX_NPROC, help="Train with N local processes (DistributedDataParallel: gloo on CPU, nccl with one GPU per process): each embeds a slice of every batch, and the run equals the one-process run on the same batches. contrastive, triplet and protonet; a contrastive / triplet --batch-size must be a multiple of N; --threads then counts per process (default: cores / N). Worth it when the backbone trains (--fine-tune) on several GPUs or many cores; with --fine-tune none the exchange of the head's gradients outweighs the work. Under torchrun (`torchrun --nproc_per_node=N -m fewshot train ...`) leave it out."),
    **method_flags,
) -> None:
    """Train contrastive / triplet (or episodic) embeddings; keep the best epoch by val MAP@R.

    A method option (under "Method options", or --opt KEY=VALUE) applies to the methods its help names; `fewshot methods METHOD` lists one method's options.
    """
    apply_runtime(runtime, threads)
    from ..methods.base import make_config
    from ..training import train as run_train

    options = _method_options(method, method_flags, opt or [], epochs)
    cfg = make_config(
        method, data=data, split_file=str(split_file), out=str(out), backbone=backbone, image_size=image_size,
        seed=seed, epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay, head=_head_spec(head),
        fine_tune=fine_tune, fine_tune_blocks=fine_tune_blocks, backbone_lr=backbone_lr, warmup_steps=warmup_steps,
        lr_schedule=lr_schedule, bn=bn, pretrained=not from_scratch, augment=augment, class_rotations=class_rotations, ways=ways, shots=shots, queries=queries,
        val_episodes=val_episodes, eval_episodes=eval_episodes, final_tta=tta, resume=resume, overwrite=overwrite, device=device,
        group_from=group_from, layout=layout, embed_batch_size=embed_batch_size, workers=workers, runtime=runtime,
        cache_dir=str(cache_dir) if cache_dir else None, progress=not no_progress, final_eval=split, options=options)
    result = _run(cfg, nproc, threads, run_train)
    if result is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return
    b = result.best_metrics
    typer.echo(f"best epoch {result.best_epoch} of {result.history[-1]['epoch']}"
               + (" (stopped early)" if result.stopped_early else "")
               + f": val MAP@R {b['val_map_at_r']:.4f}  mAP {b['val_map']:.4f}  P@1 {b['val_precision_at_1']:.4f}"
               + f"  ({result.seconds:.1f} s)")
    if result.final_metrics is not None:
        m = result.final_metrics
        typer.echo(f"{split} classes" + (f" (--tta {tta})" if tta != "none" else "")
                   + f": mAP {m['map']:.4f}  MAP@R {m['map_at_r']:.4f}  P@1 {m['precision_at_1']:.4f}")
        echo_episodes(m["episodes"])
    typer.echo(f"wrote {one_line(out)}/config.json, model.safetensors, history.csv, curves.png")


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


def _option_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def method_flags() -> dict[str, _Flag]:
    """Every option of every registered method, by field name (a flag serves every method
    whose :attr:`~fewshot.methods.base.Method.Config` has a field of that name)."""
    from ..methods.base import get_method, list_methods

    out: dict[str, _Flag] = {}
    for name in list_methods():
        cls = get_method(name).Config
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = out.setdefault(f.name, _Flag(f.name, f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                                                _option_type(hints[f.name]), f.metadata.get("help", "")))
            flag.methods.append(name)
            flag.defaults.append(f.default)
            flag.helps.append(f.metadata.get("help", ""))
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
    from ..methods.base import get_method, method_options

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
    """``fewshot train``: the loop's options above, plus one flag per method option."""
    import inspect

    base = inspect.signature(_train)
    params = [p for p in base.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    annotations = dict(typing.get_type_hints(_train))
    for f in method_flags().values():
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[f.type],
            default=typer.Option(None, f.flag, help=_flag_help(f), rich_help_panel="Method options")))
        annotations[f.name] = Optional[f.type]
    _train.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
    _train.__annotations__ = annotations
    app.command("train")(handle_errors(_train))


@app.command("methods")
def methods_cmd(name: Optional[str] = typer.Argument(None, help="A method: show only its options.")) -> None:
    """List the training methods with their options and defaults."""
    from ..methods.base import get_method, list_methods

    names = [name] if name else list_methods()
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
            typer.echo(f"    loop defaults: {', '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in cls.defaults.items())}")


_register_train()
