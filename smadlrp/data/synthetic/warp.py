"""Image warps: the landmark triangulation, piecewise-affine warps of images and label maps, similarity warps."""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage
from PIL import ImageDraw

from smadlrp.data.synthetic.arrays import Image, Plane, Points, Vec
from smadlrp.data.synthetic.geometry import landmarks
from smadlrp.data.synthetic.people import neutral_capture, sample_identity


def _circumcircle_contains(p: Points, tri: tuple[int, int, int], q: Vec) -> bool:
    (ax, ay), (bx, by), (cx, cy) = p[tri[0]], p[tri[1]], p[tri[2]]
    d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    ux = ((ax**2 + ay**2) * (by - cy) + (bx**2 + by**2) * (cy - ay) + (cx**2 + cy**2) * (ay - by)) / d
    uy = ((ax**2 + ay**2) * (cx - bx) + (bx**2 + by**2) * (ax - cx) + (cx**2 + cy**2) * (bx - ax)) / d
    return bool((q[0] - ux) ** 2 + (q[1] - uy) ** 2 < (ax - ux) ** 2 + (ay - uy) ** 2 - 1e-12)


def delaunay(points: Points) -> NDArray[np.int64]:
    """Delaunay triangulation (Bowyer-Watson) of (N, 2) points; (T, 3) vertex indices, counter-clockwise."""
    n = len(points)
    lo, hi = points.min(axis=0), points.max(axis=0)
    mid, span = (lo + hi) / 2, float((hi - lo).max()) * 1e5  # far enough that no hull triangle is lost
    p = np.concatenate([points, mid + np.array([[-span, -span], [span, -span], [0.0, span]])])
    tris: list[tuple[int, int, int]] = [(n, n + 1, n + 2)]
    for i in range(n):
        bad = [t for t in tris if _circumcircle_contains(p, t, p[i])]
        edges = Counter(tuple(sorted(e)) for t in bad for e in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
        tris = [t for t in tris if t not in bad] + [(a, b, i) for (a, b), c in edges.items() if c == 1]
    kept = np.array([t for t in tris if max(t) < n], dtype=np.int64)
    a, b, c = p[kept[:, 0]], p[kept[:, 1]], p[kept[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    kept[cross < 0] = kept[cross < 0][:, [0, 2, 1]]
    return kept


@lru_cache(maxsize=1)
def triangles() -> NDArray[np.int64]:
    """The fixed triangulation of the landmark set: Delaunay of the mean landmarks of 64 reference faces."""
    rng = np.random.default_rng(20240607)
    capture = neutral_capture()
    mean = np.mean([landmarks(sample_identity(rng), capture, 1000) for _ in range(64)], axis=0)
    return delaunay(np.round(mean / 999.0, 3))


def sample_bilinear(image: Image, x: Plane, y: Plane) -> Image:
    """Bilinear sampling of `image` (H, W, C) at pixel positions (x, y) (pixel centres at integers), edges clamped;
    float32, shape x.shape + (C,)."""
    h, w = image.shape[:2]
    x = np.clip(x, 0, w - 1.0)
    y = np.clip(y, 0, h - 1.0)
    x0 = np.minimum(x.astype(np.intp), w - 2)
    y0 = np.minimum(y.astype(np.intp), h - 2)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    flat = image.reshape(h * w, -1)
    i00 = y0 * w + x0
    top = np.take(flat, i00, axis=0)
    top += fx * (np.take(flat, i00 + 1, axis=0) - top)
    bottom = np.take(flat, i00 + w, axis=0)
    bottom += fx * (np.take(flat, i00 + w + 1, axis=0) - bottom)
    return (top + fy * (bottom - top)).astype(np.float32)


def _affine_maps(src: Points, dst: Points, tris: NDArray[np.int64]) -> NDArray[np.float64]:
    """Per triangle, the (2, 3) affine matrix taking destination (x, y, 1) to source (x, y); (T, 2, 3).

    Degenerate destination triangles get the identity map."""
    d = np.concatenate([dst[tris].transpose(0, 2, 1), np.ones((len(tris), 1, 3))], axis=1)
    s = src[tris].transpose(0, 2, 1)
    ok = np.abs(np.linalg.det(d)) > 1e-9
    maps = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (len(tris), 1, 1))
    maps[ok] = s[ok] @ np.linalg.inv(d[ok])
    return maps


def triangle_ids(dst: Points, size: int, tris: NDArray[np.int64] | None = None) -> NDArray[np.intp]:
    """Which triangle of `tris` (default `triangles()`), laid out on landmarks `dst`, covers each pixel; (size, size).

    Each triangle is filled with its outline, later triangles over earlier ones, so no pixel on a shared edge is
    left out. Pixels no triangle covers get the number of triangles."""
    tris = triangles() if tris is None else tris
    ids = PILImage.new("I", (size, size), len(tris))
    draw = ImageDraw.Draw(ids)
    for n, corners in enumerate(dst[tris].reshape(len(tris), 6).tolist()):
        draw.polygon(corners, fill=n, outline=n)
    return np.asarray(ids, dtype=np.intp)


def piecewise_affine_map(src: Points, dst: Points, size: int, ids: NDArray[np.intp] | None = None,
                         tris: NDArray[np.int64] | None = None) -> tuple[Plane, Plane]:
    """Source pixel positions (x, y), each (size, size), that carry landmarks `src` onto `dst`.

    Each triangle of `tris` (default `triangles()`, the synthetic set's) in the destination geometry is mapped
    affinely onto the same triangle in the source geometry; pixels no triangle covers keep their own position.
    `ids` is `triangle_ids(dst, size, tris)` when already at hand.
    """
    tris = triangles() if tris is None else tris
    if ids is None:
        ids = triangle_ids(dst, size, tris)
    identity_map = [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]
    maps = np.concatenate([_affine_maps(src, dst, tris), identity_map]).astype(np.float32)
    per_pixel = maps[ids]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    map_x = per_pixel[..., 0, 0] * xs + per_pixel[..., 0, 1] * ys + per_pixel[..., 0, 2]
    map_y = per_pixel[..., 1, 0] * xs + per_pixel[..., 1, 1] * ys + per_pixel[..., 1, 2]
    return map_x, map_y


def warp_piecewise_affine(image: Image, src: Points, dst: Points, ids: NDArray[np.intp] | None = None,
                          tris: NDArray[np.int64] | None = None) -> Image:
    """Warp `image` (H, W, C) so that its landmarks `src` land on `dst` (per-triangle affine over `tris`, default
    `triangles()`; bilinear).

    `ids` is `triangle_ids(dst, size, tris)` when already at hand (several images warped onto the same landmarks)."""
    map_x, map_y = piecewise_affine_map(src, dst, image.shape[0], ids, tris)
    return sample_bilinear(image, map_x, map_y)


def warp_labels(labels: NDArray[np.uint8], src: Points, dst: Points,
                ids: NDArray[np.intp] | None = None) -> NDArray[np.uint8]:
    """`warp_piecewise_affine` for an (H, W) label map: nearest neighbour, so labels stay labels."""
    map_x, map_y = piecewise_affine_map(src, dst, labels.shape[0], ids)
    h, w = labels.shape
    rows = np.clip(np.rint(map_y), 0, h - 1).astype(np.intp)
    cols = np.clip(np.rint(map_x), 0, w - 1).astype(np.intp)
    return labels[rows, cols]


def warp_similarity(image: Image, angle: float, scale: float, shift: Vec, *, nearest: bool = False) -> Image:
    """Rotate (radians) and scale `image` (H, W, C) about its centre, then shift by `shift` pixels.

    Bilinear (nearest neighbour with `nearest`, for label maps), edges replicated; moves of up to a tenth of
    the image size are supported."""
    size = image.shape[0]
    c, pad = (size - 1) / 2.0, size // 10 + 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # PIL samples the source at a*(x+0.5) + b*(y+0.5) + c0 with pixel centres at +0.5; fold that in
    x0 = pad + c - cos * (c + shift[0]) - sin * (c + shift[1]) + 0.5 - 0.5 * (cos + sin)
    y0 = pad + c + sin * (c + shift[0]) - cos * (c + shift[1]) + 0.5 - 0.5 * (cos - sin)
    coeffs = (cos, sin, x0, -sin, cos, y0)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    resample = PILImage.Resampling.NEAREST if nearest else PILImage.Resampling.BILINEAR
    channels = [np.asarray(PILImage.fromarray(np.ascontiguousarray(padded[..., i]), mode="F").transform(
        (size, size), PILImage.Transform.AFFINE, coeffs, resample=resample)) for i in range(image.shape[2])]
    return np.stack(channels, axis=2).astype(np.float32)
