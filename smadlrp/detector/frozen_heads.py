"""Heads fitted on frozen backbone features (the recipe of Colbois & Marcel, IJCB 2024): a linear layer trained
by Adam, an L2 logistic regression, a linear SVM, or a one-class Gaussian mixture of the bona fide features.

Every head maps features (B, D) to logits (B, num_classes), so that the backbone with the head in place of its
classifier layer is an ordinary smadlrp network whose softmax gives P(attack). The supervised kinds are stored
as one `nn.Linear` (any feature standardisation folded into it); `gmm` as a `GMMHead` whose tensors are buffers.
`head_spec` describes a head as JSON and `build_head` rebuilds an empty one from it, into which the checkpoint's
state dict loads.

The binary kinds (logistic, svm, gmm) separate the attack class from all others: the attack logit is their
decision value and every other logit is -log(num_classes - 1) (0 for two classes), so that softmax P(attack) is
exactly sigmoid(decision) for any number of classes.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from smadlrp.core.errors import SmadlrpError, UsageError, shorten, shown
from smadlrp.lrp.node_rules import PoolFunction
from smadlrp.lrp.op_kinds import NodeCall, OpKind, register_op

Notify = Callable[[str], None]
Array = NDArray[np.float64]
KINDS = ("linear", "logistic", "svm", "gmm")
COVARIANCE_TYPES = ("full", "diag")
CLASS_WEIGHTS = (None, "balanced")
HEAD_ATTRIBUTE = "smadlrp_frozen_head"  # on a fitted or rebuilt nn.Linear head: {"kind": ..., "fit": {...}}
FALLBACK_SIGMAS = 3.0  # fallback calibration: P(attack) = 0.5 this many bona fide NLL std above their mean
_LOG_2PI = math.log(2.0 * math.pi)


def _silent(_message: str) -> None:
    """A notice callback that says nothing."""


# ---- options -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearOptions:
    """`linear`: nn.Linear(D, num_classes) from zeros, softmax cross-entropy, Adam; the epoch with the lowest
    validation loss is kept (the last one without validation images)."""

    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    standardize: bool = True  # train on standardised features (train mean and std), folded into the stored layer


@dataclass(frozen=True)
class LogisticOptions:
    """`logistic`: scikit-learn LogisticRegression (lbfgs) of attack vs the rest on the (standardised) features: it
    minimises 0.5 * |w|^2 + C * sum_i log-loss_i (intercept not penalised), so a smaller C regularises more."""

    C: float = 1.0
    max_iter: int = 10_000
    tol: float = 1e-6
    standardize: bool = True
    class_weight: str | None = None  # "balanced": weight each class by n / (2 * its count)


@dataclass(frozen=True)
class SvmOptions:
    """`svm`: scikit-learn LinearSVC (squared hinge, L2, dual="auto") of attack vs the rest; C as for logistic."""

    C: float = 1.0
    max_iter: int = 10_000
    tol: float = 1e-4
    standardize: bool = True
    class_weight: str | None = None


@dataclass(frozen=True)
class GmmOptions:
    """`gmm`: scikit-learn GaussianMixture of the bona fide training features only (one-class).

    One full-covariance component by default: its maximum-likelihood fit is unique (no dependence on the seed or
    the k-means start) and it is the Mahalanobis model of the bona fide features, whose strong correlations a
    diagonal model ignores. `reg_covar` is added to the diagonal of each covariance of the standardised features
    (unit variance), i.e. 1% of each feature's variance: a ridge that keeps the covariance well conditioned when
    there are only a few bona fide images per dimension (a few thousand for D = 384..1024).
    """

    components: int = 1
    covariance_type: str = "full"  # "full" (K, D, D) or "diag" (K, D)
    reg_covar: float = 1e-2
    max_iter: int = 100
    n_init: int = 1
    standardize: bool = True  # fit on features standardised with the bona fide training mean and std (folded)


OPTION_TYPES: dict[str, type[Any]] = {"linear": LinearOptions, "logistic": LogisticOptions, "svm": SvmOptions,
                                      "gmm": GmmOptions}
_POSITIVE = {"epochs", "lr", "batch_size", "C", "max_iter", "tol", "components", "n_init"}
_CHOICES: dict[str, tuple[Any, ...]] = {"covariance_type": COVARIANCE_TYPES, "class_weight": CLASS_WEIGHTS}


def default_options(kind: str) -> dict[str, Any]:
    """The default options of head `kind` (UsageError for an unknown kind)."""
    return asdict(OPTION_TYPES[_check_kind(kind)]())


def head_options(kind: str, options: Mapping[str, Any]) -> Any:
    """`options` for head `kind` checked and completed with the defaults (one of the *Options classes);
    UsageError naming an unknown option or a value that cannot work."""
    cls = OPTION_TYPES[_check_kind(kind)]
    defaults = {f.name: f.default for f in fields(cls)}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UsageError(f"{kind} head: unknown option {unknown[0]!r} (options: {', '.join(defaults)})")
    for name, value in options.items():
        problem = _option_problem(name, value, defaults[name])
        if problem is not None:
            raise UsageError(f"{kind} head option {name}={shown(value)}: {problem}")
    return cls(**options)


def _option_problem(name: str, value: Any, default: Any) -> str | None:
    """Why `value` cannot be option `name` (whose default is `default`); None when it can."""
    if name in _CHOICES:
        choices = _CHOICES[name]
        return None if value in choices else f"choose one of {', '.join(str(c) for c in choices)}"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            return "must be an integer"
    elif isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(value):
        return "must be a finite number"
    if name in _POSITIVE and not value > 0:
        return "must be > 0"
    if not value >= 0:
        return "must be >= 0"
    return None


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UsageError(f"unknown frozen head {shown(kind)}: choose one of {', '.join(KINDS)}")
    return kind


# ---- the Gaussian mixture head -----------------------------------------------------------------------------


class GMMHead(nn.Module):
    """A one-class Gaussian mixture of bona fide features as a classifier head: features (B, D) -> logits
    (B, num_classes).

    Buffers: `means` (K, D); `precisions_cholesky`, scikit-learn's Cholesky factors P of the precisions
    (precision = P P^T), (K, D, D) for "full" or (K, D) for "diag"; `log_weights` (K,); `calibration_a` and
    `calibration_b`, scalars. `log_likelihood` is log sum_k w_k N(f; mu_k, Sigma_k) in nats (scikit-learn's
    `score_samples`); the attack logit is a * NLL + b with NLL = -log_likelihood and a > 0, every other logit is
    -log(num_classes - 1), so softmax gives P(attack) = sigmoid(a * NLL + b): the less likely an image is under the
    bona fide model, the more likely an attack. Computed in the buffers' dtype with autocast off.
    """

    means: torch.Tensor
    precisions_cholesky: torch.Tensor
    log_weights: torch.Tensor
    calibration_a: torch.Tensor
    calibration_b: torch.Tensor

    def __init__(self, dims: int, components: int = 1, covariance_type: str = "full", num_classes: int = 2,
                 attack_index: int = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}")
        if not 0 <= attack_index < num_classes or num_classes < 2 or dims < 1 or components < 1:
            raise ValueError("invalid GMMHead shape")
        self.dims, self.components, self.covariance_type = dims, components, covariance_type
        self.num_classes, self.attack_index = num_classes, attack_index
        self.fit_info: dict[str, Any] = {}
        precision_shape = (components, dims, dims) if covariance_type == "full" else (components, dims)
        eye = torch.eye(dims, dtype=dtype).expand(components, dims, dims) if covariance_type == "full" else None
        self.register_buffer("means", torch.zeros(components, dims, dtype=dtype))
        self.register_buffer("precisions_cholesky",
                             eye.clone() if eye is not None else torch.ones(precision_shape, dtype=dtype))
        self.register_buffer("log_weights", torch.full((components,), -math.log(components), dtype=dtype))
        self.register_buffer("calibration_a", torch.ones((), dtype=dtype))
        self.register_buffer("calibration_b", torch.zeros((), dtype=dtype))

    @property
    def other_logit(self) -> float:
        """The logit of every class but the attack one: -log(num_classes - 1), 0 for two classes."""
        return 0.0 if self.num_classes == 2 else -math.log(self.num_classes - 1)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, components={self.components}, covariance_type={self.covariance_type!r}, "
                f"num_classes={self.num_classes}, attack_index={self.attack_index}")

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """log p(f) under the mixture, nats, (B,) from features (B, D)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.to(self.means.dtype)
            diff = x[:, None, :] - self.means[None]  # (B, K, D)
            if self.covariance_type == "full":
                y = torch.einsum("bkd,kde->bke", diff, self.precisions_cholesky)
                log_det = torch.log(torch.diagonal(self.precisions_cholesky, dim1=-2, dim2=-1)).sum(-1)
            else:
                y = diff * self.precisions_cholesky[None]
                log_det = torch.log(self.precisions_cholesky).sum(-1)
            log_prob = -0.5 * (self.dims * _LOG_2PI + (y * y).sum(-1)) + log_det  # (B, K)
            return torch.logsumexp(log_prob + self.log_weights, dim=1)

    def attack_score(self, features: torch.Tensor) -> torch.Tensor:
        """The calibrated attack logit a * NLL + b, (B,)."""
        return self.calibration_a * -self.log_likelihood(features) + self.calibration_b

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes): a * NLL + b for the attack class, -log(num_classes - 1) for the others."""
        score = self.attack_score(features)
        attack = torch.arange(self.num_classes, device=score.device) == self.attack_index
        return torch.where(attack, score[:, None], score.new_full((1, self.num_classes), self.other_logit))


# ---- fitting -----------------------------------------------------------------------------------------------


def fit_head(kind: str, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None,
             val_y: torch.Tensor | None, attack_index: int, num_classes: int, seed: int, *,
             notify: Notify = _silent, dtype: torch.dtype = torch.float32, **options: Any) -> nn.Module:
    """Fit a head of `kind` (linear, logistic, svm, gmm) on features (N, D) with class-index labels (N,);
    `val_x`/`val_y` (M, D)/(M,) may be None or empty. Returns an nn.Linear(D, num_classes) or a GMMHead in
    `dtype`, in eval mode (fitting itself runs in float64 where scikit-learn does). `options`: those of the kind's
    *Options class (`default_options(kind)`). Notices (unconverged solvers, a calibration fallback) go to
    `notify`. SmadlrpError for features or labels a head cannot be fitted on; UsageError for bad options.
    """
    opts = head_options(kind, options)
    if num_classes < 2 or not 0 <= attack_index < num_classes:
        raise SmadlrpError(f"attack index {attack_index} does not fit {num_classes} classes")
    x = _features("training", train_x)
    y = _labels("training", train_y, len(x), num_classes)
    if val_x is None or val_y is None or len(val_x) == 0:
        vx, vy = np.zeros((0, x.shape[1])), np.zeros(0, dtype=np.int64)
    else:
        vx = _features("validation", val_x, x.shape[1])
        vy = _labels("validation", val_y, len(vx), num_classes)
    if kind == "gmm":
        head: nn.Module = _fit_gmm(opts, x, y, vx, vy, attack_index, num_classes, seed, notify)
    elif kind == "linear":
        head = _fit_linear(opts, x, y, vx, vy, num_classes, seed)
    else:
        head = _fit_binary_linear(kind, opts, x, y, attack_index, num_classes, seed, notify)
    return head.to(dtype).eval()


def _features(split: str, values: torch.Tensor, dims: int | None = None) -> Array:
    """Features as a float64 (N, D) array; SmadlrpError for another shape or non-finite values."""
    array = torch.as_tensor(values).detach().to("cpu", torch.float64).numpy()
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise SmadlrpError(f"{split} features of shape {tuple(array.shape)}: a head needs (N, D) with N, D > 0")
    if dims is not None and array.shape[1] != dims:
        raise SmadlrpError(f"{split} features have {array.shape[1]} dimensions, the training ones {dims}")
    bad = int((~np.isfinite(array)).any(axis=1).sum())
    if bad:
        raise SmadlrpError(f"{bad} of {len(array)} {split} feature vectors hold NaN or infinity (the backbone's "
                           "output): no head can be fitted on them")
    return array


def _labels(split: str, values: torch.Tensor, count: int, num_classes: int) -> NDArray[np.int64]:
    """Class indices as an int64 (N,) array; SmadlrpError when they do not fit the features or the classes."""
    array = torch.as_tensor(values).detach().to("cpu").numpy()
    if array.shape != (count,) or not np.issubdtype(array.dtype, np.integer):
        raise SmadlrpError(f"{split} labels: {count} class indices expected, got shape {array.shape} "
                           f"({array.dtype})")
    if count and (array.min() < 0 or array.max() >= num_classes):
        raise SmadlrpError(f"{split} labels outside 0..{num_classes - 1}")
    return array.astype(np.int64)


def _scaling(x: Array, standardize: bool) -> tuple[Array, Array]:
    """(mean, scale) (D,) of StandardScaler on `x` (scale 1 for constant features); (0, 1) without `standardize`."""
    if not standardize:
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    scaler = StandardScaler().fit(x)
    return np.asarray(scaler.mean_, dtype=np.float64), np.asarray(scaler.scale_, dtype=np.float64)


def _notify_warnings(caught: list[warnings.WarningMessage], what: str, notify: Notify) -> bool:
    """Pass scikit-learn's ConvergenceWarnings on as one notice; whether there was one."""
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    if messages:
        notify(f"{what} did not fully converge ({shorten(messages[0], 120)})")
    return bool(messages)


def _linear_layer(weight: Array, bias: Array, kind: str, fit: dict[str, Any]) -> nn.Linear:
    """nn.Linear holding `weight` (K, D) and `bias` (K,) (float64), tagged with its kind and fit record."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    setattr(layer, HEAD_ATTRIBUTE, {"kind": kind, "fit": fit})
    return layer


def _binary_rows(w: Array, b: float, attack_index: int, num_classes: int) -> tuple[Array, Array]:
    """A (num_classes, D) weight and (num_classes,) bias whose attack row is (w, b) and whose other rows are 0
    with bias -log(num_classes - 1)."""
    weight = np.zeros((num_classes, len(w)))
    bias = np.full(num_classes, 0.0 if num_classes == 2 else -math.log(num_classes - 1))
    weight[attack_index], bias[attack_index] = w, b
    return weight, bias


def _fit_binary_linear(kind: str, opts: LogisticOptions | SvmOptions, x: Array, y: NDArray[np.int64],
                       attack_index: int, num_classes: int, seed: int, notify: Notify) -> nn.Linear:
    """logistic or svm: attack vs rest on standardised features; z = w.(x - mean)/scale + b is stored as the
    attack row w/scale and bias b - (w/scale).mean."""
    target = y == attack_index
    if target.all() or not target.any():
        raise SmadlrpError(f"a {kind} head needs training images of the attack class and of the others "
                           f"({int(target.sum())} attack, {int((~target).sum())} other)")
    mean, scale = _scaling(x, opts.standardize)
    z = (x - mean) / scale
    model: LogisticRegression | LinearSVC
    if isinstance(opts, LogisticOptions):
        model = LogisticRegression(C=opts.C, tol=opts.tol, max_iter=opts.max_iter, class_weight=opts.class_weight,
                                   random_state=seed)
    else:
        model = LinearSVC(C=opts.C, tol=opts.tol, max_iter=opts.max_iter, class_weight=opts.class_weight,
                          dual="auto", random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(z, target)
    unconverged = _notify_warnings(caught, f"the {kind} head's solver", notify)
    w = np.asarray(model.coef_, dtype=np.float64)[0] / scale
    b = float(np.asarray(model.intercept_, dtype=np.float64)[0]) - float(w @ mean)
    fit = {"options": asdict(opts), "train": {"attack": int(target.sum()), "other": int((~target).sum())},
           "iterations": int(np.max(model.n_iter_)), "converged": not unconverged}
    return _linear_layer(*_binary_rows(w, b, attack_index, num_classes), kind, fit)


def _fit_linear(opts: LinearOptions, x: Array, y: NDArray[np.int64], vx: Array, vy: NDArray[np.int64],
                num_classes: int, seed: int) -> nn.Linear:
    """A softmax-regression layer trained by seeded Adam from zeros on standardised float32 features, folded."""
    mean, scale = _scaling(x, opts.standardize)
    with torch.inference_mode(False), torch.enable_grad():
        z = torch.from_numpy(((x - mean) / scale).astype(np.float32))
        target = torch.from_numpy(y)
        vz = torch.from_numpy(((vx - mean) / scale).astype(np.float32))
        vtarget = torch.from_numpy(vy)
        layer = nn.Linear(x.shape[1], num_classes)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        optimizer = torch.optim.Adam(layer.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        for epoch in range(1, opts.epochs + 1):
            for chunk in torch.randperm(len(z), generator=generator).split(opts.batch_size):
                loss = nn.functional.cross_entropy(layer(z[chunk]), target[chunk])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if len(vz):
                with torch.no_grad():
                    val_loss = float(nn.functional.cross_entropy(layer(vz), vtarget))
                if best is None or val_loss < best[0]:
                    best = (val_loss, epoch, copy.deepcopy(layer.state_dict()))
        if best is not None:
            layer.load_state_dict(best[2])
        weight_z = layer.weight.detach().double().numpy()
        bias_z = layer.bias.detach().double().numpy()
    weight = weight_z / scale
    bias = bias_z - weight @ mean
    fit = {"options": asdict(opts), "train": len(x), "epoch": best[1] if best else opts.epochs,
           "val_loss": best[0] if best else None}
    return _linear_layer(weight, bias, "linear", fit)


def _fit_gmm(opts: GmmOptions, x: Array, y: NDArray[np.int64], vx: Array, vy: NDArray[np.int64], attack_index: int,
             num_classes: int, seed: int, notify: Notify) -> GMMHead:
    """The mixture of the bona fide training rows (standardised, then folded back: means m + s * mu, Cholesky
    factors diag(1/s) P), calibrated on the validation split (`calibrate`)."""
    bona = x[y != attack_index]
    if len(bona) < max(2, opts.components):
        raise SmadlrpError(f"a gmm head with {opts.components} component(s) needs at least {max(2, opts.components)} "
                           f"bona fide training images, found {len(bona)}")
    dims = x.shape[1]
    if opts.covariance_type == "full" and len(bona) / opts.components <= dims:
        notify(f"gmm head: {len(bona)} bona fide images for {opts.components} full {dims}x{dims} covariance(s): "
               f"they rest on reg_covar={opts.reg_covar:g}; consider covariance_type=diag or more images")
    mean, scale = _scaling(bona, opts.standardize)
    mixture = GaussianMixture(n_components=opts.components, covariance_type=opts.covariance_type,
                              reg_covar=opts.reg_covar, max_iter=opts.max_iter, n_init=opts.n_init,
                              random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            mixture.fit((bona - mean) / scale)
        except ValueError as exc:
            raise SmadlrpError(f"the gmm head cannot be fitted ({shorten(str(exc), 160)}); try fewer components "
                               "or a larger reg_covar") from None
    unconverged = _notify_warnings(caught, "the gmm head's EM", notify)
    chol = np.asarray(mixture.precisions_cholesky_, dtype=np.float64)
    head = GMMHead(dims, opts.components, opts.covariance_type, num_classes, attack_index, dtype=torch.float64)
    with torch.no_grad():
        head.means.copy_(torch.from_numpy(mean + scale * np.asarray(mixture.means_, dtype=np.float64)))
        factor = scale[None, :, None] if opts.covariance_type == "full" else scale[None, :]
        head.precisions_cholesky.copy_(torch.from_numpy(chol / factor))
        head.log_weights.copy_(torch.from_numpy(np.log(np.asarray(mixture.weights_, dtype=np.float64))))
        nll_val = -head.log_likelihood(torch.from_numpy(vx)).numpy()
        nll_bona = -head.log_likelihood(torch.from_numpy(bona)).numpy()
    a, b, calibration = calibrate(nll_val, vy == attack_index, nll_bona, notify)
    with torch.no_grad():
        head.calibration_a.fill_(a)
        head.calibration_b.fill_(b)
    head.fit_info = {"options": asdict(opts), "train_bonafide": len(bona), "converged": not unconverged,
                     "iterations": int(mixture.n_iter_), "calibration": calibration}
    return head


# ---- calibration -------------------------------------------------------------------------------------------


def calibrate(nll: Array, attack: NDArray[np.bool_], train_bona_nll: Array,
              notify: Notify = _silent) -> tuple[float, float, dict[str, Any]]:
    """(a, b, record) mapping a negative log-likelihood s (nats) to P(attack) = sigmoid(a * s + b), a > 0.

    With validation images of both classes (`nll` (M,), `attack` (M,) bool): Platt scaling, the 1-D logistic
    regression of the labels on s with Platt's smoothed targets ((n+ + 1) / (n+ + 2) for attacks, 1 / (n- + 2)
    for bona fide; always a finite fit) solved by Newton's method (`platt_scaling`). Otherwise, or when Platt's
    slope is not positive (the validation attacks are not less likely than its bona fide images, so a larger NLL
    would mean more bona fide), the fallback, with a notice for the latter: standardise by the mean m and standard
    deviation sd of the bona fide NLLs (validation, or the training ones when validation has fewer than two),
    a = 1 / sd, b = -m / sd - FALLBACK_SIGMAS: P(attack) = 0.5 at m + 3 sd.
    """
    positives, negatives = int(attack.sum()), int((~attack).sum())
    if positives and negatives:
        a, b = platt_scaling(nll, attack)
        if a > 0:
            return a, b, {"method": "platt", "split": "val", "attack": positives, "bonafide": negatives}
        notify(f"gmm calibration: the validation attacks are not less likely than its bona fide images under the "
               f"bona fide model (Platt slope {a:.3g} <= 0): calibrating on the bona fide scores alone")
    reference, split = (nll[~attack], "val") if negatives >= 2 else (train_bona_nll, "train")
    if split == "train":
        notify("gmm calibration: fewer than two validation bona fide images; calibrating on the training bona fide "
               "images (their likelihood is optimistic)")
    m = float(np.mean(reference))
    sd = float(np.std(reference, ddof=1)) if len(reference) > 1 else 0.0
    if not sd > 1e-12 * max(1.0, abs(m)):  # constant scores: unit scale
        sd = 1.0
    return 1.0 / sd, -m / sd - FALLBACK_SIGMAS, {"method": "bonafide standardisation", "split": split,
                                                 "mean_nll": m, "std_nll": sd, "sigmas": FALLBACK_SIGMAS}


def platt_scaling(scores: Array, positive: NDArray[np.bool_], max_iter: int = 100) -> tuple[float, float]:
    """(a, b) minimising the cross-entropy of sigmoid(a * s + b) against Platt's smoothed targets, by Newton's
    method with backtracking (Lin, Lin & Weng 2007) on standardised scores; `scores` (M,), `positive` (M,) bool."""
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    t = np.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    center, spread = float(s.mean()), float(s.std())
    spread = spread if spread > 0 else 1.0
    u = (s - center) / spread

    def loss(params: Array) -> float:
        v = params[0] * u + params[1]
        return float(np.sum(np.logaddexp(0.0, v) - t * v))  # -t log p - (1 - t) log(1 - p), p = sigmoid(v)

    params = np.array([0.0, math.log((n_pos + 1.0) / (n_neg + 1.0))])
    current = loss(params)
    for _ in range(max_iter):
        p = expit(params[0] * u + params[1])
        gradient = np.array([np.sum((p - t) * u), np.sum(p - t)])
        if np.max(np.abs(gradient)) < 1e-12 * len(u):
            break
        weight = p * (1.0 - p)
        hessian = np.array([[np.sum(weight * u * u), np.sum(weight * u)], [np.sum(weight * u), np.sum(weight)]])
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), -gradient)
        size = 1.0
        while size > 1e-10:
            candidate = params + size * step
            value = loss(candidate)
            if value <= current + 1e-4 * size * float(gradient @ step):
                break
            size /= 2.0
        else:
            break
        params, current = candidate, value
    return float(params[0] / spread), float(params[1] - params[0] * center / spread)


# ---- describing and rebuilding heads -----------------------------------------------------------------------


def head_spec(head: nn.Module) -> dict[str, Any]:
    """The JSON description of a frozen head: kind, dims, num_classes, for gmm components, covariance_type and
    attack_index, and "fit" (how it was fitted) when known. TypeError for a module that is no frozen head."""
    if isinstance(head, GMMHead):
        spec: dict[str, Any] = {"kind": "gmm", "dims": head.dims, "num_classes": head.num_classes,
                                "components": head.components, "covariance_type": head.covariance_type,
                                "attack_index": head.attack_index}
        return {**spec, "fit": head.fit_info} if head.fit_info else spec
    if isinstance(head, nn.Linear):
        tag = getattr(head, HEAD_ATTRIBUTE, {"kind": "linear"})
        spec = {"kind": tag["kind"], "dims": head.in_features, "num_classes": head.out_features}
        return {**spec, "fit": tag["fit"]} if tag.get("fit") else spec
    raise TypeError(f"not a frozen head: {type(head).__name__}")


def build_head(spec: Mapping[str, Any], in_features: int, num_classes: int) -> nn.Module:
    """An empty head of the shapes `spec` (from `head_spec`) describes, for `in_features` features and
    `num_classes` classes, ready for `load_state_dict`; SmadlrpError naming what is wrong with a spec that is
    unknown or does not fit."""
    if not isinstance(spec, Mapping):
        raise SmadlrpError(f"frozen head spec {shown(spec)}: not a JSON object")
    if in_features < 1 or num_classes < 2:
        raise SmadlrpError(f"a frozen head needs at least 1 feature and 2 classes, not {in_features} and {num_classes}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise SmadlrpError(f"frozen head spec: unknown kind {shown(kind)} (expected one of {', '.join(KINDS)})")
    for name, expected in (("dims", in_features), ("num_classes", num_classes)):
        if name in spec and spec[name] != expected:
            raise SmadlrpError(f"frozen {kind} head spec: {name} {shown(spec[name])}, the network has {expected}")
    fit = spec.get("fit")
    if kind != "gmm":
        layer = nn.Linear(in_features, num_classes)
        setattr(layer, HEAD_ATTRIBUTE, {"kind": kind, "fit": fit} if fit else {"kind": kind})
        return layer
    components, covariance, attack = spec.get("components"), spec.get("covariance_type"), spec.get("attack_index")
    if type(components) is not int or components < 1:
        raise SmadlrpError(f"frozen gmm head spec: components {shown(components)} is not a positive integer")
    if covariance not in COVARIANCE_TYPES:
        raise SmadlrpError(f"frozen gmm head spec: covariance_type {shown(covariance)} (expected full or diag)")
    if type(attack) is not int or not 0 <= attack < num_classes:
        raise SmadlrpError(f"frozen gmm head spec: attack_index {shown(attack)} does not fit {num_classes} classes")
    head = GMMHead(in_features, components, covariance, num_classes, attack)
    head.fit_info = dict(fit) if isinstance(fit, Mapping) else {}
    return head


# ---- explaining a GMM head ---------------------------------------------------------------------------------

GMM_HEAD_RULE = "gradient x input"  # how explain labels the GMM head's share of an explanation


def _taylor(call: NodeCall) -> torch.Tensor:
    """The head's relevance by gradient x input of its logits: R_f = f * J^T (R / y); starting from the target
    logit y_t, R_f = f * dy_t/df. Not conservative: the quadratic form has no LRP rule."""
    return PoolFunction.apply(call.operand(), lambda t: call.call_with(t))  # type: ignore[no-any-return]


register_op(OpKind("gmm-head", "gradient x input of the score: R_f = f * dS/df (not conservative)",
                   modules=(GMMHead,), apply=_taylor))
