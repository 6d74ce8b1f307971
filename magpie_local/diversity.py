"""Diversity-aware selection: IFD-weighted facility location over embeddings.

The objective of a subset S of the candidates V is

    F(S) = sum over i in V of  ifd_i * max over j in S of  sim(i, j)

with sim the cosine clipped at 0 (and sim(i, i) = 1): every candidate should have a chosen one like
it, and high-IFD candidates count more (the diversity term Superfiltering-D adds to IFD selection).
F is monotone submodular, so the greedy choice is within 1 - 1/e of the best subset of its size.

At 100k candidates the n x n similarities do not fit in memory: sim(i, j) is kept only where j is
among i's `neighbours` nearest candidates and taken as 0 elsewhere: the sparse facility location of
apricot and of the data-selection papers. The graph comes from the embedding run, where the
neighbour statistics' search stored it (candidate_graph), so select does not search again. With
`neighbours` >= n - 1 it is the exact objective. The greedy is lazy (gains only shrink), so each step
re-evaluates a few candidates, not all; ties go to the lower index: deterministic.
"""

from __future__ import annotations

import heapq

import numpy as np

from .neighbours import DEGREE, nearest_neighbours

NEIGHBOURS = DEGREE  # sparsity of the graph: what embed stores (docs/curation.md: the objective at 16/32/64)
MIN_KEPT = 8  # a candidate left with fewer of its stored neighbours is searched again (docs/curation.md)


def similarity_graph(vectors: np.ndarray, neighbours: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """(similar, cosine): each row's `neighbours` most similar other rows, by exact search."""
    found = nearest_neighbours(vectors, degree=neighbours)
    return found.similar, found.cosine


def candidate_graph(vectors: np.ndarray, neighbours: int, stored: np.ndarray | None = None,
                    stored_cosine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(similar, cosine, rows searched): the graph over the candidates (rows of normalised
    `vectors`) facility location runs on. `stored`: each candidate's most similar turns of the
    whole embedding run, as candidate positions (-1: not a candidate, or padding), most similar
    first. The candidates among them are exactly its most similar candidates, so they are kept (the
    first `neighbours`); a candidate the filters left with fewer than MIN_KEPT of them, and every
    candidate when nothing is stored, is searched again among the candidates."""
    n = len(vectors)
    degree = max(0, min(neighbours, n - 1))
    if stored is None:
        similar, cosine = similarity_graph(vectors, degree)
        return similar, cosine, n
    kept = stored >= 0
    order = np.argsort(~kept, axis=1, kind="stable")[:, :degree]  # the kept ones first, in their order
    similar = np.take_along_axis(stored, order, axis=1)
    cosine = np.take_along_axis(stored_cosine, order, axis=1)
    if similar.shape[1] < degree:  # stored with fewer than asked for: pad
        pad = degree - similar.shape[1]
        similar = np.pad(similar, ((0, 0), (0, pad)), constant_values=-1)
        cosine = np.pad(cosine, ((0, 0), (0, pad)), constant_values=np.nan)
    cosine = np.where(similar >= 0, cosine, np.nan).astype(np.float32)
    thin = np.flatnonzero(kept.sum(axis=1) < min(MIN_KEPT, degree))
    if len(thin):
        again = nearest_neighbours(vectors, degree=degree, rows=thin)
        similar[thin], cosine[thin] = again.similar, again.cosine
    return similar, cosine, len(thin)


def coverage_lists(similar: np.ndarray, cosine: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each candidate j: (the candidates i it covers, sim(i, j)): itself at 1, and every i that
    has j in its row of the graph, at their clipped cosine."""
    n = len(similar)
    rows = np.repeat(np.arange(n), similar.shape[1])
    cols, sims = similar.ravel(), np.maximum(np.nan_to_num(cosine.ravel(), nan=0.0), 0).astype(np.float64)
    real = cols >= 0
    rows, cols, sims = rows[real], cols[real], sims[real]
    order = np.argsort(cols, kind="stable")
    rows, cols, sims = rows[order], cols[order], sims[order]
    bounds = np.searchsorted(cols, np.arange(n + 1))
    return [(np.concatenate(([j], rows[bounds[j]:bounds[j + 1]])),
             np.concatenate(([1.0], sims[bounds[j]:bounds[j + 1]]))) for j in range(n)]


def facility_location(weights: np.ndarray, k: int, graph: tuple[np.ndarray, np.ndarray]) -> tuple[list[int], float]:
    """(the greedy order of k candidates, F of the chosen set) for non-negative `weights` (IFD) and
    the similarity `graph` (similar, cosine) over the candidates."""
    weights = np.asarray(weights, dtype=np.float64)
    n = len(weights)
    k = min(k, n)
    covers = coverage_lists(*graph)
    best = np.zeros(n)  # each candidate's similarity to its nearest chosen one so far

    def gain(j: int) -> float:
        who, sims = covers[j]
        return float((weights[who] * np.maximum(sims - best[who], 0)).sum())

    heap = [(-gain(j), j) for j in range(n)]
    heapq.heapify(heap)
    chosen: list[int] = []
    while len(chosen) < k and heap:
        _, j = heapq.heappop(heap)
        fresh = gain(j)
        if heap and (-fresh, j) > heap[0]:  # its stored gain was stale: back, with the true one
            heapq.heappush(heap, (-fresh, j))
            continue
        chosen.append(j)
        who, sims = covers[j]
        best[who] = np.maximum(best[who], sims)
    return chosen, float((weights * best).sum())


def kmeans(vectors: np.ndarray, clusters: int, seed: int = 0, iterations: int = 25,
           block: int = 8192) -> np.ndarray:
    """Spherical k-means (cosine) of normalised `vectors`: each row's cluster, 0..clusters-1.
    k-means++ seeding from `seed`, then Lloyd steps until no row moves (or `iterations`);
    assignments in blocks, so memory stays at one block of similarities."""
    n = len(vectors)
    clusters = min(clusters, n)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    centres = [int(rng.integers(n))]
    nearest = 1.0 - vectors @ vectors[centres[0]]  # cosine distance to the nearest centre so far
    for _ in range(1, clusters):
        weights = np.maximum(nearest, 0).astype(np.float64) ** 2
        pick = int(rng.choice(n, p=weights / weights.sum())) if weights.sum() > 0 else int(rng.integers(n))
        centres.append(pick)
        nearest = np.minimum(nearest, 1.0 - vectors @ vectors[pick])
    centroids = vectors[centres].copy()
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(iterations):
        moved = labels.copy()
        for i0 in range(0, n, block):
            labels[i0:i0 + block] = (vectors[i0:i0 + block] @ centroids.T).argmax(axis=1)
        if (labels == moved).all():
            break
        order = np.argsort(labels, kind="stable")  # each cluster's rows together: np.add.at is 4x slower at 100k
        present, starts = np.unique(labels[order], return_index=True)
        sums = np.zeros_like(centroids)
        sums[present] = np.add.reduceat(vectors[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = np.where(norms > 0, sums / np.where(norms > 0, norms, 1), centroids)  # an empty one stays
    return labels


def first_per_cluster(labels: np.ndarray, n_each: int) -> list[int]:
    """Candidates (indices, in the given order: highest IFD first) keeping the first `n_each` of each cluster."""
    taken: dict[int, int] = {}
    out = []
    for i, label in enumerate(labels.tolist()):
        if taken.get(label, 0) < n_each:
            taken[label] = taken.get(label, 0) + 1
            out.append(i)
    return out


def balanced(groups: list[str], size: int) -> list[int]:
    """`size` candidates (indices, given highest IFD first) in equal shares per group: round robin
    over the groups, each giving its best remaining one; a group that runs out leaves its share to
    the others."""
    queues: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        queues.setdefault(group, []).append(i)
    order = sorted(queues)  # deterministic: the groups by name
    out: list[int] = []
    depth = 0
    while len(out) < size and any(depth < len(queues[g]) for g in order):
        for group in order:
            if depth < len(queues[group]) and len(out) < size:
                out.append(queues[group][depth])
        depth += 1
    return out
