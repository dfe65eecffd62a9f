"""Seen-class calibration (calibrated stacking) of the single-stage models and
tools/search_calibration.py."""

import shlex

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import REPO, load_tool, setup_config

from ov_seg.data import build_dataset_mapper
from ov_seg.data.datasets.benchmark_utils import read_label_image
from ov_seg.engine import Trainer
from ov_seg.evaluation.open_vocab_sem_seg import sem_seg_metrics
from ov_seg.modeling.calibration import SeenCalibration
from ov_seg.modeling.meta_arch.pacl import PACL

TINY = ["MODEL.DEVICE", "cpu", "MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]
CONFIGS = {
    "pacl": ("configs/toyworld/pacl_vanilla.yaml", []),
    "mgca": ("configs/toyworld/mgca.yaml", []),
    "mixreorg": ("configs/toyworld/mixreorg.yaml", ["MODEL.MIXREORG.NUM_GROUP_TOKENS", "[8, 4]"]),
}
SEEN = ["red star", "grass", "sky"]
VOCAB = ["red star", "blue circle", "grass", "sky", "green heart"]


def test_bias_and_apply():
    cal = SeenCalibration(gamma=0.5, seen_names=["a", "b"])
    assert torch.equal(cal.bias(["a", "c", "b"]), torch.tensor([-0.5, 0.0, -0.5]))
    logits = torch.randn(2, 3, 4)
    out = cal.apply(logits, ["a", "c", "b"], dim=1)
    assert torch.equal(out[:, 1], logits[:, 1])
    assert torch.allclose(out[:, [0, 2]], logits[:, [0, 2]] - 0.5)
    off = SeenCalibration(gamma=0.0, seen_names=["a"])
    assert off.apply(logits, ["a", "c", "b"], dim=1) is logits
    with pytest.raises(ValueError, match="classes at dim"):
        cal.apply(logits, ["a", "b"], dim=1)
    with pytest.raises(ValueError, match="needs seen names"):
        SeenCalibration(gamma=1.0, seen_names=())
    with pytest.raises(ValueError, match="not exempt"):  # every seen name exempt
        SeenCalibration(gamma=1.0, seen_names=["grass"], exempt_names=["grass"])
    with pytest.raises(ValueError, match=">= 0"):
        SeenCalibration(gamma=-1.0, seen_names=["a"])


def test_two_stage_calibration_keeps_each_proposals_mass():
    """Two-stage fusion: CLIP-only rows (mass 1) become softmax(logits − γ · seen); proposal-head
    rows keep their 1 − p(no object); the classes' ratios move by e^(−γ) for seen names only."""
    from ov_seg.modeling.fusion import (
        calibrate_query_probs,
        geometric_ensemble,
        proposal_class_probs,
    )

    vocab = ["a", "b", "c", "d"]
    bias = SeenCalibration(gamma=1.5, seen_names=["a", "c"]).bias(vocab)
    logits = torch.randn(6, 4)
    assert torch.allclose(
        calibrate_query_probs(logits.softmax(-1), bias), (logits + bias).softmax(-1), atol=1e-6
    )
    head = proposal_class_probs(torch.randn(6, 5))
    clip = logits.softmax(-1)
    fused, _ = geometric_ensemble(head, clip, torch.ones(6, dtype=torch.bool), 0.7)
    out = calibrate_query_probs(fused, bias)
    assert torch.allclose(out.sum(-1), fused.sum(-1), atol=1e-6)
    ratio = (out / fused) / (out / fused)[:, 1:2]
    assert torch.allclose(ratio, bias.exp().expand(6, 4), atol=1e-5)
    assert calibrate_query_probs(fused, None) is fused
    with pytest.raises(ValueError, match="class_bias"):
        calibrate_query_probs(fused, bias[:3])


def test_seen_names_from_the_datasets_metadata(toyworld_root):
    cfg = setup_config(CONFIGS["pacl"][0], [*TINY, "MODEL.SEEN_CALIBRATION.EXEMPT_STUFF", "False"])
    meta = MetadataCatalog.get("toyworld_sem_seg_val")
    assert SeenCalibration(cfg).seen_names == set(meta.seen_classes)
    assert not set(meta.unseen_classes) & SeenCalibration(cfg).seen_names
    # default: the stuff names (all seen, no unseen stuff) keep their logits
    cfg = setup_config(CONFIGS["pacl"][0], TINY)
    stuff = {"grass", "sky", "water", "sand", "wall"}
    assert set(meta.stuff_names) == stuff
    assert SeenCalibration(cfg).seen_names == set(meta.seen_classes) - stuff
    bias = SeenCalibration(cfg).bias(["grass", meta.seen_classes[-1]])
    assert bias[0] == 0 and bias[1] == 0  # γ 0
    cfg = setup_config(CONFIGS["pacl"][0], [*TINY, "MODEL.SEEN_CALIBRATION.GAMMA", "2.0"])
    assert SeenCalibration(cfg).bias(["grass", meta.seen_classes[-1]]).tolist() == [0.0, -2.0]
    cfg = setup_config(CONFIGS["pacl"][0], [*TINY, "MODEL.SEEN_CALIBRATION.SEEN_NAMES", '["x"]'])
    assert SeenCalibration(cfg).seen_names == {"x"}


def _predict(model, image):
    with torch.inference_mode():
        return model([{"image": image, "vocabulary": VOCAB, "height": 64, "width": 64}])[0][
            "sem_seg"
        ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_calibration_moves_scores_from_seen_to_unseen_names(name):
    config, opts = CONFIGS[name]
    torch.manual_seed(0)
    model = Trainer.build_model(setup_config(config, [*TINY, *opts])).eval()
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    plain = _predict(model, image)
    seen = torch.tensor([n in SEEN for n in VOCAB])
    model.seen_calibration = SeenCalibration(gamma=0.7, seen_names=SEEN)
    calibrated = _predict(model, image)
    assert calibrated.shape == plain.shape == (len(VOCAB), 64, 64)
    if name == "mgca":  # softmax at feature resolution, then bilinear upsampling
        with torch.inference_mode():
            features = model.dense_features(image.float() / 255.0)  # (D, h', w')
            model.seen_calibration.gamma = 0.0
            plain = model.class_scores(features, VOCAB)
            model.seen_calibration.gamma = 0.7
            calibrated = model.class_scores(features, VOCAB)
    if name != "mixreorg":
        # softmax outputs: calibrated ∝ plain · exp(−γ [seen]), exactly
        expected = plain * torch.exp(-0.7 * seen.float())[:, None, None]
        expected = expected / expected.sum(0, keepdim=True)
        assert torch.allclose(calibrated, expected, atol=1e-5)
    # a large γ: no pixel keeps a seen name
    model.seen_calibration = SeenCalibration(gamma=1000.0, seen_names=SEEN)
    labels = _predict(model, image).argmax(0)
    assert not seen[labels].any()


def test_search_tool_cross_validates_and_reuses_the_invariant_parts(toyworld_root, tmp_path):
    tool = load_tool("search_calibration")
    config = str(REPO / CONFIGS["pacl"][0])
    calls = {"n": 0}
    original = PACL.encode

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    # random weights, saved so that the tool and the direct evaluation below use the same ones
    torch.manual_seed(0)
    cfg = setup_config(CONFIGS["pacl"][0], TINY)
    model = Trainer.build_model(cfg).eval()
    weights = tmp_path / "random.pth"
    torch.save({"model": model.state_dict()}, weights)
    args = [
        "--output", str(tmp_path), "--gammas", "0,0.5,4", "--subset", "0:12", "--holdout", "12:24",
        "--method", f"vanilla={config}:{weights}:{shlex.join(TINY)}",
    ]  # fmt: skip
    PACL.encode = counting
    try:
        summary = tool.main(args)["vanilla"]
    finally:
        PACL.encode = original
    assert calls["n"] == 24  # once per image, not once per (image, γ)

    # γ = 0 pooled over both folds = the plain model scored directly on the 24 images
    meta = MetadataCatalog.get("toyworld_sem_seg_val")
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name="toyworld_sem_seg_val")
    n = len(meta.stuff_classes) + 1
    conf = np.zeros((n, n), np.int64)
    for d in DatasetCatalog.get("toyworld_sem_seg_val")[:24]:
        with torch.inference_mode():
            pred = model([mapper(d)])[0]["sem_seg"].argmax(0).numpy()
        gt = read_label_image(d["sem_seg_file_name"]).astype(np.int64)
        gt[gt == meta.ignore_label] = n - 1
        conf += np.bincount(n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n).reshape(n, n)
    plain = sem_seg_metrics(conf, meta.stuff_classes, meta.seen_class_ids, meta.unseen_class_ids)
    cv = summary["cross_validated"]
    assert cv["uncalibrated"]["picks"] == [{"gamma": 0.0}, {"gamma": 0.0}]
    for key in ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU"):
        assert np.isclose(cv["uncalibrated"][key], plain[key], equal_nan=True)
    assert all(p["gamma"] in (0.0, 0.5, 4.0) for p in cv["calibrated"]["picks"])
    assert (tmp_path / "vanilla" / "search.json").is_file()
    # a resumed finished search gives the same numbers without segmenting again
    again = tool.main([*args, "--resume"])["vanilla"]
    assert again["cross_validated"] == cv

    with pytest.raises(SystemExit, match="must contain 0"):
        tool.main([*args[:2], "--gammas", "0.5,1", *args[4:]])
