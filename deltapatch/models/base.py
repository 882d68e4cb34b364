"""The frozen base model: architecture from torchvision, weights from a local file.

Weights are read with safetensors, or with `torch.load(weights_only=True)` for .pt/.pth files, so
a user-supplied checkpoint can never run code. A sidecar JSON beside the weights
(`<weights>.json`) records the base task's class names and the fingerprint.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from deltapatch.config import ConfigError, resolve_path, section
from deltapatch.errors import DeltapatchError
from deltapatch.fingerprint import fingerprint


@dataclass
class BaseSettings:
    """params.yaml `base:` section."""

    arch: str = "resnet18"
    small_input_stem: bool = True
    stem_stride: int = 2
    input_size: int = 32
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    task: str = "digits"
    eval_set: str = "builtin:digits"
    weights: str = "models/base.safetensors"


@dataclass
class BaseModel:
    """A loaded, frozen base model (eval mode) and what is known about it."""

    model: nn.Module
    settings: BaseSettings
    class_names: list[str]
    fingerprint: str
    weights_path: Path

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def base_settings(params: dict[str, Any]) -> BaseSettings:
    return section(params, "base", BaseSettings)


def build_architecture(settings: BaseSettings, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier, stem adapted for small inputs if asked."""
    try:
        model = torchvision.models.get_model(settings.arch, weights=None, num_classes=num_classes)
    except ValueError:
        raise ConfigError(
            f"params.yaml base.arch '{settings.arch}' is not a torchvision model; "
            f"e.g. resnet18, resnet50, mobilenet_v3_small, vgg11_bn"
        ) from None
    if settings.small_input_stem:
        adapt_small_input(model, settings)
    return model


# The ImageNet designs downsample 32× (a 32×32 input ends at 1×1, after losing most of its detail in
# the stem). `small_input_stem` makes every supported family downsample 8·stem_stride× instead
# (16× by default: 32×32 → 2×2, the same map the default ResNet-18 ends at).
SMALL_INPUT_FAMILIES = "ResNet/ResNeXt/Wide-ResNet, DenseNet, ConvNeXt, MobileNetV2/V3, EfficientNet/V2, RegNet, VGG"


def adapt_small_input(model: nn.Module, settings: BaseSettings) -> None:
    """Adapt `model`'s stem (in place) to small inputs; refuses the families it does not know.

    - ResNet, DenseNet: the 7×7/2 conv + 3×3/2 max-pool become one 3×3 conv of stride `stem_stride`.
    - ConvNeXt: the 4×4/4 patchify conv becomes `stem_stride`×`stem_stride`/`stem_stride` (3×3/1 for 1).
    - MobileNetV2/V3, EfficientNet, RegNet: the 3×3/2 stem conv gets stride 1 (needs stem_stride 2).
    - VGG: the last max-pool is dropped and the 7×7 average pool + 25088-wide first Linear become a
      global average pool + a 512-wide one (needs stem_stride 2).
    """
    stride = settings.stem_stride
    models = torchvision.models
    if isinstance(model, models.ResNet):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride, 1, bias=False)
        model.maxpool = nn.Identity()
    elif isinstance(model, models.DenseNet):
        model.features.conv0 = nn.Conv2d(3, model.features.conv0.out_channels, 3, stride, 1, bias=False)
        model.features.pool0 = nn.Identity()
    elif isinstance(model, models.ConvNeXt):
        patchify = model.features[0][0]
        kernel, padding = (stride, 0) if stride > 1 else (3, 1)
        model.features[0][0] = nn.Conv2d(3, patchify.out_channels, kernel, stride, padding)
    elif isinstance(model, models.MobileNetV2 | models.MobileNetV3 | models.EfficientNet | models.RegNet):
        _require_stride_2(settings)
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        stem.stride = (1, 1)
    elif isinstance(model, models.VGG):
        _require_stride_2(settings)
        pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        model.features[pools[-1]] = nn.Identity()
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        first = model.classifier[0]
        channels = [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels
        model.classifier[0] = nn.Linear(channels, first.out_features)
    else:
        raise ConfigError(
            f"base.small_input_stem is defined for {SMALL_INPUT_FAMILIES}, not '{settings.arch}'; "
            f"pick one of those families, or set base.small_input_stem: false and base.input_size (and "
            f"data.image_size) to the size the architecture was designed for (e.g. 224)"
        )


def _require_stride_2(settings: BaseSettings) -> None:
    if settings.stem_stride != 2:
        raise ConfigError(
            f"base.stem_stride {settings.stem_stride} is only available for ResNet, DenseNet and ConvNeXt stems; "
            f"'{settings.arch}' keeps its own 3×3 stem conv at stride 1 (16× downsampling in all): set "
            f"base.stem_stride: 2"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a .pt/.pth checkpoint, never executing pickled code."""
    if not path.is_file():
        raise ConfigError(f"base weights {path} not found; run `deltapatch pretrain` or fix base.weights")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(
            f"{path}: cannot read weights safely ({str(exc).splitlines()[0]}); export them as a plain "
            f"state dict (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a state dict of tensors; save model.state_dict()")
    return state


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def load_base(params: dict[str, Any], device: torch.device | str = "cpu") -> BaseModel:
    """Build the base architecture and load its local weights (frozen, eval mode)."""
    settings = base_settings(params)
    weights = resolve_path(params, settings.weights)
    state = read_state_dict(weights)
    class_names = _class_names(weights, state)
    model = build_architecture(settings, len(class_names))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"{weights} does not match base.arch '{settings.arch}' (small_input_stem="
            f"{settings.small_input_stem}): {first}; fix base.arch or the weights file"
        ) from None
    model.eval().to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(model, settings, class_names, fingerprint(state), weights)


def _class_names(weights: Path, state: dict[str, torch.Tensor]) -> list[str]:
    sidecar = sidecar_path(weights)
    if sidecar.is_file():
        return list(json.loads(sidecar.read_text())["class_names"])
    linear = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not linear:
        raise DeltapatchError(f"{weights}: no classifier weight found and no {sidecar.name} with class_names")
    return [str(i) for i in range(linear[-1].shape[0])]


def write_sidecar(weights: Path, settings: BaseSettings, class_names: list[str], fp: str, metrics: dict[str, float]) -> None:
    sidecar_path(weights).write_text(
        json.dumps({"class_names": class_names, "fingerprint": fp, "settings": asdict(settings), "metrics": metrics}, indent=2)
        + "\n"
    )
