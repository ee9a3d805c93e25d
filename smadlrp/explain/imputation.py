"""What a removed patch becomes during region perturbation: the image's per-channel mean, a blurred copy of the
image, or ROAD's noisy linear imputation (Rong et al., ICML 2022). No printing here.

Every imputer takes model inputs `x` (B, C, H, W) and removal masks `removed` (K, B, 1, H, W) (True = removed;
K versions of each image) and returns the K x B perturbed images (K, B, C, H, W): kept pixels unchanged, removed
ones replaced.

ROAD ("A Consistent and Efficient Evaluation Strategy for Attribution Methods", Rong, Leemann, Borisov, Kasneci
and Kasneci, ICML 2022; reference code github.com/tleemann/road_evaluation, `road/imputations.py`): each removed
pixel takes the weighted mean of its 8 neighbours inside the image (direct neighbours weight 1/6, diagonal ones
1/12, divided by the weight of the neighbours that exist), where removed neighbours are unknowns themselves, so
all removed pixels of an image are solved jointly from the known pixels around them; then Gaussian noise of
standard deviation 0.01 in [0, 1] pixel units is added to the imputed pixels (`NoisyLinearImputer(noise=0.01)`,
applied before normalisation in their experiments). On the normalised model input the same system holds (the
weights of each equation sum to one, so the solution commutes with the per-channel affine normalisation) and the
noise becomes 0.01 / std_c per channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch import Tensor

IMPUTATIONS: tuple[str, ...] = ("road", "mean", "blur")
DEFAULT_IMPUTATION = "road"
ROAD_NOISE = 0.01  # noise standard deviation in [0, 1] pixel units (Rong et al. 2022)
BLUR_SIGMA_SHARE = 0.1  # blur: Gaussian standard deviation as a share of the input side (6.4 px at 64 px)
# The 3x3 neighbour weights of ROAD's linear imputation: direct neighbours 1/6, diagonal ones 1/12.
ROAD_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
DESCRIPTIONS = {
    "road": "ROAD noisy linear imputation (8-neighbour weighted mean solved jointly, noise 0.01 in [0, 1] units)",
    "mean": "per-image channel mean",
    "blur": f"Gaussian-blurred image (sigma {BLUR_SIGMA_SHARE:g} x the input side)",
}


def describe(name: str) -> str:
    """One phrase naming what removed pixels become."""
    return DESCRIPTIONS[name]


def impute(name: str, x: Tensor, removed: Tensor, noise: Tensor | None = None) -> Tensor:
    """(K, B, C, H, W): `x` (B, C, H, W) with the pixels of `removed` (K, B, 1, H, W) replaced by imputation
    `name`. `noise` (B, C, H, W), model-input units, is added to ROAD's imputed pixels (None: no noise)."""
    if name == "mean":
        fill = x.mean(dim=(2, 3), keepdim=True).unsqueeze(0)
    elif name == "blur":
        fill = gaussian_blur(x, BLUR_SIGMA_SHARE * max(x.shape[2:])).unsqueeze(0)
    elif name == "road":
        count = removed.shape[0]
        solved = road_fill(x.unsqueeze(0).expand(count, *x.shape).flatten(0, 1), removed.flatten(0, 1))
        fill = solved.view(count, *x.shape)
        if noise is not None:
            fill = fill + noise.unsqueeze(0)
    else:
        raise ValueError(f"unknown imputation {name!r}; choose {', '.join(IMPUTATIONS)}")
    return torch.where(removed, fill, x.unsqueeze(0))


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """(B, C, H, W) -> the same, blurred by a separable Gaussian of standard deviation `sigma` pixels (kernel
    radius 3 sigma, at most the image side minus one; reflected borders)."""
    height, width = x.shape[2:]
    radius = max(1, min(int(3 * sigma + 0.5), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    out = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), rows, groups=channels)
    return F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), cols, groups=channels)


def road_fill(x: Tensor, removed: Tensor) -> Tensor:
    """(N, C, H, W): `x` with the pixels of `removed` (N, 1, H, W) replaced by the exact solution of ROAD's linear
    system (`road_solve`, one sparse LU factorisation per image on the CPU, all channels at once; no noise)."""
    values = x.detach().to("cpu", torch.float64).numpy()
    masks = removed.detach().cpu().numpy()[:, 0]
    solved = np.stack([road_solve(image, mask) if mask.any() else image for image, mask in zip(values, masks,
                                                                                               strict=True)])
    return torch.from_numpy(solved).to(x.device, x.dtype)


def road_system(image: npt.ArrayLike, removed: npt.ArrayLike) -> tuple[sp.csr_matrix, npt.NDArray[np.float64],
                                                                       npt.NDArray[np.int64]]:
    """ROAD's linear system for one image (C, H, W) and removal mask (H, W): the sparse matrix A (U, U), the
    right-hand sides b (U, C) and the flat pixel indices of the U removed pixels, row-major. Row i says
    `s_i y_i - sum_{j in N(i), removed} w_ij y_j = sum_{j in N(i), kept} w_ij x_j`, N(i) the neighbours inside the
    image, s_i the sum of their weights: y_i is the weighted mean of its neighbours."""
    values = np.asarray(image, dtype=np.float64)
    mask = np.asarray(removed, dtype=bool)
    height, width = mask.shape
    unknown = np.flatnonzero(mask)
    variable = np.full(mask.size, -1, dtype=np.int64)
    variable[unknown] = np.arange(len(unknown))
    rows, cols = np.divmod(unknown, width)
    entries: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]] = []
    diagonal = np.zeros(len(unknown))
    b = np.zeros((len(unknown), values.shape[0]))
    flat = values.reshape(values.shape[0], -1)
    for dr, dc, weight in _offsets():
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        ids = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        diagonal[ids] += weight
        is_unknown = mask.reshape(-1)[neighbour]
        entries.append((ids[is_unknown], variable[neighbour[is_unknown]],
                        np.full(int(is_unknown.sum()), -weight)))
        np.add.at(b, ids[~is_unknown], weight * flat[:, neighbour[~is_unknown]].T)
    row = np.concatenate([np.arange(len(unknown)), *(e[0] for e in entries)])
    col = np.concatenate([np.arange(len(unknown)), *(e[1] for e in entries)])
    data = np.concatenate([diagonal, *(e[2] for e in entries)])
    return sp.csr_matrix((data, (row, col)), shape=(len(unknown), len(unknown))), b, unknown


def road_solve(image: npt.ArrayLike, removed: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(C, H, W): `image` with its `removed` pixels replaced by the solution of `road_system` (a direct sparse LU
    solve). With every pixel removed there is no known value to interpolate from (the system is singular): the
    image gets its channel means."""
    values = np.array(image, dtype=np.float64)
    mask = np.asarray(removed, dtype=bool)
    if mask.all():
        return np.broadcast_to(values.mean(axis=(1, 2), keepdims=True), values.shape).copy()
    a, b, unknown = road_system(values, mask)
    if len(unknown):
        solution = spla.splu(a.tocsc()).solve(b)
        values.reshape(values.shape[0], -1)[:, unknown] = solution.T
    return values


def _offsets() -> list[tuple[int, int, float]]:
    return [(dr - 1, dc - 1, w) for dr, row in enumerate(ROAD_WEIGHTS) for dc, w in enumerate(row) if w]


def road_noise(positions: Sequence[int], shape: Sequence[int], seed: int, std: Sequence[float]) -> Tensor:
    """(B, C, H, W) float32 noise for the images at `positions` of the subset: ROAD_NOISE in [0, 1] pixel units
    divided by each channel's normalisation std, drawn per image from (`seed`, position), the same for every
    method and step, so the comparison of methods shares its noise."""
    scale = ROAD_NOISE / np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    fields = [np.random.default_rng([seed, p, 7]).standard_normal(tuple(shape)) * scale for p in positions]
    return torch.from_numpy(np.stack(fields).astype(np.float32))
