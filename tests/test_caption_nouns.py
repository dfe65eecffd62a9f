"""The caption mapper is the one path by which caption nouns reach PACL, MGCA and MixReorg
(``ov_seg.data.caption_nouns``): its ``nouns`` field equals what each model computed in-model
before (recorded below from commit bdb78e5: PACL's and MixReorg's ``caption_nouns`` table, MGCA's
``noun_extractor``), and the models read that field."""

import pytest
import torch
from detectron2.data import DatasetCatalog
from helpers import setup_config

from ov_seg.data import build_dataset_mapper
from ov_seg.data.caption_nouns import caption_noun_settings
from ov_seg.engine import Trainer

TINY = ["MODEL.DEVICE", "cpu", "MODEL.CLIP.PRETRAINED", "", "MODEL.WEIGHTS", ""]

# caption -> (nouns, nouns) computed inside the models at bdb78e5: the toy PACL config's
# ``caption_nouns`` (chunk mode, tagger chunker), equal to the toy MGCA config's ``noun_extractor``
# output (same settings); the toy MixReorg config with NOUN_PROMPTS.WEIGHT 0.5's ``caption_nouns``
# (noun mode, parser chunker)
BEFORE = {
    "a photo of a red hexagon": (["red hexagon"], ["hexagon"]),
    "a close-up photo of a yellow heart": (["yellow heart"], ["heart"]),
    "a photo of a red heart": (["red heart"], ["heart"]),
    "a black heart": (["black heart"], ["heart"]),
    "an orange cross and a purple triangle between the wall and the water": (
        ["orange cross", "purple triangle", "wall", "water"],
        ["orange cross", "triangle", "wall", "water"],
    ),
    "a purple triangle and an orange cross between the wall and the water": (
        ["purple triangle", "orange cross", "wall", "water"],
        ["triangle", "orange cross", "wall", "water"],
    ),
    "a photo of a purple triangle and an orange cross with wall and water": (
        ["purple triangle", "orange cross", "wall", "water"],
        ["triangle", "orange cross", "wall", "water"],
    ),
    "a photo of a black hexagon and a black circle on the grass": (
        ["black hexagon", "black circle", "grass"],
        ["hexagon", "circle", "grass"],
    ),
    "grass with a black circle and a black hexagon": (
        ["grass", "black circle", "black hexagon"],
        ["grass", "circle", "hexagon"],
    ),
    "a picture of a black circle and a black hexagon": (
        ["black circle", "black hexagon"],
        ["circle", "hexagon"],
    ),
    "there is a black hexagon and a black circle on the grass": (
        ["black hexagon", "black circle", "grass"],
        ["hexagon", "circle", "grass"],
    ),
    "a photo of a red star and a blue circle on the grass": (
        ["red star", "blue circle", "grass"],
        ["star", "circle", "grass"],
    ),
    "sky": (["sky"], ["sky"]),
    "water above sky with a purple hexagon": (
        ["water", "sky", "purple hexagon"],
        ["water", "sky", "hexagon"],
    ),
    "two red stars and the blue circles": (["red star", "blue circle"], ["star", "circle"]),
}
CAPTIONS = list(BEFORE)
PACL_BEFORE = MGCA_BEFORE = {c: chunks for c, (chunks, _) in BEFORE.items()}
MIXREORG_BEFORE = {c: nouns for c, (_, nouns) in BEFORE.items()}

METHODS = [
    ("configs/toyworld/pacl.yaml", [], PACL_BEFORE),
    ("configs/toyworld/pacl.yaml", ["MODEL.PACL.PROMPT_AUG.DATASET_CACHE", "False"], PACL_BEFORE),
    ("configs/toyworld/mgca.yaml", [], MGCA_BEFORE),
    (
        "configs/toyworld/mixreorg.yaml",
        ["MODEL.MIXREORG.NOUN_PROMPTS.WEIGHT", "0.5"],
        MIXREORG_BEFORE,
    ),
]


def _mapped(cfg, captions, is_train=True):
    d = dict(DatasetCatalog.get("toyworld_captions_web")[0])
    d["captions"] = list(captions)
    d.pop("hard_negatives", None)
    return build_dataset_mapper(cfg, is_train, "toyworld_captions_web")(d)


@pytest.mark.parametrize("config,opts,before", METHODS)
def test_mapper_nouns_equal_the_old_in_model_nouns(toyworld_root, config, opts, before):
    cfg = setup_config(config, [*TINY, *opts])
    x = _mapped(cfg, CAPTIONS)
    assert x["captions"] == CAPTIONS
    assert x["nouns"] == [before[c] for c in CAPTIONS]
    # the dataset's own captions too (parsed up front when the method caches the dataset)
    d = DatasetCatalog.get("toyworld_captions_web")[1]
    y = build_dataset_mapper(cfg, True, "toyworld_captions_web")(d)
    assert len(y["nouns"]) == len(d["captions"]) and all(isinstance(n, list) for n in y["nouns"])


@pytest.mark.parametrize(
    "config,opts",
    [
        ("configs/toyworld/clip_pretrain.yaml", []),
        ("configs/toyworld/pacl.yaml", ["MODEL.PACL.PROMPT_AUG.ENABLED", "False"]),
        ("configs/toyworld/pacl.yaml", ["MODEL.PACL.PROMPT_AUG.WEIGHT", "0.0"]),
        ("configs/toyworld/mixreorg.yaml", []),  # NOUN_PROMPTS.WEIGHT 0
    ],
)
def test_no_nouns_when_the_method_reads_none(toyworld_root, config, opts):
    cfg = setup_config(config, [*TINY, *opts])
    assert caption_noun_settings(cfg) is None
    assert "nouns" not in _mapped(cfg, ["a red star"])


def test_eval_mapper_adds_no_nouns(toyworld_root):
    cfg = setup_config("configs/toyworld/pacl.yaml", TINY)
    assert "nouns" not in _mapped(cfg, ["a red star"], is_train=False)


@pytest.mark.parametrize(
    "config,opts",
    [
        ("configs/toyworld/pacl.yaml", []),
        ("configs/toyworld/mgca.yaml", []),
        ("configs/toyworld/mixreorg.yaml", ["MODEL.MIXREORG.NOUN_PROMPTS.WEIGHT", "0.5"]),
    ],
)
def test_models_read_the_mapper_nouns(toyworld_root, config, opts):
    """No extractor in the models: a mapped batch trains; without ``nouns`` the model says so."""
    cfg = setup_config(config, [*TINY, *opts])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    assert not any("noun_extractor" in k or "noun_table" in k for k in vars(model))
    batch = [_mapped(cfg, CAPTIONS[i : i + 2]) for i in range(0, 8, 2)]
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    for x in batch:
        del x["nouns"]
    with pytest.raises(KeyError, match="nouns"):
        model(batch)
