"""``OVSegPredictor``: one trained model segmenting single images with any vocabulary (the demo's
and the web demo's predictor; detectron2's ``DefaultPredictor`` with a vocabulary).

Works with every ``OpenVocabSegmentor`` (the vocabulary goes in the call's ``InferenceOptions``):
``TwoStageOVSeg`` (semantic and panoptic output, a background name appended
to a single class name), ``PACL``, ``MGCA`` and ``MixReorg`` (semantic output only; a single class
name labels every pixel).
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from torch import nn

from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.engine.trainer import Trainer
from ov_seg.modeling.meta_arch.base import InferenceOptions
from ov_seg.utils.semseg import label_map

__all__ = ["OVSegPredictor", "NO_LABEL"]

# label of pixels no name covers (no proposal survived): 255 up to 255 names, else 65535
NO_LABEL = {True: 255, False: 65535}


class OVSegPredictor:
    """A model in eval mode, the test-time resize and input format of its config.

    Args:
        cfg: the model's config (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` / ``FORMAT``).
        model: the built model; None builds it from ``cfg`` and loads ``MODEL.WEIGHTS`` (if any).
    """

    def __init__(self, cfg, model: Optional[nn.Module] = None):
        self.cfg = cfg
        if model is None:
            model = Trainer.build_model(cfg)
            if cfg.MODEL.WEIGHTS:
                SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        self.model = model.eval()
        # TwoStageOVSeg: both outputs (the single-stage models give semantic output only)
        self.has_panoptic = hasattr(model, "panoptic_on")
        if self.has_panoptic:
            model.semantic_on = model.panoptic_on = True
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        """An image in the model's input format as contiguous RGB."""
        return np.ascontiguousarray(image[:, :, ::-1] if self.input_format == "BGR" else image)

    def options(self, vocabulary: Sequence[str]) -> InferenceOptions:
        """The model's default options with ``vocabulary``."""
        return self.model.default_options.replace(vocabulary=tuple(vocabulary))

    def final_vocabulary(self, vocabulary: Sequence[str]) -> List[str]:
        """The names the output channels refer to (the two-stage model appends a background name
        to a single class)."""
        return self.model.vocabulary({}, self.options(vocabulary))

    def __call__(
        self,
        image: np.ndarray,
        vocabulary: Sequence[str],
        file_name: str = "",
        options: Optional[InferenceOptions] = None,
    ) -> dict:
        """Segment one image.

        Args:
            image: (H, W, 3) uint8 in the model's input format (``cfg.INPUT.FORMAT``).
            vocabulary: the class names.
            file_name: recorded in the input (models may name it in messages).
            options: the other inference options (default: the config's).

        Returns:
            The model's output (``sem_seg`` (K, H, W) scores, or (H, W) labels past
            ``TEST.MEMORY_BUDGET_MB``, and ``panoptic_seg`` for the two-stage model) with
            ``vocabulary``: the K names the channels refer to.
        """
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        x = {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": height,
            "width": width,
            "file_name": file_name,
        }
        options = (options or self.model.default_options).replace(vocabulary=tuple(vocabulary))
        with torch.no_grad():
            out = dict(self.model([x], options=options)[0])
        out.setdefault("vocabulary", list(vocabulary))
        return out

    def notice(self, panoptic: bool = False) -> str:
        """Why an output holds no name, in the config's terms: every proposal dropped (semantic),
        or no segment kept by the panoptic merge."""
        cfg = self.cfg.MODEL
        if not self.has_panoptic:
            return "every score is 0"
        if panoptic:
            test = cfg.TWO_STAGE.TEST
            return (
                "no segment kept by the panoptic merge (MODEL.TWO_STAGE.TEST."
                f"OBJECT_MASK_THRESHOLD {test.OBJECT_MASK_THRESHOLD}, OVERLAP_THRESHOLD "
                f"{test.OVERLAP_THRESHOLD})"
            )
        return (
            f"no proposal survived (MODEL.CLIP.MASK_THR {cfg.CLIP.MASK_THR}, "
            f"MODEL.TWO_STAGE.FAST.MIN_OBJECTNESS {cfg.TWO_STAGE.FAST.MIN_OBJECTNESS})"
        )

    @staticmethod
    def labels(out: dict) -> Tuple[torch.Tensor, bool]:
        """((H, W) int64 name index per pixel, whether nothing is labelled): when every score is
        0 (no proposal survived), every pixel gets ``NO_LABEL`` (255, or 65535 past 255 names)
        instead of name 0. ``sem_seg`` is (K, H, W) scores, or (H, W) labels with
        ``sem_seg_empty`` (outputs past ``TEST.MEMORY_BUDGET_MB``)."""
        scores = out["sem_seg"]
        if scores.dim() == 2:
            if not out.get("sem_seg_empty", False):
                return scores.cpu(), False
        elif scores.numel() and float(scores.max()) > 0:
            return label_map(scores).cpu(), False
        value = NO_LABEL[len(out["vocabulary"]) <= 255]
        return torch.full(scores.shape[-2:], value, dtype=torch.int64), True
