"""``fewshot train``: train a method's head (and optionally the backbone's last blocks) on a class split.

Registered on :data:`fewshot.cli.app` when :mod:`fewshot.cli` is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import app, echo_episodes, handle_errors, positive


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
    from ..methods.method import HEAD_PRESETS
    from ..errors import FewshotError

    if value not in HEAD_PRESETS:
        raise FewshotError(f"unknown --head '{value}'",
                           hint=f"use {' | '.join(HEAD_PRESETS)} or a JSON ProjectionHead spec")
    return dict(HEAD_PRESETS[value])


@app.command()
@handle_errors
def train(
    data: str = typer.Option(..., "--data", help="Dataset folder, CSV manifest, or a fetched dataset name."),
    split_file: Path = typer.Option(..., "--split-file", help="Class-disjoint protocol JSON (e.g. splits/grocery-unseen.json): train on its train classes, validate on its val classes."),
    method: str = typer.Option("triplet", "--method", help="contrastive | triplet | protonet | maml | fomaml."),
    out: Path = typer.Option(..., "--out", help="RUN_DIR: config.json, model.safetensors, history.csv, curves.png, checkpoint.pt."),
    split: str = typer.Option("test", "--split", help="Class part evaluated with the best model at the end (test | val | none)."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="Backbone name."),
    image_size: int = typer.Option(224, "--image-size", min=16, help="Input side in pixels."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=0, help="Maximum epochs (default 30; episodic methods: --episodes / --episodes-per-epoch, and --epochs N means N x --episodes-per-epoch episodes)."),
    patience: Optional[int] = typer.Option(None, "--patience", min=0, help="Stop after this many epochs without a better val MAP@R (default 5; 0 = never)."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=positive, help="Adam learning rate (default 1e-4 unless the method sets its own)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", min=0.0, help="Adam weight decay (default 0)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="Items per batch (siamese; default 64)."),
    m_per_class: Optional[int] = typer.Option(None, "--m-per-class", min=2, help="Images per class in a batch (default 4)."),
    margin: Optional[float] = typer.Option(None, "--margin", min=0.0, help="Triplet margin (default 0.1) / contrastive negative margin (default 0.3), on cosine similarity."),
    pos_margin: Optional[float] = typer.Option(None, "--pos-margin", min=-1.0, max=1.0, help="Contrastive positive margin (cosine; default 0.8)."),
    miner: Optional[str] = typer.Option(None, "--miner", help="hard | semihard | all (default: contrastive hard, triplet semihard)."),
    head: Optional[str] = typer.Option(None, "--head", help="linear (identity-initialised, centred; default) | mlp (1280-512-256) | JSON spec."),
    fine_tune: str = typer.Option("none", "--fine-tune", help="none (head on cached embeddings) | last (also the backbone's last blocks, on augmented images; for a GPU)."),
    fine_tune_blocks: Optional[int] = typer.Option(None, "--fine-tune-blocks", min=1, help="Backbone blocks trained with --fine-tune last (default 2)."),
    ways: Optional[int] = typer.Option(None, "--ways", min=2, help="N of N-way episodes (episodic methods and episodic validation; default 5)."),
    shots: Optional[int] = typer.Option(None, "--shots", min=1, help="K support images per class (default 5)."),
    queries: Optional[int] = typer.Option(None, "--queries", min=1, help="Q query images per class (default 5)."),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="Training episodes in all (episodic methods)."),
    episodes_per_epoch: Optional[int] = typer.Option(None, "--episodes-per-epoch", min=1, help="Training episodes between validations (episodic methods)."),
    inner_lr: Optional[float] = typer.Option(None, "--inner-lr", callback=positive, help="MAML inner-loop learning rate."),
    inner_steps: Optional[int] = typer.Option(None, "--inner-steps", min=0, help="MAML inner steps when training."),
    inner_steps_test: Optional[int] = typer.Option(None, "--inner-steps-test", min=0, help="MAML inner steps when evaluating."),
    meta_batch: Optional[int] = typer.Option(None, "--meta-batch", min=1, help="MAML tasks per outer step."),
    maml_init: str = typer.Option("proto", "--maml-init", help="MAML's initial output layer per task: proto (from the support prototypes) | zero | learned."),
    val_episodes: Optional[int] = typer.Option(None, "--val-episodes", min=0, help="Episodic validation episodes per epoch (default 300; 0 = none)."),
    eval_episodes: Optional[int] = typer.Option(None, "--eval-episodes", min=1, help="Episodes per setting in the final evaluation (default 1000)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of everything random (same seed, same run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    group_from: Optional[str] = typer.Option(None, "--group-from", help="Group (brand) from 'path:N', 'label:N' or 'column:NAME'."),
    embed_batch_size: Optional[int] = typer.Option(None, "--embed-batch-size", min=1, help="Images per forward pass when embedding (default 32)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Image-decoding worker processes."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Embedding cache folder (default $FEWSHOT_CACHE or ~/.cache/fewshot)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's choice). On a machine busy with other work, 1 is often much faster for training on cached embeddings."),
) -> None:
    """Train contrastive / triplet (or episodic) embeddings; keep the best epoch by val MAP@R."""
    from ..methods.maml import INITS

    if maml_init not in INITS:
        raise typer.BadParameter(f"{maml_init!r}: use {', '.join(INITS[:-1])} or {INITS[-1]}",
                                 param_hint="--maml-init")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from ..methods.method import get_method, make_config
    from ..training import train as run_train

    if epochs is not None and get_method(method).episodic:
        # episodic methods count training in episodes: --epochs N is N epochs of episodes
        if episodes is not None:
            raise typer.BadParameter("episodic methods count training in episodes: give --episodes or "
                                     "--epochs, not both", param_hint="--epochs")
        episodes = epochs * (episodes_per_epoch or make_config(method).episodes_per_epoch)

    cfg = make_config(
        method, data=data, split_file=str(split_file), out=str(out), backbone=backbone, image_size=image_size,
        seed=seed, epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
        m_per_class=m_per_class, margin=margin, pos_margin=pos_margin, miner=miner, head=_head_spec(head),
        fine_tune=fine_tune, fine_tune_blocks=fine_tune_blocks, ways=ways, shots=shots, queries=queries,
        episodes=episodes, episodes_per_epoch=episodes_per_epoch, inner_lr=inner_lr, inner_steps=inner_steps,
        inner_steps_test=inner_steps_test, meta_batch=meta_batch, maml_init=maml_init, val_episodes=val_episodes,
        eval_episodes=eval_episodes, resume=resume, overwrite=overwrite, device=device, group_from=group_from,
        embed_batch_size=embed_batch_size, workers=workers, cache_dir=str(cache_dir) if cache_dir else None,
        progress=not no_progress, final_eval=split)
    result = run_train(cfg)
    b = result.best_metrics
    typer.echo(f"best epoch {result.best_epoch} of {result.history[-1]['epoch']}"
               + (" (stopped early)" if result.stopped_early else "")
               + f": val MAP@R {b['val_map_at_r']:.4f}  mAP {b['val_map']:.4f}  P@1 {b['val_precision_at_1']:.4f}"
               + f"  ({result.seconds:.1f} s)")
    if result.final_metrics is not None:
        m = result.final_metrics
        typer.echo(f"{split} classes: mAP {m['map']:.4f}  MAP@R {m['map_at_r']:.4f}  P@1 {m['precision_at_1']:.4f}")
        echo_episodes(m["episodes"])
    typer.echo(f"wrote {out}/config.json, model.safetensors, history.csv, curves.png")
