"""OpenVocabSegmentor and InferenceOptions: options passed per call give the outputs of a model
configured with the same values, encode-once / score-many equals the forward, the shared
vocabulary rules and sliding windows."""

import dataclasses

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from helpers import setup_config

from ov_seg.data import build_dataset_mapper
from ov_seg.modeling.calibration import SeenCalibration
from ov_seg.modeling.meta_arch.base import (
    FastModes,
    InferenceOptions,
    OpenVocabSegmentor,
    SlidingWindow,
    StageTimer,
)

TINY = ["MODEL.DEVICE", "cpu", "MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]
SINGLE_STAGE = {
    "pacl": ("configs/toyworld/pacl_vanilla.yaml", []),
    "mgca": ("configs/toyworld/mgca.yaml", []),
    "mixreorg": ("configs/toyworld/mixreorg.yaml", ["MODEL.MIXREORG.NUM_GROUP_TOKENS", "[8, 4]"]),
}
TWO_STAGE = "configs/toyworld/two_stage_R18.yaml"
SEEN = ["red star", "grass", "sky"]
CALIBRATED = ["MODEL.SEEN_CALIBRATION.GAMMA", "0.7", "MODEL.SEEN_CALIBRATION.SEEN_NAMES", str(SEEN)]


def _pair(config, opts, changed):
    """Two models with the same random weights: one with the default config, one with
    ``changed`` keys."""
    torch.manual_seed(0)
    plain = build_model(setup_config(config, [*TINY, *opts])).eval()
    configured = build_model(setup_config(config, [*TINY, *opts, *changed])).eval()
    configured.load_state_dict(plain.state_dict())
    return plain, configured


@pytest.fixture(scope="module")
def val_inputs(toyworld_root):
    cfg = setup_config(TWO_STAGE, TINY)
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name="toyworld_sem_seg_val")
    return [mapper(d) for d in DatasetCatalog.get("toyworld_sem_seg_val")[:2]]


def test_options_are_validated_immutable_values():
    opts = InferenceOptions(vocabulary=["sky", "grass"])
    assert opts.vocabulary == ("sky", "grass")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seen_gamma = 1.0
    changed = opts.replace(seen_gamma=2.0)
    assert changed.seen_gamma == 2.0 and opts.seen_gamma == 0.0
    for bad in ({"ensemble_weight": 1.5}, {"seen_gamma": -1.0}, {"vocabulary": []}):
        with pytest.raises(ValueError):
            InferenceOptions(**bad)
    for bad in ({"min_objectness": -0.1}, {"duplicate_iou": 0.0}):
        with pytest.raises(ValueError):
            FastModes(**bad)
    with pytest.raises(TypeError):
        InferenceOptions(vocabulary="sky")


def test_sliding_windows_cover_the_image_and_average():
    slide = SlidingWindow(16, 12)
    assert slide.starts(40) == [0, 12, 24]
    assert slide.starts(16) == [0] and not slide.active(16, 16) and slide.active(16, 17)
    image = torch.randn(2, 40, 28)
    # each window returns itself: the average of identical overlaps is the image
    assert torch.allclose(slide.average(image, lambda crop: crop), image)
    # windows of ones through a stride-4 output: every cell covered, the mean is 1
    count = slide.average(image, lambda crop: torch.ones(1, *[s // 4 for s in crop.shape[-2:]]), 4)
    assert count.shape == (1, 10, 7) and torch.equal(count, torch.ones(1, 10, 7))
    with pytest.raises(ValueError, match="SLIDE_STRIDE"):
        SlidingWindow(16, 0)


@pytest.mark.parametrize("name", sorted(SINGLE_STAGE))
def test_single_stage_options_equal_the_config_path(name, toyworld_root):
    config, opts = SINGLE_STAGE[name]
    plain, calibrated = _pair(config, opts, CALIBRATED)
    assert isinstance(plain, OpenVocabSegmentor)
    assert calibrated.default_options.seen_gamma == 0.7
    vocab = ["red star", "blue circle", "grass", "sky", "background"]
    gen = torch.Generator().manual_seed(1)
    x = {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=gen)}
    with torch.inference_mode():
        default = plain([{**x, "vocabulary": vocab}])[0]["sem_seg"]
        # the options' vocabulary replaces the input's
        by_options = plain([x], options=InferenceOptions(vocabulary=vocab))[0]["sem_seg"]
        # γ per call = γ from the config (its seen names are the plain model's too)
        plain.seen_calibration = SeenCalibration(
            gamma=0.0, seen_names=calibrated.seen_calibration.seen_names
        )
        per_call = plain([x], options=InferenceOptions(vocabulary=vocab, seen_gamma=0.7))
        configured = calibrated([{**x, "vocabulary": vocab}])[0]["sem_seg"]
        # encode once, score many
        timer = StageTimer()
        encoded = plain.encode_inputs([{**x, "vocabulary": vocab}], timer)
        again = plain.predict(encoded, InferenceOptions(seen_gamma=0.7), timer)[0]["sem_seg"]
        uncalibrated = plain.predict(encoded, timer=timer)[0]["sem_seg"]
    assert default.shape == (len(vocab), 64, 64)
    assert torch.equal(by_options, default)
    assert torch.equal(per_call[0]["sem_seg"], configured)
    assert not torch.allclose(configured, default)  # γ changes the scores
    assert torch.equal(again, configured) and torch.equal(uncalibrated, default)
    assert len(timer.ms["encode"]) == 1 and len(timer.ms["score"]) == 2


def test_two_stage_options_equal_the_config_path(val_inputs):
    fast = [
        "MODEL.TWO_STAGE.FAST.MIN_OBJECTNESS",
        "0.2",
        "MODEL.TWO_STAGE.FAST.DUPLICATE_IOU",
        "0.9",
    ]
    changed = ["MODEL.TWO_STAGE.ENSEMBLE_WEIGHT", "0.4", "MODEL.CLIP.MASK_THR", "0.3", *CALIBRATED]
    plain, configured = _pair(TWO_STAGE, [], [*changed, *fast])
    options = configured.default_options
    assert (options.ensemble_weight, options.mask_thr, options.seen_gamma) == (0.4, 0.3, 0.7)
    assert options.fast == FastModes(min_objectness=0.2, duplicate_iou=0.9)
    assert plain.default_options != options
    plain.seen_calibration = SeenCalibration(
        gamma=0.0, seen_names=configured.seen_calibration.seen_names
    )
    reference = configured(val_inputs)
    per_call = plain(val_inputs, options=options)
    default = plain(val_inputs)
    for r, p, d in zip(reference, per_call, default):
        assert torch.equal(r["sem_seg"], p["sem_seg"])
        assert r["vocabulary"] == p["vocabulary"]
        assert not torch.allclose(r["sem_seg"], d["sem_seg"])
    # encode once (proposals, then CLIP at one MASK_THR), score many λ / γ
    with torch.inference_mode():
        proposals = plain.encode_proposals(val_inputs, options)
        encoded = plain.encode_clip_inputs(proposals, options)
        again = plain.predict(encoded, options)
        head_only = plain.predict(proposals, options.replace(ensemble_weight=0.0))
        with pytest.raises(ValueError, match="MASK_THR"):
            plain.predict(encoded, options.replace(mask_thr=0.5))
        with pytest.raises(ValueError, match="CLIP embeddings"):
            plain.predict(proposals, options)
        with pytest.raises(ValueError, match="vocabulary differs"):
            plain.predict(encoded, options.replace(vocabulary=("sky", "grass")))
    assert all(torch.equal(a["sem_seg"], r["sem_seg"]) for a, r in zip(again, reference))
    direct = plain(val_inputs, options=options.replace(ensemble_weight=0.0))
    assert all(torch.equal(a["sem_seg"], r["sem_seg"]) for a, r in zip(head_only, direct))


def test_vocabulary_sources_in_order(val_inputs):
    torch.manual_seed(0)
    model = build_model(setup_config(TWO_STAGE, TINY)).eval()
    x = dict(val_inputs[0])
    names = list(MetadataCatalog.get("toyworld_sem_seg_val").stuff_classes)
    assert model.vocabulary(x) == list(x["vocabulary"])
    assert model.vocabulary(x, InferenceOptions(vocabulary=["sky", "grass"])) == ["sky", "grass"]
    # a single name gets the background name (the two-stage rule)
    assert model.vocabulary(x, InferenceOptions(vocabulary=["sky"])) == ["sky", "others"]
    del x["vocabulary"]
    x["dataset_name"] = "toyworld_sem_seg_val"
    assert model.vocabulary(x) == names
    assert model.vocabulary({}) == model.default_vocabulary == names
    with pytest.raises(KeyError, match="unknown dataset"):
        model.vocabulary({"dataset_name": "no_such_dataset"})
    with pytest.raises(ValueError, match="empty vocabulary"):
        model.vocabulary({"vocabulary": []})


def test_methods_must_supply_their_hooks():
    from ov_seg.modeling.meta_arch.base import PerImageSegmentor

    class NoScore(PerImageSegmentor):
        def losses(self, batched_inputs):
            return {}

        def encode(self, image):
            return image

    with pytest.raises(TypeError, match="score"):
        NoScore()  # an abstract hook left out fails at construction, not at the first call
    with pytest.raises(TypeError, match="encode_inputs"):
        OpenVocabSegmentor()

    class Dense(NoScore):
        def score(self, encoded, vocabulary, options):
            return encoded[: len(vocabulary)]

    model = Dense(default_vocabulary=["a", "b"]).eval()
    image = torch.randint(0, 256, (3, 8, 6), dtype=torch.uint8)
    out = model([{"image": image, "height": 8, "width": 6}])
    assert out[0]["sem_seg"].shape == (2, 8, 6)
