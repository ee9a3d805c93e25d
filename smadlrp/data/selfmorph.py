"""Training on bona fide images alone: each bona fide image and a pseudo-morph of it (`finetune --selfmorph`).

Where the face is, per image, comes from the first source a data set offers:
- `regions`: its face-region maps (the synthetic set; a `region_path` column): the eyes, brows, nose, mouth and
  face skin;
- `aligned chips`: a data set made by `smadlrp align --policy chip` has every face's 5 landmarks at the
  template's place, so one face ellipse (`selfblend.face_ellipse`) fits every crop;
- `landmarks`: dlib's detector and 5-point model (the `align` extra) find each face once, before training.
An image whose face is not found stays a bona fide sample and makes no pseudo-morph (counted and said).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.align import AlignExtraMissing, AlignPolicy, FaceAligner
from smadlrp.data.loading import ImageDataset, SplitIndex, load_rgb
from smadlrp.data.perturb import sample_rng
from smadlrp.data.regions import REGION_ID, read_region_map, resize_region_map
from smadlrp.data.selfblend import (
    PAIR_AUGMENTATION,
    RECIPE,
    BoolArray,
    PairAugmentation,
    Pixels,
    SelfBlendRecipe,
    Weights,
    augment_pair,
    face_ellipse,
    pseudo_morph,
)

Item = tuple[torch.Tensor, int, int]
MODES = ("only", "mixed")  # pseudo-morphs alone (the training morphs are ignored), or beside the training morphs
FACE_REGIONS = tuple(REGION_ID[name] for name in ("left-eye", "right-eye", "brows", "nose", "mouth", "face-skin"))


@dataclass(frozen=True)
class FaceFinding:
    """Per image its face region at the model's input size (None: not found), and the source they came from."""

    faces: list[BoolArray | None]
    source: str

    @property
    def found(self) -> int:
        return sum(face is not None for face in self.faces)

    def describe(self) -> dict[str, Any]:
        return {"face_source": self.source, "faces_found": self.found, "faces_missing": len(self.faces) - self.found}


def find_faces(split: SplitIndex, size: int, alignment: Mapping[str, Any] | None,
               on_image: Callable[[], None] = lambda: None) -> FaceFinding:
    """The face region of every sample of `split` at `size` x `size` px, from its first available source."""
    region_paths = split.groups.get("region_path")
    if region_paths is not None and all(region_paths):
        return FaceFinding([_face_from_regions(split, i, size) for i in range(len(split.samples))], "regions")
    if alignment and alignment.get("policy") == "chip":
        policy = AlignPolicy.from_dict(dict(alignment))
        face = face_ellipse(policy.template() * size / policy.size, size, size)
        return FaceFinding([face] * len(split.samples), "aligned chips")
    try:
        aligner = FaceAligner(AlignPolicy())
    except AlignExtraMissing:
        raise UsageError("--selfmorph needs to know where each face is: face-region maps (a region_path column), "
                         "chips made by `smadlrp align`, or the align extra to find them: "
                         "pip install 'smadlrp[align]'") from None
    faces = []
    for sample in split.samples:
        faces.append(_face_from_landmarks(aligner, sample.path, size))
        on_image()
    return FaceFinding(faces, "landmarks")


def _face_from_regions(split: SplitIndex, index: int, size: int) -> BoolArray | None:
    path = split.root / split.groups["region_path"][index]
    with Image.open(split.samples[index].path) as image:  # the header: the size, without decoding the pixels
        image_size = image.size
    ids = resize_region_map(read_region_map(path, image_size), size)
    face = np.isin(ids, FACE_REGIONS)
    return face if face.any() else None


def _face_from_landmarks(aligner: FaceAligner, path: Any, size: int) -> BoolArray | None:
    try:
        image = load_rgb(path)
    except SmadlrpError:
        return None  # the loader reports an unreadable image when it is used
    found = aligner.detect(np.asarray(image))
    if found is None:
        return None
    scale = np.array([size / image.width, size / image.height])
    face = face_ellipse(np.array(found[0].landmarks, dtype=np.float64) * scale, size, size)
    return face if face.any() else None


class SelfMorphDataset(Dataset[Item]):
    """Bona fide images and their pseudo-morphs -> (normalised image (3, S, S), label, item index).

    Items 0..n-1 are the n bona fide images of `images`; the next ones are pseudo-morphs, one per image with a
    face region. Both kinds get the same pair augmentation (colour, JPEG) and, with `flip`, a random horizontal
    flip, so that only the blend tells them apart. `seed` None draws anew on every pass (training, seeded from
    torch's generator); an integer fixes every item (validation: the same pseudo-morphs each epoch).
    """

    def __init__(self, images: ImageDataset, finding: FaceFinding, labels: tuple[int, int], *,
                 seed: int | None, flip: bool = False, recipe: SelfBlendRecipe = RECIPE,
                 augmentation: PairAugmentation = PAIR_AUGMENTATION) -> None:
        self.images, self.faces = images, finding.faces
        self.bonafide_label, self.attack_label = labels
        self.morphable = [i for i, face in enumerate(self.faces) if face is not None]
        self.seed, self.flip = seed, flip
        self.recipe, self.augmentation = recipe, augmentation

    def __len__(self) -> int:
        return len(self.images) + len(self.morphable)

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        n = len(self.images)
        return np.array([self.bonafide_label] * n + [self.attack_label] * len(self.morphable), dtype=np.int64)

    def _rng(self, index: int) -> np.random.Generator:
        seed = int(torch.randint(2**62, ())) if self.seed is None else self.seed
        return sample_rng(seed, index)

    def pseudo_morph(self, index: int, rng: np.random.Generator) -> tuple[Pixels, Weights]:
        """The pseudo-morph of bona fide image `index` at the model's input size, and its blend weights."""
        face = self.faces[index]
        if face is None:
            raise ValueError(f"image {index} has no face region")
        return pseudo_morph(self.images.pixels(index).permute(1, 2, 0).numpy(), face, rng, self.recipe)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        rng = self._rng(index)
        n = len(self.images)
        if index < n:
            pixels, label = self.images.pixels(index).permute(1, 2, 0).numpy().copy(), self.bonafide_label
        else:
            pixels, label = self.pseudo_morph(self.morphable[index - n], rng)[0], self.attack_label
        image = torch.from_numpy(np.array(augment_pair(pixels, rng, self.augmentation))).permute(2, 0, 1)
        if self.flip and rng.random() < 0.5:
            image = image.flip(-1)
        return self.images.normalize(image), label, index


def recipe_record(mode: str, finding: FaceFinding, recipe: SelfBlendRecipe = RECIPE) -> dict[str, Any]:
    """What a checkpoint records about a self-morph run: the mode, the face source and the recipe's ranges."""
    return {"mode": mode, **finding.describe(), "recipe": asdict(recipe),
            "pair_augmentation": asdict(PAIR_AUGMENTATION)}


def check_morphable(finding: FaceFinding, split: str) -> None:
    """Refuse a split where no face was found: it could make no pseudo-morph."""
    if finding.found == 0:
        raise SmadlrpError(f"--selfmorph: no face found in any bona fide image of the {split} split "
                           f"(face source: {finding.source}), so no pseudo-morph can be made")


def bonafide_samples(split: SplitIndex, attack_index: int) -> list[Any]:
    """The bona fide samples of a split."""
    return [s for s in split.samples if s.label != attack_index]


def mode_of(selfmorph: str) -> str:
    if selfmorph not in MODES:
        raise UsageError(f"selfmorph mode {selfmorph!r}: choose one of {', '.join(MODES)}")
    return selfmorph



@dataclass(frozen=True)
class ImageSettings:
    """How the model sees an image: input side (px) and normalisation."""

    size: int
    mean: list[float]
    std: list[float]


def selfmorph_datasets(mode: str, train: SplitIndex, val: SplitIndex, attack_index: int, settings: ImageSettings,
                       alignment: Mapping[str, Any] | None, notify: Callable[[str], None] = lambda msg: None,
                       ) -> tuple[SelfMorphDataset | ConcatDataset[Item], SelfMorphDataset, dict[str, Any]]:
    """(training data, validation data, record) of a self-morph run. Training: each bona fide image and a new
    pseudo-morph of it every epoch, with the training morphs too in `mixed` mode; validation: the validation
    bona fide images and fixed pseudo-morphs of them, so that model selection never sees a real morph."""
    labels = (1 - attack_index, attack_index)
    found: dict[str, FaceFinding] = {}
    data: dict[str, SelfMorphDataset] = {}
    for name, split in (("train", train), ("val", val)):
        bonafide = bonafide_samples(split, attack_index)
        morphs = len(split.samples) - len(bonafide)
        if morphs and (name == "val" or mode == "only"):
            notify(f"--selfmorph: the {morphs} morph(s) of the {name} split are ignored"
                   + (" (model selection sees pseudo-morphs only)" if name == "val" else
                      "; --selfmorph-mixed trains on them as well"))
        bonafide_split = SplitIndex(split.root, split.split, split.class_names, bonafide,
                                    {k: tuple(v[i] for i, s in enumerate(split.samples) if s.label != attack_index)
                                     for k, v in split.groups.items()}, split.groups_file)
        found[name] = finding = find_faces(bonafide_split, settings.size, alignment)
        check_morphable(finding, name)
        if finding.found < len(bonafide):
            notify(f"--selfmorph: no face found in {len(bonafide) - finding.found} of {len(bonafide)} bona fide "
                   f"image(s) of the {name} split; they train as bona fide images only")
        images = ImageDataset(bonafide, settings.size, settings.mean, settings.std, cache=True)
        data[name] = SelfMorphDataset(images, finding, labels, seed=None if name == "train" else 0,
                                      flip=name == "train")
    train_data: SelfMorphDataset | ConcatDataset[Item] = data["train"]
    real = [s for s in train.samples if s.label == attack_index]
    if mode == "mixed" and real:
        train_data = ConcatDataset([data["train"], ImageDataset(real, settings.size, settings.mean, settings.std,
                                                                augment=True, cache=True)])
    record = {**recipe_record(mode, found["train"]), "train_pseudo_morphs": len(data["train"].morphable),
              "val_pseudo_morphs": len(data["val"].morphable), "train_morphs_used": len(real) if mode == "mixed"
              else 0}
    return train_data, data["val"], record
