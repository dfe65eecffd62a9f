"""kill -9 during training, then ``--resume``: the same final weights and metrics as the
uninterrupted run under the same SEED (issue 23, case 5)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from helpers import run_train_net as _run

# the killed run: tools/train_net.py with one more hook that SIGKILLs the process after iteration
# KILL_AFTER (past the checkpoint at iteration PERIOD - 1, before the next one)
KILLER = """
import os, signal, sys
sys.path.insert(0, {tools!r})
import train_net
from detectron2.engine import HookBase, default_argument_parser
from ov_seg.engine import Trainer

class Kill(HookBase):
    def after_step(self):
        if self.trainer.iter == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)

build_hooks = Trainer.build_hooks
Trainer.build_hooks = lambda self: build_hooks(self) + [Kill()]
train_net.main(default_argument_parser().parse_args(sys.argv[1:]))
"""

MAX_ITER, PERIOD, KILL_AFTER = 8, 4, 5


def _args(out, resume=False):
    return [
        "--config-file",
        str(REPO / "configs/toyworld/proposal_R18.yaml"),
        *(["--resume"] if resume else []),
        "OUTPUT_DIR",
        str(out),
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.MAX_ITER",
        str(MAX_ITER),
        "SOLVER.CHECKPOINT_PERIOD",
        str(PERIOD),
        "SOLVER.WARMUP_ITERS",
        "2",
        "RUNTIME.LOG_PERIOD",
        "1",
        "RUNTIME.NUM_THREADS",
        "1",
        "MODEL.MASK_FORMER.DROPOUT",  # torch RNG draws in every step, besides the data order and
        "0.1",  # the flips (numpy)
        "DATASETS.TEST",
        "('toyworld_panoptic_val_8',)",
    ]


def _last_logged_iteration(out):
    rows = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    return max(r["iteration"] for r in rows if "total_loss" in r)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_result(toyworld_root, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if "toyworld_panoptic_val_8" not in DatasetCatalog.list():  # a short evaluation
        DatasetCatalog.register(
            "toyworld_panoptic_val_8", lambda: DatasetCatalog.get("toyworld_panoptic_val")[:8]
        )
        meta = MetadataCatalog.get("toyworld_panoptic_val").as_dict()
        meta.pop("name")
        MetadataCatalog.get("toyworld_panoptic_val_8").set(**meta)
    ref = _run(_args(tmp_path / "ref"))

    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tools=str(REPO / "tools"), kill_after=KILL_AFTER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DETECTRON2_DATASETS": str(toyworld_root.parent)}
    proc = subprocess.run(
        [sys.executable, str(script), *_args(killed)], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert (killed / "last_checkpoint").read_text() == f"model_{PERIOD - 1:07d}.pth"
    assert _last_logged_iteration(killed) == KILL_AFTER
    assert not (killed / "model_final.pth").exists()

    resumed = _run(_args(killed, resume=True))
    assert resumed == ref  # final evaluation, every metric
    final = torch.load(killed / "model_final.pth", weights_only=True)["model"]
    expected = torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True)["model"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
