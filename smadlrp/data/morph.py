"""Landmark morphs of real faces: faces aligned into one frame, Delaunay warps, complete and splicing morphs, masks.

Images are float32 RGB arrays (H, W, 3) in [0, 1]; points are float64 (N, 2) pixel positions (x, y), pixel
centres at integers (as in smadlrp/data/synthetic/arrays.py).

- Alignment: a similarity transform (rotation, uniform scale, shift) takes each face into a square `size` frame,
  the eye centres onto EYE_TEMPLATE (landmark layouts with known eyes), else all landmarks onto a template shape
  by least squares. A face shrunk by more than half is first resized with an antialiasing filter.
- Geometry: the morph landmarks are `(1 - alpha) * La + alpha * Lb`. Next to them lie fixed points that every
  geometry shares: an anchor ring (the convex hull of both faces' landmarks, grown by ANCHOR_GROWTH about their
  centroid, inside the image) and points on the image border. One Delaunay triangulation of the morph geometry
  tiles the whole image, and each contributor is warped onto it triangle by triangle (affine, bilinear): inside
  the ring the landmarks move, outside it nothing moves.
- `complete`: both warped faces alpha-blended over the whole image. `splicing`: the blended face pasted into
  contributor a warped onto the morph geometry, inside the face hull, with a feathered seam or Poisson blending.
- Mask (8-bit): the share of the blended face per pixel, 255 = a blend of both faces, 0 = contributor a alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage

from smadlrp.data.synthetic.arrays import Image, Plane, Points
from smadlrp.data.synthetic.raster import polygon_mask
from smadlrp.data.synthetic.warp import delaunay, piecewise_affine_map, sample_bilinear, triangle_ids

SPECIES = ("complete", "splicing")
SEAMS = ("feather", "poisson")
EYE_TEMPLATE = ((0.35, 0.40), (0.65, 0.40))  # where the image-left and image-right eye centres go, share of the side
SHAPE_CENTRE, SHAPE_SPREAD = (0.5, 0.55), 0.2  # a template shape: its centroid and RMS radius, shares of the side
ANCHOR_GROWTH = 1.3  # the anchor ring: the faces' joint hull grown by this factor about their centroid
BORDER_PER_SIDE = 4  # border points: the corners and 3 more on every side


# ---- alignment ---------------------------------------------------------------------------------------------------


def _complex(points: Points) -> NDArray[np.complex128]:
    return points[:, 0] + 1j * points[:, 1]


def _points(z: NDArray[np.complex128]) -> Points:
    return np.stack([z.real, z.imag], axis=1)


def fit_similarity(src: Points, dst: Points) -> tuple[complex, complex]:
    """The similarity z -> a * z + b (complex pixel positions) taking `src` closest to `dst` (least squares;
    exact for two points)."""
    s, d = _complex(src), _complex(dst)
    s0, d0 = s - s.mean(), d - d.mean()
    a = complex(np.sum(np.conj(s0) * d0) / max(float(np.sum(np.abs(s0) ** 2)), 1e-12))
    return a, complex(d.mean() - a * s.mean())


def mean_shape(shapes: Sequence[Points], size: int, iterations: int = 10) -> Points:
    """A template shape for landmarks of unknown layout: the generalised Procrustes mean of `shapes` (each (K, 2);
    the first one's orientation), centred at SHAPE_CENTRE with RMS radius SHAPE_SPREAD of the side `size`."""

    def normalised(z: NDArray[np.complex128]) -> NDArray[np.complex128]:
        z = z - z.mean()
        return z / max(float(np.sqrt(np.mean(np.abs(z) ** 2))), 1e-12)

    zs = [normalised(_complex(s)) for s in shapes]
    mean = zs[0]
    for _ in range(iterations):
        fitted = [z * (np.sum(np.conj(z) * mean) / np.sum(np.abs(z) ** 2)) for z in zs]
        mean = normalised(np.mean(fitted, axis=0))
    centre = complex(SHAPE_CENTRE[0], SHAPE_CENTRE[1]) * (size - 1)
    return _points(centre + SHAPE_SPREAD * size * mean)


def _reference(points: Points, eyes: tuple[Points, Points] | None, size: int,
               template: Points | None) -> tuple[Points, Points]:
    """(source points, where they go) that define a face's alignment."""
    if template is not None:
        return points, template
    if eyes is None:
        raise ValueError("aligning landmarks of unknown layout needs a template shape")
    return np.stack(eyes), np.array(EYE_TEMPLATE) * (size - 1)


def align_face(image: PILImage.Image, points: Points, size: int, *, eyes: tuple[Points, Points] | None = None,
               template: Points | None = None) -> tuple[Image, Points]:
    """The face of `image` with landmarks `points` (K, 2) in the `size` x `size` frame, and its landmarks there.

    The eye centres `eyes` (image-left, image-right) go onto EYE_TEMPLATE, or, with `template` (K, 2), all
    landmarks onto it by least squares. Bilinear sampling; beyond the photo's edge its edge pixels are repeated."""
    src, dst = _reference(points, eyes, size, template)
    a, _ = fit_similarity(src, dst)
    rgb = image.convert("RGB")
    if abs(a) < 0.5:  # shrinking: resize with an antialiasing filter first, so the bilinear warp does not alias
        w, h = max(2, round(rgb.width * abs(a))), max(2, round(rgb.height * abs(a)))
        factor = np.array([w / rgb.width, h / rgb.height])
        points, src = (points + 0.5) * factor - 0.5, (src + 0.5) * factor - 0.5
        rgb = rgb.resize((w, h), PILImage.Resampling.LANCZOS)
    a, b = fit_similarity(src, dst)
    ys, xs = np.mgrid[0:size, 0:size]
    source = (xs + 1j * ys - b) / a
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    crop = sample_bilinear(pixels, source.real.astype(np.float32), source.imag.astype(np.float32))
    return crop, _points(a * _complex(points) + b)


def to_uint8(image: NDArray[np.float32]) -> NDArray[np.uint8]:
    """[0, 1] float image -> 8-bit (rounded)."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---- geometry ----------------------------------------------------------------------------------------------------


def convex_hull(points: Points) -> Points:
    """The convex hull's vertices of (N, 2) points, counter-clockwise in (x, y) (Andrew's monotone chain)."""
    unique = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(unique) < 3:
        return np.array(unique, dtype=np.float64).reshape(-1, 2)

    def cross(o: tuple[float, ...], a: tuple[float, ...], b: tuple[float, ...]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    chains: list[list[tuple[float, ...]]] = [[], []]
    for chain, ordered in zip(chains, (unique, unique[::-1]), strict=True):
        for p in ordered:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
    return np.array(chains[0][:-1] + chains[1][:-1], dtype=np.float64)


def border_points(size: int, per_side: int = BORDER_PER_SIDE) -> Points:
    """Points along the image border (pixel centres 0 and size - 1): the corners and per_side - 1 per side."""
    edge = np.linspace(0.0, size - 1.0, per_side + 1)
    last = size - 1.0
    sides = [[(x, 0.0) for x in edge[:-1]], [(last, y) for y in edge[:-1]], [(x, last) for x in edge[:0:-1]],
             [(0.0, y) for y in edge[:0:-1]]]
    return np.array([p for side in sides for p in side], dtype=np.float64)


def anchor_ring(la: Points, lb: Points, size: int, growth: float = ANCHOR_GROWTH, keep: float = 3.0) -> Points:
    """Fixed points around both faces: the vertices of their joint convex hull grown by `growth` about the
    landmarks' centroid; points within `keep` px of the border (or beyond it) or of an earlier ring point are
    left out."""
    both = np.concatenate([la, lb])
    centre = both.mean(axis=0)
    ring: list[Points] = []
    for p in centre + growth * (convex_hull(both) - centre):
        inside = bool((p >= keep).all() and (p <= size - 1 - keep).all())
        if inside and all(float(np.hypot(*(p - q))) >= keep for q in ring):
            ring.append(p)
    return np.array(ring, dtype=np.float64).reshape(-1, 2)


def triangulate(points: Points) -> NDArray[np.int64]:
    """Delaunay triangles (T, 3) of (N, 2) points (counter-clockwise); points repeating an earlier one (to 1e-6
    px) are left out of the triangles. Computed in unit coordinates, where the Bowyer-Watson tests are exact
    enough for the collinear border points."""
    keys = np.round(points, 6)
    _, first = np.unique(keys, axis=0, return_index=True)
    kept = np.sort(first)
    lo, span = points[kept].min(axis=0), float(np.ptp(points[kept], axis=0).max()) or 1.0
    return kept[delaunay((points[kept] - lo) / span)]


@dataclass(frozen=True)
class MorphGeometry:
    """Both contributors' points and the morph's, in the same order: `faces` face landmarks, then the anchor ring,
    then the border points; `tris` triangulates `points_m` and `ids` says which triangle covers each pixel."""

    points_a: Points
    points_b: Points
    points_m: Points
    faces: int
    tris: NDArray[np.int64]
    ids: NDArray[np.intp]
    size: int

    def maps(self) -> tuple[tuple[Plane, Plane], tuple[Plane, Plane]]:
        """Per contributor, the source pixel positions (map_x, map_y), each (size, size), that the morph's pixels
        are sampled from."""
        return (piecewise_affine_map(self.points_a, self.points_m, self.size, self.ids, self.tris),
                piecewise_affine_map(self.points_b, self.points_m, self.size, self.ids, self.tris))

    def hull(self) -> NDArray[np.bool_]:
        """(size, size) True inside the convex hull of the morph's face landmarks (pixel centres)."""
        return polygon_mask(convex_hull(self.points_m[: self.faces]), self.size) > 0.5


def morph_geometry(la: Points, lb: Points, alpha: float, size: int) -> MorphGeometry:
    """The morph geometry of two aligned faces' landmarks (K, 2) with contributor b's share `alpha`."""
    if la.shape != lb.shape:
        raise ValueError(f"landmarks of different shapes: {la.shape} and {lb.shape}")
    fixed = np.concatenate([anchor_ring(la, lb, size), border_points(size)])
    lm = (1 - alpha) * la + alpha * lb
    points_m = np.concatenate([lm, fixed])
    tris = triangulate(points_m)
    return MorphGeometry(np.concatenate([la, fixed]), np.concatenate([lb, fixed]), points_m, len(la), tris,
                         triangle_ids(points_m, size, tris), size)


# ---- morphs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Morph:
    """A morph (H, W, 3) and its mask (H, W) uint8, with both warped contributors and the geometry."""

    image: Image
    mask: NDArray[np.uint8]
    warped_a: Image
    warped_b: Image
    geometry: MorphGeometry


def feather_weight(region: NDArray[np.bool_], width: float) -> Plane:
    """(H, W) weights in [0, 1]: 0 outside `region`, rising smoothly (smoothstep of the distance to the nearest
    pixel outside, over `width` px) to 1 deeper inside. The seam lies inside the region."""
    if width <= 0:
        return region.astype(np.float32)
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]  # the image's edge counts as outside
    t = np.clip((depth - 0.5) / width, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def poisson_paste(target: Image, source: Image, region: NDArray[np.bool_]) -> Image:
    """`target` with `source` pasted inside `region` by Poisson blending: inside, the result keeps `source`'s
    gradients and meets `target` at the region's boundary (4-neighbour Laplacian, sparse LU); outside it is
    `target` exactly."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import factorized

    inner = region.copy()
    inner[[0, -1], :] = inner[:, [0, -1]] = False
    ys, xs = np.nonzero(inner)
    if len(ys) == 0:
        return target.copy()
    index = np.full(inner.shape, -1, dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    rows, cols = [np.arange(len(ys))], [np.arange(len(ys))]
    data = [np.full(len(ys), 4.0)]
    rhs = 4.0 * source[ys, xs].astype(np.float64)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        rhs -= source[ny, nx]
        neighbour = index[ny, nx]
        inside = neighbour >= 0
        rows.append(np.nonzero(inside)[0])
        cols.append(neighbour[inside])
        data.append(np.full(int(inside.sum()), -1.0))
        rhs[~inside] += target[ny[~inside], nx[~inside]]
    matrix = coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(len(ys), len(ys))).tocsc()
    solve = factorized(matrix)
    out = target.copy()
    for channel in range(target.shape[2]):
        out[ys, xs, channel] = solve(np.ascontiguousarray(rhs[:, channel]))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def make_morph(a: Image, b: Image, la: Points, lb: Points, alpha: float, species: str, *, seam: str = "feather",
               feather: float = 8.0) -> Morph:
    """Morph two aligned faces (H, W, 3) with landmarks `la`, `lb` (K, 2); `alpha` is contributor b's share.

    complete: (1 - alpha) * warped_a + alpha * warped_b everywhere; mask 255 inside the face hull (outside it the
    two warped pictures, hair, neck and backdrop, are blended as well, but no face is). splicing: warped_a with
    the blended face pasted inside the face hull; `seam` feather: blend weight `feather_weight(hull, feather)`,
    mask = that weight; poisson: Poisson blending inside the hull, mask 255 inside it. Where the mask is 0 a
    splicing morph equals warped_a exactly, and beyond the anchor ring warped_a is contributor a itself."""
    if species not in SPECIES:
        raise ValueError(f"unknown morph species {species!r}")
    if seam not in SEAMS:
        raise ValueError(f"unknown seam {seam!r}")
    size = a.shape[0]
    geometry = morph_geometry(la, lb, alpha, size)
    (ax, ay), (bx, by) = geometry.maps()
    wa, wb = sample_bilinear(a, ax, ay), sample_bilinear(b, bx, by)
    blended = ((1 - alpha) * wa + alpha * wb).astype(np.float32)
    hull = geometry.hull()
    if species == "complete":
        return Morph(blended, hull.astype(np.uint8) * 255, wa, wb, geometry)
    if seam == "poisson":
        hull[[0, -1], :] = hull[:, [0, -1]] = False  # the image's edge pixels stay contributor a's
        return Morph(poisson_paste(wa, blended, hull), hull.astype(np.uint8) * 255, wa, wb, geometry)
    mask = np.rint(feather_weight(hull, feather) * 255).astype(np.uint8)
    weight = (mask.astype(np.float32) / 255)[..., None]  # the mask is the blend weight, exactly
    image = ((1 - weight) * wa + weight * blended).astype(np.float32)
    return Morph(image, mask, wa, wb, geometry)
