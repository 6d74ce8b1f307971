"""Diversity-aware selection: IFD-weighted facility location over embeddings.

The objective of a subset S of the candidates V is

    F(S) = sum over i in V of  ifd_i * max over j in S of  sim(i, j)

with sim the cosine clipped at 0 (and sim(i, i) = 1): every candidate should have a chosen one like
it, and high-IFD candidates count more (the diversity term Superfiltering-D adds to IFD selection).
F is monotone submodular, so the greedy choice is within 1 - 1/e of the best subset of its size.

At 100k candidates the n x n similarities do not fit in memory: sim(i, j) is kept only where j is
among i's `neighbours` nearest (found by the blocked exact search, neighbours.top_neighbours) and
taken as 0 elsewhere: the sparse facility location of apricot and of the data-selection papers.
With `neighbours` >= n - 1 it is the exact objective. The greedy is lazy (gains only shrink), so
each step re-evaluates a few candidates, not all; ties go to the lower index: deterministic.
"""

from __future__ import annotations

import heapq

import numpy as np

from .neighbours import top_neighbours

NEIGHBOURS = 32  # sparsity of the similarity graph (docs/curation.md: the objective reached at 16/32/64)


def coverage_lists(vectors: np.ndarray, neighbours: int = NEIGHBOURS) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each candidate j: (the candidates i it covers, sim(i, j)): itself at 1, and every i that
    has j among its nearest, at their clipped cosine."""
    n = len(vectors)
    indices, cosines = top_neighbours(vectors, neighbours)
    rows = np.repeat(np.arange(n), indices.shape[1])
    cols, sims = indices.ravel(), np.maximum(cosines.ravel(), 0).astype(np.float64)
    order = np.argsort(cols, kind="stable")
    rows, cols, sims = rows[order], cols[order], sims[order]
    bounds = np.searchsorted(cols, np.arange(n + 1))
    return [(np.concatenate(([j], rows[bounds[j]:bounds[j + 1]])),
             np.concatenate(([1.0], sims[bounds[j]:bounds[j + 1]]))) for j in range(n)]


def facility_location(vectors: np.ndarray, weights: np.ndarray, k: int,
                      neighbours: int = NEIGHBOURS) -> tuple[list[int], float]:
    """(the greedy order of k candidates, F of the chosen set) for normalised `vectors` and
    non-negative `weights` (IFD)."""
    n = len(vectors)
    k = min(k, n)
    weights = np.asarray(weights, dtype=np.float64)
    covers = coverage_lists(vectors, neighbours)
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
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, vectors)
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
