"""Training: the one path every method shares (run.py), split by concern: the Trainer glue (trainer.py),
checkpoints (checkpoints.py), measurement (measure.py), and the GPU path's packing (packing.py) and kernels
(speedups.py)."""

from .run import RunContext, TrainingRun, build, load_examples, train

__all__ = ["RunContext", "TrainingRun", "build", "load_examples", "train"]
