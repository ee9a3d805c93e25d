"""LoRA adaptation of the attention projections of transformer detectors (`smadlrp finetune --lora RANK`), through
peft.

MADation (WACVW 2025) adapts only the query and value projections of a frozen CLIP; that is the default here, and
`--lora-targets` chooses among `q`, `k`, `v` and `out` (the attention's output projection).

Splitting: packed q/k/v projections are first split into separate Linear layers (`split_attention`).

Every LoRA-adapted module is then checked with one forward pass: an adapter that the network bypasses (by reading
a weight functionally) raises SmadlrpError naming it.

LoRA. A projection with weight W (out, in) gets A (rank, in) and B (out, rank), B zero at the start; it computes
`x W^T + b + scaling * (x A^T) B^T` with `scaling = alpha / rank`, i.e. its merged weight is
`W + scaling * B @ A`. The default alpha is the rank (scaling 1), see `LoraSettings`.

Layouts:

* the training model's own `state_dict()` (split layout): peft's, e.g. `M.q.base_layer.weight`,
  `M.q.lora_A.default.weight`, `M.q.lora_B.default.weight`; rebuilding the original network and attaching LoRA with
  the same settings gives the same layout, so it can be loaded back (resume);
* `LoraAdapter.merged_state_dict()`: exactly the keys and shapes of the original network, LoRA merged in;
* `LoraAdapter.adapter_state_dict()`: only `"<module path>.lora_A"` (rank, in) and `"<module path>.lora_B"`
  (out, rank) for each adapted projection, the path in the split layout (e.g.
  `encoder.layers.encoder_layer_0.self_attention.q`, `blocks.0.attn.qkv.v`, `features.0.0.attn.proj`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from smadlrp.core.errors import SmadlrpError, UsageError, shorten, shown
from smadlrp.detector.split_attention import (
    TARGETS,
    AttentionUnit,
    SplitQKV,
    is_lora_layer,
    join,
    split_attention,
)

DEFAULT_TARGETS = ("q", "v")  # MADation's choice
ADAPTER = "default"  # peft's adapter name
TRANSFORMERS = "vit_*, swin_*, maxvit_t, clip_*, timm ViTs"


@dataclass(frozen=True)
class LoraSettings:
    """What `--lora RANK`, `--lora-alpha` and `--lora-targets` ask for.

    `rank`: the inner dimension r of every adapter (A is (r, in), B is (out, r)). `alpha`: the update is scaled by
    alpha / r. `from_options` defaults alpha to the rank, i.e. scaling 1: the merged update is exactly B @ A, so a
    saved adapter reads without a scale, and it is the LoRA paper's own setting (alpha fixed to the first rank
    tried). `targets`: which projections of each attention get adapters, among q, k, v and out.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def from_options(cls, rank: int, alpha: float | None = None,
                     targets: str | Sequence[str] | None = None) -> LoraSettings:
        """Settings from the command-line values (alpha None: the rank; targets None: q and v; a string: "q,v"),
        validated (UsageError)."""
        chosen = DEFAULT_TARGETS if targets is None else parse_targets(targets) if isinstance(targets, str) \
            else tuple(targets)
        settings = cls(rank, float(rank) if alpha is None else alpha, chosen)
        settings.validate()
        return settings

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor of every LoRA update."""
        return self.alpha / self.rank

    def validate(self) -> None:
        """UsageError (one line) for a rank below 1, an alpha that is not a positive finite number, or targets
        that are empty, repeated or unknown."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UsageError(f"--lora {shown(self.rank)}: the LoRA rank must be a whole number of at least 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise UsageError(f"--lora-alpha {shown(self.alpha)}: LoRA alpha must be a positive finite number")
        _check_targets(tuple(self.targets))


def _check_targets(targets: tuple[str, ...]) -> None:
    valid = ", ".join(TARGETS)
    if not targets:
        raise UsageError(f"--lora-targets: name at least one of {valid}")
    for target in targets:
        if target not in TARGETS:
            raise UsageError(f"--lora-targets: unknown target {shown(target)}; choose among {valid}")
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise UsageError(f"--lora-targets: {', '.join(repeated)} named twice; choose each of {valid} at most once")


def parse_targets(text: str) -> tuple[str, ...]:
    """"q,v" -> ("q", "v") (spaces and case ignored); UsageError for empty, unknown or repeated names."""
    targets = tuple(part.strip().lower() for part in text.split(",")) if text.strip() else ()
    if "" in targets:
        raise UsageError(f"--lora-targets {shown(text)}: an empty name; write e.g. q,v")
    _check_targets(targets)
    return targets


# --- splitting --------------------------------------------------------------------------------------------------


def _matrix(layer: nn.Module, which: str) -> nn.Linear:
    """The LoRA matrix `which` ("A" or "B") of a peft LoRA layer, as its Linear layer (weight (rank, in) or
    (out, rank))."""
    matrices = getattr(layer, f"lora_{which}")
    assert isinstance(matrices, nn.ModuleDict)
    matrix = matrices[ADAPTER]
    assert isinstance(matrix, nn.Linear)
    return matrix


# --- attaching --------------------------------------------------------------------------------------------------


class LoraAdapter:
    """A model carrying LoRA adapters (`attach_lora`), the original state-dict layout it came from, and the views a
    trainer needs: the trainable parameters, the merged state dict of the original layout, the adapter tensors."""

    def __init__(self, model: nn.Module, settings: LoraSettings, arch_name: str, original: dict[str, torch.Size],
                 units: list[AttentionUnit], adapted: list[str], head_prefixes: tuple[str, ...]) -> None:
        self.model = model
        self.settings = settings
        self.arch_name = arch_name
        self.original_layout = original  # key -> shape of the original network's state dict, in its order
        self.units = units
        self.adapted = adapted  # module paths of the LoRA layers, in the split model
        self.head_prefixes = head_prefixes
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    def _layers(self) -> Iterator[tuple[str, nn.Module]]:
        for path in self.adapted:
            yield path, self.model.get_submodule(path)

    def train(self, mode: bool = True) -> None:
        """Put the model in training mode (`mode` True; call this instead of `model.train()`) or eval mode. In
        training mode the batch-norm layers of the frozen network stay in eval mode: their running statistics are
        buffers outside LoRA and the head, and are kept as they were, like every other frozen tensor."""
        self.model.train(mode)
        if mode:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the LoRA A and B matrices and the head, in the model's order."""
        return list(self._trainable)

    @property
    def trainable_count(self) -> int:
        """The number of trainable scalars (LoRA and head)."""
        return sum(p.numel() for p in self._trainable)

    def lora_parameter_names(self) -> list[str]:
        """The names of the LoRA parameters in the training model's state dict (split layout)."""
        return [join(path, f"lora_{ab}", ADAPTER, "weight") for path in self.adapted for ab in ("A", "B")]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """`"<module path>.lora_A"` (rank, in) and `"<module path>.lora_B"` (out, rank) of every adapted projection
        (paths of the split layout), contiguous CPU copies; the update of a projection is (alpha / rank) * B @ A."""
        state: dict[str, Tensor] = {}
        for path, layer in self._layers():
            for ab in ("A", "B"):
                weight = _matrix(layer, ab).weight
                state[f"{path}.lora_{ab}"] = weight.detach().to("cpu", copy=True).contiguous()
        return state

    def merged_state_dict(self) -> dict[str, Tensor]:
        """A state dict of the original network (exactly its keys and shapes, in its order) with every LoRA update
        merged into its projection's weight and the split projections packed again; copies: the training model is
        left as it is. Loaded into a freshly built original network, it computes what the adapted model computes."""
        with torch.no_grad():
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            for path, layer in self._layers():
                a = state.pop(join(path, "lora_A", ADAPTER, "weight"))
                b = state.pop(join(path, "lora_B", ADAPTER, "weight"))
                base = state.pop(join(path, "base_layer", "weight"))
                scaling = float(layer.scaling[ADAPTER])  # type: ignore[index]
                state[f"{path}.weight"] = (base + scaling * (b.to(base.dtype) @ a.to(base.dtype))).to(base.dtype)
                if join(path, "base_layer", "bias") in state:
                    state[f"{path}.bias"] = state.pop(join(path, "base_layer", "bias"))
            for unit in self.units:
                _pack(unit, state, self.original_layout)
        missing = [k for k in self.original_layout if k not in state]
        extra = [k for k in state if k not in self.original_layout]
        wrong = [k for k in self.original_layout if k in state and state[k].shape != self.original_layout[k]]
        if missing or extra or wrong:
            raise SmadlrpError(f"cannot merge the LoRA adapters of {self.arch_name} back into its layout "
                               f"(missing {missing[:2]}, unexpected {extra[:2]}, reshaped {wrong[:2]})")
        return {k: state[k] for k in self.original_layout}

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: rank, alpha, scaling, targets, adapted modules, trainable and total parameters (all
        parameters of the training model, LoRA included)."""
        return {
            "rank": self.settings.rank,
            "alpha": self.settings.alpha,
            "scaling": self.settings.scaling,
            "targets": list(self.settings.targets),
            "adapted_modules": len(self.adapted),
            "trainable_parameters": self.trainable_count,
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
        }


def _pack(unit: AttentionUnit, state: dict[str, Tensor], original: dict[str, torch.Size]) -> None:
    """Replace the split tensors of `unit` in `state` (merged, in the split layout) by the original packed ones."""
    p = unit.path

    def take(name: str) -> Tensor | None:
        return state.pop(f"{p}.{name}", None)

    if unit.kind == "mha":
        weights = [take(f"{t}.weight") for t in ("q", "k", "v")]
        biases = [take(f"{t}.bias") for t in ("q", "k", "v")]
        if f"{p}.in_proj_weight" in original:
            state[f"{p}.in_proj_weight"] = torch.cat(weights)  # type: ignore[arg-type]
        else:
            for t, weight in zip(("q", "k", "v"), weights, strict=True):
                state[f"{p}.{t}_proj_weight"] = weight  # type: ignore[assignment]
        if biases[0] is not None:
            state[f"{p}.in_proj_bias"] = torch.cat(biases)  # type: ignore[arg-type]
        state[f"{p}.out_proj.weight"] = take("out.weight")  # type: ignore[assignment]
        out_bias = take("out.bias")
        if out_bias is not None:
            state[f"{p}.out_proj.bias"] = out_bias
        return
    state[f"{p}.weight"] = torch.cat([take(f"{t}.weight") for t in ("q", "k", "v")])  # type: ignore[misc]
    q_bias, k_bias, v_bias, ignored = take("q.bias"), take("k.bias"), take("v.bias"), take("k_bias")
    if q_bias is not None and v_bias is not None:
        state[f"{p}.bias"] = torch.cat([q_bias, k_bias if k_bias is not None else ignored, v_bias])  # type: ignore[list-item]


def attach_lora(model: nn.Module, settings: LoraSettings, head_prefixes: tuple[str, ...], arch_name: str,
                image_size: int) -> LoraAdapter:
    """Adapt the attention projections of `model` (in place) with LoRA: split packed projections, inject peft's
    LoRA layers on the `settings.targets` projections, and make only the LoRA matrices and the parameters whose
    names start with one of `head_prefixes` (e.g. "heads.head.") trainable. One forward pass of a (1, 3,
    `image_size`, `image_size`) input checks that every adapter is called.

    UsageError when `model` has no attention projection (a CNN) or the rank exceeds a projection's width;
    SmadlrpError when an adapter would be bypassed. After an error `model` may be left with its projections split
    (computing the same function): build it again rather than reuse it.
    """
    try:
        import peft
    except ImportError:
        raise UsageError("--lora needs the lora extra: pip install 'smadlrp[lora]'") from None
    settings.validate()
    original = {k: v.shape for k, v in model.state_dict().items()}
    units = split_attention(model)
    if not units:
        raise UsageError(f"--lora: {arch_name} has no attention projections to adapt; LoRA applies to transformers "
                         f"({TRANSFORMERS})")
    paths = [path for unit in units for t in settings.targets if (path := unit.projections[t]) is not None]
    if not paths:
        raise UsageError(f"--lora-targets {','.join(settings.targets)}: {arch_name} has no such projections")
    for path in paths:
        layer = model.get_submodule(path)
        assert isinstance(layer, nn.Linear)
        width = min(layer.in_features, layer.out_features)
        if settings.rank > width:
            raise UsageError(f"--lora {settings.rank}: the rank exceeds the width {width} of {arch_name}'s "
                             f"projection {path}; choose at most {width}")
    # peft annotates lora_alpha as int, but takes any number: its scaling is lora_alpha / r
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=paths,  # type: ignore[arg-type]
                             lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # no model.config needed; warns nothing
    adapted = [path for path, module in model.named_modules() if is_lora_layer(module)]
    if sorted(adapted) != sorted(paths):
        raise SmadlrpError(f"--lora: peft adapted {len(adapted)} module(s) of {arch_name}, {len(paths)} asked")
    lora = {id(p) for path in adapted for ab in "AB" for p in _matrix(model.get_submodule(path), ab).parameters()}
    heads_found = set()
    for name, param in model.named_parameters():
        prefix = next((h for h in head_prefixes if name.startswith(h)), None)
        param.requires_grad_(id(param) in lora or prefix is not None)
        if prefix is not None:
            heads_found.add(prefix)
    absent = [h for h in head_prefixes if h not in heads_found]
    if absent:
        raise SmadlrpError(f"--lora: {arch_name} has no head parameters named {absent[0]}*")
    adapter = LoraAdapter(model, settings, arch_name, original, units, adapted, head_prefixes)
    check_adapters_called(model, adapted, torch.zeros(1, 3, image_size, image_size), arch_name)
    return adapter


def check_adapters_called(model: nn.Module, adapted: list[str], example: Tensor, arch_name: str) -> None:
    """Run `example` (B, 3, H, W) through `model` (eval mode, no gradients; its modes are restored) and raise
    SmadlrpError naming the first LoRA layer among `adapted` (module paths) whose adapter was not called, i.e. that
    the network bypasses by reading its weights directly. An adapter inside a `SplitQKV` counts as called when the
    `SplitQKV` is (it applies its adapters itself, and has no packed weight anyone could read)."""
    called: set[str] = set()
    handles = []
    for path in adapted:
        parent = model.get_submodule(path.rpartition(".")[0])
        watched = parent if isinstance(parent, SplitQKV) else _matrix(model.get_submodule(path), "A")
        handles.append(watched.register_forward_pre_hook(lambda _m, _x, path=path: called.add(path)))
    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(example.to(parameter.device, parameter.dtype))
    except SmadlrpError:
        raise
    except Exception as exc:  # noqa: BLE001 - the network's own failure on the split projections, any type
        problem = shorten(" ".join(f"{exc.__class__.__name__}: {exc}".split()), 100)
        raise SmadlrpError(f"--lora: {arch_name} does not run with split attention projections ({problem}); it "
                           "reads them in a way LoRA cannot adapt") from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    skipped = [path for path in adapted if path not in called]
    if skipped:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise SmadlrpError(f"--lora: the adapter on {skipped[0]}{more} of {arch_name} is never called: the network "
                           "reads that projection's weight directly, which would bypass LoRA")
