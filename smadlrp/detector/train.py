"""Fine-tuning: the training loop, model selection on the validation split, and an exact resume state."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset
from torch.utils.data.distributed import DistributedSampler

from smadlrp.core.container import read_document, read_tensors, write_document
from smadlrp.core.device import autocast, seed_everything
from smadlrp.core.distributed import RankError, Ranks, current
from smadlrp.core.errors import SmadlrpError, UsageError, shorten, shown
from smadlrp.core.fileio import write_text_atomic
from smadlrp.core.processes import interrupted, is_interrupt
from smadlrp.data.align import recorded_policy
from smadlrp.data.loading import DataSource, ImageDataset, make_loader
from smadlrp.data.perturb import parse_augmentation
from smadlrp.data.protocol import read_protocol
from smadlrp.data.selfmorph import ImageSettings, SelfMorphDataset, mode_of, selfmorph_datasets
from smadlrp.detector.backbones import LibraryArchitecture
from smadlrp.detector.checkpoint import ADAPTER_PREFIX, INPUT_SIZES, CheckpointMeta, first_mismatch, save_checkpoint
from smadlrp.detector.frozen_heads import KINDS as HEAD_KINDS
from smadlrp.detector.inference import Predictions, logits_of, predict_dataset
from smadlrp.detector.lora import DEFAULT_TARGETS, LoraAdapter, LoraSettings, attach_lora
from smadlrp.detector.models import RANDOM_INIT, build_model, get_architecture, set_trainable
from smadlrp.detector.run_folder import RESUME_FILE
from smadlrp.evaluation.metrics import ConfusionMatrix, d_eer
from smadlrp.evaluation.thresholds import operating_points

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
SELECT_BY: dict[str, tuple[str, int]] = {"d-eer": ("d_eer", -1), "accuracy": ("val_acc", 1), "loss": ("val_loss", -1)}
RESUME_SCHEMA = "smadlrp.resume/1"
AUX_LOSS_WEIGHT = 0.4  # inception_v3 auxiliary classifier, as in torchvision's reference training


@dataclass
class TrainConfig:
    """Everything that decides a training run (stored in the checkpoint and the resume state)."""

    arch: str = "vgg_compact"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "cosine"  # learning rate per epoch: cosine decay from lr towards 0, or constant
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    image_size: int = 0  # 0: the architecture's default
    full: bool | None = None  # train every layer, or only the new head; None: every layer on a random backbone
    weights: str = "auto"
    amp: bool = False
    select_by: str = "d-eer"
    attack_class: str = "morph"
    seed: int = 0
    data: str = ""  # the split folders, or the folder a protocol's relative paths start from
    protocol: str = ""  # a protocol file, when the data comes from one
    bonafide_label: str = "bonafide"  # protocol label values
    attack_label: str = "morph"
    augment: str = ""  # perturbations drawn per training sample, e.g. "jpeg:50-95,blur:0-1.5" (data.perturb)
    lora: int = 0  # LoRA rank on the attention projections (0: no LoRA; detector.lora)
    lora_alpha: float = 0.0  # LoRA alpha (0: the rank, a scaling of 1)
    lora_targets: str = ",".join(DEFAULT_TARGETS)  # the projections LoRA adapts, among q, k, v, out
    frozen: str = ""  # a head fitted on frozen backbone features: linear, logistic, svm, gmm ("": gradient steps)
    selfmorph: str = ""  # train on bona fide images and their pseudo-morphs: only, or mixed with the morphs ("": no)

    def validate(self) -> TrainConfig:
        """Raise UsageError for values that cannot work; fill in the architecture's input size."""
        arch = get_architecture(self.arch)
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.select_by not in SELECT_BY:
            raise UsageError(f"--select-by {self.select_by!r}: choose one of {', '.join(SELECT_BY)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("--epochs and --batch-size must be >= 1")
        for option, value, low in (("--lr", self.lr, None), ("--weight-decay", self.weight_decay, 0.0),
                                   ("momentum", self.momentum, 0.0)):
            if not math.isfinite(value) or (value <= 0 if low is None else value < low):
                raise UsageError(f"{option} {value}: must be a finite number {'> 0' if low is None else '>= 0'}")
        if self.augment:
            self.augment = parse_augmentation(self.augment).spec
        self._check_recipe()
        if self.image_size == 0:
            self.image_size = arch.input_size
        if self.image_size > INPUT_SIZES[1]:
            raise UsageError(f"--image-size {self.image_size}: at most {INPUT_SIZES[1]} px")
        arch.check_image_size(self.image_size)
        return self

    def _check_recipe(self) -> None:
        """LoRA and frozen features are recipes of their own: refuse the options that contradict them."""
        if self.lora:
            LoraSettings.from_options(self.lora, self.lora_alpha or None, self.lora_targets)
            if self.frozen:
                raise UsageError("--lora trains adapters, --frozen fits a head on fixed features: choose one")
            if self.full:
                raise UsageError("--lora trains the adapters and the head only: drop --full")
        if self.frozen:
            if self.frozen not in HEAD_KINDS:
                raise UsageError(f"--head {self.frozen!r}: choose one of {', '.join(HEAD_KINDS)}")
            if self.full or self.augment:
                raise UsageError("--frozen extracts the backbone's features once: drop --full and --augment")
        if self.selfmorph:
            mode_of(self.selfmorph)
            if self.frozen:
                raise UsageError("--selfmorph draws new pseudo-morphs every epoch; --frozen fits a head once: "
                                 "choose one")


@dataclass
class EpochRow:
    """One epoch's numbers (losses in nats per image, rates as fractions)."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float | None  # None only for an empty split; the rates need both classes
    apcer: float | None
    bpcer: float | None
    d_eer: float | None
    seconds: float


@dataclass
class Callbacks:
    """Progress hooks for a user interface; every one is optional."""

    epoch_start: Callable[[int, int], None] = lambda epoch, batches: None
    batch_end: Callable[[float], None] = lambda running_loss: None
    epoch_end: Callable[[EpochRow, bool], None] = lambda row, is_best: None


@dataclass
class RunState:
    """What the loop carries from epoch to epoch (saved whole in the resume state)."""

    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: list[float] = field(default_factory=list)  # (selection value, -val loss): larger is better


def make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class Finetuner:
    """A fine-tuning run writing into `out`: best/last checkpoints, history.json, curves, resume state.

    Under torchrun (`ranks`, default: the current ones) the model trains as DistributedDataParallel: each rank
    takes `batch_size / world size` images of every global batch (a DistributedSampler reshuffled each epoch),
    validation is scored in shares and gathered, so every rank computes the same metrics on all scores, and rank
    0 alone writes the files.
    """

    def __init__(self, config: TrainConfig, data: DataSource | Path, out: Path, device: torch.device,
                 notify: Callable[[str], None] = lambda msg: None, workers: int = 0,
                 ranks: Ranks | None = None) -> None:
        self.config = config.validate()
        self.ranks = ranks = ranks or current()
        if config.batch_size % ranks.world_size:
            raise UsageError(f"--batch-size {config.batch_size} is the global batch: it must be a multiple of the "
                             f"{ranks.world_size} processes")
        self.out, self.device, self.notify, self.workers = out, device, notify, workers
        self.generator = seed_everything(config.seed)
        arch = get_architecture(config.arch)
        data = data if isinstance(data, DataSource) else DataSource(Path(data))
        self.alignment = recorded_policy(data.protocol.file.parent if data.protocol is not None else data.root) or {}
        bonafide_only = config.selfmorph == "only"
        train_split = data.split("train", attack_class=config.attack_class, warn=notify, bonafide_only=bonafide_only)
        self.class_names = train_split.class_names
        self.train_samples = train_split.samples
        if config.attack_class not in self.class_names:
            raise UsageError(f"attack class {config.attack_class!r} is not a class folder of {data.name}/train "
                             f"(found: {', '.join(self.class_names)}); set --attack-class")
        val_split = data.split("val", self.class_names, config.attack_class, warn=notify,
                               bonafide_only=bool(config.selfmorph))
        self.attack_index = self.class_names.index(config.attack_class)
        size = config.image_size
        self.mean, self.std = list(arch.mean), list(arch.std)  # the normalisation the backbone's weights expect
        perturb = parse_augmentation(config.augment) if config.augment else None
        self.selfmorph: dict[str, Any] = {}
        train_data: ImageDataset | SelfMorphDataset | ConcatDataset[tuple[torch.Tensor, int, int]]
        self.val_data: ImageDataset | SelfMorphDataset
        if config.selfmorph:
            train_data, self.val_data, self.selfmorph = selfmorph_datasets(
                config.selfmorph, train_split, val_split, self.attack_index, ImageSettings(size, self.mean, self.std),
                self.alignment, notify)
        else:
            train_data = ImageDataset(train_split.samples, size, self.mean, self.std, augment=True, cache=True,
                                      perturb=perturb, perturb_seed=None)
            self.val_data = ImageDataset(val_split.samples, size, self.mean, self.std, cache=True)
        self.sampler: DistributedSampler[int] | None = None  # one process: the loader shuffles itself
        if ranks.distributed:
            self.sampler = DistributedSampler(train_data, ranks.world_size, ranks.rank, seed=config.seed)
        self.train_loader = make_loader(
            train_data, config.batch_size // ranks.world_size, shuffle=self.sampler is None, sampler=self.sampler,
            workers=workers, generator=self.generator, device=device)
        self.shares = (len(self.sampler or train_data), len(train_data),
                       len(ranks.shard(len(self.val_data), config.batch_size)), len(self.val_data))
        model, self.weights_source = build_model(config.arch, len(self.class_names), config.weights, notify,
                                                 image_size=config.image_size)
        self.model = model.to(device)
        self.lora: LoraAdapter | None = None
        self.head_spec: dict[str, Any] = {}  # a frozen-feature head's description (frozen_heads.head_spec)
        if config.lora:
            config.full = False
            self.lora = attach_lora(self.model, LoraSettings.from_options(config.lora, config.lora_alpha or None,
                                                                          config.lora_targets),
                                    arch.head, arch.name, config.image_size)
            self.params = self.lora.trainable_parameters()
        else:
            self.params = set_trainable(self.model, arch, False if config.frozen else self._resolve_full())
        self.optimizer = make_optimizer(config, self.params)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
        self.state = RunState()
        self.saved_epoch = 0  # the epoch of the resume state on disk
        self._trained: nn.Module | None = None  # the model as trained: itself, or wrapped for DDP

    @classmethod
    def resume(cls, out: Path, device: torch.device, *, epochs: int | None = None, workers: int = 0,
               notify: Callable[[str], None] = lambda message: None, ranks: Ranks | None = None,
               check: Callable[[TrainConfig], None] = lambda config: None) -> Finetuner:
        """The interrupted run in `out`, restored from its resume state to continue bit for bit (to `epochs` in
        all, default: its own), on the data and with the settings it was started with; `check` may refuse the
        stored configuration first (the CLI refuses options that differ from it)."""
        ranks = ranks or current()
        with ranks.shared_failure():
            config, doc, tensors = read_resume(out)
            check(config)
        config.epochs = epochs or config.epochs
        root = Path(config.data)
        source = DataSource(root, read_protocol(Path(config.protocol), base=root, bonafide_label=config.bonafide_label,
                                                attack_label=config.attack_label) if config.protocol else None)
        with ranks.shared_failure():
            trainer = cls(config, source, out, device, notify, workers, ranks)
            trainer.restore(doc, tensors)
        notify(f"resuming {out} after epoch {trainer.state.epoch} of {config.epochs}")
        if doc.get("world_size", 1) != ranks.world_size:
            notify(f"the run trained on {doc.get('world_size', 1)} process(es) and continues on {ranks.world_size}: "
                   "weights, optimizer, schedule and history carry on; later epochs visit the images in another order")
        return trainer

    @property
    def trained(self) -> nn.Module:
        """The module the training steps call: DistributedDataParallel under torchrun (built on first use, as
        building it is a collective), else the model."""
        if self._trained is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._trained = DistributedDataParallel(self.model, device_ids=ids) if self.ranks.distributed \
                else self.model
        return self._trained

    def _resolve_full(self) -> bool:
        """Train every layer when asked, or by default when the backbone starts from random initialisation (a new
        head on random features learns little); an explicit head-only run on a random backbone is said aloud."""
        random_backbone = self.weights_source == RANDOM_INIT
        if self.config.full is None:
            self.config.full = random_backbone
            if random_backbone:
                self.notify(f"{self.config.arch} starts from random initialisation, so every layer is trained (a "
                            "new head on random features learns little); --head-only trains only the head anyway, "
                            "--weights imagenet or --weights FILE gives a pretrained backbone")
        elif random_backbone and not self.config.full:
            self.notify("training only a new head on a randomly initialised backbone (a linear probe of random "
                        "features), as --head-only asks")
        return self.config.full

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, callbacks: Callbacks | None = None) -> RunState:
        """Train until `config.epochs`; Ctrl-C leaves the last completed epoch's resume state and says how to resume."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.saved_epoch = self.state.epoch  # 0, or the epoch the run was restored at
        if self.config.frozen:
            from smadlrp.detector.frozen import fit_frozen_head

            fit_frozen_head(self, callbacks or Callbacks())
            return self.state
        try:
            while self.state.epoch < self.config.epochs:
                self._epoch(callbacks or Callbacks())
        except (KeyboardInterrupt, RuntimeError) as exc:
            if not is_interrupt(exc):  # a RuntimeError that did not follow Ctrl-C is a bug
                raise
            saved = self.saved_epoch
            message = (f"interrupted in epoch {saved + 1}; {saved} completed epoch(s) are saved. Continue with: "
                       f"smadlrp finetune --resume {self.out}") if saved else (
                f"interrupted in epoch 1, before anything was saved; start the run again with --out {self.out}")
            if self.ranks.distributed:  # Ctrl-C reaches every rank: one of them says so
                raise RankError(self.ranks.rank, message, exit_code=130) from None
            raise SmadlrpError(message, exit_code=130) from None
        return self.state

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of `epoch` (1-based): cosine decay over the run's epochs, or constant."""
        if self.config.schedule == "constant":
            return self.config.lr
        return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.config.epochs))

    def _epoch(self, callbacks: Callbacks) -> None:
        epoch = self.state.epoch + 1
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            seed = np.random.SeedSequence([self.config.seed, epoch, self.ranks.rank]).generate_state(1)[0]
            torch.manual_seed(int(seed))  # each rank's flips, reproducible from (seed, epoch, rank) alone
        callbacks.epoch_start(epoch, len(self.train_loader))
        train_loss, train_acc, samples = self._train_pass(callbacks)
        preds = predict_dataset(self.model, self.val_data, self.config.batch_size, self.device, self.attack_index,
                                workers=self.workers, amp=self.config.amp, ranks=self.ranks)
        self.record_epoch(epoch, (train_loss, train_acc, samples), preds, start, callbacks)

    def record_epoch(self, epoch: int, train: tuple[float, float, int], preds: Predictions, start: float,
                     callbacks: Callbacks) -> None:
        """Score epoch `epoch` on the validation predictions, select, and write its files (rank 0): checkpoints,
        history, resume state. `train`: (mean loss, accuracy, images); `start`: its perf_counter start."""
        train_loss, train_acc, samples = train
        at_half = ConfusionMatrix.from_scores(preds.labels, preds.scores, 0.5)
        eer = d_eer(preds.labels, preds.scores)
        row = EpochRow(epoch, train_loss, train_acc, preds.loss, at_half.accuracy, at_half.apcer, at_half.bpcer,
                       eer.value, time.perf_counter() - start)
        is_best = self._select(row)
        self.state.epoch = epoch
        self.state.history.append(asdict(row))
        metrics = {"epoch": epoch, "train": {"loss": row.train_loss, "accuracy": row.train_acc, "samples": samples},
                   "val": {"loss": row.val_loss, "accuracy": row.val_acc, "apcer": row.apcer, "bpcer": row.bpcer,
                           "d-eer": row.d_eer, "threshold": 0.5}}
        points = {"split": "val", "epoch": epoch, **operating_points(preds.labels, preds.scores)}
        with self.ranks.shared_failure():  # rank 0 writes; a failed write ends every rank
            if self.ranks.is_main:
                weights = self.checkpoint_tensors()
                save_checkpoint(self.out / "last.safetensors", weights, self.meta(metrics, points))
                if is_best:
                    save_checkpoint(self.out / "best.safetensors", weights, self.meta(metrics, points))
                self._save_history()
                if not self.config.frozen:  # a frozen head is fitted at once: nothing to resume
                    self._save_resume()  # last: once it says epoch N, every file of epoch N is written
            self.saved_epoch = epoch
        callbacks.epoch_end(row, is_best)

    def _train_pass(self, callbacks: Callbacks) -> tuple[float, float, int]:
        """Mean loss and accuracy over the epoch's training images on every rank, and their number. Under torchrun a
        rank that dies or stops answering during a step (DDP's gradient all-reduce) ends this one with one line."""
        with self.ranks.exchanging():  # building DDP broadcasts rank 0's parameters
            model = self.trained
        model.train()
        if self.lora is not None:
            self.lora.train()  # the frozen network's BatchNorms keep their statistics
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        aux = self.config.arch == "inception_v3"
        batches = iter(self.train_loader)
        for _ in range(len(self.train_loader)):  # the same number of batches on every rank
            if interrupted():  # a Ctrl-C whose KeyboardInterrupt a library swallowed
                raise KeyboardInterrupt
            with self.ranks.shared_failure():  # an unreadable image on one rank ends them all
                images, targets, _ = next(batches)
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.ranks.exchanging():  # DDP all-reduces the gradients during the backward pass
                with autocast(self.device, self.config.amp):
                    output = model(images)
                    logits = logits_of(output)
                    loss = nn.functional.cross_entropy(logits, targets)
                    if aux and isinstance(output, tuple):
                        loss = loss + AUX_LOSS_WEIGHT * nn.functional.cross_entropy(output[1], targets)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            batch = len(targets)
            seen += batch
            total_loss += loss.detach() * batch
            correct += (logits.detach().argmax(1) == targets).sum()
            callbacks.batch_end(float(total_loss) / seen)
        loss_sum, right, n = self.ranks.sum([float(total_loss), float(correct), seen])
        if n == 0:
            raise SmadlrpError("the training split yielded no images")
        return loss_sum / n, right / n, int(n)

    def _select(self, row: EpochRow) -> bool:
        """Is this epoch the best so far on the validation split? Ties go to the lower validation loss; a
        not-estimable value ranks last."""
        key, sign = SELECT_BY[self.config.select_by]
        value = getattr(row, key)
        score = [-math.inf if value is None or math.isnan(value) else sign * value, -row.val_loss]
        if self.state.best_epoch == 0 or score > self.state.best_score:
            self.state.best_epoch, self.state.best_score = row.epoch, score
            return True
        return False

    # ---- files ----------------------------------------------------------------------------------------------
    def meta(self, metrics: dict[str, Any], points: dict[str, Any] | None = None) -> CheckpointMeta:
        """The checkpoint metadata of this run with an epoch's metrics and validation operating points."""
        return CheckpointMeta(
            architecture=self.config.arch, class_names=self.class_names, attack_class=self.config.attack_class,
            input_size=self.config.image_size, mean=self.mean, std=self.std,
            weights_source=self.weights_source,
            training={**asdict(self.config), "world_size": self.ranks.world_size, **self.recipe()},
            metrics=metrics, operating_points=points or {}, alignment=self.alignment, head=self.head_spec,
        )

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors: the model's state dict; with LoRA the merged weights in the architecture's own
        layout, and the adapters under `adapter/<module>.lora_A` (rank, in) and `.lora_B` (out, rank)."""
        if self.lora is None:
            return dict(self.model.state_dict())
        adapters = {f"{ADAPTER_PREFIX}{k}": v for k, v in self.lora.adapter_state_dict().items()}
        return {**self.lora.merged_state_dict(), **adapters}

    def recipe(self) -> dict[str, Any]:
        """What the checkpoint and history record beyond the configuration: a library backbone's model name and
        pretrained tag, and a LoRA run's rank, alpha, targets and trainable parameters."""
        arch = get_architecture(self.config.arch)
        backbone = {"backbone": {"library": arch.library, "model": arch.model_name, "tag": arch.pretrained_tag}} \
            if isinstance(arch, LibraryArchitecture) else {}
        return {**backbone, **({"lora": self.lora.describe()} if self.lora is not None else {}),
                **({"selfmorph": self.selfmorph} if self.selfmorph else {})}

    def _save_history(self) -> None:
        doc = {"config": asdict(self.config), "best_epoch": self.state.best_epoch, "epochs": self.state.history,
               **self.recipe()}
        write_text_atomic(self.out / "history.json", json.dumps(doc, indent=2) + "\n")
        from smadlrp.evaluation.plots import plot_training_curves

        plot_training_curves(self.state.history, self.out / "training-curves.png")

    def _save_resume(self) -> None:
        tensors: dict[str, torch.Tensor] = {f"model/{k}": v.detach().cpu().clone().contiguous()
                                            for k, v in self.model.state_dict().items()}
        optim = self.optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for index, slots in optim["state"].items():
            for name, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{index}/{name}"] = value.detach().cpu().clone().contiguous()
                else:
                    scalars[f"{index}/{name}"] = value
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/loader"] = self.generator.get_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        doc = {"schema": RESUME_SCHEMA, "config": asdict(self.config), "state": asdict(self.state),
               "param_groups": optim["param_groups"], "optim_scalars": scalars,
               "scaler": self.scaler.state_dict(), "weights_source": self.weights_source,
               "class_names": self.class_names, "world_size": self.ranks.world_size}
        write_document(self.out / RESUME_FILE, tensors, doc)

    def restore(self, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Load a resume state read by `read_resume` (same config, same data); SmadlrpError naming the file when
        its weights, optimizer state or random states do not fit this run."""
        if doc["class_names"] != self.class_names:
            raise SmadlrpError(f"the data's classes {self.class_names} differ from the run's {doc['class_names']}")
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        mismatch = first_mismatch(self.model.state_dict(), weights)
        if mismatch is not None:
            raise _not_resume(self.out / RESUME_FILE, f"its model tensors do not fit {self.config.arch} (first "
                                                      f"mismatch: {shorten(mismatch, 60)!r})")
        try:
            self.model.load_state_dict(weights)
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("optim/"):
                    _, index, name = key.split("/", 2)
                    state.setdefault(int(index), {})[name] = value.to(self.device)
            for key, value in doc["optim_scalars"].items():
                index, name = key.split("/", 1)
                state.setdefault(int(index), {})[name] = value
            self.optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
            _check_optimizer_state(self.optimizer)
            if doc["scaler"]:
                self.scaler.load_state_dict(doc["scaler"])
            torch.set_rng_state(tensors["rng/torch"])
            self.generator.set_state(tensors["rng/loader"])
            if "rng/cuda" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise _not_resume(self.out / RESUME_FILE, shorten(str(exc) or type(exc).__name__)) from None
        self.weights_source = doc["weights_source"]
        self.state = RunState(**doc["state"])


def read_resume(out: Path) -> tuple[TrainConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """Read `out/resume.safetensors`: the run's (validated) config, its document and its tensors; SmadlrpError
    "PATH: not a valid smadlrp resume state: ..." when the document or the tensors lack what `restore` needs."""
    path = out / RESUME_FILE
    if not path.is_file():
        raise SmadlrpError(f"{out}: no {RESUME_FILE} here, so nothing to resume (is it a finetune output folder?)")
    doc = read_document(path)
    if doc.get("schema") != RESUME_SCHEMA:
        raise SmadlrpError(f"{path}: not a smadlrp resume state")
    problem = _resume_document_problem(doc)
    if problem is not None:
        raise _not_resume(path, problem)
    tensors = read_tensors(path)
    missing = [name for name in ("rng/torch", "rng/loader") if name not in tensors]
    if missing:
        raise _not_resume(path, f"tensor {missing[0]} is missing")
    try:
        config = TrainConfig(**doc["config"]).validate()
    except UsageError as exc:
        raise _not_resume(path, f"config: {exc.message}") from None
    return config, doc, tensors


def _not_resume(path: Path, problem: str) -> SmadlrpError:
    return SmadlrpError(f"{path}: not a valid smadlrp resume state: {problem}")


# the JSON types of TrainConfig's and EpochRow's fields, by their annotation
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "bool | None": (bool, type(None)),
    "float | None": (int, float, type(None)),
}


def _fields_problem(cls: type, value: Any, where: str) -> str | None:
    """What is wrong with `value` as the fields of dataclass `cls` (all of its keys known, each of its field's
    JSON type, only fields with a default missing): a one-line description naming `where`, or None."""
    if not isinstance(value, dict):
        return f"{where} is not a JSON object"
    known = {f.name: str(f.type) for f in fields(cls)}
    missing = [f.name for f in fields(cls) if f.name not in value and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        return f"{where} lacks {missing[0]}"
    for key, item in value.items():
        if key not in known:
            return f"{where} has an unknown key {shorten(str(key), 40)!r}"
        kinds = _JSON_TYPES.get(known[key])  # None for a field of another annotation: any JSON value
        if kinds is not None and (not isinstance(item, kinds) or (isinstance(item, bool) and bool not in kinds)):
            return f"{where}.{key} is {shown(item, 40)}, not of type {known[key]}"
    return None


def _resume_document_problem(doc: dict[str, Any]) -> str | None:
    """What a resume document lacks for `read_resume` and `restore` (keys, their JSON types, the run state's
    counters), or None."""
    kinds = {"config": dict, "state": dict, "param_groups": list, "optim_scalars": dict, "scaler": dict,
             "weights_source": str, "class_names": list}
    for key, kind in kinds.items():
        if not isinstance(doc.get(key), kind):
            return f"{key} is {'missing' if key not in doc else 'not a JSON ' + kind.__name__}"
    state = doc["state"]
    if set(state) != {f.name for f in fields(RunState)}:
        return f"state must hold exactly {', '.join(f.name for f in fields(RunState))}"
    for key in ("epoch", "best_epoch"):
        if type(state[key]) is not int or state[key] < 0:
            return f"state.{key} is {shown(state[key], 40)}, not a whole number >= 0"
    if not isinstance(state["best_score"], list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in state["best_score"]):
        return "state.best_score is not a list of numbers"
    if not isinstance(state["history"], list):
        return "state.history is not a list"
    rows = (_fields_problem(EpochRow, row, f"state.history[{i}]") for i, row in enumerate(state["history"]))
    return next((p for p in rows if p is not None), None) or _fields_problem(TrainConfig, doc["config"], "config")


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """ValueError when a loaded per-parameter optimizer tensor (a moment, a momentum buffer) has another shape
    than its parameter (a 0-d tensor, such as Adam's step, fits any)."""
    for param, slots in optimizer.state.items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(f"optimizer tensor {name} has shape {tuple(value.shape)}, its parameter "
                                 f"{tuple(param.shape)}")
