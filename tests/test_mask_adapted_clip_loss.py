"""MaskAdaptedCLIP with OVSeg's loss: symmetric CLIP loss over the step's pairs, templated names,
learnable logit scale, random-resized crops."""

import json
import math

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from helpers import REPO, run_train_net, setup_config

from ov_seg.data import build_dataset_mapper
from ov_seg.engine import Trainer
from ov_seg.modeling.clip import random_resized_crop

CONFIG = "configs/toyworld/clip_mpt.yaml"
OVSEG = ["MODEL.MASK_ADAPTED_CLIP.LOSS", "ovseg", "MODEL.MASK_ADAPTED_CLIP.RRC_SCALE", "(0.9, 1.0)"]


def _model(*opts):
    torch.manual_seed(0)
    return Trainer.build_model(setup_config(CONFIG, [*OVSEG, *opts])).train()


def _two_pairs():
    """One 64 x 64 image with two disjoint masks named "red star" and "sky"."""
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 5:30, 5:30] = True
    masks[1, 35:60, 10:50] = True
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    return [{"image": image, "masks": masks, "categories": ["red star", "sky"]}]


def test_loss_value_on_a_hand_case(toyworld_root, monkeypatch):
    model = _model()
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(2.0))  # s = 2
    e1, e2 = torch.eye(64)[:2]
    crops = torch.stack([e1, e2])  # V: crop i is unit vector e_i
    texts = torch.stack([e1, (e1 + e2) / math.sqrt(2)])  # T: text 1 is half-way between both
    seen = []
    monkeypatch.setattr(model.crop_classifier, "encode_crops", lambda c, m: crops)

    def encode_texts(batch):
        seen.extend(batch)
        return texts

    monkeypatch.setattr(model.crop_classifier.text_classifier, "encode_texts", encode_texts)
    with EventStorage():
        loss = model(_two_pairs())["loss_mask_cls"]
    # logits s·VTᵀ = [[2, √2], [0, √2]]; crop→text rows, then text→crop rows (the transpose)
    c = math.sqrt(2)
    crop_to_text = math.log(1 + math.exp(c - 2)) + math.log(1 + math.exp(-c))
    text_to_crop = math.log(1 + math.exp(-2)) + math.log(2)
    assert float(loss) == pytest.approx((crop_to_text + text_to_crop) / 4, rel=1e-5)
    # one text per pair, in pair order: a template of MODEL.CLIP.TEMPLATES with the pair's name
    templates = model.crop_classifier.text_classifier.templates
    assert len(seen) == 2
    assert seen[0] in {t.format("red star") for t in templates}
    assert seen[1] in {t.format("sky") for t in templates}


@pytest.mark.parametrize("same_name_negatives", [True, False])
def test_pairs_of_one_name_as_negatives_or_not(toyworld_root, monkeypatch, same_name_negatives):
    """Two pairs named "red star" (crops and texts both e1) and one "sky" (e2), s = 2. OVSeg's loss
    makes the two red stars negatives of each other; SAME_NAME_NEGATIVES False leaves them out."""
    model = _model("MODEL.MASK_ADAPTED_CLIP.SAME_NAME_NEGATIVES", str(same_name_negatives))
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(2.0))
    e1, e2 = torch.eye(64)[:2]
    vectors = torch.stack([e1, e1, e2])
    monkeypatch.setattr(model.crop_classifier, "encode_crops", lambda c, m: vectors)
    monkeypatch.setattr(model.crop_classifier.text_classifier, "encode_texts", lambda t: vectors)
    inputs = _two_pairs()
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 5:30, 5:30] = masks[1, 35:60, 10:50] = masks[2, 2:20, 40:60] = True
    inputs[0].update(masks=masks, categories=["red star", "red star", "sky"])
    with EventStorage() as storage:
        loss = float(model(inputs)["loss_mask_cls"])
    # logits s·VTᵀ = [[2, 2, 0], [2, 2, 0], [0, 0, 2]], symmetric: both directions alike
    if same_name_negatives:
        star, sky = math.log(1 + math.exp(0) + math.exp(-2)), math.log(1 + 2 * math.exp(-2))
        assert "same_name_pairs" not in storage.histories()
    else:
        star, sky = math.log(1 + math.exp(-2)), math.log(1 + 2 * math.exp(-2))
        assert storage.history("same_name_pairs").latest() == pytest.approx(2 / 3)
    assert loss == pytest.approx((2 * star + sky) / 3, rel=1e-5)


def test_pair_texts_draw_templates(toyworld_root):
    model = _model()
    templates = model.crop_classifier.text_classifier.templates
    assert len(templates) > 1
    texts = model.pair_texts(["sky"] * 200)
    assert set(texts) == {t.format("sky") for t in templates}  # every template drawn


def test_gradients_reach_the_logit_scale_and_the_prompts(toyworld_root):
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"crop_classifier.encoder.prompts", "clip.logit_scale"}
    mapper = build_dataset_mapper(setup_config(CONFIG, OVSEG), True, "toyworld_panoptic_train")
    inputs = [mapper(d) for d in DatasetCatalog.get("toyworld_panoptic_train")[:4]]
    with EventStorage():
        loss = model(inputs)["loss_mask_cls"]
    loss.backward()
    assert torch.isfinite(loss) and float(loss) > 0
    assert model.clip.logit_scale.grad is not None and float(model.clip.logit_scale.grad) != 0
    assert float(model.crop_classifier.encoder.prompts.grad.abs().sum()) > 0
    assert all(p.grad is None for n, p in model.clip.named_parameters() if n != "logit_scale")


def test_classification_loss_keeps_the_scale_fixed(toyworld_root):
    model = _model("MODEL.MASK_ADAPTED_CLIP.LOSS", "classification")
    assert not model.clip.logit_scale.requires_grad
    with pytest.raises(ValueError, match="LOSS"):
        _model("MODEL.MASK_ADAPTED_CLIP.LOSS", "bce")


def test_random_resized_crop_zooms_image_and_mask_together():
    s = 32
    ramp = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # value = x position in (0, 1)
    crops = ramp.expand(4, 3, s, s).clone()
    masks = crops[:, 0] < 0.5  # left half
    same, same_masks = random_resized_crop(crops, masks, scale=(1.0, 1.0))
    assert same is crops and same_masks is masks
    gen = torch.Generator().manual_seed(0)
    out, out_masks = random_resized_crop(crops, masks, (0.25, 0.25), (1.0, 1.0), generator=gen)
    assert out.shape == crops.shape and out_masks.shape == masks.shape
    assert out_masks.dtype == torch.bool
    # a quarter of the area at aspect 1: half the width, so the ramp spans about 0.5
    span = out[:, 0].amax(dim=(1, 2)) - out[:, 0].amin(dim=(1, 2))
    assert torch.allclose(span, torch.full((4,), 0.5 - 1 / s), atol=0.02)
    # the mask follows the image: away from the edge, mask == (value < 0.5)
    far = (out[:, 0] - 0.5).abs() > 1.5 / s
    assert torch.equal(out_masks[far], (out[:, 0] < 0.5)[far])


def test_short_training_run_with_ovseg_loss(toyworld_root, tmp_path):
    run_train_net(
        [
            "--config-file",
            str(REPO / CONFIG),
            *OVSEG,
            "OUTPUT_DIR",
            str(tmp_path),
            "SOLVER.MAX_ITER",
            "3",
            "SOLVER.IMS_PER_BATCH",
            "8",
            "SOLVER.WARMUP_ITERS",
            "1",
            "RUNTIME.NUM_THREADS",
            "1",
            "RUNTIME.LOG_PERIOD",
            "1",
            "DATASETS.TEST",
            "()",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    rows = [r for r in rows if "total_loss" in r]  # one loss: detectron2 logs only the total
    assert len(rows) == 3 and all(math.isfinite(r["total_loss"]) for r in rows)
    assert all(0 < r["logit_scale"] <= 100 for r in rows)
    assert rows[0]["logit_scale"] != rows[-1]["logit_scale"]  # the scale trains
    assert (tmp_path / "model_final.pth").is_file()
