"""Training, by job: FP training (``fp``), the distillation loss and ensemble teacher
(``distillation``), BatchNorm re-estimation (``bn``), weight averaging (``averaging``), training
checkpoints (``checkpoints``), the private global RNG (``rng``) and training a zoo model
(``zoo``). Everything is importable from ``lowbit.train`` as before.

Log messages of FP training go to the ``lowbit.train`` logger.
"""
from .averaging import WeightAverage
from .bn import reestimate_bn
from .checkpoints import (load_checkpoint, parameter_shapes, restore_failed, run_differences,
                          save_checkpoint)
from .distillation import Ensemble, distillation_loss
from .fp import (TRAIN_FORMAT, TRAIN_RESUMABLE, TrainConfig, TrainResult, augment_batch, lr_factor, train_model,
                 train_step)
from .rng import private_global_rng, seed_global_rng
from .zoo import train_zoo_model

__all__ = ["WeightAverage", "reestimate_bn", "load_checkpoint", "parameter_shapes", "restore_failed",
           "run_differences", "save_checkpoint", "Ensemble", "distillation_loss", "TRAIN_FORMAT", "TRAIN_RESUMABLE",
           "TrainConfig", "TrainResult", "augment_batch", "lr_factor", "train_model", "train_step",
           "private_global_rng", "seed_global_rng", "train_zoo_model"]
