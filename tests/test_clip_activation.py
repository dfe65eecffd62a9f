"""The CLIP builder picks QuickGELU for weights trained with it (OpenAI's), without downloading."""

import logging

import open_clip
import pytest
import torch
from helpers import REPO, setup_config
from open_clip import pretrained as open_clip_pretrained

from ov_seg.modeling.clip import (
    build_clip,
    build_clip_from_cfg,
    clip_activation,
    resolve_clip_config,
    save_clip_checkpoint,
)

TINY = "ovseg-tiny-vit8-64"
REAL_SCALE_CONFIGS = sorted(
    str(p.relative_to(REPO))
    for folder in ("configs/two_stage", "configs/clip", "configs/proposal", "configs/pacl")
    + ("configs/mgca", "configs/mixreorg")
    for p in (REPO / folder).glob("*.yaml")
    if not p.name.startswith("Base-")
)


@pytest.fixture
def fake_tags(monkeypatch, tmp_path):
    """Two pretrained tags of the tiny model, as open_clip records them: "openai" (trained with
    QuickGELU) and "laion_like" (GELU). Their "download" returns one local file of weights."""
    torch.manual_seed(0)
    weights = tmp_path / "tiny_weights.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    base = {"url": "https://example.invalid/tiny.pt", "hf_hub": "", "mean": None, "std": None}
    tags = {"openai": {**base, "quick_gelu": True}, "laion_like": dict(base)}
    monkeypatch.setitem(open_clip_pretrained._PRETRAINED, TINY, tags)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(weights))
    return torch.load(weights, weights_only=True)


def _encode(model, image):
    with torch.no_grad():
        return model.encode_image(image)


def test_openai_tag_builds_quick_gelu(fake_tags, recwarn):
    openai = build_clip(TINY, "openai")
    laion = build_clip(TINY, "laion_like")
    assert clip_activation(openai) == "quick_gelu" and clip_activation(laion) == "gelu"
    # the same weights were loaded both times: only the activation differs, and it matters
    for key, value in fake_tags.items():
        assert torch.equal(openai.state_dict()[key], value)
        assert torch.equal(laion.state_dict()[key], value)
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(_encode(openai, image), _encode(laion, image), atol=1e-4)
    # open_clip's own mismatch warning stays silent: the activation matches the tag
    assert not [w for w in recwarn if "QuickGELU mismatch" in str(w.message)]
    # the config key overrides the tag
    assert clip_activation(build_clip(TINY, "openai", activation="gelu")) == "gelu"
    assert clip_activation(build_clip(TINY, "laion_like", activation="quick_gelu")) == "quick_gelu"


def test_resolver_reads_tags_without_downloading(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("resolve_clip_config must not download")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    assert resolve_clip_config("ViT-B-16", "openai").quick_gelu
    assert resolve_clip_config("ViT-B-16", "openai").source == "pretrained tag"
    assert not resolve_clip_config("ViT-B-16", "laion2b_s34b_b88k").quick_gelu
    assert not resolve_clip_config("ViT-B-16", None).quick_gelu  # the model config's default
    assert resolve_clip_config("ViT-B-16-quickgelu", None).quick_gelu
    assert not resolve_clip_config("ViT-B-16-quickgelu", None, "gelu").quick_gelu
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        resolve_clip_config("ViT-B-16", "no_such_tag")
    with pytest.raises(ValueError, match="ACTIVATION"):
        resolve_clip_config("ViT-B-16", "openai", "relu")


def test_every_open_clip_tag_resolves_to_its_recorded_activation():
    for name, tag in open_clip.list_pretrained():
        if open_clip.get_model_config(name) is None:
            continue
        recorded = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu")
        if recorded is not None:
            assert resolve_clip_config(name, tag).quick_gelu == recorded, (name, tag)


def test_checkpoint_meta_carries_the_activation(tmp_path, caplog):
    model = build_clip(TINY, None, activation="quick_gelu")
    path = tmp_path / "clip.pth"
    save_clip_checkpoint(str(path), model)
    assert torch.load(path, weights_only=True)["meta"]["activation"] == "quick_gelu"
    loaded = build_clip(TINY, str(path))
    assert clip_activation(loaded) == "quick_gelu"
    assert resolve_clip_config(TINY, str(path)).source == "checkpoint meta"
    image = torch.randn(1, 3, 64, 64)
    assert torch.allclose(_encode(loaded, image), _encode(model, image), atol=1e-6)
    # a raw state dict records nothing: the model config's default, with a warning
    raw = tmp_path / "raw.pth"
    torch.save(model.state_dict(), raw)
    with caplog.at_level(logging.WARNING, logger="ov_seg.modeling.clip.builder"):
        assert clip_activation(build_clip(TINY, str(raw))) == "gelu"
    assert "records no activation" in caplog.text
    assert clip_activation(build_clip(TINY, str(raw), activation="quick_gelu")) == "quick_gelu"


@pytest.mark.parametrize("config", REAL_SCALE_CONFIGS)
def test_real_scale_configs_build_quick_gelu_for_openai(config, monkeypatch):
    """Every real-scale config (two-stage, CLIP, proposals, single-stage) with MODEL.CLIP.PRETRAINED
    openai builds a QuickGELU ViT-B/16 or ViT-L/14; built on the meta device, nothing downloaded."""
    cfg = setup_config(config, ["MODEL.CLIP.PRETRAINED", "openai"])
    name = cfg.MODEL.CLIP.MODEL_NAME
    assert name in ("ViT-B-16", "ViT-L-14")
    resolved = resolve_clip_config(name, "openai", cfg.MODEL.CLIP.ACTIVATION)
    assert resolved.quick_gelu and resolved.model_name == name
    calls = []
    create_model = open_clip.create_model

    def on_meta_device(model_name, pretrained=None, device="cpu", **kwargs):
        calls.append((model_name, pretrained, kwargs))
        with torch.device("meta"):
            return create_model(model_name, pretrained=None, device="meta", **kwargs)

    monkeypatch.setattr(open_clip, "create_model", on_meta_device)
    model = build_clip_from_cfg(cfg)
    assert calls == [(name, "openai", {"force_quick_gelu": True})]
    assert clip_activation(model) == "quick_gelu"
