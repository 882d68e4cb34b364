"""`peft-lora`: LoRA on every conv layer through Hugging Face PEFT, used the standard way:

    LoraConfig(r, lora_alpha, target_modules=[all Conv2d names], modules_to_save=["head"])

PEFT freezes every base parameter but leaves module modes alone, so in training the base
BatchNorms run in train mode and their running statistics drift towards the patch task. That is
what a user gets from the standard recipe; the bench measures it instead of hiding it (see
`base_bn_stats_changed` and docs/benchmark.md). The base route is `disable_adapter()` with the
original base head. The shipped files are PEFT's own `save_pretrained` output.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch
from torch import nn

from deltapatch.baselines.base import (
    Classifier,
    Forward,
    Method,
    MethodSettings,
    classifier_from,
    split_head,
)
from deltapatch.data.dataset import TaskData
from deltapatch.train import Trainable

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class LoraSettings(MethodSettings):
    r: int = 4
    lora_alpha: float = 4.0  # scaling α/r = 1, the same parameterisation as delta-lowrank
    lora_dropout: float = 0.0


def peft_can_wrap(conv: nn.Module) -> TypeGuard[nn.Conv2d]:
    """Whether PEFT's LoRA can wrap `conv`: a plain nn.Conv2d, ungrouped. Its Conv2d layer rebuilds the
    base layer's class with nn.Conv2d's arguments, which timm's Conv2dSame (TF-"same" padding, the
    stride-2 convolutions of tf_efficientnet_*) does not take, and it refuses a rank not divisible by
    the groups (depthwise convolutions). Those stay frozen under PEFT (a bench note says how many)."""
    return type(conv) is nn.Conv2d and conv.groups == 1


def conv_names(module: nn.Module) -> list[str]:
    return [name for name, child in module.named_modules() if peft_can_wrap(child)]


def lora_param_count(module: nn.Module, r: int) -> int:
    """LoRA parameters PEFT adds to each ungrouped Conv2d (A: r×C_in×k×k, B: C_out×r×1×1)."""
    total = 0
    for child in module.modules():
        if peft_can_wrap(child):  # what conv_names targets
            k = child.kernel_size[0] * child.kernel_size[1]
            total += r * child.in_channels // child.groups * k + child.out_channels * r
    return total


class PeftLora(Method):
    name = "peft-lora"
    settings_class = LoraSettings
    settings: LoraSettings

    def prepare(self, data: TaskData) -> Trainable:
        from peft import (  # lazy: peft loads transformers (seconds), only this method needs it
            LoraConfig,
            get_peft_model,
        )

        self.task = data.name
        base_model = self.context.base.model
        _, base_head = split_head(base_model)
        backbone = copy.deepcopy(base_model)  # PEFT injects its layers in place
        classifier = classifier_from(backbone, data.num_classes, base_head, self.context.device)
        config = LoraConfig(
            r=self.settings.r,
            lora_alpha=self.settings.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; any number works (scale α/r)
            lora_dropout=self.settings.lora_dropout,
            target_modules=[f"backbone.{n}" for n in conv_names(classifier.backbone)],
            modules_to_save=["head"],
        )
        convs = [child for child in classifier.backbone.modules() if isinstance(child, nn.Conv2d)]
        self.skipped_convs = sum(1 for child in convs if not peft_can_wrap(child))
        self.classifier: Classifier = classifier
        self.bn_before = bn_statistics(classifier.backbone)
        self.model = get_peft_model(classifier, config)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        groups = {"delta": [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n],
                  "head": [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" not in n]}
        state = lambda: {k: v for k, v in self.model.state_dict().items() if "lora_" in k or "modules_to_save" in k}  # noqa: E731
        return Trainable(self.model, trained, state, lambda sd: self.model.load_state_dict(sd, strict=False), groups)

    def base_bn_stats_changed(self) -> float:
        """Max |Δ| of the base BatchNorms' running statistics caused by training (0 = untouched)."""
        after = bn_statistics(self.classifier.backbone)
        return max((float((after[k] - v).abs().max()) for k, v in self.bn_before.items()), default=0.0)

    def task_forward(self) -> Forward:
        return self.model.eval()

    def base_forward(self) -> Forward:
        model = self.model.eval()
        classifier = self.classifier

        def forward(x: torch.Tensor) -> torch.Tensor:
            with model.disable_adapter():
                return classifier.forward_base(x)

        return forward

    def save(self, out_dir: Path) -> int:
        out_dir = Path(out_dir)
        self.model.save_pretrained(str(out_dir))
        # PEFT also writes a model-card README.md; only the adapter files are needed to serve.
        return sum((out_dir / name).stat().st_size for name in ADAPTER_FILES)

    @contextlib.contextmanager
    def merged(self) -> Iterator[Forward | None]:
        merged = copy.deepcopy(self.model).merge_and_unload().eval()
        yield merged

    def trainable_params(self) -> int:
        return int(self.model.get_nb_trainable_parameters()[0])


def bn_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm running_mean / running_var, keyed by module name."""
    stats = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_mean is not None \
                and child.running_var is not None:
            stats[f"{name}.running_mean"] = child.running_mean.detach().clone()
            stats[f"{name}.running_var"] = child.running_var.detach().clone()
    return stats
