"""Pre-train the embedded default base model on the base task when no weights exist yet."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltapatch.config import resolve_path, section
from deltapatch.data.sources import base_eval_data
from deltapatch.fingerprint import fingerprint
from deltapatch.models.base import base_settings, build_architecture, write_sidecar
from deltapatch.train import (
    Normalizer,
    Trainable,
    TrainSettings,
    accuracy,
    apply_threads,
    fit,
    predict_logits,
    resolve_device,
)


@dataclass
class PretrainSettings:
    """params.yaml `pretrain:` section: overrides of `train:` for pre-training the base."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.0005


def pretrain_base(params: dict[str, Any], *, progress: bool = True, force: bool = False) -> Path:
    """Train base.arch on the base task and write base.weights (+ sidecar). Returns the path.

    Existing weights are kept unless `force`: a base model is an identity that patches refer to.
    """
    import torch
    from safetensors.torch import save_file

    settings = base_settings(params)
    weights = resolve_path(params, settings.weights)
    if weights.exists() and not force:
        return weights
    # Every `pretrain:` field overrides the `train:` field of the same name.
    overrides = dataclasses.asdict(section(params, "pretrain", PretrainSettings))
    train_settings = dataclasses.replace(section(params, "train", TrainSettings), **overrides)
    apply_threads(train_settings)
    device = resolve_device(train_settings.device)
    seed = int(params.get("seed", 0))
    torch.manual_seed(seed)
    data = base_eval_data(params)
    model = build_architecture(settings, data.num_classes).to(device)
    norm = Normalizer(settings.mean, settings.std, device)
    trainable = Trainable(model, list(model.parameters()), model.state_dict, model.load_state_dict)
    fit(trainable, data, train_settings, norm, seed=seed, desc=f"pretrain {settings.arch} on {data.name}", progress=progress)
    test_acc = accuracy(predict_logits(model, data.test, norm), data.test.labels)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    write_sidecar(weights, settings, data.class_names, fingerprint(state), {"test_acc": test_acc})
    tmp.replace(weights)
    return weights
