"""Landmark morphs: two contributors warped to shared landmarks, blended in a region, with artifact masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from smadlrp.data.regions import REGION_ID
from smadlrp.data.synthetic.arrays import Image, Plane, Points
from smadlrp.data.synthetic.config import SynthConfig
from smadlrp.data.synthetic.geometry import EYES, JAW, NOSE_ROOT, landmarks
from smadlrp.data.synthetic.labels import region_labels
from smadlrp.data.synthetic.plan import SamplePlan
from smadlrp.data.synthetic.raster import gaussian_blur, polygon_mask
from smadlrp.data.synthetic.sources import capture, contributor, identity
from smadlrp.data.synthetic.warp import triangle_ids, warp_labels, warp_piecewise_affine

MASK_THRESHOLD = 0.08  # mean absolute RGB difference (0..1) that counts as "the sources differ noticeably"


@dataclass(frozen=True)
class MorphParts:
    """A morph before the shared post-processing, with what it was made from (all (H, W[, 3]) float32).

    `image` is warped_a + region * blend * (warped_b - warped_a) with its contrast and fine detail restored
    inside the region; `region` is the soft blend region in [0, 1]; `mask` (bool) marks the artifacts;
    `regions` (uint8) are the face-region ids (see `_blend_labels`).
    """

    image: Image
    warped_a: Image
    warped_b: Image
    region: Plane
    mask: NDArray[np.bool_]
    regions: NDArray[np.uint8]


def _ellipse_mask(centre: NDArray[np.float64], rx: float, ry: float, size: int) -> Plane:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return (((xs - centre[0]) / rx) ** 2 + ((ys - centre[1]) / ry) ** 2 <= 1.0).astype(np.float32)


def _inner_face(points: Points, size: int) -> Plane:
    """Hard mask (H, W) of the inner face: inside the jaw line and up to just above the brows."""
    unit = float(np.linalg.norm(points[JAW[0]] - points[JAW[-1]])) / 2
    centre = points[list(EYES) + [JAW[6]]].mean(axis=0)
    jaw = centre + 0.93 * (points[list(JAW)] - centre)
    brows = points[list(EYES)] + np.array([0.0, -0.6 * unit])
    return polygon_mask(np.concatenate([jaw, brows]), size)


def _partial_region(points: Points, region: str, size: int) -> Plane:
    """Hard mask (H, W) of one facial region in the geometry `points`."""
    unit = float(np.linalg.norm(points[JAW[0]] - points[JAW[-1]])) / 2
    if region == "hair":
        below_cheeks = np.mgrid[0:size, 0:size][0] > points[JAW[2], 1]
        return ((1 - _inner_face(points, size)) * (1 - below_cheeks)).astype(np.float32)
    if region == "eyes":
        mask = np.zeros((size, size), dtype=np.float32)
        for pair in (EYES[:2], EYES[2:]):
            corners = points[list(pair)]
            centre = corners.mean(axis=0) - np.array([0.0, 0.2 * unit])
            rx = float(np.abs(corners[0, 0] - corners[1, 0])) / 2 + 0.2 * unit
            mask = np.maximum(mask, _ellipse_mask(centre, rx, 0.48 * unit, size))
        return mask
    # nose and mouth sit on the line from the nose root to the chin, about a third and two thirds down
    root, chin = points[NOSE_ROOT], points[JAW[6]]
    share, rx, ry = {"nose": (0.36, 0.4, 0.38), "mouth": (0.68, 0.5, 0.3)}[region]
    return _ellipse_mask(root + share * (chin - root), rx * unit, ry * unit, size)


def _subject_region(matte_a: Plane, matte_b: Plane) -> Plane:
    """Hard mask (H, W) of where either warped contributor shows head, hair, ears or neck, grown by ~3 px."""
    size = matte_a.shape[0]
    either = np.maximum(matte_a, matte_b)
    return (gaussian_blur(either, 1.5 * size / 128) > 0.02).astype(np.float32)


def _high_pass(image: NDArray[np.float32]) -> NDArray[np.float32]:
    """What a Gaussian blur (sigma 1 px) removes: the fine detail, same shape as `image`."""
    return image - gaussian_blur(image, 1.0)


def _local_energy(detail: Plane) -> Plane:
    """Local mean (Gaussian, sigma 3 px) of a squared high-pass residual, (H, W)."""
    return gaussian_blur(detail**2, 3.0)


def _detail_energy(image: Image) -> Plane:
    """Local fine-detail energy of an image's luminance (channel mean), (H, W)."""
    return _local_energy(_high_pass(image.mean(axis=2)))


def _restore_detail(morph: Image, target: Plane) -> Image:
    """Scale the morph's high-pass residual so its local luminance energy matches `target` (gain 1 to 3)."""
    detail = _high_pass(morph)
    gain = np.clip(np.sqrt(target / (_local_energy(detail.mean(axis=2)) + 1e-8)), 1.0, 3.0)
    return np.clip(morph + (gain - 1)[..., None] * detail, 0.0, 1.0).astype(np.float32)


def morph_parts(config: SynthConfig, plan: SamplePlan,
                contributors: tuple[Image, Image] | None = None) -> MorphParts:
    """Make the morph `plan` describes, before post-processing: warp both contributors to the morph landmarks
    (per-triangle affine), blend them inside the morph region, restore the fine detail and contrast that
    blending two independent faces removes, and mark where the two aligned sources differ noticeably.

    `contributors` are the two `contributor` captures when already at hand (they are drawn otherwise)."""
    if plan.label != "morph" or len(plan.captures) != 2:
        raise ValueError("morph_parts needs a morph plan")
    size = config.image_size
    if contributors is None:
        contributors = (contributor(config, *plan.captures[0]), contributor(config, *plan.captures[1]))
    pa, pb = (landmarks(identity(config, p), capture(config, p, c), size) for p, c in plan.captures)
    pm = (1 - plan.blend) * pa + plan.blend * pb
    ids = triangle_ids(pm, size)
    warped = [warp_piecewise_affine(c, p, pm, ids) for c, p in zip(contributors, (pa, pb), strict=True)]
    wa, wb = warped[0][..., :3], warped[1][..., :3]
    subject = _subject_region(warped[0][..., 3], warped[1][..., 3])
    if plan.morph_type == "complete":
        hard = subject
        region = gaussian_blur(hard, 2.0 * size / 128)
    elif plan.morph_type == "splicing":
        hard = _inner_face(pm, size)
        region = gaussian_blur(hard, 0.6 * size / 128)
    else:
        hard = _partial_region(pm, plan.region, size) * subject
        region = gaussian_blur(hard, 1.0 * size / 128)
    weight = (region * plan.blend)[..., None]
    blended = wa + weight * (wb - wa)
    target = (1 - weight[..., 0]) * _detail_energy(wa) + weight[..., 0] * _detail_energy(wb)
    contrast = _match_contrast(blended, wa, wb, float(weight.mean()))
    image = _restore_detail(blended + region[..., None] * (contrast - blended), target)
    differ = gaussian_blur(np.abs(wa - wb).mean(axis=2), 0.7) > MASK_THRESHOLD
    mask = differ & (region > 0.5)
    if plan.morph_type == "splicing":
        soft = gaussian_blur(hard, 1.5 * size / 128)
        mask |= (soft > 0.03) & (soft < 0.97)
    labels = [warp_labels(region_labels(identity(config, p), capture(config, p, c), size), pts, pm,
                                ids) for (p, c), pts in zip(plan.captures, (pa, pb), strict=True)]
    regions = _blend_labels(labels[0], labels[1], region > 0.5)
    return MorphParts(image=image, warped_a=wa, warped_b=wb, region=region, mask=mask, regions=regions)


# how strongly a region claims a pixel that the two contributors of a morph label differently
_RANK = np.zeros(len(REGION_ID), dtype=np.uint8)
for _name, _rank in {"hair": 1, "face-skin": 2, "face-outline": 3, "brows": 4, "left-eye": 5, "right-eye": 5,
                     "nose": 5, "mouth": 5}.items():
    _RANK[REGION_ID[_name]] = _rank


def _blend_labels(labels_a: NDArray[np.uint8], labels_b: NDArray[np.uint8],
                  blended: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """A morph's region ids: contributor a's outside the blended area; inside it, where either aligned
    contributor shows a feature (features over the outline, over skin, over hair, over background), so the
    double edges of a ghosted feature fall into its region."""
    b_wins = blended & (_RANK[labels_b] > _RANK[labels_a])
    return np.where(b_wins, labels_b, labels_a)


def _spread(image: Image) -> NDArray[np.float32]:
    """Per-channel standard deviation of an (H, W, 3) image, shape (3,)."""
    return np.ascontiguousarray(image.reshape(-1, 3).T).std(axis=1)  # contiguous rows reduce much faster


def _match_contrast(image: Image, wa: Image, wb: Image, share_b: float) -> Image:
    """Rescale each channel about its mean so its spread matches the mix of the contributors' spreads.

    Blending two faces whose structures do not line up lowers the image's contrast, a global cue."""
    target = np.sqrt((1 - share_b) * _spread(wa) ** 2 + share_b * _spread(wb) ** 2)
    mean, std = np.ascontiguousarray(image.reshape(-1, 3).T).mean(axis=1), _spread(image)
    return np.clip(mean + (image - mean) * (target / np.maximum(std, 1e-6)), 0.0, 1.0).astype(np.float32)
