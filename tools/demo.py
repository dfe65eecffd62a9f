#!/usr/bin/env python
"""Open-vocabulary segmentation of your own images with the two-stage model (``TwoStageOVSeg``).

    python tools/demo.py --config-file configs/toyworld/two_stage_R18.yaml --input "photos/*.jpg" \\
        --vocabulary "red star,blue circle,grass,sky" --output /tmp/demo --labels \\
        MODEL.WEIGHTS merged.pth

Per image it writes ``<stem>_sem.png`` (semantic segmentation) and ``<stem>_pan.png`` (panoptic
segmentation), each the image with the segmentation blended over it, names on the regions and a
legend (colour -> name, share of the image's pixels; ``ov_seg.utils.visualize``), with
``--side-by-side`` beside the plain image; with ``--labels``, ``<stem>_label.png`` (class index per
pixel: 8-bit up to 255 classes, else 16-bit; 255 / 65535 = unlabelled, when no proposal survived).
A line per image on the console names what was found and the share of pixels of each name, or says
that nothing was. ``vocabulary.txt`` lists the class of each index and ``demo_run.json`` what
produced the folder (vocabulary, config, weights, drawing options). Images whose outputs exist are
skipped (``--overwrite`` redoes them). A folder written with another vocabulary, config or weights
is refused; ``--overwrite`` deletes its outputs first, so a folder never mixes two runs.

An unreadable image, or one whose outputs would not fit in the free memory (about 4 bytes per
pixel per class name and per proposal), is skipped with a warning naming it and counted at the end;
``--strict`` stops at the first. An image where no proposal survives is written unlabelled, with a
warning, instead of painted with class 0.

``--vocabulary`` is a comma-separated list or a text file (one name per line, or comma-separated);
names are normalised (``ov_seg.data.vocabulary``: lower case, one space; tabs and near-duplicates
are errors), and an argument that looks like a path but is no file is an error, not a class name.
A single class name gets the background name ``MODEL.TWO_STAGE.BACKGROUND_NAME`` ("others")
appended, as in OVSeg: classification is a softmax over the vocabulary, so one name alone would win
every pixel. The demo's vocabulary has no thing / stuff split: every panoptic segment is an
instance. OVSeg's demo classifies with CLIP only (the proposal head overfits its training names):
pass ``MODEL.TWO_STAGE.ENSEMBLE_WEIGHT 1.0`` (and ``MODEL.CLIP.MASK_THR 0.35``) for that behaviour.
"""

import argparse
import glob
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.utils.logger import setup_logger
from PIL import Image
from tqdm import tqdm

import ov_seg  # noqa: F401 (registration)
from ov_seg.data.image_io import UnreadableImageError, UnreadableImages, read_image
from ov_seg.data.vocabulary import parse_vocabulary
from ov_seg.engine.predictor import OVSegPredictor
from ov_seg.engine.setup import get_ov_seg_cfg
from ov_seg.modeling.postprocess import budget_bytes
from ov_seg.utils.threads import set_num_threads
from ov_seg.utils.visualize import draw_panoptic, draw_semantic, semantic_summary

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# the demo's own files in --output (deleted by --overwrite when the folder holds another run)
OUTPUT_SUFFIXES = ("_sem.png", "_pan.png", "_label.png")
RUN_RECORD = "demo_run.json"
# bytes per output pixel: float32 scores per class name and per proposal mask at the image's size,
# plus the image, label map and drawings (measured: 1.5 MP x 69 names peaks at 0.5 GB)
BYTES_PER_PIXEL_MAP = 4
BYTES_PER_PIXEL_FIXED = 32

logger = logging.getLogger("ov_seg.demo")


class DemoMemoryError(MemoryError):
    """An image whose outputs would not fit in memory (the message gives the numbers)."""


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
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="draw the plain image beside the segmentation",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo images whose outputs exist; replace a folder written by another run",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable or too large image instead of skipping it",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


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


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def available_memory_bytes() -> int:
    """Memory this process can still take: ``MemAvailable`` of /proc/meminfo, capped by the cgroup
    limit when there is one (0 when unknown)."""
    free = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used) if free else int(limit) - used
    except (OSError, ValueError):
        pass
    return free


def output_bytes(
    height: int, width: int, num_names: int, num_proposals: int, scale: float, budget: int = 0
) -> int:
    """Estimated peak memory of one image's outputs: (K + Q) float maps at the image size (at most
    ``budget`` bytes of them when > 0: ``TEST.MEMORY_BUDGET_MB``, the model streams larger ones),
    the image, label map and drawings."""
    pixels = height * width
    drawn = int(pixels * scale * scale) * BYTES_PER_PIXEL_FIXED
    maps = pixels * BYTES_PER_PIXEL_MAP * (num_names + num_proposals)
    if budget > 0:
        maps = min(maps, budget)
    return maps + pixels * BYTES_PER_PIXEL_FIXED + drawn


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _file_identity(path: str) -> Dict[str, object]:
    if not path or not os.path.isfile(path):
        return {"path": path}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_record(cfg, vocabulary: List[str], scale: float, side_by_side: bool = False) -> dict:
    """What decides the outputs of a demo folder: ``demo_run.json``."""
    weights = {
        "MODEL.WEIGHTS": cfg.MODEL.WEIGHTS,
        "MODEL.TWO_STAGE.PROPOSAL_WEIGHTS": cfg.MODEL.TWO_STAGE.PROPOSAL_WEIGHTS,
        "MODEL.CLIP.PRETRAINED": cfg.MODEL.CLIP.PRETRAINED,
    }
    return {
        "vocabulary": list(vocabulary),
        "scale": float(scale),
        "side_by_side": bool(side_by_side),
        "config_sha1": hashlib.sha1(cfg.dump().encode()).hexdigest(),
        "weights": {k: _file_identity(v) for k, v in weights.items()},
    }


class StaleOutputError(RuntimeError):
    """``--output`` holds the outputs of another run (vocabulary, config or weights)."""


def prepare_output(out_dir: Path, record: dict, overwrite: bool) -> None:
    """Make ``out_dir`` hold only outputs of ``record``'s run: a folder written by another run is
    refused, or with ``overwrite`` emptied of the demo's files; then write the record and
    ``vocabulary.txt`` (atomically).

    Raises:
        StaleOutputError: another run's outputs and no ``overwrite``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / RUN_RECORD
    old = json.loads(record_path.read_text()) if record_path.is_file() else None
    ours = [p for p in out_dir.iterdir() if p.name.endswith(OUTPUT_SUFFIXES)]
    if old != record and (old is not None or ours or (out_dir / "vocabulary.txt").exists()):
        if not overwrite:
            what = "an older demo" if old is None else "another run"
            if old is not None:
                changed = [k for k in record if old.get(k) != record[k]]
                what += f" (different {', '.join(changed)})"
            raise StaleOutputError(
                f"{out_dir} holds the outputs of {what}: {len(ours)} files. Use another --output, "
                "or --overwrite to delete them and write this run's"
            )
        for p in ours:
            p.unlink()
        logger.warning("--overwrite: deleted %d outputs of another run in %s", len(ours), out_dir)
    for name, text in (
        (RUN_RECORD, json.dumps(record, indent=1) + "\n"),
        ("vocabulary.txt", "".join(f"{i}\t{n}\n" for i, n in enumerate(record["vocabulary"]))),
    ):
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def _check_stems(files: List[str]) -> None:
    seen: Dict[str, str] = {}
    for f in files:
        stem = Path(f).stem
        if stem in seen:
            raise ValueError(
                f"--input {seen[stem]} and {f} would write the same outputs ({stem}_*.png): "
                "rename one or run them into separate --output folders"
            )
        seen[stem] = f


class Demo:
    """Predictor (``OVSegPredictor``) + drawing for a list of images and one vocabulary."""

    def __init__(self, cfg, vocabulary: List[str], side_by_side: bool = False):
        self.cfg = cfg
        self.predictor = OVSegPredictor(cfg)
        self.model = self.predictor.model
        self.vocabulary = list(vocabulary)
        self.final_vocabulary = self.predictor.final_vocabulary(self.vocabulary)
        self.side_by_side = side_by_side

    def check_memory(self, path: str, height: int, width: int, scale: float = 1.0) -> None:
        """Raise ``DemoMemoryError`` (with the numbers) when the image's outputs would not fit."""
        names = len(self.final_vocabulary)
        queries = self.cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
        budget = budget_bytes(self.cfg.TEST.MEMORY_BUDGET_MB)
        need = output_bytes(height, width, names, queries, scale, budget)
        free = available_memory_bytes()
        if free and need > free:
            raise DemoMemoryError(
                f"{path}: {width}x{height} ({height * width / 1e6:.1f} MP) with {names} class "
                f"names and up to {queries} proposals needs about {_gib(need)}, {_gib(free)} "
                "free: use fewer names or a smaller image"
            )

    def predict(self, path: str, scale: float = 1.0):
        """(RGB image (H, W, 3) uint8, model output dict) of one image file.

        Raises:
            UnreadableImageError: the file cannot be decoded. DemoMemoryError: its outputs would
            not fit in memory.
        """
        image = read_image(path, self.predictor.input_format)
        height, width = image.shape[:2]
        self.check_memory(path, height, width, scale)
        try:
            out = self.predictor(image, self.vocabulary, path)
        except (MemoryError, torch.OutOfMemoryError) as e:
            budget = budget_bytes(self.cfg.TEST.MEMORY_BUDGET_MB)
            need = output_bytes(height, width, len(self.final_vocabulary), 0, scale, budget)
            raise DemoMemoryError(
                f"{path}: out of memory at {width}x{height} with {len(self.final_vocabulary)} "
                f"class names (outputs alone about {_gib(need)}): use fewer names or a smaller "
                "image"
            ) from e
        return self.predictor.to_rgb(image), out

    def run(
        self,
        files: List[str],
        out_dir: Path,
        labels: bool,
        scale: float,
        overwrite: bool,
        strict: bool = False,
    ) -> dict:
        """Write the outputs of ``files`` into ``out_dir`` (see the module docstring).

        Returns:
            ``{"written", "existing", "skipped": [messages], "unlabelled": [files]}``.
        """
        _check_stems(files)
        record = run_record(self.cfg, self.final_vocabulary, scale, self.side_by_side)
        prepare_output(out_dir, record, overwrite)
        skipped = UnreadableImages(fatal=strict)
        summary: Dict[str, object] = {"written": 0, "existing": 0, "unlabelled": []}
        for path in tqdm(files, desc="demo", file=sys.stdout):
            stem = Path(path).stem
            outputs = [out_dir / f"{stem}_sem.png", out_dir / f"{stem}_pan.png"]
            if labels:
                outputs.append(out_dir / f"{stem}_label.png")
            if not overwrite and all(p.is_file() for p in outputs):
                summary["existing"] += 1
                continue
            try:
                rgb, out = self.predict(path, scale)
            except (UnreadableImageError, DemoMemoryError) as e:
                skipped.skip(e)
                continue
            sem, unlabelled = self.labels(path, out)
            if unlabelled:
                summary["unlabelled"].append(path)
            sem, vocabulary = sem.numpy(), out["vocabulary"]
            tqdm.write(semantic_summary(sem, vocabulary).line(path, self.notice()), file=sys.stdout)
            draw = {"scale": scale, "side_by_side": self.side_by_side}
            _save_png(draw_semantic(rgb, sem, vocabulary, notice=self.notice(), **draw), outputs[0])
            pan, segments = out["panoptic_seg"]
            pan_notice = self.predictor.notice(panoptic=True)
            pan = draw_panoptic(
                rgb, pan.cpu().numpy(), segments, vocabulary, notice=pan_notice, **draw
            )
            _save_png(pan, outputs[1])
            if labels:
                dtype = np.uint8 if len(out["vocabulary"]) <= 255 else np.uint16
                _save_png(sem.astype(dtype), outputs[2])
            summary["written"] += 1
        skipped.report(len(files))
        if summary["unlabelled"]:
            logger.warning(
                "%d of %d images had no surviving proposal (written unlabelled): %s",
                len(summary["unlabelled"]),
                len(files),
                ", ".join(summary["unlabelled"][:10]),
            )
        summary["skipped"] = skipped.skipped
        return summary

    def notice(self) -> str:
        """Why an image has no label (``OVSegPredictor.notice``)."""
        return self.predictor.notice()

    def labels(self, path: str, out: dict) -> Tuple[torch.Tensor, bool]:
        """(H, W) class per pixel, and whether the image is unlabelled: when no proposal survived
        (every score is 0), every pixel gets the unlabelled value (255 / 65535) and a warning,
        not class 0."""
        sem, unlabelled = OVSegPredictor.labels(out)
        if unlabelled:
            logger.warning(
                "%s: %s: nothing labelled (label value %d)", path, self.notice(), int(sem[0, 0])
            )
        return sem, unlabelled


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
    return Demo(cfg, vocabulary, args.side_by_side).run(
        files, Path(args.output), args.labels, args.scale, args.overwrite, args.strict
    )


if __name__ == "__main__":
    main()
