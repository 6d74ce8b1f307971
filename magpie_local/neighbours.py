"""Nearest neighbours over stored embeddings, exact and in blocks.

Each turn's nearest other turn, its cosine distance (1 - cosine of the L2-normalised vectors) and how
many other turns lie within a radius: the Magpie reference's `min_neighbor_distance` and
`repeat_count`, without its FAISS index; and, from the same pass, each turn's DEGREE most similar
turns: the similarity graph `select --diverse` reads instead of searching again. The search is a
blocked matrix product (BLAS on float32): memory is the vectors plus one block of similarities,
never an n x n matrix, and the work is n^2 * dim multiply-adds (docs/curation.md has the measured
times at 10k and 100k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RADIUS = 0.05  # cosine distance: the near-duplicate check's 0.95 cosine bound
DEGREE = 32  # most similar turns kept per turn: --diverse's default graph (docs/curation.md: objective by degree)


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
    """Per searched row: its most similar other rows, most similar first (ties: the lower index),
    padded with -1 (cosine nan) where it has fewer; and how many other rows lie within the radius."""

    similar: np.ndarray  # rows x degree, int64 row indices
    cosine: np.ndarray  # rows x degree, float32
    repeats: np.ndarray  # other rows within the radius

    @property
    def nearest(self) -> np.ndarray:
        """Each row's nearest other row (-1 when alone)."""
        return self.similar[:, 0] if self.similar.shape[1] else np.full(len(self.repeats), -1, dtype=np.int64)

    @property
    def distance(self) -> np.ndarray:
        """Its cosine distance (nan when alone)."""
        if not self.similar.shape[1]:
            return np.full(len(self.repeats), np.nan)
        return np.maximum(0.0, 1.0 - self.cosine[:, 0].astype(np.float64))


def nearest_neighbours(vectors: np.ndarray, radius: float = RADIUS, degree: int = DEGREE,
                       rows: np.ndarray | None = None, block: int = 512,
                       progress: Callable[[int], None] | None = None) -> Neighbours:
    """Exact search among the rows of normalised `vectors`: for each of `rows` (default: all), its
    `degree` most similar other rows and the number within `radius`."""
    n = len(vectors)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    d = max(0, min(degree, n - 1))
    similar = np.full((len(rows), d), -1, dtype=np.int64)
    cosine = np.full((len(rows), d), np.nan, dtype=np.float32)
    repeats = np.zeros(len(rows), dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    bound = 1.0 - radius
    for b0 in range(0, len(rows), block):
        query = rows[b0:b0 + block]
        sims = vectors[query] @ vectors.T
        sims[np.arange(len(query)), query] = -np.inf  # not itself
        repeats[b0:b0 + len(query)] = (sims >= bound).sum(axis=1)
        for c0 in range(0, len(query) if d else 0, 64):  # argpartition's n-wide int64 indices: 64 rows at a time
            chunk = sims[c0:c0 + 64]
            part = np.argpartition(chunk, -d, axis=1)[:, -d:]
            values = np.take_along_axis(chunk, part, axis=1)
            order = np.lexsort((part, -values), axis=1)  # most similar first, then the lower index
            similar[b0 + c0:b0 + c0 + len(chunk)] = np.take_along_axis(part, order, axis=1)
            cosine[b0 + c0:b0 + c0 + len(chunk)] = np.take_along_axis(values, order, axis=1)
        if progress:
            progress(len(query))
    return Neighbours(similar, cosine, repeats)


def ids_to_blob(ids: np.ndarray) -> bytes:
    """A row of the graph as stored: turn ids, int64 little-endian (-1 pads)."""
    return np.asarray(ids, dtype="<i8").tobytes()


def cosines_to_blob(cosines: np.ndarray) -> bytes:
    """Their cosines, float32 little-endian (float16 would move the greedy's ties)."""
    return np.asarray(cosines, dtype="<f4").tobytes()


def graph_from_blobs(ids: list[bytes], cosines: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Stored graph rows (all of one degree) as (turn ids, cosines) matrices."""
    if not ids:
        return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    similar = np.frombuffer(b"".join(ids), dtype="<i8").astype(np.int64).reshape(len(ids), -1)
    return similar, np.frombuffer(b"".join(cosines), dtype="<f4").astype(np.float32).reshape(similar.shape)
