"""Evaluators extending detectron2's, and the registry the trainer dispatches on."""

from .build import EVALUATOR_REGISTRY, build_evaluator
from .mask_classification import MaskClassificationEvaluator
from .open_vocab_sem_seg import OpenVocabSemSegEvaluator
from .proposal_recall import ProposalRecallEvaluator

__all__ = [
    "MaskClassificationEvaluator",
    "EVALUATOR_REGISTRY",
    "build_evaluator",
    "ProposalRecallEvaluator",
    "OpenVocabSemSegEvaluator",
]
