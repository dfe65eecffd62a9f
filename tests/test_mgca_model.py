"""The MGCA meta-architecture end to end on CPU with a random-init tiny CLIP (no trained weights
needed)."""

import json

import pytest
import torch
from helpers import REPO, assert_sem_seg_consistent, run_train_net, setup_config

from ov_seg.engine import Trainer

CONFIG = "configs/toyworld/mgca.yaml"
TINY = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.CLIP.PRETRAINED", ""]


def _model(opts=()):
    torch.manual_seed(0)
    return Trainer.build_model(setup_config(CONFIG, [*TINY, *opts]))


def _train_inputs(n=4):
    captions = [
        ["a photo of a red star and a blue circle on the grass"],
        ["water above sky with a purple hexagon", "a purple hexagon between the water and the sky"],
        ["a photo of a yellow heart"],
        ["sky"],  # no chunk: the caption is its own entity
    ]
    # the caption mapper's ``nouns`` field: the noun chunks of each caption
    nouns = [
        [["red star", "blue circle", "grass"]],
        [["water", "sky", "purple hexagon"], ["purple hexagon", "water", "sky"]],
        [["yellow heart"]],
        [[]],
    ]
    return [
        {
            "image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
            "captions": captions[i % 4],
            "nouns": nouns[i % 4],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model():
    return _model()


def test_train_step_all_levels_backpropagate(model):
    model.train()
    losses = model(_train_inputs())
    assert set(losses) == {"loss_obj", "loss_reg", "loss_pix"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    model.zero_grad()
    total.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # decoder, grounding (w, β), logit scale, the last image-tower block, ln_post and the
    # projection train
    assert any(n.startswith("decoder.") for n in trainable)
    assert {"grounding_w", "grounding_b", "logit_scale"} <= set(trainable)
    blocks = model.encoder.visual.transformer.resblocks
    assert all(not p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert not any(
        p.requires_grad for p in model.clip.transformer.parameters()
    )  # text tower frozen
    missing = [
        n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, missing


def test_loss_weights_select_levels():
    model = _model(["MODEL.MGCA.LOSS_WEIGHTS", "(1.0, 0.0, 0.0)"])
    model.train()
    losses = model(_train_inputs(2))
    assert set(losses) == {"loss_obj"}
    model = _model(["MODEL.MGCA.LOSS_WEIGHTS", "(1.0, 1.0, 0.0)", "MODEL.MGCA.K_NEG", "0"])
    model.train()
    assert set(model(_train_inputs(2))) == {"loss_obj", "loss_reg"}


def test_single_image_batch_and_missing_captions(model):
    model.train()
    losses = model(_train_inputs(1))  # no other image: only intra-image negatives
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="captions"):
        model([{"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}])


@pytest.mark.parametrize("mode", ["pixel", "group", "adaptive"])
def test_inference_outputs_scores_at_input_resolution(mode):
    model = _model(["MODEL.MGCA.TEST.UNIT_MODE", mode])
    model.eval()
    vocab = ["grass", "sky", "red star", "background"]
    inputs = [
        {
            "image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
            "height": 64,
            "width": 64,
            "vocabulary": vocab,
        },
        # a size that is no multiple of the patch, reported at another original resolution
        {
            "image": torch.randint(0, 256, (3, 60, 70), dtype=torch.uint8),
            "height": 120,
            "width": 140,
            "vocabulary": vocab,
        },
    ]
    with torch.no_grad():
        out = model(inputs)
    assert out[0]["sem_seg"].shape == (4, 64, 64)
    assert out[1]["sem_seg"].shape == (4, 120, 140)
    probs = out[0]["sem_seg"]
    assert torch.isfinite(probs).all()
    # BG_THRESH 0: the background entry is a constant 0, the text classes sum to 1
    assert torch.all(probs[3] == 0)
    assert torch.allclose(probs[:3].sum(0), torch.ones(64, 64), atol=1e-4)


def test_sliding_window_matches_shapes():
    model = _model(["MODEL.MGCA.TEST.SLIDE_WINDOW", "32", "MODEL.MGCA.TEST.SLIDE_STRIDE", "16"])
    model.eval()
    with torch.no_grad():
        out = model(
            [
                {
                    "image": torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8),
                    "vocabulary": ["sky", "grass"],
                }
            ]
        )
    assert out[0]["sem_seg"].shape == (2, 48, 80)
    with pytest.raises(ValueError, match="SLIDE"):
        _model(["MODEL.MGCA.TEST.SLIDE_WINDOW", "30", "MODEL.MGCA.TEST.SLIDE_STRIDE", "16"])


def test_bad_unit_mode():
    with pytest.raises(KeyError, match="UNIT_MODE"):
        _model(["MODEL.MGCA.TEST.UNIT_MODE", "superpixel"])


def test_train_net_then_eval(toyworld_root, tmp_path):
    """A few iterations through tools/train_net.py on the caption split, then --eval-only
    seen/unseen mIoU."""
    out = tmp_path / "run"
    cfg_file = str(REPO / CONFIG)
    common = [*TINY, "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", "8", "RUNTIME.LOG_PERIOD", "2"]
    common += ["RUNTIME.NUM_THREADS", "1"]  # tiny model: a second thread only adds contention
    run_train_net(
        ["--config-file", cfg_file, *common, "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1"]
    )
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_pix" in m for m in metrics)
    results = run_train_net(
        [
            "--config-file",
            cfg_file,
            "--eval-only",
            *common,
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
        ]
    )
    res = results["sem_seg"]
    assert_sem_seg_consistent(res, "toyworld_sem_seg_val")
    assert "mIoU-unseen" in res and "mIoU-seen" in res
