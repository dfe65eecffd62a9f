"""Unreadable images: a truncated JPEG is never decoded silently (issue 23, case 4); an evaluation
skips an unreadable image with a warning naming it and a count, or stops on it with
TEST.FAIL_ON_UNREADABLE_IMAGE (case 10)."""

import logging
import re
import shutil

import cv2
import numpy as np
import pytest
import torch

from ov_seg.data.dataset_mappers.caption import CaptionDatasetMapper
from ov_seg.data.image_io import UnreadableImageError, read_image


def _truncated_jpeg(tmp_path, name="cut.jpg"):
    rng = np.random.RandomState(0)
    full = tmp_path / "full.jpg"
    cv2.imwrite(str(full), (rng.rand(48, 64, 3) * 255).astype(np.uint8))
    data = full.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) * 2 // 3])
    return full, cut


def test_caption_mapper_refuses_a_truncated_jpeg(tmp_path):
    full, cut = _truncated_jpeg(tmp_path)
    mapper = CaptionDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    ok = mapper({"file_name": str(full), "captions": ["a photo"]})
    assert tuple(ok["image"].shape) == (3, 48, 64)
    with pytest.raises(UnreadableImageError, match=re.escape(str(cut)) + ".*truncated"):
        mapper({"file_name": str(cut), "captions": ["a photo"]})


def test_read_image_on_truncated_and_garbage_files(tmp_path):
    full, cut = _truncated_jpeg(tmp_path)
    for fast in (True, False):
        assert read_image(str(full), "RGB", fast=fast).shape == (48, 64, 3)
        with pytest.raises(UnreadableImageError, match=re.escape(str(cut))):
            read_image(str(cut), "RGB", fast=fast)
    png = tmp_path / "cut.png"
    cv2.imwrite(str(png), np.zeros((20, 20, 3), np.uint8))
    png.write_bytes(png.read_bytes()[:40])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    for bad in (png, garbage, tmp_path / "missing.png"):
        with pytest.raises(UnreadableImageError, match=re.escape(str(bad))):
            read_image(str(bad), "RGB", fast=True)


@pytest.fixture
def val_with_a_corrupt_image(toyworld_root, tmp_path):
    """``toyworld_sem_seg_val`` first 4 images, the second one truncated (a copy)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = [dict(d) for d in DatasetCatalog.get("toyworld_sem_seg_val")[:4]]
    bad = tmp_path / "broken.png"
    shutil.copy(dicts[1]["file_name"], bad)
    bad.write_bytes(bad.read_bytes()[:100])
    dicts[1]["file_name"] = str(bad)
    name = "toyworld_sem_seg_val_corrupt"
    meta = MetadataCatalog.get("toyworld_sem_seg_val").as_dict()
    meta.pop("name")
    readable = [d for d in dicts if d["file_name"] != str(bad)]
    for n, ds in ((name, dicts), (name + "_readable", readable)):
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
        DatasetCatalog.register(n, lambda ds=ds: ds)
        MetadataCatalog.get(n).set(**meta)
    return name, bad


def _evaluate(name, tmp_path, *opts):
    from helpers import setup_config

    from ov_seg.engine import Trainer

    cfg = setup_config(
        "configs/toyworld/semseg_R18.yaml",
        ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path / "out"), *opts],
    )
    return Trainer.test(cfg, Trainer.build_model(cfg).eval())


def test_evaluation_skips_an_unreadable_image_and_counts_it(
    val_with_a_corrupt_image, tmp_path, caplog
):
    name, bad = val_with_a_corrupt_image
    with caplog.at_level(logging.WARNING):
        torch.manual_seed(0)
        results = _evaluate(name, tmp_path)
    # the same (seeded) model on the 3 readable images alone: the skipped image left no trace
    torch.manual_seed(0)
    alone = _evaluate(name + "_readable", tmp_path / "alone")
    assert results["sem_seg"]["mIoU"] == pytest.approx(alone["sem_seg"]["mIoU"], abs=1e-9)
    assert results["sem_seg"]["pACC"] == pytest.approx(alone["sem_seg"]["pACC"], abs=1e-9)
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(bad) in m and "skipped" in m for m in messages)
    assert any(m.startswith("1 of 4 test images skipped as unreadable") for m in messages)


def test_evaluation_stops_on_an_unreadable_image_when_asked(val_with_a_corrupt_image, tmp_path):
    name, bad = val_with_a_corrupt_image
    with pytest.raises(UnreadableImageError, match=re.escape(str(bad))):
        _evaluate(name, tmp_path, "TEST.FAIL_ON_UNREADABLE_IMAGE", "True")
