"""Training engine."""

from .trainer import Trainer, build_optimizer

__all__ = ["Trainer", "build_optimizer"]
