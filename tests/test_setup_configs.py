"""Every YAML under configs/ goes through train_net's setup() and builds its model.

Real-scale configs (ViT-B/16, ViT-L/14, R101c, Swin-B) are built on the meta device: every module
and parameter with its real shape, no memory and no initialisation; their parameter counts are
checked against the numbers recorded below, so a config that builds another architecture fails.
The toy-world configs build on the CPU as they run.
"""

from pathlib import Path

import pytest
import torch
from helpers import REPO, load_train_net

from ov_seg.engine import Trainer

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
BASES = [c for c in CONFIGS if Path(c).name.startswith("Base-")]
TOY = [c for c in CONFIGS if c not in BASES and c.startswith("configs/toyworld/")]
REAL = [c for c in CONFIGS if c not in BASES and c not in TOY]
# No weights, no download, no output directory of the config's.
NO_WEIGHTS = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.CLIP.PRETRAINED",
    "",
    "OUTPUT_DIR",
    "/tmp/ov_seg_test_setup",
]

# Parameters of each real-scale model (with its CLIP), as built on the meta device (equal to the
# CPU build: checked for one config of each method when recorded). A change here is a change of
# architecture: update the number with the reason in the commit.
REAL_PARAMS = {
    # CLIP alone: open_clip's ViT-B/16 (149.6 M) and ViT-L/14 (427.6 M); + mask prompts
    # (3 x 196 x 768, 3 x 256 x 1024)
    "configs/clip/mask_adapted_vitb16_ft.yaml": 149_620_737,
    "configs/clip/mask_adapted_vitb16_mpt.yaml": 150_072_321,
    "configs/clip/mask_adapted_vitl14_ft.yaml": 427_616_513,
    "configs/clip/mask_adapted_vitl14_mpt.yaml": 428_402_945,
    "configs/clip/pretrain_vitb16_coco_captions.yaml": 149_620_737,
    "configs/mgca/mgca_vitb16_cc3m.yaml": 154_342_404,
    "configs/mixreorg/groupvit_vit_b16_coco.yaml": 189_991_954,
    "configs/mixreorg/mixreorg_vit_b16_coco.yaml": 189_991_954,
    "configs/pacl/pacl_vitb16.yaml": 150_670_850,
    "configs/pacl/pacl_vitl14.yaml": 429_781_506,
    "configs/pacl/vanilla_patches_vitb16.yaml": 149_620_737,
    "configs/proposal/R101c.yaml": 61_173_440,
    "configs/proposal/R50.yaml": 42_004_416,
    "configs/proposal/swinB.yaml": 102_841_720,
    "configs/two_stage/R101c_vitB16_ade150.yaml": 210_794_177,
    "configs/two_stage/R101c_vitB16_ade150_fast.yaml": 210_794_177,
    "configs/two_stage/R101c_vitB16_ade847.yaml": 210_794_177,
    "configs/two_stage/R101c_vitB16_pc459.yaml": 210_794_177,
    "configs/two_stage/R101c_vitB16_pc59.yaml": 210_794_177,
    "configs/two_stage/R101c_vitB16_voc20.yaml": 210_794_177,
    "configs/two_stage/swinB_vitL14_ade150.yaml": 530_458_233,
    "configs/two_stage/swinB_vitL14_ade847.yaml": 530_458_233,
    "configs/two_stage/swinB_vitL14_pc459.yaml": 530_458_233,
    "configs/two_stage/swinB_vitL14_pc59.yaml": 530_458_233,
    "configs/two_stage/swinB_vitL14_voc20.yaml": 530_458_233,
}


def _cfg(path, device):
    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args(
        ["--config-file", str(REPO / path), *NO_WEIGHTS, "MODEL.DEVICE", device]
    )
    return load_train_net().setup_cfg(args, default_setup_enabled=False)


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_configs_exist():
    assert BASES and TOY and REAL
    assert set(REAL) == set(REAL_PARAMS), "record the parameter count of a new real-scale config"


def build_on_meta(cfg):
    """``Trainer.build_model`` with every tensor on the meta device (open_clip moves its model to
    the CPU by default: told to stay on meta)."""
    import open_clip

    create_model = open_clip.create_model

    def on_meta(*args, **kwargs):
        return create_model(*args, **{**kwargs, "device": "meta"})

    open_clip.create_model = on_meta
    try:
        with torch.device("meta"):
            return Trainer.build_model(cfg)
    finally:
        open_clip.create_model = create_model


@pytest.mark.parametrize("path", REAL)
def test_real_scale_config_builds_on_meta(path):
    model = build_on_meta(_cfg(path, "meta"))
    assert all(p.is_meta for p in model.parameters())
    assert _num_params(model) == REAL_PARAMS[path]


@pytest.mark.parametrize("path", TOY)
def test_toy_config_builds_model(path):
    model = Trainer.build_model(_cfg(path, "cpu"))
    assert _num_params(model) > 0
    assert all(p.device == torch.device("cpu") for p in model.parameters())
