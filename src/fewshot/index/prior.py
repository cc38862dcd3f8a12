"""A trained run's whitening prior: how photos of one article vary, measured on the run's own
training photos, pooled into every catalogue whitening made with that run
(:func:`fewshot.index.whiten.fit_whitening`'s ``prior``).

A catalogue of a few dozen articles shows the within-article spread of only those articles, and
its mean sits among them. The run's training photos (other articles, the same model) show more
of both: pooled with the catalogue's, the whitening's mean and within-article covariance are
those of both sets. Measured on Grocery's open-set protocol (the 28 unseen test articles halved
20 times, each half's train photos a whitened catalogue; the three default ``fewshot train``
runs, seeds 0 / 1 / 2): relative AUROC 0.898 / 0.898 / 0.902 -> 0.907 / 0.908 / 0.911,
FPR@95TPR 0.389 / 0.402 / 0.396 -> 0.352 / 0.349 / 0.344 (docs/measurements.md).

Since 0.11.0 the prior also holds the run's **rivals**: the mean unit embedding of each of its
training and validation articles. A whitened catalogue scores every photo against them too, and
the open-set scores count the best of them as a rival of the catalogue's best article
(:func:`fewshot.catalogue.scores.with_rivals`): a photo of an article the catalogue does not
hold often lies nearer one of the run's own articles than a photo of a catalogue article does.
Same protocol: FPR@95TPR 0.352 / 0.349 / 0.344 -> 0.340 / 0.335 / 0.342, AUROC 0.907 / 0.908 /
0.911 -> 0.920 / 0.924 / 0.921.

The file, written by ``fewshot train`` after the run's weights (:func:`save_prior`)::

    RUN_DIR/whitening-prior.safetensors   float64 scatter [D, D], total [D], counts [5] (the
                                          training photos' :class:`~fewshot.index.whiten.WithinStats`),
                                          rivals [B, D] (one row per training or validation
                                          article, by name; since 0.11.0), uint8 digests [N, 32]
                                          (the photos' SHA-256); its metadata: the articles, the
                                          weights' SHA-256, the image size and test-time
                                          augmentation it was embedded with (none: a catalogue
                                          embedded with ``--tta scales`` pools it as well;
                                          measured alike, docs/measurements.md)

A catalogue that shares articles (by name) or photos (by SHA-256) with the run's training or
validation photos does not pool it: those photos would count twice (or their article would be
its own rival), and the calibration, which leaves articles out fold by fold, would have seen
them (the whitening falls back to the catalogue's own photos, with a warning).

A run without the file (trained before 0.10.0, or a frozen backbone) has no prior: its
catalogues are whitened on their own photos, as before.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_path
from ..methods.runs import WHITENING_PRIOR as PRIOR_FILE
from ..model import EmbeddingModel
from ..version import __version__
from .whiten import WithinStats

__all__ = ["PRIOR_FILE", "Prior", "save_prior", "load_prior", "read_prior"]

log = logging.getLogger("fewshot")


#: the most photos of validation articles (rivals beyond the training photos) a prior names
MAX_RIVAL_PHOTOS = 10**7
#: what a warning about the prior asks for
FIX = ("rerun the run's own `fewshot train` command with --resume, or call "
       "fewshot.training.add_whitening_prior(RUN_DIR) from the folder it was trained in: either writes it again")


def save_prior(run_dir: str | Path, stats: WithinStats, model: EmbeddingModel, labels: Sequence[str],
               digests: Sequence[str | None], tta: str = "none") -> Path:
    """Write ``stats`` (the run's training photos embedded by ``model``, the run's own; with
    ``stats.rivals`` the mean of each of ``labels``' articles, sorted by name) as
    ``run_dir/whitening-prior.safetensors``, atomically, with the articles (``labels``, one per
    photo: the training photos' and the rivals') and the photos' SHA-256 (``digests``, ``None``
    where not known) it was measured on; returns its path.

    Raises:
        ValueError: ``stats.rivals`` not one row per article of ``labels``.
    """
    from safetensors.numpy import save_file

    if stats.rivals is not None and len(stats.rivals) != len({str(x) for x in labels}):
        raise ValueError(f"{len(stats.rivals)} rival means for {len({str(x) for x in labels})} articles")

    known = sorted({d for d in digests if d})
    arrays = {**stats.to_arrays(), "digests": np.frombuffer(b"".join(bytes.fromhex(d) for d in known),
                                                            np.uint8).reshape(len(known), 32)}
    meta = {"format": "fewshot.whitening_prior", "version": __version__, "weights_sha256": model.weights_digest(),
            "image_size": str(model.backbone.image_size), "tta": tta,
            "articles": json.dumps(sorted({str(x) for x in labels}))}
    path = Path(run_dir) / PRIOR_FILE
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    return path


@dataclass(frozen=True)
class Prior:
    """A prior file read back: the statistics, the metadata, and what it was measured on."""

    stats: WithinStats
    meta: dict
    articles: frozenset[str]
    digests: frozenset[str]


def read_prior(path: str | Path) -> Prior:
    """The prior file at ``path``.

    Raises:
        OSError, ValueError, KeyError, TypeError (and safetensors' own errors): an unreadable or
            damaged file, or statistics no set of photos gives (:meth:`WithinStats.from_arrays`).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:  # one read: the metadata, then the arrays
        meta = dict(fh.metadata() or {})
        if meta.get("format") != "fewshot.whitening_prior":
            raise ValueError(f"not a fewshot whitening prior (format {meta.get('format')!r})")
        arrays = {name: fh.get_tensor(name) for name in fh.keys()}
    digests = np.asarray(arrays["digests"], np.uint8)
    if digests.ndim != 2 or digests.shape[1] != 32:
        raise ValueError(f"photo digests of shape {digests.shape}")
    articles = json.loads(meta["articles"])
    if not isinstance(articles, list):
        raise ValueError("its articles are not a list")
    stats = WithinStats.from_arrays(arrays)
    names = len(set(map(str, articles)))
    if stats.rivals is None:  # written by 0.10.0: the training photos alone
        fits = stats.articles == names and len(digests) <= stats.photos
    else:  # since 0.11.0: the rivals' photos (training and validation articles) named too
        fits = stats.articles <= names == len(stats.rivals) and len(digests) <= stats.photos + MAX_RIVAL_PHOTOS
    if not fits:
        raise ValueError(f"its counts ({stats.photos} photos of {stats.articles} articles"
                         f"{'' if stats.rivals is None else f', {len(stats.rivals)} rivals'}) do not fit its "
                         f"{len(digests)} photo digests and {len(articles)} article names")
    if stats.rivals is not None and stats.rival_names is None:  # one row per article, by name
        stats = replace(stats, rival_names=tuple(sorted({str(a) for a in articles})))
    return Prior(stats, meta, frozenset(str(a) for a in articles), frozenset(bytes(row).hex() for row in digests))


def _shared(prior: Prior, labels: Sequence[str] | None, digests: Sequence[str | None] | None) -> str:
    """What the catalogue shares with the prior's training and validation photos (``""``: nothing)."""
    articles = sorted({str(x) for x in labels or []} & prior.articles)
    photos = {d for d in digests or [] if d} & prior.digests
    parts = ([f"{len(articles)} article(s) (e.g. {', '.join(articles[:3])})"] if articles else []) + (
        [f"{len(photos)} photo(s)"] if photos else [])
    return " and ".join(parts)


def _warn(what: str) -> None:
    log.warning("%s: whitening on the catalogue's photos alone (fix: %s)", what, FIX)


def load_prior(model: EmbeddingModel, labels: Sequence[str] | None = None,
               digests: Sequence[str | None] | None = None) -> WithinStats | None:
    """The whitening prior of ``model``'s run for a catalogue of photos of ``labels`` with file
    SHA-256 ``digests``, or ``None``: a frozen backbone or a run trained before 0.10.0 (silent);
    a missing file that the run wrote, a file that cannot be read or gives impossible statistics,
    one measured with other weights or embeddings of another dimension (each warned); or a
    catalogue that shares articles (by name) or photos (by digest) with the run's training or
    validation photos (warned: the prior would count them twice, and its calibration folds would
    have seen the articles they leave out). A prior written since 0.11.0 carries the run's
    rivals (``.rivals``). The catalogue is then whitened on its own photos, and the index
    records ``prior: null``."""
    if model.run_dir is None:
        return None
    path = Path(model.run_dir) / PRIOR_FILE
    if not path.is_file():
        if (model.run_config or {}).get("whitening_prior") or _written_since_010(model.run_config or {}):
            _warn(f"the run's whitening prior {path} is missing")
        return None
    try:
        prior = read_prior(path)
    except Exception as exc:  # safetensors raises its own errors
        _warn(f"the run's whitening prior {path} cannot be used ({type(exc).__name__}: {exc})")
        return None
    if prior.stats.dim != model.dim:
        _warn(f"the run's whitening prior {path} is {prior.stats.dim}-dimensional, the model {model.dim}-dimensional")
        return None
    if prior.meta.get("weights_sha256") != model.weights_digest():
        _warn(f"the run's whitening prior {path} was measured with other weights")
        return None
    shared = _shared(prior, labels, digests)
    if shared:
        log.warning("the catalogue shares %s with the run's training and validation photos: its whitening prior "
                    "and rivals are left out (it would count them twice, and the reject threshold's calibration would "
                    "have seen them); to keep them, index only articles the run was neither trained nor validated on",
                    shared)
        return None
    return prior.stats


def _written_since_010(config: dict) -> bool:
    """Whether a run's ``config.json`` says fewshot 0.10.0 or later trained it (such a run ends by
    writing its prior: a run without one was interrupted in that step)."""
    try:
        major, minor = (int(x) for x in str(config.get("fewshot_version", "0.0")).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (0, 10) and "whitening_prior" not in config
