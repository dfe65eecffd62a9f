"""Test helpers: repository paths, the train_net module, config setup with tiny overrides."""

import importlib.util
from pathlib import Path

from detectron2.engine import default_argument_parser
from pytest import approx

REPO = Path(__file__).resolve().parents[1]
# Tests run the tiny models on one torch thread (conftest.py): a config's RUNTIME.NUM_THREADS 0
# (= every free core) would raise it again, and a second thread on the shared cores made a 64-px
# forward 3-30x slower. Explicit options still override it.
ONE_THREAD = ["RUNTIME.NUM_THREADS", "1"]


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_train_net():
    """Import tools/train_net.py as a module."""
    return load_tool("train_net")


def setup_config(path, opts=()):
    """Frozen config from ``configs/...`` + opts, as train_net's setup builds it (without
    logging)."""
    from ov_seg.engine.setup import setup_cfg

    args = default_argument_parser().parse_args(
        ["--config-file", str(REPO / path), *ONE_THREAD, *opts]
    )
    return setup_cfg(args, default_setup_enabled=False)


def run_train_net(args):
    """Run ``tools/train_net.py main`` in-process with command-line ``args``; returns its result."""
    args = default_argument_parser().parse_args(list(args))
    args.opts = [*ONE_THREAD, *args.opts]
    return load_train_net().main(args)


def tiny_demo_method(config: str, fast_opts=(), opts=()):
    """A ``DemoMethod`` of ``configs/...`` (+ ``opts``) with random weights (no CLIP checkpoint, no
    download)."""
    from ov_seg.engine.demo_service import DemoMethod
    from ov_seg.engine.methods import build_method
    from ov_seg.engine.setup import get_ov_seg_cfg

    tiny = ["MODEL.CLIP.PRETRAINED", "", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts]
    cfg, model = build_method(get_ov_seg_cfg(), str(REPO / config), "", tiny)
    return DemoMethod(cfg, model, fast_opts)


def assert_sem_seg_consistent(res: dict, dataset: str) -> None:
    """The evaluator's summary numbers follow from its own per-class IoUs: mIoU (all / seen /
    unseen) is the mean of the reported ``IoU-<name>`` of the classes present in ``dataset``'s
    split, and hIoU their harmonic mean."""
    import math

    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset)
    iou = [res[f"IoU-{n}"] for n in meta.stuff_classes]

    def mean(ids):
        vals = [iou[i] for i in ids if not math.isnan(iou[i])]
        return sum(vals) / len(vals)

    assert res["mIoU"] == approx(mean(range(len(iou))), abs=1e-6)
    seen, unseen = mean(meta.seen_class_ids), mean(meta.unseen_class_ids)
    assert res["mIoU-seen"] == approx(seen, abs=1e-6)
    assert res["mIoU-unseen"] == approx(unseen, abs=1e-6)
    h = 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)
    assert res["hIoU"] == approx(h, abs=1e-6)
