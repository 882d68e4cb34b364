"""EWC, LwF and replay add their loss terms through `add_to_loss`: checked inside the real `fit`."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from deltapatch.data.dataset import Split, TaskData
from deltapatch.stream.strategies.base import add_to_loss
from deltapatch.train import Normalizer, Trainable, TrainSettings, fit


class _Probe(nn.Module):
    """A linear classifier that records its input and adds 0.5·Σw² through add_to_loss."""

    def __init__(self, add_term: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * 4 * 4, 2)
        self.add_term = add_term
        self.seen: list[torch.Tensor] = []

    def term(self) -> torch.Tensor:
        return 0.5 * self.linear.weight.pow(2).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        if self.training:
            self.seen.append(x.detach().clone())
            if self.add_term:
                return add_to_loss(logits, self.term())
        return logits


def _grad_seen_by_fit(add_term: bool) -> tuple[torch.Tensor, torch.Tensor, _Probe]:
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(8, dtype=torch.long)  # one class: the batch order cannot matter
    split = Split(images, labels)
    data = TaskData("probe", ["a", "b"], split, split, split)
    probe = _Probe(add_term)
    initial = probe.linear.weight.detach().clone()
    grads: list[torch.Tensor] = []
    probe.linear.weight.register_hook(lambda g: grads.append(g.detach().clone()))
    settings = dataclasses.replace(TrainSettings(), epochs=1, batch_size=8, device="cpu")
    trainable = Trainable(probe, list(probe.parameters()), probe.state_dict, probe.load_state_dict)
    fit(trainable, data, settings, Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu")), progress=False)
    assert len(grads) == 1 and len(probe.seen) == 1  # one optimiser step on the one batch
    return grads[0], initial, probe


def _expected(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, with_term: bool) -> torch.Tensor:
    weight = weight.clone().requires_grad_(True)
    loss = F.cross_entropy(F.linear(x.flatten(1), weight, bias), torch.zeros(len(x), dtype=torch.long))
    if with_term:
        loss = loss + 0.5 * weight.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, weight)
    return grad


def test_fit_backpropagates_cross_entropy_plus_the_added_term() -> None:
    grad, initial, probe = _grad_seen_by_fit(add_term=True)
    torch.manual_seed(0)
    bias = nn.Linear(3 * 4 * 4, 2).bias.detach()  # the probe's initial bias (same seed)
    x = probe.seen[0]
    assert torch.allclose(grad, _expected(x, initial, bias, with_term=True), atol=1e-6)
    assert not torch.allclose(grad, _expected(x, initial, bias, with_term=False), atol=1e-3)


def test_without_the_term_fit_sees_plain_cross_entropy() -> None:
    grad, initial, probe = _grad_seen_by_fit(add_term=False)
    torch.manual_seed(0)
    bias = nn.Linear(3 * 4 * 4, 2).bias.detach()
    assert torch.allclose(grad, _expected(probe.seen[0], initial, bias, with_term=False), atol=1e-6)


def test_add_to_loss_leaves_the_logits_unchanged() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    out = add_to_loss(logits, torch.tensor(2.0, requires_grad=True))
    assert torch.equal(out, logits)
