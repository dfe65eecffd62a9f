"""timm Swin as a detectron2 Backbone: shapes / strides, odd sizes, freezing, checkpoints."""

import pytest
import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from helpers import setup_config

from ov_seg.modeling.backbone import D2SwinTransformer

TINY = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "window_size": 4}


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return D2SwinTransformer("swin_base_patch4_window12_384", 64, model_kwargs=TINY).eval()


def test_output_shape(swin):
    shapes = swin.output_shape()
    assert list(shapes) == ["res2", "res3", "res4", "res5"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    assert [s.channels for s in shapes.values()] == [16, 32, 64, 128]


@pytest.mark.parametrize("size", [(64, 64), (37, 53), (96, 160), (3, 2)])
def test_features_match_output_shape(swin, size):
    h, w = size
    with torch.no_grad():
        feats = swin(torch.randn(2, 3, h, w))
    for name, spec in swin.output_shape().items():
        s = spec.stride
        assert feats[name].shape == (2, spec.channels, -(-h // s), -(-w // s)), name
        assert torch.isfinite(feats[name]).all()


def test_subset_and_bad_features():
    m = D2SwinTransformer("swin_base_patch4_window12_384", 64, ["res3"], model_kwargs=TINY)
    assert list(m.output_shape()) == ["res3"]
    assert len(m.model.layers) == 2  # stages after res3 are pruned
    assert m(torch.randn(1, 3, 32, 32))["res3"].shape == (1, 32, 4, 4)
    with pytest.raises(ValueError, match="subset"):
        D2SwinTransformer("swin_base_patch4_window12_384", 64, ["p5"], model_kwargs=TINY)


def test_freeze():
    m = D2SwinTransformer("swin_base_patch4_window12_384", 64, model_kwargs=TINY).freeze(2)
    assert not any(p.requires_grad for p in m.model.patch_embed.parameters())
    assert not any(p.requires_grad for p in m.model.layers[0].parameters())
    assert all(p.requires_grad for p in m.model.layers[1].parameters())


def test_loads_timm_checkpoint(tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model("swin_base_patch4_window12_384", pretrained=False, img_size=64, **TINY)
    path = tmp_path / "swin.pth"
    torch.save(ref.state_dict(), path)
    m = D2SwinTransformer(
        "swin_base_patch4_window12_384", 64, model_kwargs=TINY, pretrained_file=str(path)
    )
    key = "layers.1.blocks.0.attn.qkv.weight"
    assert torch.equal(m.model.state_dict()[key], ref.state_dict()[key])
    with pytest.raises(FileNotFoundError):
        D2SwinTransformer(
            "swin_base_patch4_window12_384", 64, model_kwargs=TINY, pretrained_file="/nonexistent"
        )


def test_build_from_config():
    cfg = setup_config(
        "configs/toyworld/proposal_R18.yaml",
        [
            "MODEL.BACKBONE.NAME",
            "build_swin_backbone",
            "MODEL.SWIN.EMBED_DIM",
            "16",
            "MODEL.SWIN.DEPTHS",
            "[1, 1, 1, 1]",
            "MODEL.SWIN.NUM_HEADS",
            "[1, 2, 2, 4]",
            "MODEL.SWIN.WINDOW_SIZE",
            "4",
            "MODEL.SWIN.PRETRAIN_IMG_SIZE",
            "64",
        ],
    )
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, D2SwinTransformer)
    assert backbone.output_shape()["res5"].channels == 128
