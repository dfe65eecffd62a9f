"""TwoStageOVSeg with tiny random models on the toy world: outputs, vocabulary rules, errors,
proposal sources."""

import json

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from helpers import setup_config
from torch import nn

from ov_seg.data import build_dataset_mapper
from ov_seg.modeling.proposal_sources import (
    PrecomputedProposalSource,
    load_precomputed_proposals,
    save_precomputed_proposals,
)

CONFIG = "configs/toyworld/two_stage_R18.yaml"
TINY = ["MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]


def _cfg(*opts):
    return setup_config(CONFIG, [*TINY, *opts])


class _CertainObjects(nn.Module):
    """A proposal source wrapper whose proposals all have objectness 1."""

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.has_class_scores = source.has_class_scores

    def forward(self, batched_inputs, vocabulary):
        out = self.source(batched_inputs, vocabulary)
        return [p._replace(scores=torch.ones_like(p.scores)) for p in out]


@pytest.fixture(scope="module")
def model(toyworld_root):
    torch.manual_seed(0)
    # thresholds 0: random weights give low scores; every proposal should reach the panoptic merge
    opts = [
        "MODEL.TWO_STAGE.TEST.PANOPTIC_ON",
        "True",
        "MODEL.TWO_STAGE.TEST.OBJECT_MASK_THRESHOLD",
        "0.0",
    ]
    return build_model(_cfg(*opts, "MODEL.TWO_STAGE.TEST.OVERLAP_THRESHOLD", "0.0")).eval()


@pytest.fixture(scope="module")
def val_inputs(toyworld_root):
    cfg = _cfg()
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name="toyworld_sem_seg_val")
    return [mapper(d) for d in DatasetCatalog.get("toyworld_sem_seg_val")[:2]]


def test_outputs_on_dataset_inputs(model, val_inputs):
    out = model(val_inputs)
    assert len(out) == 2
    for x, r in zip(val_inputs, out):
        assert r["vocabulary"] == x["vocabulary"] and len(r["vocabulary"]) == 69
        assert r["sem_seg"].shape == (69, x["height"], x["width"])
        assert torch.isfinite(r["sem_seg"]).all() and (r["sem_seg"] >= 0).all()
        pan, segments = r["panoptic_seg"]
        assert pan.shape == (x["height"], x["width"]) and pan.dtype == torch.int32
        ids = {s["id"] for s in segments}
        assert set(pan.unique().tolist()) <= ids | {0}


def test_panoptic_segments_follow_the_dataset_metadata(model, val_inputs):
    # what detectron2's COCOPanopticEvaluator reads: ids, isthing (maps category ids back with the
    # thing / stuff tables), one merged segment per stuff class
    meta = MetadataCatalog.get("toyworld_panoptic_val")
    things = set(meta.thing_dataset_id_to_contiguous_id.values())
    stuff = set(meta.stuff_dataset_id_to_contiguous_id.values())
    x = {**val_inputs[0], "dataset_name": "toyworld_panoptic_val"}
    x.pop("vocabulary")
    original = model.proposal_source
    model.proposal_source = _CertainObjects(original)  # random objectness would lose to "no object"
    try:
        pan, segments = model([x])[0]["panoptic_seg"]
    finally:
        model.proposal_source = original
    assert segments
    for s in segments:
        assert s["isthing"] == (s["category_id"] in things)
        assert s["category_id"] in (things if s["isthing"] else stuff)
        assert (pan == s["id"]).any()
    stuff_ids = [s["category_id"] for s in segments if not s["isthing"]]
    assert len(stuff_ids) == len(set(stuff_ids))


def test_explicit_vocabularies_output_size_and_single_class(model, val_inputs):
    image = val_inputs[0]["image"]
    batch = [
        {
            "image": image,
            "vocabulary": ["red star", "blue circle", "grass"],
            "height": 96,
            "width": 80,
        },
        {"image": image[:, :48, :40], "vocabulary": ["red star"]},
        {"image": image},  # no vocabulary: the test dataset's classes
    ]
    out = model(batch)
    assert out[0]["sem_seg"].shape == (3, 96, 80)
    assert out[1]["vocabulary"] == ["red star", "others"]  # OVSeg's single-class rule
    assert out[1]["sem_seg"].shape == (2, 48, 40)
    assert out[2]["sem_seg"].shape[0] == 69


def test_vocabulary_errors(model, val_inputs):
    image = val_inputs[0]["image"]
    with pytest.raises(ValueError, match="empty vocabulary"):
        model([{"image": image, "vocabulary": []}])
    with pytest.raises(KeyError, match="unknown dataset name 'no_such_dataset'"):
        model([{"image": image, "dataset_name": "no_such_dataset"}])
    with pytest.raises(ValueError, match="duplicate"):
        model([{"image": image, "vocabulary": ["sky", "sky"]}])


def test_inference_only(model, val_inputs):
    model.train()
    try:
        with pytest.raises(RuntimeError, match="inference-only"):
            model(val_inputs)
    finally:
        model.eval()


def test_lambda_below_one_needs_class_scores(toyworld_root):
    with pytest.raises(ValueError, match="ENSEMBLE_WEIGHT 1.0"):
        build_model(
            _cfg(
                "MODEL.MASK_FORMER.CLASS_HEAD.NAME",
                "class_agnostic",
                "MODEL.TWO_STAGE.ENSEMBLE_WEIGHT",
                "0.5",
            )
        )


def test_precomputed_files_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    soft = torch.rand(4, 12, 10, generator=gen)
    scores = torch.tensor([0.9, 0.5, 0.1, 1.0])
    p = load_precomputed_proposals(save_precomputed_proposals(tmp_path / "a.npz", soft, scores))
    assert torch.equal(p.masks, soft.half().float()) and torch.allclose(p.scores, scores)
    binary = soft > 0.5
    p = load_precomputed_proposals(save_precomputed_proposals(tmp_path / "b.npz", binary))
    assert torch.equal(p.masks, binary.float()) and torch.equal(p.scores, torch.ones(4))
    p = load_precomputed_proposals(save_precomputed_proposals(tmp_path / "c.json", soft, scores))
    assert torch.equal(p.masks, (soft >= 0.5).float()) and torch.allclose(p.scores, scores)
    # Segment Anything's coco_rle records
    records = json.loads((tmp_path / "c.json").read_text())
    sam = [{"segmentation": rle, "predicted_iou": 0.7} for rle in records["masks"]]
    (tmp_path / "d.json").write_text(json.dumps(sam))
    p = load_precomputed_proposals(tmp_path / "d.json")
    assert torch.equal(p.masks, (soft >= 0.5).float()) and torch.allclose(
        p.scores, torch.full((4,), 0.7)
    )
    with pytest.raises(ValueError, match="scores"):
        save_precomputed_proposals(tmp_path / "e.npz", soft, scores[:2])


def test_precomputed_source_feeds_the_model(model, val_inputs, tmp_path):
    x = dict(val_inputs[0])
    h, w = x["image"].shape[-2:]
    # one proposal on the left half, stored at twice the resolution (resized to the input)
    mask = torch.zeros(1, 2 * h, 2 * w, dtype=torch.bool)
    mask[:, :, :w] = True
    save_precomputed_proposals(
        tmp_path / (x["file_name"].rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".npz"), mask
    )
    source = PrecomputedProposalSource(root=str(tmp_path))
    proposals = source([x], x["vocabulary"])
    assert proposals[0].masks.shape == (1, h, w)
    original, weight = model.proposal_source, model.ensemble_weight
    model.proposal_source, model.ensemble_weight = source, 1.0  # no class scores: CLIP only
    try:
        sem = model([x])[0]["sem_seg"]
    finally:
        model.proposal_source, model.ensemble_weight = original, weight
    out_w = sem.shape[-1]  # the output is at the original image size (the input may be resized)
    assert (sem[:, :, out_w // 2 + 2 :] == 0).all()  # nothing outside the proposal
    assert (sem[:, :, : out_w // 2 - 2].sum(0) > 0.99).all()  # CLIP probabilities sum to 1 inside
    with pytest.raises(FileNotFoundError, match="no precomputed proposals"):
        source([{"image": x["image"], "file_name": "/nowhere/missing.png"}], ["a", "b"])


def test_lambda_zero_reproduces_the_proposal_generator(model, val_inputs):
    # λ = 0: semantic and panoptic outputs are exactly ProposalMaskFormer's own inference rules
    x = {"image": val_inputs[0]["image"], "vocabulary": val_inputs[0]["vocabulary"]}
    generator = model.proposal_source.model
    raw = generator.predict_proposals([dict(x)])[0]
    weight, model.ensemble_weight = model.ensemble_weight, 0.0
    try:
        out = model([x])[0]
    finally:
        model.ensemble_weight = weight
    expected = generator.semantic_inference(raw["class_logits"], raw["masks"])
    assert torch.allclose(out["sem_seg"], expected, atol=1e-5)
    saved = (generator.thing_ids, generator.object_mask_threshold, generator.overlap_threshold)
    generator.thing_ids = set(model.thing_ids_for(x, x["vocabulary"]))
    generator.object_mask_threshold = model.object_mask_threshold
    generator.overlap_threshold = model.overlap_threshold
    try:
        pan, segments = generator.panoptic_inference(raw["class_logits"], raw["masks"])
    finally:
        generator.thing_ids, generator.object_mask_threshold, generator.overlap_threshold = saved
    assert segments and torch.equal(out["panoptic_seg"][0], pan)
    assert out["panoptic_seg"][1] == segments


def test_seen_ensemble_weight(model, val_inputs):
    """λ_s reaches the fusion (the seen names' scores change, the unseen ones do not), λ = 0 with
    λ_s > 0 still runs the CLIP branch, and bad settings fail at build time."""
    options = model.default_options.replace(ensemble_weight=0.7)
    seen = model.seen_mask(model.vocabulary(val_inputs[0]))
    assert seen.any() and not seen.all()  # the toy vocabulary has both
    uniform = model.inference(val_inputs[:1], options)[0]["sem_seg"]
    own = model.inference(val_inputs[:1], options.replace(seen_ensemble_weight=0.3))[0]["sem_seg"]
    assert torch.allclose(own[~seen], uniform[~seen], rtol=1e-5, atol=0) and not torch.allclose(
        own[seen], uniform[seen]
    )
    head_only = model.default_options.replace(ensemble_weight=0.0)
    assert not model.uses_clip(head_only)
    assert model.uses_clip(head_only.replace(seen_ensemble_weight=0.5))
    mixed = model.inference(val_inputs[:1], head_only.replace(seen_ensemble_weight=0.5))[0]
    plain = model.inference(val_inputs[:1], head_only)[0]
    assert torch.allclose(mixed["sem_seg"][~seen], plain["sem_seg"][~seen], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="SEEN_ENSEMBLE_WEIGHT must be in"):
        build_model(_cfg("MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT", "1.5"))
    with pytest.raises(ValueError, match="SEEN_ENSEMBLE_WEIGHT 0.3 < 1 needs class scores"):
        build_model(
            _cfg(
                "MODEL.MASK_FORMER.CLASS_HEAD.NAME",
                "class_agnostic",
                "MODEL.TWO_STAGE.ENSEMBLE_WEIGHT",
                "1.0",
                "MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT",
                "0.3",
            )
        )
    with pytest.raises(ValueError, match="trained on"):  # no dataset lists seen names
        build_model(
            _cfg(
                "MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT",
                "0.3",
                "DATASETS.TEST",
                "()",
                "DATASETS.TRAIN",
                "()",
            )
        )
