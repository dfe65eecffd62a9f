"""The attribute (shape) probe's arithmetic; object-centric training crops = evaluation crops."""

import numpy as np
import pytest
import torch

from ov_seg.data.datasets.register_toyworld import toyworld_metadata
from ov_seg.data.toyworld.categories import STUFF
from ov_seg.data.toyworld.render import render_object_crop, render_scene
from ov_seg.evaluation.mask_classification import attribute_probe_metrics, calibrated_probe

META = toyworld_metadata()
ATTR = META["class_attributes"]
SEEN, UNSEEN = META["seen_class_ids"], META["unseen_class_ids"]
NUM_CLASSES = len(META["stuff_classes"])
THINGS = [c for c in range(NUM_CLASSES) if ATTR["colour"][c] >= 0]


def _pooled(m, key):
    """Segment-weighted mean of a seen / unseen metric pair."""
    s, u = m["segments_seen"], m["segments_unseen"]
    return (m[f"{key}_seen"] * s + m[f"{key}_unseen"] * u) / (s + u)


def test_colour_only_model_scores_chance_on_shape():
    labels = torch.tensor(THINGS * 3)
    colour = torch.tensor(ATTR["colour"])
    # logits: 1 for every name of the segment's colour (its 8 shapes tie), 0 elsewhere
    logits = (colour[None, :] == colour[labels][:, None]).float()
    m = attribute_probe_metrics(logits, labels, ATTR, SEEN, UNSEEN)
    assert m["colour_seen"] == 100.0 and m["colour_unseen"] == 100.0
    assert _pooled(m, "shape_within_colour") == pytest.approx(12.5)
    assert m["chance_shape_within_colour"] == pytest.approx(12.5)
    assert m["chance_colour"] == pytest.approx(12.5)
    assert m["segments_seen"] == 3 * 48 and m["segments_unseen"] == 3 * 16


def test_perfect_model_scores_100_and_stuff_is_left_out():
    labels = torch.tensor(list(range(NUM_CLASSES)))  # stuff segments too: not probed
    logits = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    m = attribute_probe_metrics(logits, labels, ATTR, SEEN, UNSEEN)
    for key in ("top1", "colour", "shape_within_colour"):
        assert m[f"{key}_seen"] == 100.0 and m[f"{key}_unseen"] == 100.0
    assert m["segments_seen"] + m["segments_unseen"] == len(THINGS)


def test_shape_errors_keep_colour():
    """Right colour, wrong shape: colour 100, shape 0, top-1 0."""
    labels = torch.tensor(THINGS)
    wrong = torch.tensor([c + 1 if ATTR["shape"][c] < 7 else c - 1 for c in THINGS])
    logits = torch.nn.functional.one_hot(wrong, NUM_CLASSES).float()
    m = attribute_probe_metrics(logits, labels, ATTR, SEEN, UNSEEN)
    assert m["colour_unseen"] == 100.0 and m["shape_within_colour_unseen"] == 0.0
    assert m["top1_seen"] == 0.0


def test_calibration_recovers_unseen_from_a_seen_biased_model():
    """A model right on every segment but biased by +2 toward seen names: γ ≥ 2 undoes it."""
    labels = torch.tensor(THINGS * 2)
    seen = torch.zeros(NUM_CLASSES)
    seen[SEEN] = 1.0
    logits = 3.0 * torch.nn.functional.one_hot(labels, NUM_CLASSES).float() + 4.0 * seen
    plain = attribute_probe_metrics(logits, labels, ATTR, SEEN, UNSEEN)
    assert plain["top1_unseen"] == 0.0 and plain["top1_seen"] == 100.0
    cal = calibrated_probe(logits, labels, ATTR, SEEN, UNSEEN, gammas=(0.0, 2.0, 8.0))
    assert cal["gamma_fold0"] == 2.0 and cal["gamma_fold1"] == 2.0
    assert cal["top1_unseen"] == 100.0 and cal["top1_seen"] == 100.0


@pytest.mark.parametrize("square", [False, True])
def test_object_crops_equal_the_evaluation_crops(square):
    """The web split's object-centric images are the masked crops the CLIP classifiers make at
    test time (``MaskedCropClassifier.crop`` with the toy config), up to uint8 rounding; with
    ``square`` (``SplitSpec.crop_square``) those of ``MODEL.CLIP.MASK_SQUARE_CROP True``."""
    from detectron2.config import get_cfg

    from ov_seg import add_ov_seg_config
    from ov_seg.modeling.clip import MaskedCropClassifier
    from ov_seg.modeling.clip.builder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

    cfg = get_cfg()
    add_ov_seg_config(cfg)
    cfg.merge_from_file("configs/toyworld/clip_pretrain.yaml")
    cfg.MODEL.CLIP.MASK_SQUARE_CROP = square
    clf = MaskedCropClassifier(**MaskedCropClassifier.from_config(cfg))
    checked = 0
    for seed in range(6):
        out = render_object_crop(
            np.random.default_rng(seed), 64, expand_range=(1.0, 1.0), square=square
        )
        rng = np.random.default_rng(seed)  # replay the same draws
        scene = render_scene(rng, 64, allow_unseen=False, radius_range=(0.12, 0.22))
        things = [s for s in scene["segments"] if s["category_id"] > len(STUFF)]
        if not things:
            continue
        seg = things[int(rng.integers(len(things)))]
        image = torch.from_numpy(scene["image"]).permute(2, 0, 1)
        mask = torch.from_numpy(scene["pan"] == seg["id"])[None]
        crops, crop_masks, _ = clf.crop([image], [mask])
        mean = torch.tensor(CLIP_PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_PIXEL_STD).view(3, 1, 1)
        expected = (crops[0] * std + mean).permute(1, 2, 0).numpy()
        assert np.abs(out["image"].astype(np.float64) - expected).max() <= 0.5 + 1e-3
        assert np.array_equal(out["pan"] > 0, crop_masks[0].numpy())
        assert out["segments"][0]["category_id"] == seg["category_id"]
        checked += 1
    assert checked >= 4
