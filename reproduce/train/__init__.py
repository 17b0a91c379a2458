"""Training: one run of one method with one seed.

- ``step.py``: one optimisation step (the page a method author reads);
- ``loop.py``: the run (epochs, evaluation, best epoch, checkpoints, resume): ``train``;
- ``tally.py``: an epoch's losses, signals and divergence check, kept on the device;
- ``evaluate.py``, ``checkpoint.py``, ``frozen.py``, ``outputs.py``, ``optim.py``, ``build.py``: its parts;
- ``reproduce/runtime.py``: the device and numeric options; ``reproduce/distributed.py``: DDP.
"""

from reproduce.train.checkpoint import CheckpointError, load_state
from reproduce.train.loop import EpochCallback, epoch_row, train, train_epoch
from reproduce.train.optim import LearningRates, learning_rate, make_optimizer
from reproduce.train.spec import RunSpec
from reproduce.train.step import DivergedError, train_step

__all__ = ["CheckpointError", "DivergedError", "EpochCallback", "LearningRates", "RunSpec", "epoch_row",
           "learning_rate", "load_state", "make_optimizer", "train", "train_epoch", "train_step"]
