"""ImageGuidedMaskFeatures: finer mask features from the image (PIXEL_DECODER.IMAGE_SKIP_*)."""

import pytest
import torch
from helpers import setup_config
from test_proposal_model import _input
from torch.nn import functional as F

from ov_seg.engine import Trainer
from ov_seg.modeling.pixel_decoder import ImageGuidedMaskFeatures

CONFIG = "configs/toyworld/proposal_R18.yaml"
TINY = ["MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8"]


@pytest.mark.parametrize("stride", [1, 2])
def test_starts_as_the_upsampled_stride_4_features(stride):
    """The projection starts at zero: before training the output is the bilinear upsampling of the
    pixel decoder's embeddings, at stride ``stride`` of the input."""
    torch.manual_seed(0)
    skip = ImageGuidedMaskFeatures(mask_dim=8, channels=4, stride=stride, norm="")
    feats, images = torch.randn(2, 8, 6, 5), torch.randn(2, 3, 24, 20)
    out = skip(feats, images)
    size = (24 // stride, 20 // stride)
    assert out.shape == (2, 8, *size)
    expected = F.interpolate(feats, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected)


def test_image_branch_adds_image_edges():
    """With a non-zero projection the output depends on the image: two images that differ in
    one pixel give features that differ near that pixel only."""
    torch.manual_seed(0)
    skip = ImageGuidedMaskFeatures(mask_dim=4, channels=4, stride=1, norm="")
    torch.nn.init.normal_(skip.proj.weight)
    feats = torch.zeros(1, 4, 4, 4)
    a = torch.zeros(1, 3, 16, 16)
    b = a.clone()
    b[0, :, 9, 6] = 1.0
    diff = (skip(feats, a) - skip(feats, b)).abs().sum(1)[0]
    changed = diff.nonzero()
    assert len(changed) > 0
    assert changed[:, 0].min() >= 7 and changed[:, 0].max() <= 11  # two 3x3 convs: radius 2
    assert changed[:, 1].min() >= 4 and changed[:, 1].max() <= 8


def test_bad_stride():
    with pytest.raises(ValueError, match="IMAGE_SKIP_STRIDE"):
        ImageGuidedMaskFeatures(mask_dim=4, channels=4, stride=4)


@pytest.mark.parametrize("stride", [0, 2])
def test_proposal_model_mask_resolution_and_training(stride):
    """IMAGE_SKIP_STRIDE 0: masks at 1/4 of the padded input (MaskFormer); 2: at 1/2. Training
    reaches the image branch; inference gives masks at the input size either way."""
    torch.manual_seed(0)
    cfg = setup_config(CONFIG, [*TINY, "MODEL.PIXEL_DECODER.IMAGE_SKIP_STRIDE", str(stride)])
    model = Trainer.build_model(cfg)
    out = model.forward_outputs(torch.randn(1, 3, 64, 64), [])
    assert out["pred_masks"].shape[-2:] == ((16, 16) if stride == 0 else (32, 32))
    assert (model.image_skip is None) == (stride == 0)
    model.train()
    losses = model([_input(64, 64, 2), _input(64, 64, 1, seed=1)])
    sum(losses.values()).backward()
    if stride:
        assert model.image_skip.proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        res = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}])
    assert res[0]["proposals"]["masks"].shape[-2:] == (64, 64)
