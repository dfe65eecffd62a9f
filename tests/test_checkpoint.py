"""Safe weights loading: no file runs code when it is loaded."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ov_seg.checkpoint import SafeCheckpointer, UnsafeCheckpointError, safe_torch_load

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
