"""N-way K-shot episode sampling (Vinyals et al. 2016; Snell et al. 2017).

An episode picks ``n_way`` distinct classes, ``k_shot`` support items and ``n_query`` query
items per class. The sampler only yields *indices*, so it works on anything indexable: an
embedding matrix, a list of :class:`~fewshot.data.records.ImageRecord`, a dataset.

Two protocols:

* one pool (``query_labels=None``): support and queries are drawn from the same items, with no
  index shared between the support and query sets of an episode; a class is eligible when it
  has at least ``k_shot + n_query`` items.
* cross-visit (``query_labels`` given): support indices point into ``labels`` (the gallery /
  train photos), query indices into ``query_labels`` (the query / test photos); a class is
  eligible when it has at least ``k_shot`` support items and ``n_query`` query items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from fewshot.checks import as_list, positive_int
from fewshot.errors import DataError

__all__ = ["Episode", "EpisodeSampler"]

logger = logging.getLogger("fewshot")

_MAX_NAMED = 50


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode, as indices.

    Items are in class-major order: ``support_y == [0]*K + [1]*K + ... + [N-1]*K`` and
    ``query_y == [0]*Q + ... + [N-1]*Q``.

    Attributes:
        classes: the ``N`` labels, in way order (``classes[support_y[i]]`` is the label of
            support item ``i``).
        support_idx: int64 ``[N*K]`` indices into the support pool (``labels``).
        support_y: int64 ``[N*K]`` way index in ``0..N-1``.
        query_idx: int64 ``[N*Q]`` indices into the query pool (``query_labels`` when given,
            else ``labels``).
        query_y: int64 ``[N*Q]`` way index in ``0..N-1``.
    """

    classes: list
    support_idx: np.ndarray
    support_y: np.ndarray
    query_idx: np.ndarray
    query_y: np.ndarray

    @property
    def n_way(self) -> int:
        return len(self.classes)


def _group(labels: list) -> dict[Any, np.ndarray]:
    """label -> int64 indices, classes in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}


class EpisodeSampler:
    """Seeded, re-iterable source of :class:`Episode` objects.

    Args:
        labels: labels of the support pool (and of the query pool when ``query_labels`` is
            ``None``); any hashable values, compared with ``==``.
        n_way: classes per episode (N).
        k_shot: support items per class (K).
        n_query: query items per class (Q).
        episodes: episodes per iteration (``len(sampler)``).
        seed: seed of the ``numpy.random.Generator``; every iteration over the sampler starts
            from this seed, so the same seed always gives the same episodes.
        query_labels: labels of a separate query pool (cross-visit protocol).
        names: how to name a label in messages (e.g. ``label_names`` when the labels are
            class indices); default ``str``.
        warn: log the classes left out (once per sampler; pass ``False`` for the second and
            later samplers over the same data).

    Attributes:
        classes: the eligible labels, in order of first appearance.
        dropped: the labels left out for having too few items.

    Classes with too few items are left out with one warning on the ``"fewshot"`` logger
    naming them.

    Raises:
        ValueError: a count is not a positive whole number; TypeError: a count is not a number.
        fewshot.errors.DataError: fewer than ``n_way`` classes are eligible.
    """

    def __init__(
        self,
        labels: Sequence,
        n_way: int,
        k_shot: int,
        n_query: int,
        episodes: int = 1000,
        seed: int = 0,
        query_labels: Sequence | None = None,
        *,
        names: Sequence[str] | None = None,
        warn: bool = True,
    ) -> None:
        self.n_way = positive_int(n_way, "n_way")
        self.k_shot = positive_int(k_shot, "k_shot")
        self.n_query = positive_int(n_query, "n_query")
        self.episodes = positive_int(episodes, "episodes")
        self.seed = seed
        self.cross = query_labels is not None

        support_groups = _group(as_list(labels, None, "labels"))
        if self.cross:
            query_groups = _group(as_list(query_labels, None, "query_labels"))
            extra = [c for c in query_groups if c not in support_groups]
            all_classes = list(support_groups) + extra
            need = f"at least {self.k_shot} support and {self.n_query} query items"
            empty = np.empty(0, dtype=np.int64)
            self.classes = [
                c
                for c in all_classes
                if len(support_groups.get(c, empty)) >= self.k_shot
                and len(query_groups.get(c, empty)) >= self.n_query
            ]
        else:
            query_groups = support_groups
            all_classes = list(support_groups)
            need = f"at least {self.k_shot + self.n_query} items (k_shot + n_query)"
            self.classes = [
                c for c in all_classes if len(support_groups[c]) >= self.k_shot + self.n_query
            ]
        eligible = set(self.classes)
        self.dropped = [c for c in all_classes if c not in eligible]
        self._support = [support_groups[c] for c in self.classes]
        self._query = [query_groups[c] for c in self.classes]

        if self.dropped and warn:
            name = (lambda c: str(names[c])) if names is not None else str
            shown = ", ".join(name(c) for c in self.dropped[:_MAX_NAMED])
            if len(self.dropped) > _MAX_NAMED:
                shown += f", ... ({len(self.dropped) - _MAX_NAMED} more)"
            logger.warning(
                "episodes: leaving out %d of %d classes without %s: %s",
                len(self.dropped), len(all_classes), need, shown,
            )
        if len(self.classes) < self.n_way:
            raise DataError(
                f"episodes need {self.n_way} classes with {need}, but only "
                f"{len(self.classes)} of {len(all_classes)} classes qualify",
                hint="lower n_way, k_shot or n_query, or use a dataset with more images per class",
            )

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[Episode]:
        rng = np.random.default_rng(self.seed)
        n, k, q = self.n_way, self.k_shot, self.n_query
        support_y = np.repeat(np.arange(n, dtype=np.int64), k)
        query_y = np.repeat(np.arange(n, dtype=np.int64), q)
        for _ in range(self.episodes):
            ways = rng.choice(len(self.classes), size=n, replace=False)
            support = np.empty(n * k, dtype=np.int64)
            query = np.empty(n * q, dtype=np.int64)
            for w, c in enumerate(ways):
                if self.cross:
                    pool_s, pool_q = self._support[c], self._query[c]
                    support[w * k : (w + 1) * k] = pool_s[rng.choice(len(pool_s), k, replace=False)]
                    query[w * q : (w + 1) * q] = pool_q[rng.choice(len(pool_q), q, replace=False)]
                else:
                    pool = self._support[c]
                    picked = pool[rng.choice(len(pool), k + q, replace=False)]
                    support[w * k : (w + 1) * k] = picked[:k]
                    query[w * q : (w + 1) * q] = picked[k:]
            yield Episode(
                classes=[self.classes[c] for c in ways],
                support_idx=support,
                support_y=support_y.copy(),
                query_idx=query,
                query_y=query_y.copy(),
            )

    def index_arrays(self) -> tuple[list[list], np.ndarray, np.ndarray]:
        """All episodes at once: ``(classes [E][N], support_idx [E, N*K], query_idx [E, N*Q])``.

        The same episodes, in the same order, as iterating the sampler.
        """
        classes, support, query = [], [], []
        for ep in self:
            classes.append(ep.classes)
            support.append(ep.support_idx)
            query.append(ep.query_idx)
        return classes, np.stack(support), np.stack(query)
