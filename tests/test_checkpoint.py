"""Safe weights loading: no file runs code when it is loaded."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ov_seg.checkpoint import (
    IncompatibleCheckpointError,
    SafeCheckpointer,
    UnsafeCheckpointError,
    safe_torch_load,
)

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls ``exec``, which writes ``target``."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def _write_payload_pkl(path: Path, target: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model": {"weight": _Payload(target)}, "__author__": "attacker"}, f)


def test_payload_pkl_as_weights_runs_no_code(tmp_path):
    target = tmp_path / "pwned.txt"
    weights = tmp_path / "model.pkl"
    _write_payload_pkl(weights, target)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(weights))):
        SafeCheckpointer(nn.Linear(2, 2)).load(str(weights))
    assert not target.exists()


def test_payload_pkl_named_in_last_checkpoint_runs_no_code(tmp_path):
    """``--resume`` reads the file named in ``last_checkpoint``: it must not run code either."""
    target = tmp_path / "pwned.txt"
    _write_payload_pkl(tmp_path / "model_0000009.pkl", target)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pkl")
    ckpt = SafeCheckpointer(nn.Linear(2, 2), save_dir=str(tmp_path))
    with pytest.raises(UnsafeCheckpointError):
        ckpt.resume_or_load("", resume=True)
    assert not target.exists()


def test_payload_pth_runs_no_code(tmp_path):
    target = tmp_path / "pwned.txt"
    weights = tmp_path / "model.pth"
    with open(weights, "wb") as f:
        pickle.dump(_Payload(target), f)
    with pytest.raises(RuntimeError, match=re.escape(str(weights))):
        SafeCheckpointer(nn.Linear(2, 2)).load(str(weights))
    assert not target.exists()


def test_numpy_pkl_in_detectron2_zoo_format_loads(tmp_path):
    """Detectron2's model-zoo ``.pkl`` (numpy arrays in a dict) still loads, values intact."""
    model = nn.Linear(3, 2)
    arrays = {
        k: np.random.RandomState(0).randn(*v.shape).astype(np.float32)
        for k, v in model.state_dict().items()
    }
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f)
    SafeCheckpointer(model).load(str(path))
    assert torch.equal(model.weight.detach(), torch.from_numpy(arrays["weight"]))


def test_safetensors_loads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    path = tmp_path / "m.safetensors"
    safetensors.save_file(src.state_dict(), str(path))
    SafeCheckpointer(dst).load(str(path))
    assert torch.equal(src.weight, dst.weight)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        safe_torch_load(str(tmp_path / "nope.pth"))


def test_no_other_checkpointer_in_project():
    """Every weights file goes through ``SafeCheckpointer``: no direct DetectionCheckpointer use."""
    offenders = []
    for folder in ("ov_seg", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "checkpoint.py" and path.parent.name == "ov_seg":
                continue
            text = path.read_text()
            if "DetectionCheckpointer(" in text or re.search(r"pickle\.loads?\(", text):
                offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


# ---- strict loading (issue 23, cases 3, 14, 15) -------------------------------------------------
def _save(model: nn.Module, path: Path) -> None:
    torch.save({"model": model.state_dict()}, path)


def test_weights_of_another_architecture_are_an_error_naming_file_and_keys(tmp_path):
    """Case 3: another architecture used to load partly and leave the rest random, exit 0."""
    weights = tmp_path / "other.pth"
    _save(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), weights)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    before = model[0].weight.detach().clone()
    with pytest.raises(IncompatibleCheckpointError) as err:
        SafeCheckpointer(model).load(str(weights))
    msg = str(err.value)
    assert str(weights) in msg and "1.weight" in msg and "2.weight" in msg  # unexpected / missing
    assert "0.weight (4, 3) vs (5, 3)" in msg and "MODEL.WEIGHTS_PARTIAL" in msg
    assert torch.equal(model[0].weight, before)


def test_partial_flag_loads_the_matching_keys(tmp_path):
    weights = tmp_path / "backbone.pth"
    src = nn.Sequential(nn.Linear(3, 5))
    _save(src, weights)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    SafeCheckpointer(model, partial=True).resume_or_load(str(weights), resume=False)
    assert torch.equal(model[0].weight, src[0].weight)


def test_matching_weights_load_without_a_missing_key_warning(tmp_path, caplog):
    weights = tmp_path / "same.pth"
    src = nn.Linear(3, 2)
    _save(src, weights)
    model = nn.Linear(3, 2)
    SafeCheckpointer(model).load(str(weights))
    assert torch.equal(model.weight, src.weight)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pth"))):
        SafeCheckpointer(nn.Linear(2, 2)).load(str(tmp_path / "nope.pth"))


def test_garbage_pth_is_an_error_naming_the_file(tmp_path):
    """Case 14: random bytes used to raise IndexError without the file's name."""
    weights = tmp_path / "garbage.pth"
    weights.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(RuntimeError, match=re.escape(str(weights))):
        SafeCheckpointer(nn.Linear(2, 2)).load(str(weights))


def _trained_checkpoints(folder: Path):
    """model_0000001.pth, model_0000003.pth (last) with different weights, as a run writes them."""
    ckpt = SafeCheckpointer(nn.Linear(2, 2), save_dir=str(folder))
    states = []
    for it in (1, 3):
        with torch.no_grad():
            ckpt.model.weight.fill_(float(it))
        ckpt.save(f"model_{it:07d}", iteration=it)
        os.utime(folder / f"model_{it:07d}.pth", (it, it))
        states.append(ckpt.model.weight.detach().clone())
    return states


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    """Case 15: a corrupt last checkpoint used to stop --resume though an older one was fine."""
    states = _trained_checkpoints(tmp_path)
    (tmp_path / "model_0000003.pth").write_bytes(b"\x80\x02truncated")
    model = nn.Linear(2, 2)
    extra = SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and torch.equal(model.weight, states[0])
    assert any("model_0000003.pth" in r.getMessage() for r in caplog.records)
    (tmp_path / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        SafeCheckpointer(nn.Linear(2, 2), save_dir=str(tmp_path)).resume_or_load("", resume=True)


def test_resume_is_strict_even_with_the_partial_flag(tmp_path):
    _trained_checkpoints(tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match="model_0000003.pth"):
        SafeCheckpointer(nn.Linear(2, 3), save_dir=str(tmp_path), partial=True).resume_or_load(
            "", resume=True
        )


def test_save_is_atomic(tmp_path):
    _trained_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
    ]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"


def test_train_net_eval_only_refuses_weights_of_another_model(toyworld_root, tmp_path):
    """The whole path: --eval-only with a checkpoint of another architecture fails before
    evaluating, naming the file."""
    from helpers import run_train_net

    weights = tmp_path / "linear.pth"
    _save(nn.Linear(3, 2), weights)
    args = ["--config-file", str(ROOT / "configs/toyworld/semseg_R18.yaml"), "--eval-only"]
    args += ["MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(str(weights))):
        run_train_net(args)


def test_no_initialized_randomly_warning_when_a_clip_checkpoint_is_loaded(tmp_path, caplog):
    """Case 3: open_clip's "Model initialized randomly" printed on every correct run."""
    from ov_seg.modeling.clip.builder import build_clip, save_clip_checkpoint

    path = tmp_path / "clip.pth"
    save_clip_checkpoint(str(path), build_clip("ovseg-tiny-vit8-64", ""))
    assert any("initialized randomly" in r.getMessage() for r in caplog.records)  # really random
    caplog.clear()
    build_clip("ovseg-tiny-vit8-64", str(path))
    assert not any("initialized randomly" in r.getMessage() for r in caplog.records)
