"""The training loop and what surrounds it: setup, metrics, progress."""

from plait.trainer.loop import TrainResult, evaluate, train

__all__ = ["TrainResult", "evaluate", "train"]
