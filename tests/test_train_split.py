"""``lowbit.train`` split by job: every earlier name still imports, and SWA's BN pass is unchanged."""
from __future__ import annotations

import copy

import torch

import lowbit
import lowbit.train
from lowbit.train import WeightAverage, reestimate_bn

NAMES = ["TrainConfig", "TrainResult", "augment_batch", "distillation_loss", "Ensemble", "train_step", "TRAIN_FORMAT",
         "TRAIN_RESUMABLE", "private_global_rng", "seed_global_rng", "parameter_shapes", "save_checkpoint",
         "load_checkpoint", "run_differences", "restore_failed", "train_model", "lr_factor", "WeightAverage",
         "reestimate_bn", "train_zoo_model"]


def test_every_name_of_the_former_module_imports_from_lowbit_train() -> None:
    assert all(hasattr(lowbit.train, n) for n in NAMES)
    assert lowbit.train.fp.logger.name == "lowbit.train"  # the logger name users configure stays


def test_the_swa_bn_pass_matches_the_former_reestimation_bit_for_bit() -> None:
    """update_bn (whole model in training mode) gives what train() + reestimate_bn gave before."""
    torch.manual_seed(0)
    model = lowbit.create_model("resnet20", width=4)
    x = torch.randn(40, 1, 16, 16)
    average = WeightAverage(model)
    average.add(model)
    new, old = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    average.load_into(new, x, 16, torch.device("cpu"))
    old.train()
    reestimate_bn(old, x, 16, torch.device("cpu"))
    old.eval()
    assert not new.training and all(not m.training for m in new.modules())
    for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        assert torch.equal(a, b), name
