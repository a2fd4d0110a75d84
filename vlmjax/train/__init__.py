"""The one trainer core: ``run(config, workdir)`` trains any task from its config."""

from vlmjax.train.state import TrainState
from vlmjax.train.trainer import Trainer, run

__all__ = ["TrainState", "Trainer", "run"]
