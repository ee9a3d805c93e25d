"""Spectral Relevance Analysis (SpRAy; Lapuschkin et al. 2019): cluster a split's relevance maps by strategy.

Maps are average-pooled to SPRAY_SIZE x SPRAY_SIZE, each scaled to unit Euclidean norm, and linked by a
symmetric k-nearest-neighbour affinity (k = SPRAY_NEIGHBOURS). The number of clusters is the largest eigengap
of that affinity's normalised Laplacian (or given), and scikit-learn's SpectralClustering clusters the same
affinity. No printing, no plotting.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from sklearn.cluster import SpectralClustering
from sklearn.manifold import spectral_embedding
from sklearn.neighbors import kneighbors_graph

from smadlrp.core.errors import SmadlrpError, UsageError

SPRAY_SIZE = 32  # pooled map side (maps smaller than this keep their size)
SPRAY_NEIGHBOURS = 10
MAX_CLUSTERS = 10  # the eigengap looks at this many clusters at most
CENTRAL_IMAGES = 8


def spray_features(maps: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """(N, H, W) maps -> (N, S*S) pooled maps of unit norm (all-zero maps stay zero); S = min(H, SPRAY_SIZE)."""
    side = min(maps.shape[1], SPRAY_SIZE)
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(maps)[:, None].double(), side).flatten(1).numpy()
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.where(norms > 0, norms, 1.0)


def knn_affinity(features: npt.NDArray[np.float64], neighbours: int) -> scipy.sparse.csr_matrix:
    """Symmetric 0/1 k-nearest-neighbour graph of the rows, (A + A^T) / 2, as scikit-learn's spectral clustering
    builds it for affinity='nearest_neighbors'."""
    graph = kneighbors_graph(features, n_neighbors=neighbours, include_self=True)
    return scipy.sparse.csr_matrix(0.5 * (graph + graph.T))


def laplacian_spectrum(affinity: scipy.sparse.csr_matrix, count: int) -> npt.NDArray[np.float64]:
    """The `count` smallest eigenvalues of the normalised Laplacian I - D^-1/2 A D^-1/2, ascending: one minus
    the largest eigenvalues of D^-1/2 A D^-1/2 (sparse Lanczos; dense for small graphs)."""
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    scale = scipy.sparse.diags(1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)))
    normalised = scale @ affinity @ scale
    n = normalised.shape[0]
    if n <= 4 * count + 50:
        top = scipy.linalg.eigh(normalised.toarray(), eigvals_only=True, subset_by_index=[n - count, n - 1])
    else:
        top = scipy.sparse.linalg.eigsh(normalised, k=count, which="LA", return_eigenvectors=False,
                                        v0=np.ones(n), tol=1e-8)
    return np.sort(1.0 - np.asarray(top))


def eigengap_clusters(eigenvalues: npt.NDArray[np.float64]) -> int:
    """The k (at least 2) after which the next eigenvalue jumps most: argmax of lambda_{k+1} - lambda_k."""
    gaps = np.diff(eigenvalues)[1:]  # gaps after k = 2, 3, ...
    return int(np.argmax(gaps)) + 2


@dataclass(frozen=True)
class SprayResult:
    """Cluster of each image (N,), the number of clusters and how it was chosen, the Laplacian's smallest
    eigenvalues, a 2-D spectral embedding (N, 2), and per image its distance to its cluster's mean feature
    (small = central)."""

    clusters: npt.NDArray[np.int64]
    count: int
    chosen_by: str
    eigenvalues: npt.NDArray[np.float64]
    embedding: npt.NDArray[np.float64]
    distance: npt.NDArray[np.float64]

    def central(self, cluster: int, count: int = CENTRAL_IMAGES) -> list[int]:
        """The `count` images of `cluster` closest to its mean, closest first."""
        members = np.flatnonzero(self.clusters == cluster)
        return [int(i) for i in members[np.argsort(self.distance[members], kind="stable")][:count]]


def check_cluster_count(clusters: int | None) -> None:
    if clusters is not None and clusters < 2:
        raise UsageError(f"--clusters {clusters}: give at least 2 (one cluster is no clustering), "
                         "or leave it out to take the number from the eigengap")


def spray(maps: npt.NDArray[np.float32], clusters: int | None = None, seed: int = 0) -> SprayResult:
    """Cluster (N, H, W) relevance maps; `clusters` None picks the number from the eigengap."""
    check_cluster_count(clusters)
    n = len(maps)
    if n < 4 or (clusters is not None and clusters >= n):
        raise SmadlrpError(f"SpRAy needs more images than clusters and at least 4; got {n} image(s)"
                           + (f" for {clusters} clusters" if clusters is not None else ""))
    features = spray_features(maps)
    affinity = knn_affinity(features, min(SPRAY_NEIGHBOURS, n - 1))
    eigenvalues = laplacian_spectrum(affinity, min(MAX_CLUSTERS + 1, n))
    count = clusters if clusters is not None else eigengap_clusters(eigenvalues)
    with warnings.catch_warnings():  # a graph of separate strategies is not connected: that is a finding
        warnings.simplefilter("ignore", UserWarning)
        model = SpectralClustering(n_clusters=count, affinity="precomputed", random_state=seed,
                                   assign_labels="cluster_qr")
        found = model.fit_predict(affinity)
        embedding = spectral_embedding(affinity, n_components=2, random_state=seed, drop_first=True)
    kept, labels = np.unique(found, return_inverse=True)  # numbered 0.. without empty clusters
    count = len(kept)
    centres = np.stack([features[labels == c].mean(axis=0) for c in range(count)])
    distance = np.linalg.norm(features - centres[labels], axis=1)
    chosen_by = "--clusters" if clusters is not None else "eigengap"
    return SprayResult(labels.astype(np.int64), count, chosen_by, eigenvalues, embedding, distance)


@dataclass(frozen=True)
class ClusterMix:
    """What one cluster holds: its images, per class name and per group value ("none" for "") how many."""

    cluster: int
    images: int
    classes: dict[str, int]
    groups: dict[str, int]


def cluster_mix(result: SprayResult, cluster: int, labels: npt.NDArray[np.int64], groups: Sequence[str],
                class_names: Sequence[str]) -> ClusterMix:
    members = result.clusters == cluster
    counts = Counter(g for g, m in zip(groups, members, strict=True) if m)
    return ClusterMix(cluster, int(members.sum()),
                      {name: int((labels[members] == i).sum()) for i, name in enumerate(class_names)},
                      {(g or "none"): n for g, n in sorted(counts.items())})
