"""OpenVocabSemSegEvaluator: hand-computed metrics, detectron2 agreement, 16-bit GT, errors."""

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from PIL import Image

from ov_seg.data.datasets.benchmark_utils import register_sem_seg
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.engine.trainer import Trainer
from ov_seg.evaluation import OpenVocabSemSegEvaluator
from ov_seg.evaluation.open_vocab_sem_seg import (
    binary_boundary,
    boundary_intersection_union,
    harmonic_mean,
    region_votes,
    sem_seg_metrics,
)


def make_dataset(tmp_path, name, gts, num_classes, ignore, bit_depth=None, **meta):
    """Register ``name``: one 3-channel image per ground-truth array, written as PNG."""
    for i, gt in enumerate(gts):
        (tmp_path / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "gt").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((*gt.shape, 3), np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        Image.fromarray(gt).save(tmp_path / "gt" / f"{i}.png")
    metadata = {
        "stuff_classes": [f"class {c}" for c in range(num_classes)],
        "ignore_label": ignore,
        "evaluator_type": "ov_sem_seg",
        **meta,
    }
    if bit_depth:
        metadata["sem_seg_bit_depth"] = bit_depth
    register_sem_seg(
        name, tmp_path / "images", tmp_path / "gt", "png", "jpg", "python make_it.py", metadata
    )
    return [str(tmp_path / "images" / f"{i}.jpg") for i in range(len(gts))]


def run(evaluator, files, preds):
    evaluator.reset()
    for f, p in zip(files, preds):
        evaluator.process([{"file_name": f}], [{"sem_seg": torch.as_tensor(p)}])
    return evaluator.evaluate()["sem_seg"]


def test_metrics_hand_computed():
    conf = np.zeros((4, 4), np.int64)  # [pred, gt]; index 3 = ignore
    conf[0, 0], conf[1, 0] = 8, 2  # class 0: 10 px, 8 right
    conf[1, 1] = 6  # class 1: 6 px, all right
    conf[2, 2], conf[0, 2] = 1, 3  # class 2: 4 px, 1 right
    conf[0, 3] = 5  # predictions on ignored pixels do not count
    res = sem_seg_metrics(conf, ["a", "b", "c"], seen_class_ids=[0, 1], unseen_class_ids=[2])
    iou = [8 / 13, 6 / 8, 1 / 4]
    assert res["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert res["IoU-a"] == pytest.approx(100 * 8 / 13)
    assert res["mIoU-seen"] == pytest.approx(100 * (8 / 13 + 6 / 8) / 2)
    assert res["mIoU-unseen"] == pytest.approx(25.0)
    s, u = 100 * (8 / 13 + 6 / 8) / 2, 25.0
    assert res["hIoU"] == pytest.approx(2 * s * u / (s + u))
    assert res["pACC"] == pytest.approx(100 * 15 / 20)
    assert res["mACC"] == pytest.approx(100 * (8 / 10 + 1 + 1 / 4) / 3)
    assert res["fwIoU"] == pytest.approx(100 * (10 * 8 / 13 + 6 * 6 / 8 + 4 / 4) / 20)
    assert sem_seg_metrics(conf, ["a", "b", "c"], unseen_class_ids=[2])["hIoU"] == res["hIoU"]
    assert "hIoU" not in sem_seg_metrics(conf, ["a", "b", "c"])
    assert np.isnan(harmonic_mean(50.0, float("nan"))) and harmonic_mean(0.0, 0.0) == 0.0


def test_agrees_with_detectron2_and_splits_from_metadata(tmp_path):
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, (12, 10)).astype(np.uint8) for _ in range(3)]
    gts[0][:2] = 255
    files = make_dataset(
        tmp_path, "ovseg_test_agree", gts, 5, 255, unseen_class_ids=[3, 4], seen_class_ids=[0, 1, 2]
    )
    preds = [torch.randn(5, 12, 10) for _ in gts]
    ours = run(
        OpenVocabSemSegEvaluator("ovseg_test_agree", output_dir=str(tmp_path / "o")), files, preds
    )
    theirs = run(SemSegEvaluator("ovseg_test_agree"), files, preds)
    for key in theirs:
        if "B-Iou" in key or key.startswith("BoundaryIoU"):
            continue  # per-class Boundary IoU: detectron2 erodes the label map (test below)
        assert ours[key] == pytest.approx(theirs[key], nan_ok=True), key
    assert {"mIoU-seen", "mIoU-unseen", "hIoU"} <= set(ours)
    assert (tmp_path / "o" / "sem_seg_predictions.json").is_file()
    rows = (tmp_path / "o" / "per_class_iou.csv").read_text().splitlines()
    assert rows[4].startswith("3,class 3,unseen,")


def test_boundary_iou_per_class(tmp_path):
    # class 3: a 10 x 10 square on class 2 (50 x 50 image: band width d = round(.02 * 70.7) = 1)
    gt = np.full((50, 50), 2, np.uint8)
    gt[20:30, 20:30] = 3
    band = binary_boundary(gt == 3)
    assert band.sum() == 36 and not band[21:29, 21:29].any()  # the square's 1-px outline
    assert binary_boundary(np.ones((50, 50), bool)).sum() == 4 * 49  # the image border is outside
    shifted = np.full_like(gt, 2)
    shifted[20:30, 22:32] = 3  # the square moved 2 px right
    inter, union = boundary_intersection_union(shifted, gt, 5, ignore=255)
    assert inter[3] == 2 * 8 and union[3] == 2 * 36 - 16  # top and bottom rows overlap on 8 px
    assert inter[[0, 1, 4]].sum() == 0 and union[[0, 1, 4]].sum() == 0  # absent classes
    ignored = gt.copy()
    ignored[20:30, 20:25] = 255
    inter_i, union_i = boundary_intersection_union(gt, ignored, 5, ignore=255)
    # the predicted outline loses its ignored left half (18 px left); the ground truth's right
    # half is a 10 x 5 region whose outline (26 px) includes its edge at the ignored pixels
    assert inter_i[3] == 18 and union_i[3] == 26

    files = make_dataset(tmp_path, "ovseg_test_boundary", [gt], 5, 255)
    ours = run(OpenVocabSemSegEvaluator("ovseg_test_boundary"), files, [gt.astype(np.int64)])
    assert ours["BoundaryIoU-class 3"] == pytest.approx(100.0)
    assert ours["BoundaryIoU-class 2"] == pytest.approx(100.0)
    # detectron2 subtracts eroded class ids: the square's band is counted as class 3 - 2 = 1
    scores = torch.nn.functional.one_hot(torch.as_tensor(gt).long(), 5).permute(2, 0, 1).float()
    theirs = run(SemSegEvaluator("ovseg_test_boundary"), files, [scores])
    assert not theirs["BoundaryIoU-class 3"] == pytest.approx(100.0)
    moved = run(OpenVocabSemSegEvaluator("ovseg_test_boundary"), files, [shifted.astype(np.int64)])
    assert moved["BoundaryIoU-class 3"] == pytest.approx(100.0 * 16 / 56)


def test_sixteen_bit_ground_truth(tmp_path):
    gt = np.array([[0, 256, 299, 65535], [299, 299, 256, 0]], dtype=np.uint16)
    files = make_dataset(tmp_path, "ovseg_test_16bit", [gt], 300, 65535, bit_depth=16)
    evaluator = Trainer.build_evaluator(get_ov_seg_cfg(), "ovseg_test_16bit", str(tmp_path / "o"))
    assert isinstance(evaluator, OpenVocabSemSegEvaluator)
    perfect = np.where(gt == 65535, 5, gt).astype(np.int64)
    assert run(evaluator, files, [perfect])["mIoU"] == 100.0
    scores = torch.nn.functional.one_hot(torch.as_tensor(perfect), 300).permute(2, 0, 1).float()
    assert run(evaluator, files, [scores])["mIoU"] == 100.0
    # constant 299 (3 of 7 valid pixels): IoU_299 = 3 / 7, classes 0 and 256 get 0
    assert run(evaluator, files, [np.full(gt.shape, 299)])["mIoU"] == pytest.approx(100 * 3 / 7 / 3)


def test_clear_errors(tmp_path):
    gt = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    files = make_dataset(tmp_path / "a", "ovseg_test_errors", [gt], 2, 255)
    ev = OpenVocabSemSegEvaluator("ovseg_test_errors")
    ev.reset()

    def process(pred, file_name=files[0]):
        ev.process([{"file_name": file_name}], [{"sem_seg": torch.as_tensor(pred)}])

    with pytest.raises(ValueError, match=r"labels \[2\] are neither.*Regenerate it with: python"):
        process(np.zeros((2, 2), np.int64))  # gt holds 2 in a 2-class dataset
    with pytest.raises(ValueError, match="3 channels, dataset .* has 2 classes"):
        process(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="must be scores"):
        process(torch.zeros(2, 2))  # float (H, W)
    with pytest.raises(KeyError, match="not an image of dataset"):
        process(np.zeros((2, 2), np.int64), "elsewhere.jpg")

    gt16 = np.zeros((2, 2), np.uint16)
    files = make_dataset(tmp_path / "b", "ovseg_test_depth", [gt16], 2, 255, bit_depth=8)
    ev = OpenVocabSemSegEvaluator("ovseg_test_depth")
    ev.reset()
    with pytest.raises(ValueError, match="16-bit ground truth.*needs 8-bit"):
        ev.process([{"file_name": files[0]}], [{"sem_seg": torch.zeros(2, 2, 2)}])
    with pytest.raises(ValueError, match="seen classes given without unseen"):
        OpenVocabSemSegEvaluator("ovseg_test_depth", seen_class_ids=[0])


def test_toyworld_dispatches_with_its_seen_unseen_split(toyworld_root, tmp_path):
    name = "toyworld_sem_seg_val"
    meta = MetadataCatalog.get(name)
    evaluator = Trainer.build_evaluator(get_ov_seg_cfg(), name, str(tmp_path))
    assert meta.evaluator_type == "ov_sem_seg" and isinstance(evaluator, OpenVocabSemSegEvaluator)
    evaluator.reset()
    for file_name, gt_file in evaluator.input_file_to_gt_file.items():
        gt = np.asarray(Image.open(gt_file)).astype(np.int64)
        evaluator.process([{"file_name": file_name}], [{"sem_seg": torch.as_tensor(gt % 255)}])
    res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU-seen"] == res["mIoU-unseen"] == res["hIoU"] == 100.0


def test_region_votes_hand_computed():
    """Mean scores per ground-truth class region (ignore left out); one-hot votes for labels."""
    gt = np.array([[0, 0, 2], [2, 2, 9]])
    probs = torch.zeros(3, 2, 3)
    probs[0] = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    probs[1] = 1 - probs[0]
    rows, labels = region_votes(probs, gt, 3, ignore=9)
    assert labels.tolist() == [0, 2]
    assert torch.allclose(rows, torch.tensor([[0.75, 0.25, 0.0], [0.0, 1.0, 0.0]]))
    rows, _ = region_votes(torch.tensor([[0, 1, 2], [2, 2, 0]]), gt, 3, ignore=9)
    assert torch.allclose(rows, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))


def test_dense_probe_reads_colour_not_shape(toyworld_root, tmp_path):
    """The evaluator's dense probe on the toy val split: a prediction that knows only an object's
    colour (uniform over the names of that colour) scores 100 on colour and chance-level shape
    (ties go to the first name); the ground truth itself scores 100 on both."""
    name = "toyworld_sem_seg_val"
    meta = MetadataCatalog.get(name)
    colour = torch.tensor(meta.class_attributes["colour"])
    evaluator = Trainer.build_evaluator(get_ov_seg_cfg(), name, str(tmp_path))
    results = {}
    for kind in ("truth", "colour only"):
        evaluator.reset()
        for file_name, gt_file in list(evaluator.input_file_to_gt_file.items())[:60]:
            gt = torch.as_tensor(np.asarray(Image.open(gt_file)).astype(np.int64)) % 255
            onehot = torch.nn.functional.one_hot(gt, len(colour)).permute(2, 0, 1).float()
            if kind == "colour only":
                # the same colour's names share the mass (stuff keeps its own name)
                same = (colour[:, None] == colour[None, :]) & (colour[:, None] >= 0)
                same |= torch.eye(len(colour), dtype=torch.bool)
                onehot = torch.einsum("kc,chw->khw", same.float() / same.sum(0), onehot)
            evaluator.process([{"file_name": file_name}], [{"sem_seg": onehot}])
        results[kind] = evaluator.evaluate()["dense_probe"]
    truth, col = results["truth"], results["colour only"]
    for split in ("seen", "unseen"):
        assert truth[f"shape_within_colour_{split}"] == truth[f"colour_{split}"] == 100.0
        assert col[f"colour_{split}"] == 100.0
        assert col[f"shape_within_colour_{split}"] < 30.0
