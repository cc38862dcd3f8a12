"""Catalogue checks (issue 29): defects of a catalogue that its own photos show, before a
customer's photo meets them.

:func:`check_catalogue` looks at every photo and article of a :class:`CatalogueIndex`;
:func:`check_article` at one article's photos against the rest (what the service says when it
enrols an article). They find:

* ``same_photo``: one photo (the same file content, by SHA-256) under two or more articles;
* ``near_duplicate``: photos of two articles whose cosine is at least ``duplicate_cosine``;
* ``likely_mislabel``: a photo nearer to another article's prototype than to its own article's
  prototype made without it (leave one photo out), by at least ``mislabel_margin`` (a photo
  whose copy or near-duplicate lies in that other article is reported as a duplicate instead);
* ``confusable_articles``: two articles whose prototypes' cosine is at least
  ``confusable_cosine``, or whose photos are taken for the other one (the nearest prototype,
  leave one photo out) at least ``min_confusions`` times and for at least ``confusable_share``
  of the two articles' photos; both figures are reported;
* ``single_photo``: articles with one photo (they cannot be checked for mislabels, and one
  photo is a poor prototype).

The default levels were read off real data, Grocery's 2,640 train photos of 81 articles
embedded by the frozen ``efficientnet_lite0`` at 224 px: the most similar photos of two
different articles have a cosine of 0.92 (two photos of one article up to 0.99, and a
re-encoded copy of a photo 0.997 or more); 13 % of the photos are nearer another article's
prototype than their own (leave one out), 0.6 % by 0.10 or more (odd shots: a fruit in a
hand, a shelf from afar) and two photos by 0.15 or more, while a photo planted under a wrong
article is nearer the right one by 0.3 or more; the most similar
prototypes of two articles have a cosine of 0.956 (Orange and Red-Grapefruit), and no pair of
articles has a quarter of its photos taken for the other (Floury- and Solid-Potato: 24 %),
while two articles holding the same photos have a prototype cosine of 0.999 and every photo
taken for the other. Other models give other cosines: the levels are options.
"""

from __future__ import annotations

from pathlib import PurePath

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import DataError
from ..index import CatalogueIndex
from ..index.vectors import l2_normalize

__all__ = ["CheckLevels", "CheckReport", "Finding", "KINDS", "check_article", "check_catalogue"]

#: the kinds of finding, in the order reports list them
KINDS = ("same_photo", "near_duplicate", "likely_mislabel", "confusable_articles", "single_photo")
#: rows of catalogue vectors compared at a time (bounds the memory of a check)
BLOCK_ROWS = 4096


@dataclass(frozen=True)
class CheckLevels:
    """The levels above which a check reports (see the module's docstring for how they were chosen).

    ``duplicate_cosine``: two photos of different articles at least this similar are near
    duplicates; ``mislabel_margin``: a photo nearer another article's prototype than its own
    (leave one out) by at least this is a likely mislabel; ``confusable_cosine``: two articles
    whose prototypes are at least this similar are confusable, and so are two articles with at
    least ``min_confusions`` leave-one-out confusions making ``confusable_share`` of their photos.

    Raises:
        DataError: a level outside its range (cosines in ``(0, 1]``, the margin in ``[0, 2]``,
            the share in ``(0, 1]``, ``min_confusions`` at least 1), naming the option.
    """

    duplicate_cosine: float = 0.97
    mislabel_margin: float = 0.15
    confusable_cosine: float = 0.95
    confusable_share: float = 0.25
    min_confusions: int = 2

    def __post_init__(self) -> None:
        ranges = {"duplicate_cosine": (0.0, 1.0, False), "confusable_cosine": (0.0, 1.0, False),
                  "mislabel_margin": (0.0, 2.0, True), "confusable_share": (0.0, 1.0, False)}
        for name, (low, high, closed) in ranges.items():
            value = getattr(self, name)
            if not (low <= value <= high) or (value == low and not closed):
                raise DataError(f"{name} = {value}: it must lie in {'[' if closed else '('}{low:g}, {high:g}]",
                                hint=f"use the default {getattr(CheckLevels, name)}", options=(name,))
        if self.min_confusions < 1:
            raise DataError(f"min_confusions = {self.min_confusions}: at least 1", hint="use the default 2",
                            options=("min_confusions",))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """One defect: its ``kind`` (one of :data:`KINDS`), the ``articles`` involved, the catalogue
    ``images`` involved (paths as the index keeps them; empty for ``confusable_articles``) and
    its ``figures`` (``cosine``; ``own_cosine``, ``other_cosine``, ``margin``;
    ``prototype_cosine``, ``confusions``, ``photos``, ``share``; ``copies``; ``photos``)."""

    kind: str
    articles: tuple[str, ...]
    images: tuple[str, ...]
    figures: dict = field(default_factory=dict)

    @property
    def message(self) -> str:
        """One line for people: what was found, with its figures (labels only, never paths)."""
        a, f = self.articles, self.figures
        names = " and ".join(f"'{x}'" for x in a)
        photo = f" ({PurePath(self.images[0]).name})" if self.images else ""  # a file name, not where it is
        if self.kind == "same_photo":
            return f"the same photo{photo} (identical file) is under {names}"
        if self.kind == "near_duplicate":
            return f"near-identical photos{photo} under {names} (cosine {f['cosine']:.3f})"
        if self.kind == "likely_mislabel":
            return (f"a photo{photo} of '{a[0]}' is nearer to '{a[1]}' (cosine {f['other_cosine']:.3f}) than to the rest of "
                    f"'{a[0]}' ({f['own_cosine']:.3f}): likely mislabelled")
        if self.kind == "confusable_articles":
            return (f"{names} are hard to tell apart: prototype cosine {f['prototype_cosine']:.3f}, "
                    f"{f['confusions']} of {f['photos']} photos taken for the other (leave one out)")
        return f"'{a[0]}' has a single photo: add more (one photo is a poor prototype and cannot be checked)"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "articles": list(self.articles), "images": list(self.images),
                "figures": dict(self.figures), "message": self.message}


@dataclass
class CheckReport:
    """What a check found: ``findings`` (by kind in :data:`KINDS` order, the strongest first),
    the ``levels`` it used and the size of the catalogue it checked."""

    findings: list[Finding]
    levels: CheckLevels
    num_articles: int
    num_images: int

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def counts(self) -> dict[str, int]:
        """Findings per kind, every kind of :data:`KINDS` listed (0 when none)."""
        found = Counter(f.kind for f in self.findings)
        return {k: found.get(k, 0) for k in KINDS}

    def as_dict(self) -> dict:
        return {"num_articles": self.num_articles, "num_images": self.num_images, "levels": self.levels.as_dict(),
                "counts": self.counts(), "findings": [f.as_dict() for f in self.findings]}


# --------------------------------------------------------------------------- shared parts
@dataclass
class _View:
    """What the checks read of an index: per-image articles, per-article sums, counts and
    prototypes (``float32 [C, D]``, a zero row for an article without photos)."""

    index: CatalogueIndex
    article: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    protos: np.ndarray

    @classmethod
    def of(cls, index: CatalogueIndex) -> "_View":
        if not len(index):
            raise DataError("the catalogue has no images: nothing to check", hint="add articles first")
        article = np.asarray(index.image_article)
        counts = np.bincount(article, minlength=len(index.articles))
        view = cls(index, article, np.zeros(0, np.float32), counts, np.zeros(0, np.float32))
        if index.whitening is None:
            view.sums = index.prototype_sums(0, len(index.articles))
        else:  # a whitened catalogue is checked on the model's embeddings, where the levels were read
            view.sums = np.zeros((len(index.articles), index.dim), np.float32)
            for start, xb in view.blocks():
                np.add.at(view.sums, article[start:start + len(xb)], xb)
        view.protos = l2_normalize(view.sums)
        return view

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, float32 [B, D])``: the catalogue's normalised embeddings, a block at a time
        (unwhitened: :meth:`~fewshot.index.CatalogueIndex.embedding_rows`)."""
        for start in range(0, len(self.article), BLOCK_ROWS):
            yield start, self.index.embedding_rows(start, min(start + BLOCK_ROWS, len(self.article)))

    def loo(self, x: np.ndarray, art: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For photos ``x [n, D]`` of articles ``art [n]``: ``(own [n], other [n], nearest [n])``:
        the cosine to their own article's prototype without them (NaN for a single photo), the
        best cosine to another article's prototype and that article."""
        scores = x @ self.protos.T
        scores[:, self.counts == 0] = -np.inf
        scores[np.arange(len(x)), art] = -np.inf
        nearest = scores.argmax(1)
        return self.own(x, art), scores[np.arange(len(x)), nearest], nearest

    def own(self, x: np.ndarray, art: np.ndarray) -> np.ndarray:
        """``float32 [n]``: the cosine of photos ``x [n, D]`` to their own articles' (``art [n]``)
        prototypes made without them; NaN for a single photo."""
        own = (l2_normalize(self.sums[art] - x) * x).sum(1)
        return np.where(self.counts[art] > 1, own, np.nan)


def _rounded(value: float) -> float:
    return round(float(value), 4)


def _same_photos(view: _View, rows: Sequence[int]) -> list[Finding]:
    """Photos among ``rows`` whose file content is under another article too (one finding per content)."""
    index, done, out = view.index, set(), []
    for pos, hits in zip(rows, index.find_images([index.digests[p] for p in rows])):
        digest = index.digests[pos]
        arts = sorted({int(view.article[h]) for h in hits})
        if digest is None or digest in done or len(arts) < 2:
            continue
        done.add(digest)
        first = int(view.article[pos])
        arts = [first] + [a for a in arts if a != first]
        out.append(Finding("same_photo", tuple(index.articles[a] for a in arts),
                           tuple(index.paths[h] for h in sorted(hits)), {"copies": len(hits)}))
    return out


def _gather(view: _View, rows: np.ndarray) -> np.ndarray:
    """The normalised vectors of positions ``rows`` (sorted), ``float32 [len(rows), D]``."""
    parts = [xb[rows[(rows >= start) & (rows < start + len(xb))] - start] for start, xb in view.blocks()]
    return np.concatenate(parts) if parts else np.zeros((0, view.protos.shape[1]), np.float32)


def _near_duplicates(view: _View, queries: Iterable[tuple[np.ndarray, np.ndarray]], level: float) -> list[Finding]:
    """Pairs of photos of two articles with cosine at least ``level`` (not the same file), each
    once: each of ``queries`` (``positions [q]``, ``vectors [q, D]``) against the catalogue."""
    index, pairs = view.index, []
    for rows, xq in queries:
        for start, xb in view.blocks():
            s = xq @ xb.T
            i, j = np.nonzero(s >= level)
            pairs += zip(rows[i].tolist(), (j + start).tolist(), s[i, j].tolist())
    out, seen = [], set()
    for a, b, c in sorted(pairs, key=lambda t: -t[2]):
        key = (min(a, b), max(a, b))
        same = index.digests[a] is not None and index.digests[a] == index.digests[b]
        if view.article[a] == view.article[b] or same or key in seen:
            continue
        seen.add(key)
        out.append(Finding("near_duplicate", (index.articles[view.article[a]], index.articles[view.article[b]]),
                           (index.paths[a], index.paths[b]), {"cosine": _rounded(c)}))
    return out


def _explained(index: CatalogueIndex, duplicates: list[Finding]) -> set[tuple[str, str]]:
    """``(image path, article)``: photos with a copy or near-duplicate under that article."""
    out = set()
    for f in duplicates:
        for path in f.images:
            out |= {(path, a) for a in f.articles}
    return out


def _mislabels(view: _View, rows: np.ndarray, loo: tuple, margin: float,
               explained: set) -> tuple[list[Finding], np.ndarray]:
    """Photos of ``rows`` nearer another article's prototype than their own (leave one out) by
    ``margin``, the strongest first, and which of ``rows`` they are (``bool [len(rows)]``)."""
    index = view.index
    own, other, nearest = loo
    flagged = other - np.nan_to_num(own, nan=np.inf) >= margin
    out = []
    for k in np.flatnonzero(flagged).tolist():
        pos, b = int(rows[k]), int(nearest[k])
        if (index.paths[pos], index.articles[b]) in explained:
            flagged[k] = False
            continue
        out.append(Finding("likely_mislabel", (index.labels[pos], index.articles[b]), (index.paths[pos],),
                           {"own_cosine": _rounded(own[k]), "other_cosine": _rounded(other[k]),
                            "margin": _rounded(other[k] - own[k])}))
    return sorted(out, key=lambda f: -f.figures["margin"]), flagged


def _predicted(loo: tuple, art: np.ndarray, mislabelled: np.ndarray | None = None) -> np.ndarray:
    """The nearest prototype of each photo, its own one made without it; -1 for a single photo
    and for a likely mislabel (``mislabelled``): it is no evidence that two articles look alike."""
    own, other, nearest = loo
    skip = np.isnan(own) | (mislabelled if mislabelled is not None else False)
    return np.where(skip, -1, np.where(other > own, nearest, art))


def _confusables(view: _View, pairs: set[tuple[int, int]], confusions: Counter, levels: CheckLevels) -> list[Finding]:
    """Of the candidate article ``pairs``, those whose prototypes or leave-one-out confusions say
    the model cannot tell them apart."""
    index, out = view.index, []
    judged = np.where(view.counts > 1, view.counts, 0)
    for a, b in pairs:
        cosine = float(view.protos[a] @ view.protos[b])
        n, photos = confusions.get((min(a, b), max(a, b)), 0), int(judged[a] + judged[b])
        share = n / photos if photos else 0.0
        if cosine >= levels.confusable_cosine or (n >= levels.min_confusions and share >= levels.confusable_share):
            out.append(Finding("confusable_articles", (index.articles[a], index.articles[b]), (),
                               {"prototype_cosine": _rounded(cosine), "confusions": n, "photos": photos,
                                "share": _rounded(share)}))
    return sorted(out, key=lambda f: (-f.figures["prototype_cosine"], -f.figures["share"]))


def _singles(view: _View, articles: Sequence[int]) -> list[Finding]:
    index = view.index
    return [Finding("single_photo", (index.articles[a],), tuple(index.article_paths(index.articles[a])), {"photos": 1})
            for a in articles if view.counts[a] == 1]


def _report(view: _View, levels: CheckLevels, *parts: list[Finding]) -> CheckReport:
    findings = [f for part in parts for f in part]
    findings.sort(key=lambda f: KINDS.index(f.kind))  # stable: each kind keeps its own order
    return CheckReport(findings, levels, len(view.index.articles), len(view.index))


def _count(confusions: Counter, predicted: np.ndarray, art: np.ndarray, only: int | None = None) -> None:
    """Add the photos taken for another article (``predicted != art``; ``only``: for that one)
    to ``confusions``, keyed by the pair of articles (lower position first)."""
    wrong = (predicted >= 0) & (predicted != art) & ((predicted == only) if only is not None else True)
    for p, a in zip(predicted[wrong].tolist(), art[wrong].tolist()):
        confusions[(min(p, a), max(p, a))] += 1


def _similar_prototypes(view: _View, articles: np.ndarray, level: float) -> set[tuple[int, int]]:
    """``(a, b)`` for each of ``articles`` and every other article whose prototype cosine is at least ``level``."""
    out: set[tuple[int, int]] = set()
    alive = view.counts > 0
    for start in range(0, len(articles), BLOCK_ROWS):
        rows = articles[start:start + BLOCK_ROWS]
        i, j = np.nonzero((view.protos[rows] @ view.protos.T >= level) & alive)
        out |= {(int(rows[a]), int(b)) for a, b in zip(i, j) if rows[a] != b}
    return out


def check_catalogue(index: CatalogueIndex, *, duplicate_cosine: float = CheckLevels.duplicate_cosine,
                    mislabel_margin: float = CheckLevels.mislabel_margin,
                    confusable_cosine: float = CheckLevels.confusable_cosine,
                    confusable_share: float = CheckLevels.confusable_share,
                    min_confusions: int = CheckLevels.min_confusions) -> CheckReport:
    """Every check over the whole catalogue (see the module docstring for the kinds and the levels).

    Reads the index's normalised vectors ``float32 [N, D]`` a block of :data:`BLOCK_ROWS` rows
    at a time and its prototypes ``[C, D]`` whole; near duplicates compare every pair of photos
    (``O(N^2 D)``), the other checks every photo with every prototype (``O(N C D)``).

    Raises:
        DataError: a level out of range (:class:`CheckLevels`), or an empty catalogue.
    """
    levels = CheckLevels(duplicate_cosine, mislabel_margin, confusable_cosine, confusable_share, min_confusions)
    view = _View.of(index)
    same = _same_photos(view, range(len(index)))
    near = _near_duplicates(view, ((np.arange(s, s + len(xb)), xb) for s, xb in view.blocks()),
                            levels.duplicate_cosine)
    explained = _explained(index, same + near)
    mislabels: list[Finding] = []
    confusions: Counter = Counter()
    for start, xb in view.blocks():
        rows = np.arange(start, start + len(xb))
        loo = view.loo(xb, view.article[rows])
        found, flagged = _mislabels(view, rows, loo, levels.mislabel_margin, explained)
        mislabels += found
        _count(confusions, _predicted(loo, view.article[rows], flagged), view.article[rows])
    mislabels.sort(key=lambda f: -f.figures["margin"])
    articles = np.arange(len(index.articles))
    pairs = set(confusions) | {p for p in _similar_prototypes(view, articles, levels.confusable_cosine) if p[0] < p[1]}
    return _report(view, levels, same, near, mislabels, _confusables(view, pairs, confusions, levels),
                   _singles(view, articles.tolist()))


def check_article(index: CatalogueIndex, label: str, **levels: float) -> CheckReport:
    """The checks that concern article ``label``: its photos against the whole catalogue, its
    prototype against the others' (what the service reports when it enrols photos). The same
    findings about ``label`` as :func:`check_catalogue` (with ``label`` named first), for a
    cost of ``O(N D)`` plus ``O(n C D)`` for its ``n`` photos. ``levels``: :class:`CheckLevels`.

    Raises:
        DataError: no article ``label``, or a level out of range.
    """
    lv = CheckLevels(**levels)
    view = _View.of(index)
    if not index.has_article(label):
        raise DataError(f"no article '{label}' in the catalogue", hint="check the label (see index.articles)")
    a = index.articles.index(label)
    rows = np.flatnonzero(view.article == a)
    xa, art = _gather(view, rows), view.article[rows]
    same = _same_photos(view, rows.tolist())
    near = _near_duplicates(view, [(rows, xa)], lv.duplicate_cosine)
    loo = view.loo(xa, art)
    explained = _explained(index, same + near)
    mislabels, flagged = _mislabels(view, rows, loo, lv.mislabel_margin, explained)
    confusions: Counter = Counter()
    _count(confusions, _predicted(loo, art, flagged), art)
    for start, xb in view.blocks():  # the other photos taken for this article
        b = view.article[start:start + len(xb)]
        maybe = np.flatnonzero((b != a) & (xb @ view.protos[a] > np.nan_to_num(view.own(xb, b), nan=np.inf)))
        if len(maybe):
            loo_b = view.loo(xb[maybe], b[maybe])
            mislabelled = _mislabels(view, maybe + start, loo_b, lv.mislabel_margin, explained)[1]
            _count(confusions, _predicted(loo_b, b[maybe], mislabelled), b[maybe], only=a)
    others = {b for pair in confusions for b in pair if b != a} | {b for _, b in _similar_prototypes(
        view, np.array([a]), lv.confusable_cosine)}
    return _report(view, lv, same, near, mislabels, _confusables(view, {(a, b) for b in others}, confusions, lv),
                   _singles(view, [a]))
