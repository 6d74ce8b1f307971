"""Nearest neighbours over stored embeddings, exact and in blocks.

Each turn's nearest other turn, its cosine distance (1 - cosine of the L2-normalised vectors) and how
many other turns lie within a radius: the Magpie reference's `min_neighbor_distance` and
`repeat_count`, without its FAISS index. The search is a blocked matrix product (BLAS on float32):
memory is the vectors plus one block of similarities, never an n x n matrix, and the work is
n^2 * dim multiply-adds (docs/curation.md has the measured times at 10k and 100k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RADIUS = 0.05  # cosine distance: the near-duplicate check's 0.95 cosine bound


def to_blob(vector: np.ndarray) -> bytes:
    """A normalised vector as stored: float16, little-endian."""
    return np.asarray(vector, dtype="<f2").tobytes()


def from_blobs(blobs: list[bytes], dim: int | None = None) -> np.ndarray:
    """Stored vectors as one float32 matrix (rows re-normalised: float16 rounding moves the norm)."""
    if not blobs:
        return np.zeros((0, dim or 0), dtype=np.float32)
    matrix = np.frombuffer(b"".join(blobs), dtype="<f2").astype(np.float32).reshape(len(blobs), -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1)


@dataclass(frozen=True)
class Neighbours:
    nearest: np.ndarray  # index of each row's nearest other row (-1 when alone)
    distance: np.ndarray  # its cosine distance (nan when alone)
    repeats: np.ndarray  # other rows within the radius


def nearest_neighbours(vectors: np.ndarray, radius: float = RADIUS, block: int = 512,
                       progress: Callable[[int], None] | None = None) -> Neighbours:
    """Exact nearest neighbour and neighbours within `radius` of every row of `vectors` (normalised)."""
    n = len(vectors)
    nearest = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, np.nan, dtype=np.float64)
    repeats = np.zeros(n, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    bound = 1.0 - radius
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        sims = vectors[i0:i1] @ vectors.T
        rows = np.arange(i1 - i0)
        sims[rows, rows + i0] = -np.inf  # not itself
        if n > 1:
            best = sims.argmax(axis=1)
            nearest[i0:i1] = best
            distance[i0:i1] = np.maximum(0.0, 1.0 - sims[rows, best].astype(np.float64))
        repeats[i0:i1] = (sims >= bound).sum(axis=1)
        if progress:
            progress(i1 - i0)
    return Neighbours(nearest, distance, repeats)


def top_neighbours(vectors: np.ndarray, k: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines), each n x min(k, n - 1): every row's k most similar other rows, most
    similar first (ties by index), by the same blocked exact search."""
    n = len(vectors)
    k = min(k, n - 1)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    indices = np.zeros((n, max(k, 0)), dtype=np.int64)
    cosines = np.zeros((n, max(k, 0)), dtype=np.float32)
    if k <= 0:
        return indices, cosines
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        sims = vectors[i0:i1] @ vectors.T
        rows = np.arange(i1 - i0)
        sims[rows, rows + i0] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(sims, part, axis=1)
        order = np.lexsort((part, -values), axis=1)  # most similar first, then the lower index
        indices[i0:i1] = np.take_along_axis(part, order, axis=1)
        cosines[i0:i1] = np.take_along_axis(values, order, axis=1)
    return indices, cosines
