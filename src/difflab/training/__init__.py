"""Training: the trainer loop, EMA, checkpoints and exact resume, multi-process (torchrun) helpers."""

from difflab.training.checkpoint import load_checkpoint, save_checkpoint
from difflab.training.trainer import Trainer, TrainingInterrupted, TrainResult, lr_at, train

__all__ = ["Trainer", "TrainingInterrupted", "TrainResult", "load_checkpoint", "lr_at", "save_checkpoint", "train"]
