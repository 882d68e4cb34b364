"""Base weights as versioned artefacts: register a weights file as a version of ``<prefix>base`` (with
its base-task accuracy), fetch a registered version's weights, put a base in service (the switch of
:mod:`deltapatch.registry.bases`, then ``base.weights`` becomes that base, tracked by DVC).

    new = register_weights(params, "new-base.safetensors")   # not in service yet
    p = base_params(params, new.version)                       # params whose base: is that version
    put_in_service(params, new.version, {"shapes": 7}, {}, reason="upgrade")
    roll_back(params)                                          # the previous base and its patches

``base.weights`` follows the base in service so that everything reading the project's base (a new
task's `patch-task` run, its gate, `deltapatch predict`) uses it; serving itself reads the registry
(:func:`serving_base_params`), so a crash between the switch and the file copy serves the right base.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import torch
from filelock import FileLock
from safetensors.torch import save_file

from deltapatch.config import ConfigError, state_dir
from deltapatch.data.sources import base_eval_data
from deltapatch.data.versioning import VersioningError
from deltapatch.data.versioning.tracking import track_files
from deltapatch.errors import FingerprintMismatch, RegistryError
from deltapatch.evaluate import pristine_logits
from deltapatch.fingerprint import fingerprint
from deltapatch.models.base import (
    PACKAGE_PREFIX,
    BaseModel,
    BaseSettings,
    base_settings,
    base_weights_path,
    load_base,
    read_base_state,
    read_state_dict,
    sidecar_path,
    write_sidecar,
)
from deltapatch.registry import base_switch, bases
from deltapatch.registry.base_model import register_base
from deltapatch.registry.reading import champions
from deltapatch.registry.runtime import load_base_files
from deltapatch.registry.tracking import configure
from deltapatch.train import Normalizer, accuracy

log = logging.getLogger(__name__)

ARCH_KEYS = ("arch", "small_input_stem", "stem_stride", "input_size", "mean", "std", "interpolation", "crop_pct")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def base_accuracy(params: dict[str, Any], base: BaseModel) -> float:
    """Accuracy of a loaded base on the test split of the base evaluation set (params.yaml base.eval_set)."""
    data = base_eval_data(params)
    device = next(base.model.parameters()).device
    norm = Normalizer(base.settings.mean, base.settings.std, device)
    return accuracy(pristine_logits(base.model, data.test, norm), data.test.labels)


def _weights_in(folder: Path) -> Path:
    found = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if len(found) != 1:
        raise RegistryError(f"{folder}: expected one weights file of a registered base, found {[p.name for p in found]}")
    return found[0]


def fetch_base(params: dict[str, Any], version: int) -> Path:
    """The weights file (sidecar beside it) of a registered base version, downloaded once into
    ``.deltapatch/bases/v<N>/`` (any worker machine can call this) and checked against its fingerprint."""
    info = bases.get_base(params, version)
    root = state_dir(params) / "bases"
    folder = root / f"v{info.version}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"v{info.version}.lock")):
        marker = folder / "FINGERPRINT"
        if marker.is_file() and marker.read_text().strip() == info.fingerprint:
            return _weights_in(folder / "files")
        configure(params)
        tmp = Path(tempfile.mkdtemp(prefix=f"v{info.version}-", dir=root))
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{bases.base_model_name(params)}/{info.version}", dst_path=str(tmp)))
            got = fingerprint(read_state_dict(_weights_in(local / "artifacts")))
            if got != info.fingerprint:
                raise FingerprintMismatch(f"base v{info.version}: the downloaded weights have fingerprint {got[:19]}…, "
                                          f"registered {info.fingerprint[:19]}…; the store is corrupt")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (local / "artifacts").rename(folder / "files")
            marker.write_text(info.fingerprint + "\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _weights_in(folder / "files")


def local_fingerprint(params: dict[str, Any]) -> str:
    path = base_weights_path(params)
    return fingerprint(read_base_state(path, base_settings(params))) if path.is_file() else ""


def base_params(params: dict[str, Any], version: int | str) -> dict[str, Any]:
    """`params` whose ``base:`` section is registered base `version` (the registry's copy of its weights,
    architecture from its sidecar); the project's own params when base.weights already is that base."""
    info = bases.get_base(params, version)
    if local_fingerprint(params) == info.fingerprint:
        return params
    weights = fetch_base(params, info.version)
    sidecar = json.loads(sidecar_path(weights).read_text()) if sidecar_path(weights).is_file() else {}
    out = copy.deepcopy(params)
    section = dict(out.get("base") or {})
    section.update({k: v for k, v in (sidecar.get("settings") or {}).items() if k in ARCH_KEYS})
    section["weights"] = str(weights)
    out["base"] = section
    return out


def serving_base_params(params: dict[str, Any], view: bases.ServingSet) -> dict[str, Any]:
    """The params of the base a serving set names (the project's base.weights before any base version)."""
    return params if view.base_version is None else base_params(params, view.base_version)


def register_weights(params: dict[str, Any], weights: str | Path, arch: str | None = None) -> bases.BaseVersion:
    """Register a weights file (safetensors, or .pt/.pth read weights-only) as a version of ``<prefix>base``,
    not in service. Architecture: `arch`, else the file's sidecar, else params.yaml. Its base-task accuracy
    is measured now and tagged. Idempotent per fingerprint. A missing, unreadable or mismatching file
    raises ConfigError naming it and the fix."""
    src = Path(weights).expanduser().resolve()
    if not src.is_file():
        raise ConfigError(f"{src}: no such weights file; pass the .safetensors (or .pt state dict) of the new base")
    settings = asdict(base_settings(params))
    side = bases._json(sidecar_path(src).read_text(), {}) if sidecar_path(src).is_file() else {}
    settings.update({k: v for k, v in (side.get("settings") or {}).items() if k in ARCH_KEYS})
    if arch:
        settings["arch"] = arch
    state = _state_for_registry(src, BaseSettings(**settings))
    fp = fingerprint(state)
    stage = state_dir(params) / "bases" / "incoming" / fp.removeprefix("sha256:")[:16]
    stage.mkdir(parents=True, exist_ok=True)
    staged = stage / "base.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(staged))
    write_sidecar(staged, BaseSettings(**settings), side.get("class_names") or _class_names(params, state), fp, {})
    try:
        base = load_base_files(staged)
    except ConfigError as exc:  # it names the staged copy and params.yaml: name the user's file and option
        arch_name = settings["arch"]
        if "is not a torchvision model" in str(exc):
            raise ConfigError(f"architecture '{arch_name}' is not a torchvision model",
                              hint="pass --arch with a torchvision name, e.g. resnet18, resnet50, vgg11_bn") from None
        raise ConfigError(f"{src}: these weights do not fit architecture '{arch_name}' "
                          f"(small_input_stem={settings['small_input_stem']})",
                          hint=f"pass --arch <the torchvision name of {src.name}'s architecture>") from None
    version = register_base(params, base)
    acc = base_accuracy(params, base)
    base_switch.set_base_tags(params, version, {bases.T_BASE_ACC: f"{acc:.6f}", bases.T_ARCH: base.settings.arch})
    return bases.get_base(params, version)


def _state_for_registry(src: Path, settings: BaseSettings) -> dict[str, torch.Tensor]:
    """The file's tensors under the architecture's names (read_base_state); a file whose names are the
    definition's but that does not fit is left to load_base_files, which says which architecture to pass."""
    try:
        return read_base_state(src, settings)
    except ConfigError:
        return read_state_dict(src)


def _class_names(params: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    """The project base's class names when the new classifier has as many outputs, else 0..K-1."""
    linear = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    count = int(linear[-1].shape[0]) if linear else 0
    sidecar = sidecar_path(base_weights_path(params))
    names = bases._json(sidecar.read_text(), {}).get("class_names", []) if sidecar.is_file() else []
    return list(names) if len(names) == count else [str(i) for i in range(count)]


def adopt(params: dict[str, Any]) -> bases.BaseVersion:
    """The base in service; when there is none yet (a project from before base versions), the project's
    base.weights is registered (if needed) and put in service with the champions trained on it. Its
    accuracy and DVC commit are recorded when missing, and a switch interrupted after its alias move
    is finished (per-task champions, base.weights)."""
    current = bases.champion_base(params)
    if current is None:
        base = load_base(params)
        version = register_base(params, base)
        per_task = champions(params)
        tasks = {t: int(i["version"]) for t, i in per_task.items() if i["base_fingerprint"] == base.fingerprint}
        unavailable = {t: f"champion v{i['version']} was trained on another base ({i['base_fingerprint'][:19]}…)"
                       for t, i in per_task.items() if t not in tasks}
        base_switch.switch(params, version, tasks, unavailable, reason="the project's base put in service", action="adopt")
        current = bases.get_base(params, version)
    else:  # a switch interrupted after its alias move: finish its bookkeeping
        fixed = base_switch.repair(params)
        if fixed:
            log.warning("finished an interrupted base switch: the champions of %s follow base v%s", fixed, current.version)
        local = local_fingerprint(params)
        if local != current.fingerprint and any(b.fingerprint == local for b in bases.list_bases(params)):
            _install_local(params, current.version)  # base.weights is a stale registered base, not a user's new file
    if current.base_acc is None:
        p = base_params(params, current.version)
        acc = base_accuracy(params, load_base(p))
        base_switch.set_base_tags(params, current.version, {bases.T_BASE_ACC: f"{acc:.6f}"})
    if not current.dvc_rev and local_fingerprint(params) == current.fingerprint:
        _track_local(params, current.version, f"base: track deltapatch-base v{current.version} with DVC")
    return bases.get_base(params, current.version)


def _track_local(params: dict[str, Any], version: int, message: str) -> str:
    """DVC-track base.weights (+ sidecar) and tag the version with the commit; '' when it cannot be
    tracked (e.g. outside the project): the registry still holds the weights."""
    weights = base_weights_path(params).resolve()
    files = [weights] + ([sidecar_path(weights)] if sidecar_path(weights).is_file() else [])
    try:
        commit = track_files(params, files, message)
    except VersioningError as exc:
        log.warning("base weights not tracked by DVC: %s", exc)
        commit = ""
    base_switch.set_base_tags(params, version, {bases.T_DVC_REV: commit or "untracked"})
    return commit


def _install_local(params: dict[str, Any], version: int) -> str:
    """Make base.weights (and its sidecar) the registered base `version`; track it with DVC."""
    if local_fingerprint(params) != bases.get_base(params, version).fingerprint:
        if base_settings(params).weights.startswith(PACKAGE_PREFIX):
            raise ConfigError(
                f"params.yaml base.weights '{base_settings(params).weights}' is a file inside an installed package, "
                f"which deltapatch does not overwrite; set base.weights to a project path (e.g. "
                f"models/base.safetensors) to put base v{version} in service"
            )
        src = fetch_base(params, version)
        dst = base_weights_path(params)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".incoming")
        state = read_state_dict(src)
        if dst.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        else:
            torch.save(state, tmp)
        if sidecar_path(src).is_file():
            shutil.copyfile(sidecar_path(src), sidecar_path(dst))
        tmp.replace(dst)  # atomic: a reader sees the old or the new file, never half of one
    return _track_local(params, version, f"base: deltapatch-base v{version} in service")


def put_in_service(params: dict[str, Any], version: int, tasks: dict[str, int], unavailable: dict[str, str], *,
                   reason: str, note: str = "", action: str = "upgrade") -> bases.SwitchRecord:
    """The switch (one alias move, :func:`deltapatch.registry.base_switch.switch`), then base.weights follows."""
    record = base_switch.switch(params, version, tasks, unavailable, reason=reason, note=note, action=action)
    record.dvc_rev = _install_local(params, version)
    return record


def roll_back(params: dict[str, Any], to: int | None = None, reason: str = "") -> bases.SwitchRecord:
    """Back to the previous base (or base `to`) and the patches it served; base.weights follows."""
    record = base_switch.rollback(params, to=to, reason=reason)
    record.dvc_rev = _install_local(params, record.to_version)
    return record


__all__ = ["adopt", "base_accuracy", "base_params", "fetch_base", "local_fingerprint", "put_in_service",
           "register_weights", "roll_back", "serving_base_params"]
