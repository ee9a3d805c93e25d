"""`smadlrp morph`: landmark morphs of real faces. The image maths on hand-made landmarks (the warp covers every
pixel, a complete morph is the blend of both warps, a splice equals its contributor where its mask is 0), pair
selection, landmark CSVs, the command end to end on a landmark CSV, refused inputs, and (with the align extra)
dlib's 68 landmarks on two real portraits."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import astronaut_photo, hopper_photo
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.landmarks import CsvLandmarks, eye_centres, read_landmark_csv
from smadlrp.data.loading import DataSource
from smadlrp.data.morph import (
    EYE_TEMPLATE,
    align_face,
    anchor_ring,
    convex_hull,
    make_morph,
    mean_shape,
    morph_geometry,
)
from smadlrp.data.morph_pairs import possible_pairs, random_pairs, similar_pairs, split_quotas
from smadlrp.data.morph_writer import MANIFEST_COLUMNS, PROTOCOL_COLUMNS, MorphSettings, read_inputs
from smadlrp.data.protocol import read_protocol
from smadlrp.data.synthetic.raster import polygon_mask
from smadlrp.data.synthetic.warp import sample_bilinear

runner = CliRunner()
SIZE = 128


def face68(cx: float, cy: float, s: float, rng: np.random.Generator | None = None, jitter: float = 0.0) -> np.ndarray:
    """A hand-made face in the iBUG 68-point layout: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47 (36-41 on the
    image's left), mouth 48-67; `s` is about half the face width, px."""
    pts: list[tuple[float, float]] = []
    pts += [(cx - s * np.cos(np.pi * i / 16), cy - 0.3 * s + 1.1 * s * np.sin(np.pi * i / 16)) for i in range(17)]
    for left in (-0.8, 0.28):
        pts += [(cx + (left + 0.13 * i) * s, cy - (0.75 + 0.05 * np.sin(np.pi * i / 4)) * s) for i in range(5)]
    pts += [(cx, cy - (0.55 - 0.12 * i) * s) for i in range(4)]
    pts += [(cx + (-0.2 + 0.1 * i) * s, cy) for i in range(5)]
    for side in (-1, 1):
        pts += [(cx + side * 0.45 * s - 0.15 * s * np.cos(t), cy - 0.5 * s - 0.06 * s * np.sin(t))
                for t in 2 * np.pi * np.arange(6) / 6]
    pts += [(cx - 0.35 * s * np.cos(t), cy + 0.3 * s - 0.12 * s * np.sin(t)) for t in 2 * np.pi * np.arange(12) / 12]
    pts += [(cx - 0.25 * s * np.cos(t), cy + 0.3 * s - 0.04 * s * np.sin(t)) for t in 2 * np.pi * np.arange(8) / 8]
    points = np.array(pts, dtype=np.float64)
    return points if rng is None else points + rng.normal(0.0, jitter, points.shape)


def ramps(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Two images whose values are linear in the position (so bilinear sampling is exact): a in x, b in y."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    a = 0.2 + 0.6 * xs / (size - 1)
    b = 0.3 + 0.5 * ys / (size - 1)
    return np.repeat(a[..., None], 3, axis=2), np.repeat(b[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return face68(64, 70, 30, rng, 1.5), face68(66, 66, 33, rng, 1.5)


# ---- geometry and maths ------------------------------------------------------------------------------------------


def test_the_triangulation_tiles_the_whole_image(pair: tuple[np.ndarray, np.ndarray]) -> None:
    geometry = morph_geometry(*pair, 0.5, SIZE)
    assert (geometry.ids < len(geometry.tris)).all()  # every pixel is covered by a triangle
    p = geometry.points_m
    a, b, c = p[geometry.tris[:, 0]], p[geometry.tris[:, 1]], p[geometry.tris[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    assert (cross > 0).all()
    assert cross.sum() / 2 == pytest.approx((SIZE - 1) ** 2, rel=1e-9)  # no hole, no overlap
    assert set(range(geometry.faces)) <= set(geometry.tris.ravel().tolist())  # every landmark is a vertex
    ring = geometry.points_m[geometry.faces:len(geometry.points_m) - 16]
    assert len(ring) >= 6 and np.array_equal(geometry.points_a[geometry.faces:], geometry.points_b[geometry.faces:])


def test_a_complete_morph_is_the_blend_of_both_warps_everywhere(pair: tuple[np.ndarray, np.ndarray]) -> None:
    la, lb = pair
    a, b = ramps()
    alpha = 0.4
    morph = make_morph(a, b, la, lb, alpha, "complete")
    (ax, ay), (bx, by) = morph.geometry.maps()
    hull = morph.geometry.hull()
    assert hull.sum() > 0.15 * SIZE * SIZE
    # the exact blend of the two per-pixel warps, with the warps' own sampler and in closed form for the ramps
    expected = (1 - alpha) * sample_bilinear(a, ax, ay) + alpha * sample_bilinear(b, bx, by)
    np.testing.assert_allclose(morph.image, expected, atol=1e-6)
    closed = (1 - alpha) * (0.2 + 0.6 * ax / (SIZE - 1)) + alpha * (0.3 + 0.5 * by / (SIZE - 1))
    np.testing.assert_allclose(morph.image[..., 0][hull], closed[hull], atol=1e-5)
    for mx, my in ((ax, ay), (bx, by)):  # every source position lies inside its image: no black spots
        assert mx[hull].min() >= -1e-3 and mx[hull].max() <= SIZE - 1 + 1e-3
        assert my[hull].min() >= -1e-3 and my[hull].max() <= SIZE - 1 + 1e-3
    assert morph.image.min() >= 0.2 - 1e-6
    # no unwarped triangle: on every triangle's pixels each map is the affine map taking that triangle of the morph
    # geometry onto the same triangle of the contributor's
    geometry = morph.geometry
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    checked = 0
    for t in np.unique(geometry.ids):
        on = geometry.ids == t
        design = np.stack([xs[on], ys[on], np.ones(int(on.sum()))], axis=1).astype(np.float64)
        if len(design) < 6 or np.linalg.matrix_rank(design) < 3:
            continue
        corners = np.c_[geometry.points_m[geometry.tris[t]], np.ones(3)]
        for (mx, my), points in (((ax, ay), geometry.points_a), ((bx, by), geometry.points_b)):
            fit = np.linalg.lstsq(design, np.stack([mx[on], my[on]], axis=1).astype(np.float64), rcond=None)[0]
            np.testing.assert_allclose(corners @ fit, points[geometry.tris[t]], atol=2e-3)
        checked += 1
    assert checked > 0.8 * len(geometry.tris)
    assert set(np.unique(morph.mask).tolist()) == {0, 255}
    assert np.array_equal(morph.mask == 255, hull)


def test_a_splice_equals_its_contributor_where_its_mask_is_zero(pair: tuple[np.ndarray, np.ndarray]) -> None:
    la, lb = pair
    rng = np.random.default_rng(1)
    a, b = (rng.uniform(0.1, 0.9, (SIZE, SIZE, 3)).astype(np.float32) for _ in range(2))
    morph = make_morph(a, b, la, lb, 0.5, "splicing", feather=6.0)
    outside = morph.mask == 0
    assert np.array_equal(morph.image[outside], morph.warped_a[outside])  # exactly
    blended = 0.5 * morph.warped_a + 0.5 * morph.warped_b
    weight = morph.mask.astype(np.float32)[..., None] / 255
    np.testing.assert_allclose(morph.image, morph.warped_a + weight * (blended - morph.warped_a), atol=1e-6)
    hull = morph.geometry.hull()
    assert not (morph.mask[~hull]).any() and (morph.mask[hull] == 255).mean() > 0.6
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(np.pad(hull, 1))[1:-1, 1:-1]
    soft = (morph.mask > 0) & (morph.mask < 255)
    assert soft.any() and depth[soft].max() <= 6.5  # the seam lies within the feather width inside the hull
    # beyond the anchor ring nothing moves: there the splice is contributor a's own crop
    ring = anchor_ring(la, lb, SIZE)
    beyond = distance_transform_edt(polygon_mask(convex_hull(ring), SIZE) < 0.5) > 1.5  # a pixel clear of the ring
    np.testing.assert_allclose(morph.image[beyond], a[beyond], atol=1e-5)


def test_a_poisson_splice_changes_only_the_face_hull(pair: tuple[np.ndarray, np.ndarray]) -> None:
    la, lb = pair
    a, _ = ramps()
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    b = np.repeat((0.5 + 0.2 * np.sin(xs / 3) * np.sin(ys / 4))[..., None], 3, axis=2)  # texture b brings in
    morph = make_morph(a, b, la, lb, 0.5, "splicing", seam="poisson")
    inside = morph.mask == 255
    assert np.array_equal(morph.image[~inside], morph.warped_a[~inside])
    assert np.array_equal(inside, morph.geometry.hull() & (morph.mask == 255))
    # the Poisson equation, pixel by pixel: the result's 4-neighbour Laplacian is the blend's inside the hull
    blended = (0.5 * morph.warped_a + 0.5 * morph.warped_b).astype(np.float64)

    def laplacian(image: np.ndarray) -> np.ndarray:
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        return 4 * image - padded[:-2, 1:-1] - padded[2:, 1:-1] - padded[1:-1, :-2] - padded[1:-1, 2:]

    np.testing.assert_allclose(laplacian(morph.image.astype(np.float64))[inside], laplacian(blended)[inside],
                               atol=2e-5)
    assert np.abs(morph.image - morph.warped_a)[inside].max() > 0.05  # and it is not contributor a


def test_alignment_puts_the_eyes_on_the_template_and_samples_where_it_says() -> None:
    h, w = 300, 260
    ys, xs = np.mgrid[0:h, 0:w]
    coded = np.stack([xs % 256, ys % 256, (xs // 256) * 100 + (ys // 256) * 10], axis=2).astype(np.uint8)
    points = face68(130, 160, 55)
    crop, aligned = align_face(Image.fromarray(coded), points, SIZE, eyes=eye_centres(points))
    left, right = eye_centres(aligned)  # type: ignore[misc]
    np.testing.assert_allclose([left, right], np.array(EYE_TEMPLATE) * (SIZE - 1), atol=1e-9)
    # the crop's pixel at an aligned landmark holds the code of the source pixel at that landmark
    for source, target in zip(points[::7], aligned[::7], strict=True):
        col, row = np.rint(target).astype(int)
        if 0 <= col < SIZE and 0 <= row < SIZE:
            x = crop[row, col, 0] * 255 + (crop[row, col, 2] * 255 // 100) * 256
            y = crop[row, col, 1] * 255
            assert abs(x - source[0]) < 1.5 and abs(y - source[1]) < 1.5
    # a face shrunk by more than half is resized with antialiasing first; the landmarks follow
    big = face68(500, 560, 200)
    _, small = align_face(Image.new("RGB", (1000, 1100), (128, 128, 128)), big, SIZE, eyes=eye_centres(big))
    np.testing.assert_allclose(eye_centres(small), np.array(EYE_TEMPLATE) * (SIZE - 1), atol=1e-6)


def test_landmarks_of_unknown_layout_are_aligned_onto_their_mean_shape() -> None:
    rng = np.random.default_rng(3)
    base = face68(100, 100, 40)[[0, 8, 16, 30, 36, 45, 48, 54]]
    shapes = [base * s + shift + rng.normal(0, 0.5, base.shape) for s, shift in ((1.0, 0), (1.3, 20), (0.8, -10))]
    template = mean_shape(shapes, SIZE)
    aligned = [align_face(Image.new("RGB", (250, 250)), s, SIZE, template=template)[1] for s in shapes]
    for points in aligned:
        assert np.abs(points - template).max() < 3.0  # scale and position removed
    assert np.sqrt(((template - template.mean(axis=0)) ** 2).sum(axis=1).mean()) == pytest.approx(0.2 * SIZE)


# ---- pairs --------------------------------------------------------------------------------------------------------


def test_random_pairs_are_distinct_and_of_two_subjects() -> None:
    subjects = ["s1", "s1", "s2", "s3", "s3", "s4"]
    assert possible_pairs(subjects) == 15 - 2
    pairs = random_pairs(subjects, 100, random.Random(0))
    assert len(pairs) == 13
    assert all(subjects[p.a] != subjects[p.b] for p in pairs)
    assert len({frozenset((p.a, p.b)) for p in pairs}) == 13
    assert pairs[:3] == random_pairs(subjects, 3, random.Random(0))  # seeded
    big = [f"s{i}" for i in range(1000)]  # drawn one by one (too many to list)
    drawn = random_pairs(big, 50, random.Random(1))
    assert len({frozenset((p.a, p.b)) for p in drawn}) == 50


def test_similar_pairs_take_each_faces_nearest_other_subject() -> None:
    subjects = ["a", "a", "b", "c"]
    embeddings = [np.array([0.0, 0.0]), np.array([0.1, 0.0]), np.array([0.3, 0.0]), np.array([5.0, 0.0])]
    pairs = similar_pairs(subjects, [*embeddings[:3], embeddings[3]], 10, random.Random(0))
    found = {(p.a, p.b): p.distance for p in pairs}
    assert found.get((3, 2)) == pytest.approx(4.7)  # c's nearest is b
    assert found.get((2, 1)) == pytest.approx(0.2)  # b's nearest is a's second image (not its own subject)
    assert all(subjects[p.a] != subjects[p.b] for p in pairs)
    assert len({frozenset((p.a, p.b)) for p in pairs}) == len(pairs)
    assert similar_pairs(subjects, [None, None, None, embeddings[3]], 5, random.Random(0)) == []


def test_split_quotas() -> None:
    faces = {"train": 7, "val": 2, "test": 1}
    possible = {"train": 21, "val": 1, "test": 0}
    assert split_quotas(faces, possible, None) == {"train": 7, "val": 1, "test": 0}
    assert split_quotas(faces, possible, 9) == {"train": 7, "val": 1, "test": 0}
    assert split_quotas(faces, possible, 100) == {"train": 21, "val": 1, "test": 0}


# ---- landmark files and inputs -------------------------------------------------------------------------------------


def write_landmarks(path: Path, rows: dict[str, np.ndarray]) -> Path:
    k = len(next(iter(rows.values())))
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *(f"{axis}{i}" for i in range(k) for axis in "xy")])
        for name, points in rows.items():
            writer.writerow([name, *(f"{v:.3f}" for v in points.ravel())])
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty landmark CSV"),
    ("path,x0,y0\na.png,1,2\n", "K >= 5"),
    ("file,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\n", "K >= 5"),
    ("path,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\na.png,1,2,3\n", "line 2: 4 values"),
    ("path,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\na.png,1,2,3,4,5,6,7,8,9,ten\n", "line 2: a landmark coordinate is not"),
    ("path,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\na.png,1,2,3,4,5,6,7,8,9,1\na.png,1,2,3,4,5,6,7,8,9,1\n", "twice"),
    ("path,x0,y0,x1,y1,x2,y2,x3,y3,x4,y4\n", "lists no images"),
])
def test_bad_landmark_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "marks.csv"
    file.write_text(text)
    with pytest.raises(SmadlrpError, match=message):
        read_landmark_csv(file)


def test_landmark_rows_match_by_path_or_unique_file_name(tmp_path: Path) -> None:
    points = face68(50, 50, 20)
    file = write_landmarks(tmp_path / "marks.csv", {"sub/a.png": points, "b.png": points + 1, "x/c.png": points,
                                                     "y/c.png": points})
    marks = CsvLandmarks(file)
    assert marks.lookup("sub/a.png", tmp_path / "sub" / "a.png")[0] is not None
    assert marks.lookup("other/b.png", tmp_path / "other" / "b.png")[0] is not None  # unique file name
    found, reason = marks.lookup("z/c.png", tmp_path / "z" / "c.png")  # two rows named c.png: ambiguous
    assert found is None and "no landmarks" in reason
    assert marks.describe()["layout"] == "ibug68"


def test_inputs_subjects_and_stems(tmp_path: Path) -> None:
    for name in ("s01_a.png", "s01_b.png", "sub/s02_a.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    inputs = read_inputs(tmp_path, r"^(s\d+)_")
    assert [(i.name, i.subject, i.stem) for i in inputs] == [("s01_a.png", "s01", "s01_a"),
                                                             ("s01_b.png", "s01", "s01_b"),
                                                             ("sub/s02_a.png", "s02", "sub_s02_a")]
    with pytest.raises(UsageError, match="one capture group"):
        read_inputs(tmp_path, r"^(s)(\d+)_")
    with pytest.raises(UsageError, match="--alpha"):
        MorphSettings(alphas=(0.5, 1.0))


# ---- the command on a landmark CSV ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six noise 'photographs' of four subjects (s1 twice, s2 twice) with hand-made landmarks in a CSV."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    rows = {}
    for name in ("s1_a.png", "s1_b.png", "s2_a.png", "s2_b.jpg", "s3_a.png", "s4_a.png"):
        h, w = int(rng.integers(180, 240)), int(rng.integers(160, 220))
        Image.fromarray(rng.integers(40, 230, (h, w, 3), dtype=np.uint8)).save(folder / name)
        rows[name] = face68(w / 2 + rng.normal(0, 5), h / 2 + rng.normal(0, 5), w / 4, rng, 1.0)
    return folder, write_landmarks(folder.parent / "marks.csv", rows)


def test_morph_command_writes_the_set(photos: tuple[Path, Path], tmp_path: Path) -> None:
    folder, marks = photos
    out = tmp_path / "set"
    result = runner.invoke(app, ["morph", str(folder), "--out", str(out), "--landmarks", str(marks), "--size", "96",
                                 "--ratios", "0,0,1", "--subject-regex", r"^(s\d)_", "--count", "3",
                                 "--json", str(tmp_path / "morph-run.json")])
    assert result.exit_code == 0, result.output
    assert "complete morphs" in result.output
    with (out / "manifest.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == MANIFEST_COLUMNS
        rows = list(reader)
    bona = [r for r in rows if r["label"] == "bonafide"]
    morphs = [r for r in rows if r["label"] == "morph"]
    assert len(bona) == 6 and len(morphs) == 6  # 3 pairs x 2 species
    assert {r["morph_type"] for r in morphs} == {"complete", "splicing"}
    for row in morphs:
        assert row["identity_a"] != row["identity_b"] and row["split"] == "test" and row["alpha"] == "0.5"
        a, b = Path(row["contributor_a"]).stem, Path(row["contributor_b"]).stem
        assert row["path"] == f"morph/{row['morph_type']}/{a}__{b}.png"
        assert row["mask_path"] == f"masks/{row['morph_type']}/{a}__{b}.png"
        assert row["method"] in ("landmark-delaunay/csv68/blend", "landmark-delaunay/csv68/feather")
        with Image.open(out / row["path"]) as image, Image.open(out / row["mask_path"]) as mask:
            assert image.size == (96, 96) and image.mode == "RGB" and mask.mode == "L"
            assert np.asarray(mask).max() == 255
    for row in bona:
        assert row["identity_a"] == Path(row["path"]).stem.split("_")[0] and not row["mask_path"]
        with Image.open(out / row["path"]) as image:
            assert image.size == (96, 96)
    protocol = read_protocol(out / "protocol.csv")  # what finetune/evaluate --protocol read
    assert protocol.group_columns == PROTOCOL_COLUMNS[3:]
    by_path = {Path(r["path"]): r for r in rows}
    for row in protocol.rows:
        source = by_path[row.path.relative_to((out).resolve())]
        assert row.groups["subjects"] == ";".join(filter(None, (source["identity_a"], source["identity_b"])))
    index = DataSource(out, read_protocol(out / "protocol.csv")).split("test")
    assert len(index.samples) == 12 and "mask_path" in index.groups
    doc = json.loads((out / "morph.json").read_text())
    assert doc["counts"]["faces"] == 6 and doc["counts"]["fta"] == 0 and len(doc["morphs"]) == 6
    assert doc["morphs"][0] == morphs[0] and doc["landmarks"]["layout"] == "ibug68"
    assert json.loads((tmp_path / "morph-run.json").read_text())["schema"] == "smadlrp.morph/1"
    assert not list(tmp_path.glob(".set.*"))  # the staging folder is gone


def test_self_blended_pseudo_morphs_and_region_maps(photos: tuple[Path, Path], tmp_path: Path) -> None:
    """One pseudo-morph per face with its exact blend mask, and a region map for every image, read as ground
    truth the way the synthetic set's masks and maps are read."""
    from smadlrp.data.regions import REGION_ID
    from smadlrp.explain.compare import artifact_masks
    from smadlrp.explain.regions import load_region_ids, region_inputs

    folder, marks = photos
    out = tmp_path / "set"
    result = runner.invoke(app, ["morph", str(folder), "--out", str(out), "--landmarks", str(marks), "--size", "96",
                                 "--ratios", "0,0,1", "--subject-regex", r"^(s\d)_", "--species", "self-blended"])
    assert result.exit_code == 0, result.output
    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    pseudo = [r for r in rows if r["label"] == "morph"]
    assert len(pseudo) == 6 and {r["morph_type"] for r in pseudo} == {"self-blended"}
    for row in pseudo:
        assert row["identity_b"] == "" and row["path"] == f"morph/self-blended/{Path(row['contributor_a']).stem}.png"
        with Image.open(out / row["path"]) as image, Image.open(out / row["contributor_a"]) as original, \
                Image.open(out / row["mask_path"]) as mask:
            inside = np.asarray(mask) > 0
            changed = np.any(np.asarray(image) != np.asarray(original), axis=-1)
            assert inside.any() and changed[inside].any()
    for row in rows:  # every image has a region map, with the face where its landmarks put it
        with Image.open(out / row["region_path"]) as regions:
            ids = np.asarray(regions)
        assert ids.shape == (96, 96) and (ids == REGION_ID["nose"]).any() and ids[0, 0] == REGION_ID["background"]
    index = DataSource(out, read_protocol(out / "protocol.csv")).split("test")
    masks, note = artifact_masks(index, list(range(len(index.samples))), 1, 48)
    assert note is None and len(masks) == 6 and {kind for _, kind in masks.values()} == {"self-blended"}
    inputs = region_inputs(index, by="morph_type", regions_folder=None, max_images=None, attack_index=1)
    assert load_region_ids(inputs, 48).shape == (12, 48, 48)


def test_subject_disjoint_splits_and_failures_to_acquire(photos: tuple[Path, Path], tmp_path: Path) -> None:
    folder, marks = photos
    partial = tmp_path / "marks.csv"
    partial.write_text("\n".join(marks.read_text().splitlines()[:-1]) + "\n")  # s4_a.png has no landmarks
    out = tmp_path / "set"
    result = runner.invoke(app, ["morph", str(folder), "--out", str(out), "--landmarks", str(partial), "--size",
                                 "64", "--ratios", "0.5,0,0.5", "--species", "splicing", "--alpha", "0.4,0.6",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "failure to acquire: s4_a.png: no landmarks" in result.output
    doc = json.loads((out / "morph.json").read_text())
    assert doc["failures"][0]["image"] == "s4_a.png" and doc["counts"]["fta"] == 1
    rows = list(csv.DictReader((out / "manifest.csv").open(newline="")))
    split_of = {r["identity_a"]: r["split"] for r in rows if r["label"] == "bonafide"}
    for row in rows:
        if row["label"] == "morph":
            assert split_of[row["identity_a"]] == split_of[row["identity_b"]] == row["split"]
    assert not (out / "morph" / "complete").exists()


def run_refused(args: list[str]) -> str:
    """The command's output when it stops with one error line, a non-zero exit code and no traceback."""
    result = runner.invoke(app, ["morph", *args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert [line.startswith("error:") for line in result.output.splitlines() if line.strip()][-1:] == [True]
    return result.output


def test_refused_inputs(photos: tuple[Path, Path], tmp_path: Path) -> None:
    folder, marks = photos
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (64, 64)).save(one / "only.png")
    output = run_refused([str(one), "--out", str(tmp_path / "o1"), "--landmarks", str(marks)])
    assert "a morph needs two bona fide images; found 1" in output
    output = run_refused([str(folder), "--out", str(tmp_path / "o2"), "--landmarks", str(tmp_path / "nope.csv")])
    assert "landmark file not found" in output
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"path,x0\n\xff\xfe")
    output = run_refused([str(folder), "--out", str(tmp_path / "o3"), "--landmarks", str(bad)])
    assert "bad.csv: not a readable landmark CSV" in output
    other = write_landmarks(tmp_path / "other.csv", {"elsewhere.png": face68(50, 50, 20)})
    output = run_refused([str(folder), "--out", str(tmp_path / "o4"), "--landmarks", str(other), "--ratios", "0,0,1"])
    assert "no face found in any of the 6 images (6 failures to acquire)" in output
    assert not (tmp_path / "o4").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    output = run_refused([str(folder), "--out", str(full), "--landmarks", str(marks)])
    assert "exists and is not an empty folder" in output
    two = tmp_path / "two"
    two.mkdir()
    for name in ("s1_a.png", "s2_a.png"):
        (two / name).write_bytes((folder / name).read_bytes())
    output = run_refused([str(two), "--out", str(tmp_path / "o5"), "--landmarks", str(marks)])
    assert "no split holds two subjects with --ratios 0.7,0.15,0.15 (2 subjects)" in output
    output = run_refused([str(folder), "--out", str(tmp_path / "o6"), "--landmarks", str(marks), "--subject-regex",
                          r"^(s[12])_"])
    assert "s3_a.png: the file name does not match --subject-regex" in output
    output = run_refused([str(folder), "--out", str(folder / "inside"), "--landmarks", str(marks)])
    assert "inside the input" in output


def test_a_protocol_of_bona_fide_rows_is_an_input(photos: tuple[Path, Path], tmp_path: Path) -> None:
    folder, marks = photos
    protocol = folder.parent / "bona.csv"
    protocol.write_text("path,label,split,subjects\n" + "".join(
        f"{folder.name}/{name},bonafide,train,{name[:2]}\n" for name in ("s1_a.png", "s2_a.png", "s3_a.png"))
        + f"{folder.name}/s4_a.png,morph,train,s4\n")
    out = tmp_path / "set"
    result = runner.invoke(app, ["morph", str(protocol), "--out", str(out), "--landmarks", str(marks), "--size", "64",
                                 "--ratios", "0,0,1", "--species", "complete"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "manifest.csv").open(newline="")))
    assert sorted(r["identity_a"] for r in rows if r["label"] == "bonafide") == ["s1", "s2", "s3"]
    assert sum(r["label"] == "morph" for r in rows) == 3


# ---- dlib: two real portraits --------------------------------------------------------------------------------------


def _portraits(folder: Path) -> None:
    Image.open(hopper_photo()).convert("RGB").save(folder / "hopper.jpg", quality=95)
    Image.open(astronaut_photo()).convert("RGB").save(folder / "astronaut.png")
    Image.new("RGB", (300, 200), (90, 140, 200)).save(folder / "sky.png")


@pytest.fixture(scope="module")
def portraits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("dlib")
    photos = tmp_path_factory.mktemp("portraits")
    _portraits(photos)
    return photos


@pytest.mark.dlib
@pytest.mark.slow
def test_dlib68_morph_of_two_portraits(portraits: Path, tmp_path: Path) -> None:
    photos = portraits
    out = tmp_path / "set"
    result = runner.invoke(app, ["morph", str(photos), "--out", str(out), "--landmarks", "dlib68", "--ratios",
                                 "0,0,1", "--seam", "poisson"])
    assert result.exit_code == 0, result.output
    assert "failure to acquire: sky.png: no face found" in result.output and "non-commercial" in result.output
    doc = json.loads((out / "morph.json").read_text())
    assert "non-commercial" in doc["licence"] and "iBUG" in doc["landmarks"]["licence"]
    assert doc["counts"]["faces"] == 2 and doc["failures"] == [{"image": "sky.png", "reason": "no face found",
                                                                "split": "test"}]
    rows = [r for r in csv.DictReader((out / "manifest.csv").open(newline="")) if r["label"] == "morph"]
    assert {r["morph_type"] for r in rows} == {"complete", "splicing"}
    assert {r["method"] for r in rows} == {"landmark-delaunay/dlib68/blend", "landmark-delaunay/dlib68/poisson"}
    from smadlrp.data.align import AlignPolicy, FaceAligner

    aligner = FaceAligner(AlignPolicy())
    for path in [r["path"] for r in rows] + ["bonafide/hopper.png", "bonafide/astronaut.png"]:
        with Image.open(out / path) as image:
            assert image.size == (256, 256)
            assert aligner.detect(np.asarray(image.convert("RGB"))) is not None, path  # a face, found again


@pytest.mark.dlib
@pytest.mark.slow
def test_look_alike_pairs_by_dlibs_recogniser(portraits: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("hopper.jpg", "astronaut.png"):
        (photos / name).write_bytes((portraits / name).read_bytes())
    Image.open(portraits / "hopper.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "mirror.png")
    out = tmp_path / "set"
    result = runner.invoke(app, ["morph", str(photos), "--out", str(out), "--landmarks", "dlib68", "--ratios",
                                 "0,0,1", "--pairs", "similar", "--species", "complete", "--size", "160"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "morph.json").read_text())
    pairs = {(Path(p["contributor_a"]).stem, Path(p["contributor_b"]).stem): p["distance"] for p in doc["pairs"]}
    # three subjects (each file its own): the mirrored Hopper and Hopper pick each other first, no pair twice
    assert len({frozenset(k) for k in pairs}) == len(pairs) and 2 <= len(pairs) <= 3
    assert {frozenset(k) for k in pairs} >= {frozenset(("hopper", "mirror"))}
    near = next(d for k, d in pairs.items() if set(k) == {"hopper", "mirror"})
    assert near < 0.6 and all(d is not None and d >= near for d in pairs.values())
