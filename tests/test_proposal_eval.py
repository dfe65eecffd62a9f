"""Panoptic mapper and the proposal-recall evaluator on the generated toy world; bad annotations."""

import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import setup_config

from ov_seg.data import build_dataset_mapper
from ov_seg.data.dataset_mappers.panoptic import VOID, PanopticDatasetMapper, read_segments, rgb2id
from ov_seg.evaluation import ProposalRecallEvaluator, build_evaluator

CONFIG = "configs/toyworld/proposal_R18.yaml"
# the mapper at the toy world's native 64 px (the proposal config upsamples to 128)
NATIVE_SIZE = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]
NATIVE_SIZE += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]


def _mapper(is_train, dataset="toyworld_panoptic_train", opts=()):
    cfg = setup_config(CONFIG, ["INPUT.RANDOM_FLIP", "none", *NATIVE_SIZE, *opts])
    return build_dataset_mapper(cfg, is_train=is_train, dataset_name=dataset)


def test_mapper_matches_annotations(toyworld_root):
    mapper = _mapper(True)
    assert isinstance(mapper, PanopticDatasetMapper)
    for d in DatasetCatalog.get("toyworld_panoptic_train")[:6]:
        out = mapper(d)
        inst = out["instances"]
        masks = inst.gt_masks.tensor
        pan = rgb2id(cv2.imread(d["pan_seg_file_name"])[:, :, ::-1])
        assert out["image"].shape == (3, 64, 64) and masks.shape[1:] == (64, 64)
        assert masks.sum(0).max() <= 1  # disjoint segments
        by_class = {s["category_id"]: s for s in d["segments_info"]}
        for c, m in zip(inst.gt_classes.tolist(), masks):
            assert torch.equal(m, torch.from_numpy(pan == by_class[c]["id"]))
        assert out["vocabulary"] == MetadataCatalog.get("toyworld_panoptic_train").stuff_classes
    test_out = _mapper(False)(DatasetCatalog.get("toyworld_panoptic_val")[0])
    assert "instances" not in test_out and "pan_seg_file_name" in test_out


def test_mapper_seen_training_vocabulary(toyworld_root):
    meta = MetadataCatalog.get("toyworld_panoptic_train")
    mapper = _mapper(True, opts=["INPUT.PANOPTIC.TRAIN_VOCABULARY", "seen"])
    assert mapper.vocabulary == meta.seen_classes
    d = DatasetCatalog.get("toyworld_panoptic_train")[0]
    out = mapper(d)
    names = [meta.stuff_classes[s["category_id"]] for s in d["segments_info"]]
    assert [meta.seen_classes[c] for c in out["instances"].gt_classes] == names
    assert out["vocabulary"] == meta.seen_classes
    # an unseen segment (absent from the training split) is dropped
    unseen_id = meta.unseen_class_ids[0]
    d = {**d, "segments_info": [{**d["segments_info"][-1], "category_id": unseen_id}]}
    assert len(mapper(d)["instances"]) == 0
    with pytest.raises(ValueError, match="train_vocabulary"):
        _mapper(True, opts=["INPUT.PANOPTIC.TRAIN_VOCABULARY", "unseen"])


def test_mapper_void_crowd_and_semantic(tmp_path):
    image = np.full((20, 24, 3), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "im.png"), image)
    pan = np.zeros((20, 24, 3), np.uint8)  # all void
    cv2.imwrite(str(tmp_path / "void.png"), pan)
    pan[:10, :, 2] = 7  # RGB (7, 0, 0) -> id 7, written as BGR
    pan[10:, :, 2] = 9
    cv2.imwrite(str(tmp_path / "pan.png"), pan)
    cv2.imwrite(str(tmp_path / "ignore.png"), np.full((20, 24), 255, np.uint8))
    mapper = _mapper(True, dataset="")
    base = {"file_name": str(tmp_path / "im.png"), "height": 20, "width": 24}
    # all pixels void: no segment, no crash
    out = mapper(
        {
            **base,
            "pan_seg_file_name": str(tmp_path / "void.png"),
            "segments_info": [{"id": 7, "category_id": 3, "iscrowd": 0}],
        }
    )
    h, w = out["image"].shape[1:]  # resized to the toy config's 64 px short side
    assert (h, w) == (53, 64)
    assert len(out["instances"]) == 0 and out["instances"].gt_masks.tensor.shape == (0, h, w)
    # crowd segments are dropped (void)
    out = mapper(
        {
            **base,
            "pan_seg_file_name": str(tmp_path / "pan.png"),
            "segments_info": [
                {"id": 7, "category_id": 3, "iscrowd": 0},
                {"id": 9, "category_id": 4, "iscrowd": 1},
            ],
        }
    )
    assert out["instances"].gt_classes.tolist() == [3]
    mask = out["instances"].gt_masks.tensor[0]
    assert mask[:26].all() and not mask[27:].any()
    # semantic map, every pixel ignored
    out = mapper({**base, "sem_seg_file_name": str(tmp_path / "ignore.png")})
    assert len(out["instances"]) == 0
    with pytest.raises(KeyError, match="pan_seg_file_name"):
        mapper(base)


def _gt_proposals(d, q=12, extra_noise=False):
    index, classes = read_segments(d, 255)
    masks = torch.zeros(q, *index.shape)
    for j in range(len(classes)):
        masks[j] = torch.from_numpy(index == j).float()
    scores = torch.linspace(1, 0, q)
    return {"proposals": {"masks": masks, "scores": scores}}


def test_evaluator_perfect_and_empty(toyworld_root, tmp_path):
    dicts = DatasetCatalog.get("toyworld_panoptic_val")
    ev = ProposalRecallEvaluator(
        "toyworld_panoptic_val", top_ks=(1, 10), distributed=False, output_dir=str(tmp_path)
    )
    ev.reset()
    ev.process(dicts, [_gt_proposals(d) for d in dicts])
    res = ev.evaluate()["proposal_recall"]
    assert res["AR@10"] == 1.0 and res["mBestIoU"] == pytest.approx(1.0)
    # only the first proposal (segment 0 of each image) counts at K = 1
    assert res["AR@1"] == pytest.approx(len(dicts) / res["num_gt"])
    assert res["num_gt_unseen"] > 0 and res["AR@10_unseen"] == 1.0
    assert res["num_gt_seen"] + res["num_gt_unseen"] == res["num_gt"]
    assert res["num_gt_things"] + res["num_gt_stuff"] == res["num_gt"]
    assert json.loads((tmp_path / "proposal_recall.json").read_text())["AR@10"] == 1.0
    # empty proposals and no proposals at all: recall 0
    ev.reset()
    empty = [
        {"proposals": {"masks": torch.zeros(5, d["height"], d["width"]), "scores": torch.rand(5)}}
        for d in dicts
    ]
    ev.process(dicts, empty)
    none = [
        {"proposals": {"masks": torch.zeros(0, d["height"], d["width"]), "scores": torch.zeros(0)}}
        for d in dicts
    ]
    ev.process(dicts, none)
    res = ev.evaluate()["proposal_recall"]
    assert res["AR@10"] == 0.0 and res["mBestIoU"] == 0.0


def test_evaluator_inputs_without_annotations_and_errors(toyworld_root):
    d = DatasetCatalog.get("toyworld_panoptic_val")[0]
    ev = ProposalRecallEvaluator("toyworld_panoptic_val", distributed=False)
    ev.reset()
    ev.process(
        [{"file_name": d["file_name"]}], [_gt_proposals(d)]
    )  # ground truth found by file name
    assert ev.evaluate()["proposal_recall"]["AR@100"] == 1.0
    with pytest.raises(KeyError, match="PROPOSALS_ON"):
        ev.process([d], [{"sem_seg": torch.zeros(1)}])
    bad = _gt_proposals(d)
    bad["proposals"]["masks"] = bad["proposals"]["masks"][:, :10]
    with pytest.raises(ValueError, match="original image size"):
        ev.process([d], [bad])


def test_evaluator_selected_by_config(toyworld_root, tmp_path):
    cfg = setup_config(CONFIG)
    assert isinstance(
        build_evaluator(cfg, "toyworld_panoptic_val", str(tmp_path)), ProposalRecallEvaluator
    )
    cfg = setup_config(CONFIG, ["TEST.EVALUATOR_TYPE", ""])
    assert not isinstance(
        build_evaluator(cfg, "toyworld_sem_seg_val", str(tmp_path)), ProposalRecallEvaluator
    )
    assert VOID == 255


def test_evaluator_image_without_segments(toyworld_root, tmp_path):
    cv2.imwrite(str(tmp_path / "void.png"), np.zeros((8, 8, 3), np.uint8))
    d = {
        "file_name": "x.png",
        "pan_seg_file_name": str(tmp_path / "void.png"),
        "height": 8,
        "width": 8,
        "segments_info": [{"id": 3, "category_id": 1, "iscrowd": 0}],
    }
    ev = ProposalRecallEvaluator("toyworld_panoptic_val", distributed=False)
    ev.reset()
    ev.process([d], [{"proposals": {"masks": torch.ones(2, 8, 8), "scores": torch.ones(2)}}])
    assert ev.evaluate() == {}  # nothing to recall: no metric rather than a fake 0 or 1
