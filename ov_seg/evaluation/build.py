"""Evaluator dispatch on a dataset's ``evaluator_type`` metadata."""

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator

from ov_seg.utils.registry import NamedRegistry, get_registered

EVALUATOR_REGISTRY = NamedRegistry("EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = """
Registry of evaluator builders, keyed by a dataset's ``evaluator_type``.
A builder is called as ``builder(cfg, dataset_name, output_folder)`` and returns a
``DatasetEvaluator``.
"""


@EVALUATOR_REGISTRY.register("coco_panoptic_seg")
def _coco_panoptic(cfg, dataset_name, output_folder):
    return COCOPanopticEvaluator(dataset_name, output_dir=output_folder)


def build_evaluator(cfg, dataset_name: str, output_folder: str):
    """The evaluator for ``dataset_name``, chosen by ``cfg.TEST.EVALUATOR_TYPE`` when set, else by
    its metadata's ``evaluator_type``."""
    evaluator_type = cfg.TEST.get("EVALUATOR_TYPE", "") or MetadataCatalog.get(dataset_name).get(
        "evaluator_type", None
    )
    if evaluator_type is None:
        raise KeyError(f"dataset {dataset_name!r} has no evaluator_type in its metadata")
    builder = get_registered(
        EVALUATOR_REGISTRY, evaluator_type, f"evaluator type (dataset {dataset_name!r})"
    )
    return builder(cfg, dataset_name, output_folder)
