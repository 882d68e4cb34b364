import torch

from deltapatch.fingerprint import fingerprint


def test_fingerprint_is_order_independent_and_sensitive_to_every_property():
    state = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    reference = fingerprint(state)
    assert reference.startswith("sha256:") and len(reference) == 7 + 64
    assert fingerprint(dict(reversed(list(state.items())))) == reference
    changed_value = {**state, "a": state["a"].clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(0.5))}
    changed_shape = {**state, "a": state["a"].view(3, 2)}
    changed_dtype = {**state, "b": torch.ones(2, dtype=torch.float16)}
    changed_name = {"c": state["a"], "b": state["b"]}
    variants = {fingerprint(s) for s in (changed_value, changed_shape, changed_dtype, changed_name)}
    assert reference not in variants and len(variants) == 4
