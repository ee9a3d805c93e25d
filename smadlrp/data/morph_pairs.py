"""Which faces are morphed together: morphs per split, and random or look-alike pairs of different subjects.

A pair is two faces of different subjects of the same split; no pair (in either order) is made twice.
- `random`: pairs drawn uniformly with a seeded generator (every valid pair listed and shuffled for up to 200,000
  candidates, else drawn one by one), each pair in random order.
- `similar` (look-alikes, as practitioners pre-select contributors): the faces are visited in a seeded random
  order, and each takes as its partner the most similar face (lowest recogniser distance) of another subject that
  it has not been paired with yet; the visited face is contributor a. Faces without an embedding take no part.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

PAIRINGS = ("random", "similar")
RULES = {
    "random": "pairs of faces of different subjects of one split, drawn uniformly at random (seeded), none twice",
    "similar": "faces visited in seeded random order; each is paired (as contributor a) with its most similar face "
               "of another subject of its split by dlib's recogniser distance, no pair twice",
}
ENUMERATE_LIMIT = 200_000


@dataclass(frozen=True)
class Pair:
    """Two faces by index into the list they were chosen from; `distance` is the recogniser's (similar only)."""

    a: int
    b: int
    distance: float | None = None


def possible_pairs(subjects: Sequence[str]) -> int:
    """How many unordered pairs of faces show different subjects."""
    n = len(subjects)
    return n * (n - 1) // 2 - sum(c * (c - 1) // 2 for c in Counter(subjects).values())


def split_quotas(faces: Mapping[str, int], possible: Mapping[str, int], count: int | None) -> dict[str, int]:
    """Morphs (of each species) per split. Without `count`, as many as the split has faces; with it, `count`
    shared out in proportion to the faces of the splits that allow a pair (largest remainders). Never more than
    the split's possible pairs."""
    usable = {split: n for split, n in faces.items() if possible.get(split, 0) > 0}
    if count is None:
        return {split: min(faces[split], possible.get(split, 0)) if split in usable else 0 for split in faces}
    total = sum(usable.values())
    shares = {split: count * n / total for split, n in usable.items()} if total else {}
    quotas = {split: int(share) for split, share in shares.items()}
    for split in sorted(shares, key=lambda s: (quotas[s] - shares[s], s))[: count - sum(quotas.values())]:
        quotas[split] += 1
    return {split: min(quotas.get(split, 0), possible.get(split, 0)) for split in faces}


def random_pairs(subjects: Sequence[str], quota: int, rng: random.Random) -> list[Pair]:
    """Up to `quota` random pairs of faces showing different subjects."""
    n = len(subjects)
    quota = min(quota, possible_pairs(subjects))
    if n * (n - 1) // 2 <= ENUMERATE_LIMIT:
        candidates = [(i, j) for i in range(n) for j in range(i + 1, n) if subjects[i] != subjects[j]]
        rng.shuffle(candidates)
        chosen = candidates[:quota]
    else:
        seen: set[tuple[int, int]] = set()
        chosen = []
        while len(chosen) < quota:
            i, j = rng.randrange(n), rng.randrange(n)
            key = (min(i, j), max(i, j))
            if subjects[i] != subjects[j] and key not in seen:
                seen.add(key)
                chosen.append(key)
    return [Pair(j, i) if rng.random() < 0.5 else Pair(i, j) for i, j in chosen]


def similar_pairs(subjects: Sequence[str], embeddings: Sequence[NDArray[np.float64] | None], quota: int,
                  rng: random.Random) -> list[Pair]:
    """Up to `quota` look-alike pairs (see the module docstring) by Euclidean embedding distance."""
    known = [i for i, e in enumerate(embeddings) if e is not None]
    if len(known) < 2:
        return []
    matrix = np.stack([np.asarray(embeddings[i], dtype=np.float64) for i in known])
    order = list(range(len(known)))
    rng.shuffle(order)
    made: set[tuple[int, int]] = set()
    pairs: list[Pair] = []
    for row in order:
        if len(pairs) >= quota:
            break
        distances = np.linalg.norm(matrix - matrix[row], axis=1)
        i = known[row]
        for col in np.argsort(distances, kind="stable"):
            j = known[int(col)]
            key = (min(i, j), max(i, j))
            if j != i and subjects[j] != subjects[i] and key not in made:
                made.add(key)
                pairs.append(Pair(i, j, float(distances[col])))
                break
    return pairs


def choose_pairs(pairing: str, subjects: Sequence[str], embeddings: Sequence[NDArray[np.float64] | None] | None,
                 quota: int, rng: random.Random) -> list[Pair]:
    """`random_pairs` or `similar_pairs` (which needs `embeddings`) of one split's faces."""
    if pairing == "similar":
        if embeddings is None:
            raise ValueError("similar pairs need embeddings")
        return similar_pairs(subjects, embeddings, quota, rng)
    return random_pairs(subjects, quota, rng)
