"""`lora`: PEFT LoRA with one adapter per task on a shared copy of the base (PEFT's multi-adapter API).

The first task wraps the backbone with `get_peft_model(backbone, LoraConfig(r, lora_alpha,
target_modules=[every Conv2d]), adapter_name=task)`; every later task `add_adapter`s its own
adapter and `set_adapter`s it for training, beside its own head. Asking for a task activates its
adapter; the base task is `disable_adapter()` with the base head. BatchNorm is left as the single-task
bench found the standard recipe (docs/benchmark.md): PEFT freezes the base parameters but not the
BatchNorm running statistics, which move during every task's training, so earlier tasks and the
base task drift. Kept on disk: the base weights file, PEFT's `save_pretrained` adapter files per
task, the heads, and the drifted BatchNorm statistics (without them the served model is not the
one evaluated).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from deltapatch.baselines.base import Forward, replace_module, save_tensors, split_head
from deltapatch.baselines.peft_lora import ADAPTER_FILES, bn_statistics, conv_names
from deltapatch.data.dataset import TaskData
from deltapatch.delta.routing import BASE
from deltapatch.stream.strategies.base import Strategy, StrategySettings
from deltapatch.train import Trainable

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class StreamLoraSettings(StrategySettings):
    r: int = 4
    lora_alpha: float = 4.0  # scaling α/r = 1, as the bench's peft-lora
    lora_dropout: float = 0.0


class LoraPerTask(Strategy):
    name = "lora"
    settings_class = StreamLoraSettings
    settings: StreamLoraSettings

    def start(self, base: TaskData) -> None:
        backbone = copy.deepcopy(self.context.base.model)
        name, head = split_head(backbone)
        replace_module(backbone, name, nn.Identity())
        self.backbone = backbone
        self.targets = conv_names(backbone)
        self.heads = nn.ModuleDict({BASE: head})
        self.heads.requires_grad_(False)
        self.peft: PeftModel | None = None  # created with the first task's adapter
        self.bn_start = bn_statistics(backbone)
        self.saved: set[str] = set()

    def prepare(self, data: TaskData) -> Trainable:
        from peft import (  # lazy: peft loads transformers (seconds), only this strategy needs it
            LoraConfig,
            get_peft_model,
        )

        self.tasks.append(data.name)
        config = LoraConfig(r=self.settings.r, lora_alpha=self.settings.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; any number works (scale α/r)
                            lora_dropout=self.settings.lora_dropout, target_modules=list(self.targets))
        if self.peft is None:
            self.peft = get_peft_model(self.backbone, config, adapter_name=data.name)
        else:
            self.peft.add_adapter(data.name, config)
        self.peft.set_adapter(data.name)  # trainable; every other adapter frozen
        head = nn.Linear(self.head(BASE).in_features, data.num_classes).to(self.context.device)
        self.heads[data.name] = head
        module = _TaskLora(self.peft, head)
        trained = [p for p in self.peft.parameters() if p.requires_grad] + list(head.parameters())
        return Trainable(module, trained, module.state_dict, module.load_state_dict)

    def forward(self, task: str) -> Forward:
        peft, head = self.peft, self.heads[task]
        if peft is None:
            backbone = self.backbone.eval()
            return lambda x: head(backbone(x))
        peft.eval()
        if task == BASE:
            def forward_base(x: torch.Tensor) -> torch.Tensor:
                with peft.disable_adapter():
                    return head(peft(x))

            return forward_base

        def forward(x: torch.Tensor) -> torch.Tensor:
            peft.set_adapter(task, inference_mode=True)
            return head(peft(x))

        return forward

    def head(self, task: str) -> nn.Linear:
        head = self.heads[task]
        assert isinstance(head, nn.Linear)  # prepare puts nothing else here
        return head

    def base_bn_drift(self) -> float:
        """Max |Δ| of the shared BatchNorm running statistics since the start (0 = untouched)."""
        now = bn_statistics(self.backbone)
        return max((float((now[k] - v).abs().max()) for k, v in self.bn_start.items()), default=0.0)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        base = self.context.base
        if not (folder / base.weights_path.name).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base.weights_path, folder / base.weights_path.name)
        save_tensors(bn_statistics(self.backbone), folder / "bn_statistics.safetensors")
        save_tensors(self.heads.state_dict(), folder / "heads.safetensors")
        for task in self.tasks:
            if task in self.saved or self.peft is None:
                continue
            out = folder / "adapters"
            self.peft.save_pretrained(str(out), selected_adapters=[task])
            (out / "README.md").unlink(missing_ok=True)  # PEFT's model card: not needed to serve
            if not all((out / task / name).is_file() for name in ADAPTER_FILES):
                raise RuntimeError(f"PEFT did not write {ADAPTER_FILES} for adapter '{task}' under {out}")
            self.saved.add(task)

    def notes(self) -> list[str]:
        return [f"shared BatchNorm running statistics moved by training: max |Δ| = {self.base_bn_drift():.4g}"]


class _TaskLora(nn.Module):
    """What `fit` trains for one task: the PEFT backbone (that task's adapter active) and its head."""

    def __init__(self, peft: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.peft = peft
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.peft(x))
