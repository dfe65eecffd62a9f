"""Config key names shared across methods, and the renamed keys that still load for one release
(``ov_seg.config.DEPRECATED_KEYS``)."""

import pytest
import yaml
from helpers import REPO

from ov_seg.config import DEPRECATED_KEYS
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.modeling.clip import TEMPLATE_SETS


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _has(cfg, key):
    try:
        _get(cfg, key)
    except KeyError:
        return False
    return True


def test_renamed_keys_point_from_gone_keys_to_present_ones():
    cfg = get_ov_seg_cfg()
    assert DEPRECATED_KEYS
    for old, (new, _) in DEPRECATED_KEYS.items():
        assert not _has(cfg, old), old
        assert _has(cfg, new), new


def test_every_learnable_logit_scale_has_one_clamp_name():
    cfg = get_ov_seg_cfg()
    nodes = [n for n in ("PACL", "MGCA", "MIXREORG") if "LOGIT_SCALE_INIT" in cfg.MODEL[n]]
    assert nodes == ["PACL", "MGCA", "MIXREORG"]
    for name in nodes + ["CLIP_PRETRAIN"]:
        node = cfg.MODEL[name]
        assert node.LOGIT_SCALE_MAX == 100.0, name
        assert not [k for k in node if "LOGIT_SCALE" in k and k.startswith("MAX_")], name


def test_inference_keys_live_under_test():
    cfg = get_ov_seg_cfg()
    for name in ("PACL", "MGCA", "MIXREORG", "TWO_STAGE"):
        assert "TEST" in cfg.MODEL[name], name
    assert {"INFER_STRIDE", "BG_MODE"} <= set(cfg.MODEL.PACL.TEST)
    assert not {"INFER_STRIDE", "BG_MODE", "TEMPLATES"} & set(cfg.MODEL.PACL)


def test_clip7_set_is_pacl_model_default():
    from ov_seg.modeling.meta_arch.pacl import PACL_TEMPLATES

    assert TEMPLATE_SETS["clip7"] == PACL_TEMPLATES


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_old_keys_in_a_yaml_load_into_the_new_keys(tmp_path):
    old = {
        "_BASE_": str(REPO / "configs/toyworld/pacl.yaml"),
        "MODEL": {
            "MGCA": {"MAX_LOGIT_SCALE": 50.0},
            "MIXREORG": {"MAX_LOGIT_SCALE": 30.0},
            "PACL": {"INFER_STRIDE": 2, "BG_SCORE": 0.25, "TEMPLATES": ["a photo of a {}."]},
        },
    }
    cfg = get_ov_seg_cfg()
    with pytest.warns(FutureWarning, match="MODEL.MGCA.MAX_LOGIT_SCALE is deprecated") as record:
        cfg.merge_from_file(_write(tmp_path / "old.yaml", old))
    assert len(record) == 5
    assert cfg.MODEL.MGCA.LOGIT_SCALE_MAX == 50.0
    assert cfg.MODEL.MIXREORG.LOGIT_SCALE_MAX == 30.0
    assert cfg.MODEL.PACL.TEST.INFER_STRIDE == 2
    assert cfg.MODEL.PACL.TEST.BG_SCORE == 0.25
    assert cfg.MODEL.CLIP.TEMPLATES == "single"  # the base file's "toyworld" overridden
    assert cfg.MODEL.PACL.PATCH_SOFTMAX_TEMP == 0.1  # the base file still applies


def test_old_key_in_a_base_file_is_overridden_by_the_new_key_of_its_child(tmp_path):
    base = _write(tmp_path / "base.yaml", {"MODEL": {"PACL": {"INFER_STRIDE": 2}}})
    child = {"_BASE_": base, "MODEL": {"PACL": {"TEST": {"INFER_STRIDE": 8}}}}
    cfg = get_ov_seg_cfg()
    with pytest.warns(FutureWarning):
        cfg.merge_from_file(_write(tmp_path / "child.yaml", child))
    assert cfg.MODEL.PACL.TEST.INFER_STRIDE == 8


def test_old_keys_in_an_option_list():
    cfg = get_ov_seg_cfg()
    with pytest.warns(FutureWarning, match="use MODEL.CLIP.TEMPLATES"):
        vild = str(list(TEMPLATE_SETS["vild"]))
        cfg.merge_from_list(["MODEL.PACL.BG_MODE", "score", "MODEL.PACL.TEMPLATES", vild])
    assert cfg.MODEL.PACL.TEST.BG_MODE == "score"
    assert cfg.MODEL.CLIP.TEMPLATES == "vild"
    # and an unknown key is still an error
    with pytest.raises(AssertionError, match="Non-existent key"):
        cfg.merge_from_list(["MODEL.PACL.NO_SUCH_KEY", "1"])


def test_old_template_list_that_is_no_set_is_an_error():
    cfg = get_ov_seg_cfg()
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="TEMPLATE_SETS"):
        cfg.merge_from_list(["MODEL.PACL.TEMPLATES", "['a drawing of {}']"])


def test_clone_keeps_the_upgrading_node():
    cfg = get_ov_seg_cfg().clone()
    with pytest.warns(FutureWarning):
        cfg.merge_from_list(["MODEL.MGCA.MAX_LOGIT_SCALE", "20.0"])
    assert cfg.MODEL.MGCA.LOGIT_SCALE_MAX == 20.0
