"""Re-ranking a gallery ranking from the embeddings alone (issue 30, first lever).

Three methods, each a function of L2-normalised float32 vectors (cosine similarity):

* **alpha query expansion** (alpha-QE; Radenovic, Tolias and Chum, "Fine-tuning CNN Image
  Retrieval with No Human Annotation", TPAMI 2018, section 3.3): the query is replaced by
  ``normalise(q + sum_{i<=k} max(s_i, 0)**alpha * g_i)`` over its ``k`` most similar gallery
  vectors ``g_i`` (similarities ``s_i``), then the gallery is ranked again.
* **database-side augmentation** (DBA, the same paper): every gallery vector is replaced by the
  same weighted sum over its ``k`` nearest gallery vectors, itself first (weight 1). It depends
  on the gallery alone; a catalogue search computes it for its shortlist (:func:`rerank_shortlist`).
* **k-reciprocal re-ranking** (Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification
  with k-reciprocal Encoding", CVPR 2017): the distance becomes
  ``(1 - lambda) * Jaccard(k-reciprocal sets) + lambda * d_original`` over the joint set of
  queries and gallery (transductive: every query helps rank every other). It holds about six
  ``(Q + G)^2`` float32 matrices, so it is refused above :data:`MAX_K_RECIPROCAL` vectors.

Which one, and its settings: :class:`RerankOptions` (``kind``: ``none``, ``qe``, ``dba``,
``dba-qe``, ``k-reciprocal``). ``k`` 5 and ``alpha`` 1 were chosen on Grocery's *val* articles
among k 1-5 and alpha 1 or 3 (larger k scored higher there, where articles have 20-65 gallery
photos, and would mix articles in a catalogue of about 5 photos each); k-reciprocal keeps the
paper's k1 20, k2 6, lambda 0.3. :func:`rerank_scores` gives the ``[Q, G]`` similarity a gallery
is ranked by, :func:`rerank_vectors` the vectors of ``qe`` / ``dba`` / ``dba-qe``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import numpy as np

from ..checks import as_embeddings
from ..errors import FewshotError, InputError
from ..metrics import nearest_neighbors
from ..options import check_options, option
from .vectors import l2_normalize

__all__ = ["RERANK_KINDS", "RerankOptions", "MAX_K_RECIPROCAL", "SHORTLIST", "alpha_query_expansion",
           "database_augmentation", "k_reciprocal_distance", "rerank_scores", "rerank_vectors", "rerank_shortlist", "search_rerank", "check_size"]

#: the re-ranking methods, by name
RERANK_KINDS = ("none", "qe", "dba", "dba-qe", "k-reciprocal")
#: catalogue images re-ranked per query by :func:`rerank_shortlist` (at least the ``k`` asked for)
SHORTLIST = 100
#: most vectors (queries + gallery) k-reciprocal re-ranking takes: about six float32 N x N matrices, 2.4 GB at 10,000
MAX_K_RECIPROCAL = 10_000
#: the settings each kind uses (others must stay at their defaults)
USES = {"none": (), "qe": ("k", "alpha"), "dba": ("k", "alpha"), "dba-qe": ("k", "alpha"),
        "k-reciprocal": ("k1", "k2", "lam")}


@dataclass(frozen=True)
class RerankOptions:
    """How a gallery ranking is re-ranked (see the module docstring for each method)."""

    kind: str = option("none", "Re-ranking: none | qe (alpha query expansion) | dba (database-side augmentation) "
                               "| dba-qe (both) | k-reciprocal (Zhong et al. 2017).", flag="--rerank",
                       choices=RERANK_KINDS)
    k: int = option(5, "qe: gallery neighbours added to the query; dba: neighbours averaged, the image itself "
                       "included (1 changes nothing).", flag="--rerank-k", min=1)
    alpha: float = option(1.0, "Weight exponent of qe and dba: a neighbour counts max(cosine, 0)**alpha.",
                          flag="--rerank-alpha", min=0.0)
    k1: int = option(20, "k-reciprocal: size of the k-reciprocal neighbourhoods.", flag="--rerank-k1", min=1)
    k2: int = option(6, "k-reciprocal: neighbours whose encodings are averaged (local query expansion).",
                     flag="--rerank-k2", min=1)
    lam: float = option(0.3, "k-reciprocal: weight of the original distance against the Jaccard distance.",
                        flag="--rerank-lambda", min=0.0)

    def __post_init__(self) -> None:
        try:
            check_options("re-ranking", self)
        except FewshotError as exc:  # a ValueError for Python callers, as every bad argument value
            raise InputError(exc.message, hint=exc.hint, options=exc.options) from None
        for name in ("k", "k1", "k2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"option {name} = {value!r}: re-ranking needs a whole number",
                                   hint=f"use e.g. {name} = {getattr(RerankOptions, name)}", options=(name,))
        if self.lam > 1:
            raise InputError(f"option lam = {self.lam} is above 1", hint="use a weight between 0 and 1",
                             options=("lam",))
        for f in fields(self):
            if f.name != "kind" and f.name not in USES[self.kind] and getattr(self, f.name) != f.default:
                users = [kind for kind, names in USES.items() if f.name in names]
                raise InputError(f"option {f.name} = {getattr(self, f.name)!r} does not apply to re-ranking "
                                 f"kind = {self.kind!r}", hint=f"use it with kind = {' | '.join(users)}, or leave it out",
                                 options=(f.name, "kind"))

    @classmethod
    def from_value(cls, value: "RerankOptions | str | dict[str, Any] | None") -> "RerankOptions":
        """Options from a kind name, a dict of fields (``metrics.json``'s record) or ``None``.

        Raises:
            InputError: an unknown kind, field or out-of-range value, naming it.
        """
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(kind=value)
        if not isinstance(value, dict):
            raise InputError(f"rerank = {value!r} is not a re-ranking", hint="use a kind name (" + " | ".join(
                RERANK_KINDS) + "), a dict of RerankOptions fields or RerankOptions(...)", options=("rerank",))
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown re-ranking option {unknown[0]!r}",
                               hint="use " + ", ".join(f.name for f in fields(cls)), options=("rerank",))
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """The settings that matter for ``kind`` (what a result file records)."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in USES[self.kind]}}


def _weighted_sum(vectors: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float,
                  valid: np.ndarray | None = None) -> np.ndarray:
    """``sum_j max(sims[:, j], 0)**alpha * vectors[idx[:, j]]`` over the ``valid`` neighbours
    (padding weighs 0, also when ``alpha`` is 0): float32 ``[N, D]``."""
    w = np.maximum(sims, 0.0).astype(np.float32) ** np.float32(alpha)
    if valid is not None:
        w = np.where(valid, w, np.float32(0))
    out = np.zeros((idx.shape[0], vectors.shape[1]), dtype=np.float32)
    for j in range(idx.shape[1]):
        out += w[:, j:j + 1] * vectors[idx[:, j]]
    return out


def alpha_query_expansion(query: np.ndarray, gallery: np.ndarray, k: int = 5, alpha: float = 1.0) -> np.ndarray:
    """alpha-QE (Radenovic et al. 2018): each query plus its ``k`` nearest gallery vectors,
    weighted by ``max(cosine, 0)**alpha``, L2-normalised.

    Args:
        query: float32 ``[Q, D]``; gallery: float32 ``[G, D]`` (both L2-normalised inside).
        k: neighbours added (at most ``G``); alpha: the weight exponent (0: plain average).

    Returns:
        float32 ``[Q, D]``, unit length.

    Raises:
        ValueError: bad shapes or non-finite values, ``k < 1``.
    """
    q, g = l2_normalize(as_embeddings(query, "query")), l2_normalize(as_embeddings(gallery, "gallery"))
    sims, idx = nearest_neighbors(q, g, k=k, normalize=False)
    return l2_normalize(q + _weighted_sum(g, sims, idx, alpha))


def database_augmentation(gallery: np.ndarray, k: int = 5, alpha: float = 1.0) -> np.ndarray:
    """DBA (Radenovic et al. 2018): each gallery vector replaced by the weighted sum of its ``k``
    nearest gallery vectors, itself included first with weight 1, L2-normalised.

    Args:
        gallery: float32 ``[G, D]``; k: neighbours including itself (``k = 1`` changes nothing);
        alpha: the weight exponent.

    Returns:
        float32 ``[G, D]``, unit length.

    Raises:
        ValueError: bad shapes or non-finite values, ``k < 1``.
    """
    g = l2_normalize(as_embeddings(gallery, "gallery"))
    if k <= 1 or len(g) < 2:
        return g
    sims, idx = nearest_neighbors(g, None, k=k - 1, normalize=False)
    return l2_normalize(g + _weighted_sum(g, sims, idx, alpha))


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """The k-reciprocal neighbours of ``i``: its top ``k + 1`` whose own top ``k + 1`` holds ``i``."""
    forward = rank[i, :k + 1]
    return forward[np.any(rank[forward, :k + 1] == i, axis=1)]


def _encodings(dist: np.ndarray, rank: np.ndarray, k1: int) -> np.ndarray:
    """Zhong et al. eq. 7-10: each item's expanded k-reciprocal set as Gaussian-kernel weights, float32 ``[N, N]``."""
    n = dist.shape[0]
    v = np.zeros((n, n), dtype=np.float32)
    half = int(round(k1 / 2))
    for i in range(n):
        base = _reciprocal(rank, i, k1)
        expanded = [base]
        for c in base:
            cand = _reciprocal(rank, int(c), half)
            if len(np.intersect1d(cand, base)) > 2 / 3 * len(cand):
                expanded.append(cand)
        members = np.unique(np.concatenate(expanded))
        w = np.exp(-dist[i, members])
        v[i, members] = w / w.sum()
    return v


def k_reciprocal_distance(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6,
                          lam: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. 2017): the final distance of each query to each
    gallery item (lower is closer), following the authors' reference code: squared Euclidean
    distances of the unit vectors over queries and gallery together, each row divided by its
    maximum; k-reciprocal sets expanded by the 2/3 rule; local query expansion over ``k2``.

    Args:
        query: float32 ``[Q, D]``; gallery: float32 ``[G, D]``.
        k1, k2, lam: the paper's ``k1``, ``k2`` and ``lambda``.

    Returns:
        float32 ``[Q, G]`` distances.

    Raises:
        InputError: more than :data:`MAX_K_RECIPROCAL` vectors in all.
        ValueError: bad shapes or non-finite values.
    """
    q, g = l2_normalize(as_embeddings(query, "query")), l2_normalize(as_embeddings(gallery, "gallery"))
    x = np.concatenate([q, g])
    n, nq = len(x), len(q)
    check_size(RerankOptions(kind="k-reciprocal"), nq, len(g))
    dist = np.maximum(2.0 - 2.0 * (x @ x.T), 0.0)
    # the reference divides each column by its maximum, then transposes: each row by its own maximum
    dist = (dist / np.maximum(dist.max(axis=1, keepdims=True), 1e-12)).astype(np.float32)
    rank = np.argsort(dist, axis=1, kind="stable").astype(np.int32)
    v = _encodings(dist, rank, k1)
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.empty((nq, len(g)), dtype=np.float32)
    for i in range(nq):  # the encodings are sparse: only the columns where query i's is not 0 count
        cols = np.flatnonzero(v[i])
        shared = np.minimum(v[i, cols][None, :], v[nq:, cols]).sum(axis=1)
        jaccard[i] = 1.0 - shared / (2.0 - shared)
    return (1.0 - lam) * jaccard + lam * dist[:nq, nq:]


def check_size(opts: RerankOptions, queries: int, gallery: int) -> None:
    """Refuse k-reciprocal re-ranking of more than :data:`MAX_K_RECIPROCAL` images in all (before
    anything is embedded).

    Raises:
        InputError: naming ``rerank``.
    """
    n = queries + gallery
    if opts.kind == "k-reciprocal" and n > MAX_K_RECIPROCAL:
        raise InputError(f"k-reciprocal re-ranking of {queries} queries and {gallery} gallery images would hold "
                         f"about six {n} x {n} float32 matrices ({6 * 4 * n * n / 1e9:.1f} GB)",
                         hint=f"use at most {MAX_K_RECIPROCAL} images in all, or rerank='dba-qe'", options=("rerank",))


def rerank_vectors(query: np.ndarray, gallery: np.ndarray,
                   opts: RerankOptions) -> tuple[np.ndarray, np.ndarray]:
    """``(query, gallery)`` after the vector re-rankings (``qe``, ``dba``, ``dba-qe``; ``none``
    returns them unit length). Query expansion runs against the augmented gallery.

    Raises:
        InputError: ``opts.kind`` is ``k-reciprocal`` (a distance, not vectors: use :func:`rerank_scores`).
    """
    if opts.kind == "k-reciprocal":
        raise InputError("k-reciprocal re-ranking gives distances, not vectors", hint="use rerank_scores",
                           options=("rerank",))
    q, g = l2_normalize(as_embeddings(query, "query")), l2_normalize(as_embeddings(gallery, "gallery"))
    if opts.kind in ("dba", "dba-qe"):
        g = database_augmentation(g, opts.k, opts.alpha)
    if opts.kind in ("qe", "dba-qe"):
        q = alpha_query_expansion(q, g, opts.k, opts.alpha)
    return q, g


def rerank_scores(query: np.ndarray, gallery: np.ndarray, opts: RerankOptions) -> np.ndarray:
    """The similarity each query ranks the gallery by, float32 ``[Q, G]`` (higher is closer):
    cosine after :func:`rerank_vectors`, or minus :func:`k_reciprocal_distance`.

    Raises:
        InputError / ValueError: as the method it runs.
    """
    if opts.kind == "k-reciprocal":
        return -k_reciprocal_distance(query, gallery, opts.k1, opts.k2, opts.lam)
    q, g = rerank_vectors(query, gallery, opts)
    return q @ g.T



def search_rerank(value: Any) -> RerankOptions:
    """The options of a catalogue search's ``rerank`` (a kind name, a dict, an instance or ``None``).

    Raises:
        InputError: an unknown kind or value, or ``k-reciprocal`` (it needs every query and the
            whole gallery at once: an evaluation, not a catalogue search), naming ``rerank``.
    """
    opts = RerankOptions.from_value(value)
    if opts.kind == "k-reciprocal":
        raise InputError("k-reciprocal re-ranking needs the whole gallery and every query at once, not one "
                           "catalogue search", hint="use rerank='dba-qe' (or evaluate with --rerank k-reciprocal)",
                           options=("rerank",))
    return opts


def _augmented(cand: np.ndarray, opts: RerankOptions, search: Callable, vectors_at: Callable) -> np.ndarray:
    """DBA vectors of catalogue positions ``cand`` (int64 ``[M]``), each from its ``k - 1`` nearest
    other catalogue images found by ``search``: float32 ``[M, D]``."""
    x = vectors_at(cand)
    if opts.kind not in ("dba", "dba-qe") or opts.k <= 1:
        return x
    sims, pos = search(x, opts.k)
    # drop each image itself (or, when duplicates outrank it, its last neighbour): k - 1 others stay
    own = pos == cand[:, None]
    own[np.flatnonzero(~own.any(axis=1)), -1] = True
    own &= np.cumsum(own, axis=1) == 1
    sims, pos = sims[~own].reshape(len(cand), -1), pos[~own].reshape(len(cand), -1)
    unique, local = np.unique(np.maximum(pos, 0), return_inverse=True)
    neighbours = _weighted_sum(vectors_at(unique), sims, local.reshape(pos.shape), opts.alpha, valid=pos >= 0)
    return l2_normalize(x + neighbours)


def rerank_shortlist(queries: np.ndarray, k: int, opts: RerankOptions, search: Callable, vectors_at: Callable,
                     size: int, shortlist: int = SHORTLIST) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank a catalogue's shortlist (``qe``, ``dba``, ``dba-qe``): the ``max(k, shortlist)``
    nearest images of each query, their DBA vectors from their own nearest catalogue images, the
    query expanded with the best ``opts.k`` of them, the shortlist ranked by cosine to it. With a
    shortlist of the whole catalogue this is :func:`rerank_scores` exactly; images outside the
    shortlist are not considered (the usual approximation, Radenovic et al. 2018).

    Args:
        queries: unit float32 ``[Q, D]``; k: results per query; size: the catalogue's live images
            (``k``, ``opts.k`` and the shortlist are clipped to it).
        search: ``search(vectors [M, D], n) -> (scores [M, n], positions int64 [M, n])`` (``-1`` pads),
            e.g. :meth:`fewshot.index.CatalogueIndex.search_positions`; vectors_at:
            ``vectors_at(positions [M]) -> float32 [M, D]``.

    Returns:
        ``(scores float32 [Q, k], positions int64 [Q, k])``, best first, ``-1`` padding.

    Raises:
        InputError: ``opts.kind`` is ``k-reciprocal`` (it needs every query and the whole gallery).
    """
    opts = search_rerank(opts)
    opts = replace(opts, k=min(opts.k, size))
    _, pos = search(queries, min(max(k, shortlist), size))
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_p = np.full((len(queries), k), -1, dtype=np.int64)
    cand_all = np.unique(pos[pos >= 0])
    if len(cand_all) == 0:
        return out_s, out_p
    aug = _augmented(cand_all, opts, search, vectors_at)
    for i, q in enumerate(queries):
        rows = np.searchsorted(cand_all, pos[i][pos[i] >= 0])
        g = aug[rows]
        if opts.kind in ("qe", "dba-qe"):
            s = g @ q
            top = np.argsort(-s, kind="stable")[: opts.k]
            q = l2_normalize((q + (np.maximum(s[top], 0) ** np.float32(opts.alpha)) @ g[top])[None])[0]
        s = g @ q
        order = np.lexsort((rows, -s))[:k]  # by score, ties by catalogue position
        out_s[i, :len(order)] = s[order]
        out_p[i, :len(order)] = cand_all[rows[order]]
    return out_s, out_p
