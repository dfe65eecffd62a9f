#!/usr/bin/env python
"""Open-vocabulary segmentation of your own images with the two-stage model (``TwoStageOVSeg``).

    python tools/demo.py --config-file configs/toyworld/two_stage_R18.yaml --input "photos/*.jpg" \\
        --vocabulary "red star,blue circle,grass,sky" --output /tmp/demo --labels \\
        MODEL.WEIGHTS merged.pth

Per image it writes ``<stem>_sem.png`` (semantic segmentation drawn by detectron2's ``Visualizer``),
``<stem>_pan.png`` (panoptic segmentation) and, with ``--labels``, ``<stem>_label.png`` (class index
per pixel: 8-bit up to 255 classes, else 16-bit); ``vocabulary.txt`` lists the class of each index.
Images whose outputs exist are skipped (``--overwrite`` redoes them).

``--vocabulary`` is a comma-separated list or a text file (one name per line, or comma-separated).
A single class name gets the background name ``MODEL.TWO_STAGE.BACKGROUND_NAME`` ("others")
appended, as in OVSeg: classification is a softmax over the vocabulary, so one name alone would win
every pixel. The demo's vocabulary has no thing / stuff split: every panoptic segment is an
instance. OVSeg's demo classifies with CLIP only (the proposal head overfits its training names):
pass ``MODEL.TWO_STAGE.ENSEMBLE_WEIGHT 1.0`` (and ``MODEL.CLIP.MASK_THR 0.35``) for that behaviour.
"""

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import List

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.utils.colormap import colormap
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image
from tqdm import tqdm

import ov_seg  # noqa: F401 (registration)
from ov_seg.checkpoint import SafeCheckpointer
from ov_seg.engine import Trainer
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.modeling.heads.ensemble import with_background_name
from ov_seg.utils.semseg import label_map
from ov_seg.utils.threads import set_num_threads

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="a TwoStageOVSeg config")
    p.add_argument(
        "--input", nargs="+", required=True, help="image files, directories or glob patterns"
    )
    p.add_argument("--vocabulary", required=True, help='"a,b,c" or a text file of class names')
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument(
        "--labels", action="store_true", help="also write label PNGs (class index per pixel)"
    )
    p.add_argument(
        "--scale", type=float, default=1.0, help="scale of the pictures (e.g. 6 for 64-px images)"
    )
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def parse_vocabulary(text: str) -> List[str]:
    """Class names from "a,b,c" or from a file (one name per line, or comma-separated).

    Raises:
        ValueError: no name.
    """
    if os.path.isfile(text):
        text = Path(text).read_text()
    names = [n.strip() for line in text.splitlines() for n in line.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError("--vocabulary gives no class name")
    return names


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files from paths, directories (their images) and glob patterns, sorted, without duplicates.

    Raises:
        FileNotFoundError: a pattern matches nothing.
    """
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [
                str(p)
                for p in sorted(Path(pattern).iterdir())
                if p.suffix.lower() in IMAGE_SUFFIXES
            ]
        else:
            found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} matches no image")
        files.extend(found)
    return list(dict.fromkeys(files))


def demo_metadata(vocabulary: List[str], dataset_name: str = "") -> Metadata:
    """Visualizer metadata for ``vocabulary``: colours of the dataset ``dataset_name`` for names it
    knows, detectron2's colour map for the others."""
    palette = (colormap(rgb=True, maximum=255)).astype(int).tolist()
    known = {}
    if dataset_name:
        meta = MetadataCatalog.get(dataset_name)
        known = dict(zip(meta.get("stuff_classes", []) or [], meta.get("stuff_colors", []) or []))
    colors = [list(known.get(n, palette[i % len(palette)])) for i, n in enumerate(vocabulary)]
    return Metadata(
        name="ov_seg_demo",
        stuff_classes=list(vocabulary),
        stuff_colors=colors,
        thing_classes=list(vocabulary),
        thing_colors=colors,
    )


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


class Demo:
    """Model + test-time resize + drawing for a list of images and one vocabulary."""

    def __init__(self, cfg, vocabulary: List[str]):
        self.cfg = cfg
        self.model = Trainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            SafeCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.model.eval()
        self.model.semantic_on = self.model.panoptic_on = True
        self.vocabulary = list(vocabulary)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    def predict(self, path: str):
        """(RGB image (H, W, 3) uint8, model output dict) of one image file."""
        image = utils.read_image(path, format=self.input_format)
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        x = {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": height,
            "width": width,
            "file_name": path,
            "vocabulary": self.vocabulary,
        }
        rgb = image[:, :, ::-1] if self.input_format == "BGR" else image
        return np.ascontiguousarray(rgb), self.model([x])[0]

    def run(
        self, files: List[str], out_dir: Path, labels: bool, scale: float, overwrite: bool
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        test_name = self.cfg.DATASETS.TEST[0] if self.cfg.DATASETS.TEST else ""
        final = with_background_name(self.vocabulary, self.model.background_name)
        tmp = out_dir / f".vocabulary.{os.getpid()}.tmp"
        tmp.write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(final)))
        os.replace(tmp, out_dir / "vocabulary.txt")
        for path in tqdm(files, desc="demo", file=sys.stdout):
            stem = Path(path).stem
            outputs = [out_dir / f"{stem}_sem.png", out_dir / f"{stem}_pan.png"]
            if labels:
                outputs.append(out_dir / f"{stem}_label.png")
            if not overwrite and all(p.is_file() for p in outputs):
                continue
            rgb, out = self.predict(path)
            vocabulary = out["vocabulary"]
            meta = demo_metadata(vocabulary, test_name)
            sem = label_map(out["sem_seg"]).cpu()
            vis = Visualizer(rgb, meta, scale=scale, instance_mode=ColorMode.IMAGE)
            _save_png(vis.draw_sem_seg(sem, alpha=0.5).get_image(), outputs[0])
            pan, segments = out["panoptic_seg"]
            vis = Visualizer(rgb, meta, scale=scale, instance_mode=ColorMode.IMAGE)
            _save_png(vis.draw_panoptic_seg(pan.cpu(), segments, alpha=0.5).get_image(), outputs[1])
            if labels:
                dtype = np.uint8 if len(vocabulary) <= 255 else np.uint16
                _save_png(sem.numpy().astype(dtype), outputs[2])


def setup(args):
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    set_num_threads(cfg.RUNTIME.NUM_THREADS)
    return cfg


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="ov_seg")
    cfg = setup(args)
    vocabulary = parse_vocabulary(args.vocabulary)
    files = expand_inputs(args.input)
    Demo(cfg, vocabulary).run(files, Path(args.output), args.labels, args.scale, args.overwrite)


if __name__ == "__main__":
    main()
