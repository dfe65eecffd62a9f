"""The semantic mapper: 8/16-bit ground truth, ignore remapping, vocabulary field, collision
error."""

import numpy as np
import pytest
from detectron2.data import MetadataCatalog
from PIL import Image

from ov_seg.data.dataset_mappers.semantic import SemanticDatasetMapper


def _mapper(name, classes, ignore_label):
    MetadataCatalog.get(name).set(stuff_classes=classes, ignore_label=ignore_label)
    return SemanticDatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", ignore_value=255, dataset_name=name
    )


def test_16bit_ground_truth_and_ignore_remap(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(img)
    gt = np.array([[0, 1, 65535, 2, 3, 4, 5]] * 5, np.uint16)
    gt_path = tmp_path / "a_gt.png"
    Image.fromarray(gt).save(gt_path)
    mapper = _mapper("ov_seg_test_16bit", [f"c{i}" for i in range(6)], 65535)
    out = mapper(
        {"file_name": str(img), "sem_seg_file_name": str(gt_path), "height": 5, "width": 7}
    )
    assert out["image"].shape == (3, 5, 7)
    assert out["sem_seg"][0].tolist() == [0, 1, 255, 2, 3, 4, 5]
    assert out["vocabulary"] == [f"c{i}" for i in range(6)]
    assert out["dataset_name"] == "ov_seg_test_16bit"


def test_ignore_collision_is_a_clear_error():
    with pytest.raises(ValueError, match="IGNORE_VALUE 65535"):
        _mapper("ov_seg_test_847", [f"c{i}" for i in range(847)], 65535)
