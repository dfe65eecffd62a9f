"""Real ADE20K_2021_17_01 images (../shared) through the ADE20K-847 prepare script and evaluator."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from helpers import REPO
from PIL import Image

from ov_seg.data.datasets.register_ade20k_full import (
    ADE20K_847_CATEGORIES,
    register_ade20k_full,
)
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.engine.trainer import Trainer

NAME = "ade20k_full_sem_seg_train"


@pytest.fixture(scope="module")
def prepared(shared_dir, tmp_path_factory):
    """The three shared training images converted into a temporary $DETECTRON2_DATASETS."""
    source = shared_dir / "data" / "ade20k_samples" / "dataset" / "ADE20K_2021_17_01"
    root = tmp_path_factory.mktemp("d2ade")
    spec = importlib.util.spec_from_file_location(
        "prepare_ade20k_full_sem_seg", REPO / "datasets" / "prepare_ade20k_full_sem_seg.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = root / "ADE20K_2021_17_01"
    summary = script.main(["--source", str(source), "--output", str(out), "--splits", "training"])
    assert summary == {"training": {"done": 3, "skipped": 0}}
    register_ade20k_full(root)
    yield source, out
    register_ade20k_full()


def test_conversion_matches_upstream_annotations(prepared):
    source, out = prepared
    contiguous = {ade_id: i for i, (ade_id, _) in enumerate(ADE20K_847_CATEGORIES)}
    dicts = DatasetCatalog.get(NAME)
    assert len(dicts) == 3
    for d in dicts:
        gt = Image.open(d["sem_seg_file_name"])
        image = Image.open(d["file_name"])
        assert gt.mode == "I;16" and gt.size == image.size and min(gt.size) == 512
        labels = set(np.unique(np.asarray(gt)).tolist()) - {65535}
        # the per-image JSON lists every whole object (part_level 0) with its ADE index name_ndx
        meta = json.loads(
            next(source.rglob(f"{d['image_id']}.json")).read_text(encoding="latin-1")
        )["annotation"]["object"]
        listed = {o["name_ndx"] for o in meta if o["parts"]["part_level"] == 0}
        expected = {contiguous[i] for i in listed if i in contiguous}
        assert labels == expected


def test_evaluate_real_samples(prepared, tmp_path):
    evaluator = Trainer.build_evaluator(get_ov_seg_cfg(), NAME, str(tmp_path))
    gts = []
    for predict in ("perfect", "building"):
        evaluator.reset()
        for d in DatasetCatalog.get(NAME):
            gt = np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64)
            gts.append(gt)
            pred = np.where(gt == 65535, 0, gt) if predict == "perfect" else np.ones_like(gt)
            # (H, W) labels: dense 847-class scores at 512 px would take ~1 GB
            evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": torch.as_tensor(pred)}])
        res = evaluator.evaluate()["sem_seg"]
        if predict == "perfect":
            assert res["mIoU"] == 100.0 and res["pACC"] == 100.0
    # constant "building" (contiguous 1): IoU = building pixels / valid pixels; the mean is over
    # the classes present
    valid = np.concatenate([g[g != 65535] for g in gts[:3]])
    present = np.unique(valid)
    expected = 100 * np.mean(valid == 1) / len(present)
    assert 1 in present and res["mIoU"] == pytest.approx(expected)
    assert res["IoU-building, edifice"] == pytest.approx(100 * np.mean(valid == 1))
    assert (tmp_path / "per_class_iou.csv").read_text().count("\n") == 848
