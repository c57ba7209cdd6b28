"""The training loop and what surrounds it: `build.py` (everything decided before step 1),
`step.py` (one optimizer step), `loop.py` (steps, logging, evaluation, saving, the sample),
`output.py` (display and metrics files), and the guards (`nan_guard.py`, `watchdog.py`)."""

from plait.trainer.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
