"""Prepare scripts on tiny fabricated copies of the upstream formats, then load + evaluate.

Every fabricated split has two 6x8 images whose label rows are chosen so that the constant
prediction's mIoU is a fraction written out by hand in each test.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import scipy.io
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import REPO
from PIL import Image

from ov_seg.data.datasets.register_ade20k_full import register_ade20k_full
from ov_seg.data.datasets.register_coco import register_coco
from ov_seg.data.datasets.register_pascal_context import (
    PASCAL_CONTEXT_459_CLASSES,
    register_pascal_context,
)
from ov_seg.data.datasets.register_pascal_voc import register_pascal_voc_20
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.engine.trainer import Trainer
from ov_seg.evaluation import OpenVocabSemSegEvaluator

H, W = 6, 8


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(*spec):
    """(H, W) int map from ``(value, number of rows)`` pairs, top to bottom."""
    out = np.concatenate([np.full((n, W), v, dtype=np.int64) for v, n in spec])
    assert out.shape == (H, W)
    return out


def write_jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path)


@pytest.fixture
def restore_registration():
    """Re-register the benchmark datasets at the default root after a test moved them."""
    yield
    for register in (register_ade20k_full, register_pascal_context, register_pascal_voc_20):
        register()
    register_coco()


def evaluate(dataset_name, predict, tmp_path, ignore_fill=0):
    """Run the evaluator the trainer builds for ``dataset_name`` on ``predict(gt) -> labels``."""
    evaluator = Trainer.build_evaluator(get_ov_seg_cfg(), dataset_name, str(tmp_path / "eval"))
    assert isinstance(evaluator, OpenVocabSemSegEvaluator)
    ignore = MetadataCatalog.get(dataset_name).ignore_label
    evaluator.reset()
    for d in DatasetCatalog.get(dataset_name):
        gt = np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64)
        gt[gt == ignore] = ignore_fill
        evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": predict(gt)}])
    return evaluator.evaluate()["sem_seg"]


def one_hot(num_classes):
    return lambda gt: torch.nn.functional.one_hot(torch.as_tensor(gt), num_classes).permute(2, 0, 1)


def constant(label):
    return lambda gt: torch.full(gt.shape, label, dtype=torch.long)


# ---------------------------------------------------------------- ADE20K-847 (fabricated)


def ade_seg_png(path, ade_ids):
    """An upstream ``*_seg.png``: R // 10 * 256 + G = object index (R's last digit and B vary)."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = (ade_ids // 256) * 10 + 7 * (ade_ids % 2)
    rgb[..., 1] = ade_ids % 256
    rgb[..., 2] = 40  # instance channel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def fabricate_ade(root):
    src = root / "ADE20K_2021_17_01" / "images" / "ADE"
    wall, sky, person, not_in_847 = 2978, 2420, 1831, 5
    maps = {
        "validation/home/ADE_val_00000001": rows((wall, 3), (sky, 2), (0, 1)),
        "validation/urban/street/ADE_val_00000002": rows(
            (wall, 1), (person, 3), (not_in_847, 1), (sky, 1)
        ),
        "training/home/ADE_train_00000001": rows((sky, 6)),
    }
    for stem, ids in maps.items():
        write_jpg(src / f"{stem}.jpg")
        ade_seg_png(src / f"{stem}_seg.png", ids)
    (src / "training/home/ADE_train_00000001").mkdir()  # instance masks live in such folders


def test_ade20k_full_prepare_load_evaluate(tmp_path, restore_registration):
    fabricate_ade(tmp_path)
    script = load_script("prepare_ade20k_full_sem_seg")
    source = tmp_path / "ADE20K_2021_17_01"
    summary = script.main(["--source", str(source), "--output", str(source)])
    assert summary == {
        "training": {"done": 1, "skipped": 0},
        "validation": {"done": 2, "skipped": 0},
    }
    assert script.main(["--source", str(source), "--output", str(source)])["validation"] == {
        "done": 0,
        "skipped": 2,
    }  # rerun resumes
    gt = Image.open(source / "annotations_detectron2/validation/ADE_val_00000002.tif")
    assert gt.mode == "I;16"
    # wall -> 0, person -> 11, sky -> 2; unlabeled and classes outside the 847 -> 65535
    np.testing.assert_array_equal(np.asarray(gt)[:, 0], [0, 11, 11, 11, 65535, 2])

    register_ade20k_full(tmp_path)
    dicts = DatasetCatalog.get("ade20k_full_sem_seg_val")
    assert [d["image_id"] for d in dicts] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert len(MetadataCatalog.get("ade20k_full_sem_seg_val").stuff_classes) == 847
    assert evaluate("ade20k_full_sem_seg_val", one_hot(847), tmp_path)["mIoU"] == 100.0
    # wall 32 px, sky 24, person 24 (80 valid); constant "wall": IoU_wall = 32 / 80, others 0
    res = evaluate("ade20k_full_sem_seg_val", constant(0), tmp_path)
    assert res["mIoU"] == pytest.approx(100 * (32 / 80) / 3)
    assert res["IoU-wall"] == pytest.approx(100 * 32 / 80)
    assert np.isnan(res["IoU-floor, flooring"])  # absent classes are not averaged


def test_ade20k_full_errors(tmp_path):
    script = load_script("prepare_ade20k_full_sem_seg")
    with pytest.raises(FileNotFoundError, match="ADE20K_2021_17_01 folder not found.*ade20k"):
        script.main(["--source", str(tmp_path / "missing")])
    src = tmp_path / "ADE20K_2021_17_01"
    (src / "images/ADE/training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="validation image folder not found"):
        script.main(["--source", str(src), "--splits", "validation"])
    write_jpg(src / "images/ADE/training/x/ADE_train_00000001.jpg")
    with pytest.raises(FileNotFoundError, match="segmentation of ADE_train_00000001.jpg"):
        script.main(["--source", str(src), "--splits", "training"])
    grey = np.zeros((H, W), np.uint8)  # an 8-bit grey _seg.png instead of RGB
    Image.fromarray(grey).save(src / "images/ADE/training/x/ADE_train_00000001_seg.png")
    with pytest.raises(ValueError, match="expected an 8-bit RGB"):
        script.main(["--source", str(src), "--splits", "training"])


def test_wrong_ground_truth_bit_depth(tmp_path, restore_registration):
    fabricate_ade(tmp_path)
    source = tmp_path / "ADE20K_2021_17_01"
    args = ["--source", str(source), "--output", str(source), "--splits", "validation"]
    load_script("prepare_ade20k_full_sem_seg").main(args)
    gt_file = source / "annotations_detectron2/validation/ADE_val_00000001.tif"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(gt_file)  # 8-bit: labels > 255 would be lost
    register_ade20k_full(tmp_path)
    with pytest.raises(ValueError, match="8-bit ground truth.*needs 16-bit.*prepare_ade20k_full"):
        evaluate("ade20k_full_sem_seg_val", constant(0), tmp_path)


def test_unprepared_dataset_names_the_command(tmp_path, restore_registration):
    register_ade20k_full(tmp_path)
    with pytest.raises(FileNotFoundError, match="python datasets/prepare_ade20k_full_sem_seg.py"):
        DatasetCatalog.get("ade20k_full_sem_seg_val")


# ---------------------------------------------------------------- ADE20K-150 (detectron2 builtin)


@pytest.fixture
def builtin_ade20k_at(tmp_path):
    """Point detectron2's builtin ``ade20k_sem_seg_*`` at ``tmp_path`` for one test."""
    from detectron2.data.datasets.builtin import register_all_ade20k

    def move(root):
        for split in ("train", "val"):
            DatasetCatalog.remove(f"ade20k_sem_seg_{split}")
            MetadataCatalog.remove(f"ade20k_sem_seg_{split}")
        register_all_ade20k(str(root))

    move(tmp_path)
    yield
    move(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def test_ade20k_150_prepare_then_builtin_loads(tmp_path, builtin_ade20k_at):
    ade = tmp_path / "ADEChallengeData2016"
    wall, sky, person = 1, 3, 13  # upstream ids; 0 = "other"
    labels = {
        "ADE_val_00000001": rows((wall, 3), (sky, 2), (0, 1)),
        "ADE_val_00000002": rows((person, 4), (sky, 2)),
    }
    for stem, lab in labels.items():
        write_jpg(ade / "images/validation" / f"{stem}.jpg")
        (ade / "annotations/validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab.astype(np.uint8)).save(ade / "annotations/validation" / f"{stem}.png")
    load_script("prepare_ade20k_sem_seg").main(["--root", str(ade), "--splits", "validation"])
    assert len(DatasetCatalog.get("ade20k_sem_seg_val")) == 2
    # the builtin's evaluator type is detectron2's "sem_seg"; TEST.EVALUATOR_TYPE selects ours
    cfg = get_ov_seg_cfg()
    cfg.TEST.EVALUATOR_TYPE = "ov_sem_seg"
    evaluator = Trainer.build_evaluator(cfg, "ade20k_sem_seg_val", str(tmp_path / "eval"))
    evaluator.reset()
    for d in DatasetCatalog.get("ade20k_sem_seg_val"):
        pred = torch.zeros(H, W, dtype=torch.long)  # constant "wall" (contiguous 0)
        evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": pred}])
    # wall 24 px, sky 32, person 32 (88 valid)
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100 * (24 / 88) / 3)


# ---------------------------------------------------------------- Pascal Context 59 / 459


def fabricate_pascal_context(root):
    voc = root / "VOCdevkit" / "VOC2010"
    full = {name: i + 1 for i, name in enumerate(PASCAL_CONTEXT_459_CLASSES)}
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "trainval").mkdir()
    (voc / "labels.txt").write_text("".join(f"{k}: {n}\n" for n, k in full.items()))
    aero, accordion, wall = full["aeroplane"], full["accordion"], full["wall"]
    maps = {
        "2008_000001": rows((aero, 3), (accordion, 2), (0, 1)),
        "2008_000002": rows((wall, 4), (aero, 2)),
        "2008_000003": rows((wall, 6)),
    }
    for image_id, label_map in maps.items():
        write_jpg(voc / "JPEGImages" / f"{image_id}.jpg")
        scipy.io.savemat(
            voc / "trainval" / f"{image_id}.mat", {"LabelMap": label_map.astype(np.uint16)}
        )
    (voc / "ImageSets/Main/val.txt").write_text("2008_000001\n2008_000002\n")
    (voc / "ImageSets/Main/train.txt").write_text("2008_000003\n")
    return voc


def test_pascal_context_prepare_load_evaluate(tmp_path, restore_registration):
    voc = fabricate_pascal_context(tmp_path)
    load_script("prepare_pascal_context").main(["--root", str(voc)])
    pc459 = Image.open(voc / "annotations_detectron2/pc459_val/2008_000001.tif")
    pc59 = Image.open(voc / "annotations_detectron2/pc59_val/2008_000001.png")
    assert (pc459.mode, pc59.mode) == ("I;16", "L")
    np.testing.assert_array_equal(np.asarray(pc459)[:, 0], [1, 1, 1, 0, 0, 65535])
    np.testing.assert_array_equal(np.asarray(pc59)[:, 0], [0, 0, 0, 255, 255, 255])

    register_pascal_context(tmp_path)
    for n in (59, 459):
        name = f"pascal_context_{n}_sem_seg_val"
        assert len(DatasetCatalog.get(name)) == 2
        assert evaluate(name, one_hot(n), tmp_path)["mIoU"] == 100.0
    # 459: aeroplane 40 px, accordion 16, wall 32 (88 valid); constant aeroplane
    res = evaluate("pascal_context_459_sem_seg_val", constant(1), tmp_path)
    assert res["mIoU"] == pytest.approx(100 * (40 / 88) / 3)
    # 59: accordion is not a class (ignored): aeroplane 40, wall 32 (72 valid)
    res = evaluate("pascal_context_59_sem_seg_val", constant(0), tmp_path)
    assert res["mIoU"] == pytest.approx(100 * (40 / 72) / 2)


def test_pascal_context_errors(tmp_path):
    script = load_script("prepare_pascal_context")
    with pytest.raises(FileNotFoundError, match="VOC2010 folder not found"):
        script.main(["--root", str(tmp_path / "missing")])
    voc = fabricate_pascal_context(tmp_path)
    (voc / "ImageSets/Main/val.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match="split file not found.*val.txt.*VOCtrainval_03-May"
    ):
        script.main(["--root", str(voc)])
    lines = (voc / "labels.txt").read_text().replace("2: aeroplane", "2: airplane")
    (voc / "labels.txt").write_text(lines)
    with pytest.raises(ValueError, match="459 Pascal Context classes"):
        script.main(["--root", str(voc), "--splits", "train"])


# ---------------------------------------------------------------- Pascal VOC 20


def write_voc_mask(path, labels, bits=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        im = Image.fromarray(labels.astype(np.uint8))
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        assert im.mode == "P"
    else:
        im = Image.fromarray(labels.astype(np.uint16))
    im.save(path)


def fabricate_voc(root, bits=8):
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    aeroplane, cat, sheep = 1, 8, 17
    masks = {
        "2007_000001": rows((aeroplane, 3), (0, 2), (255, 1)),
        "2007_000002": rows((cat, 4), (sheep, 2)),
    }
    for image_id, labels in masks.items():
        write_jpg(voc / "JPEGImages" / f"{image_id}.jpg")
        write_voc_mask(voc / "SegmentationClass" / f"{image_id}.png", labels, bits)
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n")
    return voc


def test_voc20_prepare_load_evaluate_seen_unseen(tmp_path, restore_registration):
    voc = fabricate_voc(tmp_path)
    load_script("prepare_voc_sem_seg").main(["--root", str(voc), "--splits", "val"])
    out = np.asarray(Image.open(voc / "annotations_detectron2/voc20_val/2007_000001.png"))
    np.testing.assert_array_equal(out[:, 0], [0, 0, 0, 255, 255, 255])  # background -> ignore

    register_pascal_voc_20(tmp_path)
    meta = MetadataCatalog.get("pascalvoc20_sem_seg_val")
    assert meta.unseen_classes == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    res = evaluate("pascalvoc20_sem_seg_val", one_hot(20), tmp_path)
    assert (res["mIoU"], res["mIoU-seen"], res["mIoU-unseen"], res["hIoU"]) == (100, 100, 100, 100)
    # aeroplane 24 px, cat 32 (seen), sheep 16 (unseen); constant aeroplane
    res = evaluate("pascalvoc20_sem_seg_val", constant(0), tmp_path)
    assert res["mIoU"] == pytest.approx(100 * (24 / 72) / 3)
    assert res["mIoU-seen"] == pytest.approx(100 * (24 / 72) / 2)
    assert res["mIoU-unseen"] == 0.0 and res["hIoU"] == 0.0
    # constant sheep: seen 0, unseen IoU_sheep = 16 / 72
    res = evaluate("pascalvoc20_sem_seg_val", constant(16), tmp_path)
    assert res["mIoU-unseen"] == pytest.approx(100 * 16 / 72) and res["hIoU"] == 0.0
    table = (tmp_path / "eval" / "per_class_iou.csv").read_text().splitlines()
    assert table[0] == "id,class,split,IoU,ACC,gt_pixels,pred_pixels"
    assert table[17].startswith("16,sheep,unseen,22.22,100.0,16,")


def test_voc20_errors(tmp_path):
    script = load_script("prepare_voc_sem_seg")
    with pytest.raises(FileNotFoundError, match="VOC2012 folder not found"):
        script.main(["--root", str(tmp_path / "missing")])
    voc = fabricate_voc(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="split file not found.*train.txt"):
        script.main(["--root", str(voc)])
    voc = fabricate_voc(tmp_path / "b", bits=16)
    with pytest.raises(ValueError, match="16-bit label map.*expected 8-bit"):
        script.main(["--root", str(voc), "--splits", "val"])


# ------------------------------------------------------- COCO-Stuff-171, panoptic, captions


def test_coco_stuff_prepare_load_evaluate(tmp_path, restore_registration):
    coco = tmp_path / "coco"
    maps = coco / "stuffthingmaps" / "val2017"
    maps.mkdir(parents=True)
    # stuffthingmaps store COCO id - 1: person 0, wood 181, tree 168; 182 ("other"), 11 (unused
    # id 12) and 255 are not COCO-Stuff-171 classes
    labels = {
        "000000000001": rows((0, 3), (181, 2), (255, 1)),
        "000000000002": rows((182, 1), (168, 4), (11, 1)),
    }
    for stem, lab in labels.items():
        write_jpg(coco / "val2017" / f"{stem}.jpg")
        Image.fromarray(lab.astype(np.uint8)).save(maps / f"{stem}.png")
    load_script("prepare_coco_stuff_sem_seg").main(["--root", str(coco), "--splits", "val2017"])
    out = np.asarray(Image.open(coco / "stuffthingmaps_detectron2/val2017/000000000002.png"))
    np.testing.assert_array_equal(out[:, 0], [255, 157, 157, 157, 157, 255])

    register_coco(tmp_path)
    name = "coco_2017_val_stuff_sem_seg"
    assert MetadataCatalog.get(name).stuff_classes[157] == "tree"
    res = evaluate(name, one_hot(171), tmp_path)
    assert (res["mIoU"], res["hIoU"]) == (100, 100)
    # person 24, wood 16 (seen), tree 32 (unseen); constant person
    res = evaluate(name, constant(0), tmp_path)
    assert res["mIoU"] == pytest.approx(100 * (24 / 72) / 3)
    assert res["mIoU-seen"] == pytest.approx(100 * (24 / 72) / 2) and res["mIoU-unseen"] == 0


def test_coco_panoptic_with_sem_seg_and_captions(tmp_path, restore_registration):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "panoptic_val2017").mkdir()
    seg_ids = rows((1, 3), (2, 2), (0, 1))
    seg_ids[5, :4] = 3  # a segment missing from segments_info -> ignore
    rgb = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(coco / "panoptic_val2017" / "000000000001.png")
    write_jpg(coco / "val2017" / "000000000001.jpg")
    segments = [
        {"id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 8, 3], "area": 24},
        {"id": 2, "category_id": 193, "iscrowd": 0, "bbox": [0, 3, 8, 2], "area": 16},
    ]
    panoptic = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": H, "width": W}],
        "annotations": [
            {"image_id": 1, "file_name": "000000000001.png", "segments_info": segments}
        ],
        "categories": [],
    }
    (coco / "annotations" / "panoptic_val2017.json").write_text(json.dumps(panoptic))
    load_script("prepare_coco_panoptic_sem_seg").main(["--root", str(coco), "--splits", "val2017"])
    register_coco(tmp_path)
    name = "coco_2017_val_panoptic_with_sem_seg"
    meta = MetadataCatalog.get(name)
    grass = meta.stuff_dataset_id_to_contiguous_id[193]
    assert (
        meta.stuff_classes[grass] == "grass-merged" and meta.evaluator_type == "coco_panoptic_seg"
    )
    (d,) = DatasetCatalog.get(name)
    assert [s["category_id"] for s in d["segments_info"]] == [0, grass]
    sem = np.asarray(Image.open(d["sem_seg_file_name"]))
    np.testing.assert_array_equal(sem[:, 7], [0, 0, 0, grass, grass, 255])
    np.testing.assert_array_equal(sem[5, :4], [255] * 4)

    captions = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": 4, "width": 5}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "A cat on a mat. "},
            {"id": 2, "image_id": 7, "caption": "a sleeping cat"},
        ],
    }
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    (d,) = DatasetCatalog.get("coco_2017_captions_val")
    assert d == {
        "file_name": str(coco / "val2017" / "000000000007.jpg"),
        "image_id": 7,
        "height": 4,
        "width": 5,
        "captions": ["A cat on a mat.", "a sleeping cat"],
    }
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        DatasetCatalog.get("coco_2017_captions_train")
