"""Prototypical concept-based explanations (PCX; Dreyer et al., CVPR Workshops 2024): per class, a Gaussian mixture
over the images' concept-relevance vectors; its components are the class's prototypical strategies, and an
image's log-likelihood under it says how usual its strategy is. No printing, no plotting.

A concept-relevance vector is an image's relevance per channel at the concept layer divided by its absolute sum
(`concepts.relative`) and multiplied by the number of channels (1 = a uniform share), so that images with large
and small logits count alike. The mixture has diagonal covariances (there are often more channels than images).
An image is an outlier when its log-likelihood lies below its class's lower Tukey fence, Q1 - 1.5 IQR.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from smadlrp.explain.concepts import relative

FloatArray = npt.NDArray[np.float64]
IMAGES_PER_COMPONENT = 5  # a class gets at most one prototype per this many images
REG_COVAR = 1e-3  # added to every variance (in units of a uniform share, squared)
FENCE = 1.5  # Tukey's fence: outliers lie below Q1 - FENCE * IQR of the class's log-likelihoods


@dataclass(frozen=True)
class ClassPrototypes:
    """The prototypes of one class: `images` (n,) positions in the split, mixture `weights` (P,), `means` (P, C)
    (mean concept-relevance vectors), each image's most likely prototype (`assignment`, (n,)) and
    `log_likelihood` (n,), the outlier `threshold` and which images lie below it (`outlier`, (n,))."""

    class_name: str
    images: npt.NDArray[np.int64]
    weights: FloatArray
    means: FloatArray
    assignment: npt.NDArray[np.int64]
    log_likelihood: FloatArray
    threshold: float
    outlier: npt.NDArray[np.bool_]

    def top_concepts(self, prototype: int, count: int = 3) -> list[int]:
        """The channels of highest mean relevance in `prototype`."""
        return [int(c) for c in np.argsort(-self.means[prototype], kind="stable")[:count]]

    def most_typical(self, prototype: int) -> int | None:
        """The image (position in the split) of `prototype` with the highest log-likelihood."""
        members = np.flatnonzero(self.assignment == prototype)
        return None if not len(members) else int(self.images[members[np.argmax(self.log_likelihood[members])]])


def concept_vectors(channels: FloatArray) -> FloatArray:
    """(N, C) concept relevances -> (N, C) vectors: relative relevance times C."""
    return relative(channels) * channels.shape[1]


def fit_class(vectors: FloatArray, components: int, seed: int = 0) -> GaussianMixture:
    """A diagonal Gaussian mixture of at most `components` components (at most one per IMAGES_PER_COMPONENT
    images, at least one) fitted to (n, C) `vectors`."""
    count = max(1, min(components, len(vectors) // IMAGES_PER_COMPONENT))
    mixture = GaussianMixture(count, covariance_type="diag", reg_covar=REG_COVAR, random_state=seed, n_init=2)
    with warnings.catch_warnings():  # a few images may not converge fully: the likelihoods are still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(vectors)
    return mixture


def tukey_threshold(scores: FloatArray) -> float:
    """Q1 - FENCE * IQR of `scores`."""
    q1, q3 = np.percentile(scores, [25, 75])
    return float(q1 - FENCE * (q3 - q1))


def fit_prototypes(channels: FloatArray, labels: npt.NDArray[np.int64], class_names: Sequence[str],
                   components: int, seed: int = 0) -> list[ClassPrototypes]:
    """The prototypes of every class with at least two images (by true class)."""
    vectors = concept_vectors(channels)
    found = []
    for label, name in enumerate(class_names):
        images = np.flatnonzero(labels == label)
        if len(images) < 2:
            continue
        mixture = fit_class(vectors[images], components, seed)
        scores = mixture.score_samples(vectors[images])
        threshold = tukey_threshold(scores)
        found.append(ClassPrototypes(name, images.astype(np.int64), mixture.weights_.astype(np.float64),
                                     mixture.means_.astype(np.float64), mixture.predict(vectors[images]),
                                     scores.astype(np.float64), threshold, scores < threshold))
    return found
