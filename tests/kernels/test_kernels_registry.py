"""The loss registry (spoxl.kernels.losses): every loss is one module with the same parts, and the
package's public ops are the registry's. This is what makes "a new loss = one module + a line"
true; a module missing a part, or a Triton head writing metrics in another order than its
METRICS, fails here rather than at a user's first fused call."""

import inspect

import pytest
import torch

import spoxl.kernels as K
from kernel_oracles import INTERPRETER
from spoxl.kernels import losses

PARTS = ("METRICS", "REDUCTION", "head", "reference", "fused", "triton_heads")


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(6)]
    if name == "spo_loss":
        return t + [torch.tensor([0.7, 0.9], dtype=torch.float64)], {"beta": 5.0, "clip": 0.2}
    if name == "mapo_loss":
        return t[:4], {"beta": 0.1, "snr": 0.5, "num_train_timesteps": 10}
    if name == "ncp_loss":
        return t, {"beta": 2.0, "kind": "dpo"}
    return t, {"beta": 50.0}


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_every_loss_module_has_every_part_and_is_the_public_op(name):
    module = losses.LOSSES[name]
    for part in PARTS:
        assert hasattr(module, part), f"{module.__name__} lacks {part}"
    assert module.REDUCTION in ("logratio", "sqerr")
    assert getattr(K, name) is getattr(module, name) is losses.op(name)
    # reference and fused take what the public op takes (a dropped keyword would be a silent default)
    public = inspect.signature(getattr(module, name)).parameters
    for impl in (module.reference, module.fused):
        assert inspect.signature(impl).parameters.keys() == public.keys(), impl.__qualname__


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_the_reference_reports_exactly_the_declared_metrics(name):
    module = losses.LOSSES[name]
    args, kwargs = _inputs(name)
    _, metrics = module.reference(*args, **kwargs, return_metrics=True)
    declared = module.METRICS[kwargs["kind"]] if isinstance(module.METRICS, dict) else module.METRICS
    assert list(metrics) == list(declared)


@pytest.mark.skipif(not INTERPRETER, reason="runs the Triton heads on CPU tensors: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_the_fused_head_writes_each_metric_in_its_declared_slot(name):
    """Each metric by name against the reference: two slots swapped in a Triton head fail here."""
    module = losses.LOSSES[name]
    args, kwargs = _inputs(name)
    _, expected = module.reference(*args, **kwargs, return_metrics=True)
    _, got = module.fused(*args, **kwargs, return_metrics=True)
    assert list(got) == list(expected)
    for key in expected:
        assert torch.allclose(got[key].double(), expected[key].double(), rtol=1e-5, atol=1e-6), key
