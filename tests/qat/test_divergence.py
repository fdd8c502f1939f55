"""A training run whose loss stops being finite ends with a LowbitError, not a NaN model."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import LowbitError
from tests.conftest import calib_tensor, make_zoo


def test_qat_divergence_is_an_error_and_leaves_the_fp_model_alone(tmp_path):
    model = make_zoo("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = calib_tensor(32), torch.arange(32) % 10
    with pytest.raises(LowbitError, match="training diverged"):
        lowbit.qat(model, (x, y), method="lsq", w_bits=4, a_bits=4, epochs=2, batch_size=8, lr=1e12,
                   scale_lr=1e12, optimizer="sgd", checkpoint=str(tmp_path / "run.ckpt"), progress=False,
                   log=lambda _: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_step_refuses_a_non_finite_loss():
    from lowbit.train import train_step

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    weight = net.weight.detach().clone()
    xb = torch.tensor([[float("inf"), 0.0, 0.0]])
    with pytest.raises(LowbitError, match="training diverged"):
        train_step(net, opt, sched, xb, torch.tensor([0]), torch.Generator(), augment=False)
    assert torch.equal(net.weight, weight)  # no step was taken
