"""tools/convert_ovseg_checkpoint.py on synthetic OVSeg checkpoints at a tiny width.

The synthetic state dicts follow ov-seg's module layout (open_vocab_seg: detectron2 ResNet or the
original Swin as backbone, ``sem_seg_head.pixel_decoder`` adapter_k / layer_k FPN,
``sem_seg_head.predictor`` DETR TransformerPredictor with an MLP ``class_embed``, ``clip_adapter``
with OpenAI's CLIP, its ``visual.mask_embedding`` and the ``non_object_embedding``) with random
tensors, at sizes different from the toy config's where the converter must read them from the
weights (queries, decoder layers, class-head width).
"""

import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone
from helpers import REPO, load_tool, setup_config

from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.data import build_dataset_mapper
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.modeling.clip import build_clip, clip_activation

CONFIG = "configs/toyworld/two_stage_R18.yaml"
TINY_CLIP = "ovseg-tiny-vit8-64"
QUERIES, HIDDEN, FFN, LAYERS, HEAD_HIDDEN, CONV, MASK_DIM, EMBED = 12, 64, 96, 2, 48, 64, 64, 64
SWIN = [
    "MODEL.BACKBONE.NAME", "build_swin_backbone", "MODEL.SWIN.PRETRAIN_IMG_SIZE", "64",
    "MODEL.SWIN.EMBED_DIM", "32", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
    "MODEL.SWIN.NUM_HEADS", "[2, 4, 8, 16]", "MODEL.SWIN.WINDOW_SIZE", "4",
    "MODEL.SWIN.OUT_FEATURES", '["res2", "res3", "res4", "res5"]',
    "MODEL.PIXEL_DECODER.IN_FEATURES", '["res2", "res3", "res4", "res5"]',
    "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res5",
]  # fmt: skip


def _rand(*shape):
    return 0.05 * torch.randn(shape)  # small: random deep nets stay finite


def _resnet_backbone():
    """ov-seg's R101c backbone is detectron2's ResNet with FrozenBN: the toy R18 in that form."""
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(str(REPO / CONFIG))
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    state = {
        f"backbone.{k}": torch.rand(v.shape) + 0.5 if k.endswith("running_var") else _rand(*v.shape)
        for k, v in backbone.state_dict().items()
    }
    return state, [64, 128, 256]  # res2, res3, res4 channels


def _swin_backbone(c=32, depths=(2, 2, 2, 2), heads=(2, 4, 8, 16), window=4):
    """The original Swin layout of ov-seg's D2SwinTransformer (PatchMerging at the end of a stage,
    one LayerNorm ``norm{i}`` per exposed stage, persistent relative_position_index)."""
    s = {"patch_embed.proj.weight": _rand(c, 3, 4, 4), "patch_embed.proj.bias": _rand(c)}
    s.update({"patch_embed.norm.weight": _rand(c), "patch_embed.norm.bias": _rand(c)})
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim = c * 2**i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            for name, shape in [
                ("norm1.weight", (dim,)), ("norm1.bias", (dim,)),
                ("attn.relative_position_bias_table", ((2 * window - 1) ** 2, h)),
                ("attn.qkv.weight", (3 * dim, dim)), ("attn.qkv.bias", (3 * dim,)),
                ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)),
                ("norm2.weight", (dim,)), ("norm2.bias", (dim,)),
                ("mlp.fc1.weight", (4 * dim, dim)), ("mlp.fc1.bias", (4 * dim,)),
                ("mlp.fc2.weight", (dim, 4 * dim)), ("mlp.fc2.bias", (dim,)),
            ]:  # fmt: skip
                s[b + name] = _rand(*shape)
            s[b + "attn.relative_position_index"] = torch.zeros(window**2, window**2).long()
        if i < len(depths) - 1:
            s[f"layers.{i}.downsample.reduction.weight"] = _rand(2 * dim, 4 * dim)
            s[f"layers.{i}.downsample.norm.weight"] = _rand(4 * dim)
            s[f"layers.{i}.downsample.norm.bias"] = _rand(4 * dim)
        s[f"norm{i}.weight"], s[f"norm{i}.bias"] = _rand(dim), _rand(dim)
    return {f"backbone.{k}": v for k, v in s.items()}, [c, 2 * c, 4 * c, 8 * c]


def _ovseg_state(backbone, channels, prompt_depth=3):
    """An OVSeg state dict (``OVSeg.state_dict()`` key names) around a backbone's keys."""
    s = dict(backbone)
    pd = "sem_seg_head.pixel_decoder."
    n = len(channels)
    for level, ch in enumerate(channels, start=1):  # 1 = finest
        if level < n:
            s[f"{pd}adapter_{level}.weight"] = _rand(CONV, ch, 1, 1)
            s[f"{pd}adapter_{level}.norm.weight"] = _rand(CONV)
            s[f"{pd}adapter_{level}.norm.bias"] = _rand(CONV)
        s[f"{pd}layer_{level}.weight"] = _rand(CONV, ch if level == n else CONV, 3, 3)
        s[f"{pd}layer_{level}.norm.weight"] = _rand(CONV)
        s[f"{pd}layer_{level}.norm.bias"] = _rand(CONV)
    s[f"{pd}mask_features.weight"] = _rand(MASK_DIM, CONV, 3, 3)
    s[f"{pd}mask_features.bias"] = _rand(MASK_DIM)
    pr = "sem_seg_head.predictor."
    s[f"{pr}query_embed.weight"] = _rand(QUERIES, HIDDEN)
    s[f"{pr}input_proj.weight"] = _rand(HIDDEN, channels[-1], 1, 1)
    s[f"{pr}input_proj.bias"] = _rand(HIDDEN)
    for i in range(LAYERS):
        layer = f"{pr}transformer.decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            s[f"{layer}{attn}.in_proj_weight"] = _rand(3 * HIDDEN, HIDDEN)
            s[f"{layer}{attn}.in_proj_bias"] = _rand(3 * HIDDEN)
            s[f"{layer}{attn}.out_proj.weight"] = _rand(HIDDEN, HIDDEN)
            s[f"{layer}{attn}.out_proj.bias"] = _rand(HIDDEN)
        s[f"{layer}linear1.weight"], s[f"{layer}linear1.bias"] = _rand(FFN, HIDDEN), _rand(FFN)
        s[f"{layer}linear2.weight"], s[f"{layer}linear2.bias"] = _rand(HIDDEN, FFN), _rand(HIDDEN)
        for k in (1, 2, 3):
            s[f"{layer}norm{k}.weight"], s[f"{layer}norm{k}.bias"] = _rand(HIDDEN), _rand(HIDDEN)
    s[f"{pr}transformer.decoder.norm.weight"] = _rand(HIDDEN)
    s[f"{pr}transformer.decoder.norm.bias"] = _rand(HIDDEN)
    for i, (a, b) in enumerate([(HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, MASK_DIM)]):
        s[f"{pr}mask_embed.layers.{i}.weight"], s[f"{pr}mask_embed.layers.{i}.bias"] = (
            _rand(b, a),
            _rand(b),
        )
    for i, (a, b) in enumerate([(HIDDEN, HEAD_HIDDEN), (HEAD_HIDDEN, EMBED)]):
        s[f"{pr}class_embed.layers.{i}.weight"], s[f"{pr}class_embed.layers.{i}.bias"] = (
            _rand(b, a),
            _rand(b),
        )
    # OpenAI's CLIP (same key names as open_clip's) with OVSeg's mask embedding
    clip = build_clip(TINY_CLIP, None).state_dict()
    s.update({f"clip_adapter.clip_model.{k}": _rand(*v.shape) for k, v in clip.items()})
    s["clip_adapter.clip_model.visual.mask_embedding"] = _rand(prompt_depth, 64, 64)
    s["clip_adapter.non_object_embedding"] = _rand(1, EMBED)
    s["clip_adapter.pixel_mean"] = _rand(1, 3, 1, 1)
    s["clip_adapter.pixel_std"] = _rand(1, 3, 1, 1)
    s["criterion.empty_weight"] = torch.ones(172)
    return s


@pytest.fixture
def tool():
    return load_tool("convert_ovseg_checkpoint")


@pytest.fixture
def resnet_source(tmp_path):
    torch.manual_seed(0)
    state = _ovseg_state(*_resnet_backbone())
    path = tmp_path / "ovseg_R18_tiny.pth"
    torch.save({"model": state, "iteration": 119999}, path)  # detectron2's layout
    return state, path


def test_convert_load_strictly_and_run(tool, resnet_source, toyworld_root, tmp_path):
    src, path = resnet_source
    out = tmp_path / "converted" / "ovseg_tiny.pth"
    args = ["--input", str(path), "--output", str(out), "--config-file", str(REPO / CONFIG)]
    weights, configs = tool.main([*args, "RUNTIME.NUM_THREADS", "1"])
    assert (
        weights == out
        and out.is_file()
        and configs == [out.parent / "ovseg_tiny_two_stage_R18.yaml"]
    )
    written = yaml.safe_load(configs[0].read_text())
    assert written["MODEL"]["CLIP"]["MASK_PROMPT_DEPTH"] == 3
    assert written["MODEL"]["CLIP"]["ACTIVATION"] == "quick_gelu"
    # OVSeg's masks are MaskFormer's (stride 4), whatever the base config's image skip
    assert setup_config(CONFIG).MODEL.PIXEL_DECODER.IMAGE_SKIP_STRIDE == 2
    assert written["MODEL"]["PIXEL_DECODER"]["IMAGE_SKIP_STRIDE"] == 0
    toy_lambda = setup_config(CONFIG).MODEL.TWO_STAGE.ENSEMBLE_WEIGHT
    assert written["MODEL"]["TWO_STAGE"]["ENSEMBLE_WEIGHT"] == toy_lambda  # the config's λ
    # the written config alone builds the model, which loads the converted weights strictly
    model = build_model(setup_config(configs[0]))
    SafeCheckpointer(model).load(str(out))
    pm = model.proposal_source.model
    prompts = model.crop_classifier.encoder.prompts
    assert torch.equal(prompts[1, 5], src["clip_adapter.clip_model.visual.mask_embedding"][1, 5])
    assert torch.equal(
        pm.transformer_decoder.query_embed.weight[3],
        src["sem_seg_head.predictor.query_embed.weight"][3],
    )
    assert pm.transformer_decoder.query_embed.weight.shape == (QUERIES, HIDDEN)
    dec = "sem_seg_head.predictor.transformer.decoder.layers.1."
    layer = pm.transformer_decoder.layers[1]
    assert torch.equal(layer.cross_attn.in_proj_weight, src[dec + "multihead_attn.in_proj_weight"])
    assert torch.equal(layer.norms[2].weight, src[dec + "norm3.weight"])
    assert torch.equal(layer.ffn.linear1.weight, src[dec + "linear1.weight"])
    # FPN levels: ov-seg's adapter_1 is the finest lateral, layer_3 the coarsest output conv
    pd = "sem_seg_head.pixel_decoder."
    assert torch.equal(pm.pixel_decoder.lateral_convs[2].weight, src[pd + "adapter_1.weight"])
    assert torch.equal(pm.pixel_decoder.output_convs[0].weight, src[pd + "layer_3.weight"])
    assert torch.equal(
        pm.class_head.text_classifier.void_embedding, src["clip_adapter.non_object_embedding"]
    )
    assert torch.equal(
        model.crop_classifier.clip.visual.proj, src["clip_adapter.clip_model.visual.proj"]
    )
    assert clip_activation(model.crop_classifier.clip) == "quick_gelu"
    # the converted model runs
    cfg = setup_config(CONFIG)
    mapper = build_dataset_mapper(cfg, is_train=False, dataset_name="toyworld_sem_seg_val")
    x = mapper(DatasetCatalog.get("toyworld_sem_seg_val")[0])
    with torch.no_grad():
        sem = model.eval()([x])[0]["sem_seg"]
    assert sem.shape[0] == len(x["vocabulary"]) and torch.isfinite(sem).all()


def test_every_key_accounted_for(tool, resnet_source):
    src, _ = resnet_source
    conv = tool.convert_state_dict(src)
    assert set(conv.mapped) | set(conv.dropped) == set(src)
    assert not set(conv.mapped) & set(conv.dropped)
    assert "training-loss" in conv.dropped["criterion.empty_weight"]
    assert "clip_adapter.pixel_mean" in conv.dropped
    assert conv.backbone == "resnet"
    assert conv.overrides["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"] == QUERIES
    assert conv.overrides["MODEL.MASK_FORMER.DEC_LAYERS"] == LAYERS
    assert conv.overrides["MODEL.MASK_FORMER.CLASS_HEAD.EMBED_HIDDEN_DIM"] == HEAD_HIDDEN
    assert conv.overrides["MODEL.RESNETS.RES5_MULTI_GRID"] == [1, 2, 4]
    without = tool.convert_state_dict(src, mask_prompts=False)
    assert "crop_classifier.encoder.prompts" not in without.state
    assert without.overrides["MODEL.CLIP.MASK_PROMPT_DEPTH"] == 0


def test_unknown_and_missing_keys_are_errors(tool, resnet_source, toyworld_root, tmp_path):
    src, _ = resnet_source
    with pytest.raises(tool.ConversionError, match=r"sem_seg_head\.predictor\.extra_head\.weight"):
        tool.convert_state_dict({**src, "sem_seg_head.predictor.extra_head.weight": _rand(2)})
    broken = dict(src)
    del broken["sem_seg_head.predictor.transformer.decoder.norm.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": broken}, path)
    out = tmp_path / "broken_converted.pth"
    args = ["--input", str(path), "--output", str(out), "--config-file", str(REPO / CONFIG)]
    with pytest.raises(tool.ConversionError, match=r"transformer_decoder\.norm\.weight"):
        tool.main([*args, "RUNTIME.NUM_THREADS", "1"])
    assert not out.exists() and not list(tmp_path.glob(".broken_converted*"))


def test_swin_layout_maps_onto_the_timm_swin(tool, toyworld_root, tmp_path):
    torch.manual_seed(0)
    src = _ovseg_state(*_swin_backbone())
    conv = tool.convert_state_dict(src)
    assert conv.backbone == "swin"
    assert "recomputed" in conv.dropped["backbone.layers.0.blocks.0.attn.relative_position_index"]
    # PatchMerging: end of stage i in the original layout, start of stage i + 1 in timm's
    ours = conv.mapped["backbone.layers.0.downsample.reduction.weight"]
    assert ours == "proposal_source.model.backbone.model.layers.1.downsample.reduction.weight"
    assert (
        conv.mapped["backbone.norm3.weight"] == "proposal_source.model.backbone.norms.res5.weight"
    )
    path = tmp_path / "swin.pth"
    torch.save({"model": conv.state}, path)
    overrides = {**conv.overrides, "MODEL.WEIGHTS": str(path), "MODEL.CLIP.PRETRAINED": ""}
    _, model = tool.build_model(str(REPO / CONFIG), overrides, [*SWIN, "RUNTIME.NUM_THREADS", "1"])
    tool.check_against_model(conv, model)
    model.load_state_dict(conv.state, strict=True)


def test_help_documents_input_and_output(tool):
    text = tool.get_parser().format_help()
    assert "--input" in text and "--output" in text and "weights_only" in text
    assert "29.6" in text  # the published ADE-150 number of the Swin-B model
