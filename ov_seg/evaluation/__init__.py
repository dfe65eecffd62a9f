"""Evaluators extending detectron2's, and the registry the trainer dispatches on."""

from .build import EVALUATOR_REGISTRY, build_evaluator

__all__ = ["EVALUATOR_REGISTRY", "build_evaluator"]
