"""Write the toy world to disk in upstream formats (COCO panoptic, COCO captions, semantic PNGs).

Layout under ``root`` (default ``$DETECTRON2_DATASETS/toyworld``)::

    categories.json                      [{id, name, isthing, seen, color}, ...]
    {split}/images/{id:06d}.png          RGB image
    {split}/sem_seg/{id:06d}.png         contiguous category id (= dataset id - 1), 255 = ignore
    {split}/panoptic/{id:06d}.png        COCO panoptic RGB encoding (id = R + 256 G + 256^2 B)
    panoptic_{split}.json                COCO panoptic annotations
    captions_{split}.json                COCO captions (``captions_train2017.json`` layout);
                                         annotations may carry ``hard_negative`` (a shape-swapped
                                         caption naming seen objects)
    {split}/DONE.json                    parameters + counts, written last: marks the split complete

Splits: ``train`` (scenes, seen categories only), ``val`` (scenes, seen + unseen) and ``web``
(caption training data mirroring web image-text pairs: scenes and object-centric images, seen only,
hard negatives).
"""

import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np
from tqdm import tqdm

from .categories import CATEGORIES
from .render import render_object_centric, render_object_crop, render_scene

logger = logging.getLogger(__name__)

SPLIT_IDS = {"train": 0, "val": 1, "web": 2}


@dataclass
class SplitSpec:
    """How one split is generated."""

    num_images: int
    allow_unseen: bool = False
    unseen_boost: float = 0.0  # probability that a sampled object is forced to an unseen category
    # fraction of object-centric images (one object, captioned "a photo of a red star")
    object_centric_fraction: float = 0.0
    # how they look: "crop" (a scene object's masked crop made by the evaluation's crop function,
    # render.render_object_crop) or "grey" (one large object drawn on plain grey)
    object_centric: str = "crop"
    # "crop": range of the box expansion ratio (1.0 = the tight box the classifiers see; measured
    # in notes/shape_clip.md: (1.0, 1.0) > (1.0, 1.3) > (1.0, 1.6))
    crop_expand_range: tuple = (1.0, 1.0)
    # "crop": a square box of side max(w, h) that keeps the object's aspect ratio instead of the
    # mask's box stretched to a square (``MODEL.CLIP.MASK_SQUARE_CROP``: must match the
    # classifier's)
    crop_square: bool = False
    # "crop": fraction of them shown in context instead (the box x a ratio drawn from
    # ``context_expand_range``, scene pixels kept, no grey): objects at other scales and on stuff,
    # as in most web photos (notes/single_stage_toy.md: what it buys the dense models)
    context_fraction: float = 0.0
    context_expand_range: tuple = (1.0, 2.5)
    hard_negatives: bool = False


def default_splits(num_train: int = 2000, num_val: int = 300, num_web: int = 20000):
    """The three splits of the default toy world with the given sizes."""
    return {
        "train": SplitSpec(num_train),
        "val": SplitSpec(num_val, allow_unseen=True, unseen_boost=0.35),
        "web": SplitSpec(num_web, object_centric_fraction=0.75, hard_negatives=True),
    }


@dataclass
class ToyWorldSpec:
    """Parameters of a toy world. Defaults: the embedded default dataset (64 px, see README)."""

    image_size: int = 64
    seed: int = 0
    radius_range: tuple = (0.12, 0.22)  # object radius as a fraction of the image size
    splits: Dict[str, SplitSpec] = field(default_factory=default_splits)


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))  # one-shot: C encoder (json.dump encodes in Python)
    os.replace(tmp, path)


def _encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def _one_thread() -> None:
    """Worker initialiser: one torch thread per worker process (object crops use torch; forked
    workers inheriting the parent's thread pool oversubscribe the cores ~7×)."""
    import torch

    torch.set_num_threads(1)


def _render_encoded(job) -> tuple:
    """Worker: render image ``index``, encode its three PNGs (image, semantic, panoptic) and write
    them as ``<dirs[k]>/<name>`` (in the worker: the parent process only collects metadata)."""
    spec, split, index, dirs, name = job
    out = render_image(spec, split, index)
    pan = out["pan"]
    pan_rgb = np.stack([pan % 256, (pan // 256) % 256, pan // 65536], -1).astype(np.uint8)
    pngs = (
        _encode_png(out["image"][:, :, ::-1]),
        _encode_png(out["sem"]),
        _encode_png(pan_rgb[:, :, ::-1]),
    )
    for folder, data in zip(dirs, pngs):
        (folder / name).write_bytes(data)
    return index, out["segments"], out["captions"], out["hard_negatives"]


def render_image(spec: ToyWorldSpec, split: str, index: int) -> dict:
    """Render image ``index`` of ``split``: a pure function of (seed, split, index)."""
    sspec = spec.splits[split]
    rng = np.random.default_rng([spec.seed, SPLIT_IDS[split], index])
    if rng.random() < sspec.object_centric_fraction:
        if sspec.object_centric == "crop":
            in_context = sspec.context_fraction > 0 and rng.random() < sspec.context_fraction
            return render_object_crop(
                rng,
                spec.image_size,
                radius_range=spec.radius_range,
                expand_range=sspec.context_expand_range if in_context else sspec.crop_expand_range,
                hard_negatives=sspec.hard_negatives,
                in_context=in_context,
                square=sspec.crop_square,
            )
        if sspec.object_centric != "grey":
            raise ValueError(
                f"object_centric must be 'crop' or 'grey', got {sspec.object_centric!r}"
            )
        return render_object_centric(rng, spec.image_size, hard_negatives=sspec.hard_negatives)
    return render_scene(
        rng,
        spec.image_size,
        allow_unseen=sspec.allow_unseen,
        unseen_boost=sspec.unseen_boost,
        radius_range=spec.radius_range,
        hard_negatives=sspec.hard_negatives,
    )


def _same_spec(stored: Optional[dict], want: dict, split: str) -> bool:
    """Whether a DONE record's spec equals ``want``; ``SplitSpec`` fields the record predates count
    as their defaults (a field added with a default that keeps the old images does not force a
    regeneration)."""
    if not stored:
        return False
    stored = json.loads(json.dumps(stored))
    defaults = json.loads(json.dumps(asdict(SplitSpec(num_images=0))))
    old_split = stored.get("splits", {}).get(split)
    if isinstance(old_split, dict):
        stored["splits"][split] = {**defaults, **old_split}
    return stored == json.loads(json.dumps(want))


def split_done(root: Path, split: str) -> Optional[dict]:
    """The DONE record of a split, or None if the split is missing or incomplete."""
    done = Path(root) / split / "DONE.json"
    if not done.is_file():
        return None
    with open(done) as f:
        return json.load(f)


def _categories_json() -> List[dict]:
    """The categories as written to ``categories.json`` and the panoptic files."""
    return [
        {
            "id": c.id,
            "name": c.name,
            "isthing": int(c.isthing),
            "seen": c.seen,
            "color": list(c.color),
        }
        for c in CATEGORIES
    ]


def generate_split(root: Path, spec: ToyWorldSpec, split: str, workers: int = 1) -> dict:
    """Generate one split under ``root`` with ``workers`` processes; returns its DONE record
    (images/s).

    Output does not depend on ``workers``: every image is a pure function of (seed, split, index).
    """
    root = Path(root)
    sspec = spec.splits[split]
    dirs = {k: root / split / k for k in ("images", "sem_seg", "panoptic")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    images, pan_anns, cap_anns = [], [], []
    start = time.perf_counter()
    folders = tuple(dirs[k] for k in ("images", "sem_seg", "panoptic"))
    jobs = ((spec, split, i, folders, f"{i:06d}.png") for i in range(sspec.num_images))
    pool = (
        multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread)
        if workers > 1
        else None
    )
    results = pool.imap(_render_encoded, jobs, chunksize=64) if pool else map(_render_encoded, jobs)
    try:
        for i, segments, captions, negs in tqdm(
            results, total=sspec.num_images, desc=f"toyworld {split}", unit="img", mininterval=2
        ):
            name = f"{i:06d}.png"
            s = spec.image_size
            images.append({"id": i, "file_name": name, "height": s, "width": s})
            pan_anns.append({"image_id": i, "file_name": name, "segments_info": segments})
            for k, cap in enumerate(captions):
                ann = {"id": len(cap_anns), "image_id": i, "caption": cap}
                if negs:
                    ann["hard_negative"] = negs[k % len(negs)]
                cap_anns.append(ann)
    finally:
        if pool:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - start
    cats = _categories_json()
    _atomic_write_json(
        root / f"panoptic_{split}.json",
        {"images": images, "annotations": pan_anns, "categories": cats},
    )
    _atomic_write_json(
        root / f"captions_{split}.json",
        {"info": {"description": f"toy world {split}"}, "images": images, "annotations": cap_anns},
    )
    record = {
        "split": split,
        "num_images": sspec.num_images,
        "num_captions": len(cap_anns),
        "spec": {**asdict(spec), "splits": {split: asdict(sspec)}},
        "seconds": round(elapsed, 3),
        "images_per_s": round(sspec.num_images / max(elapsed, 1e-9), 1),
    }
    _atomic_write_json(root / split / "DONE.json", record)
    return record


def generate_toyworld(
    root, spec: Optional[ToyWorldSpec] = None, splits=None, force: bool = False, workers: int = 1
):
    """Generate (or resume) a toy world; a split already complete with the same spec is skipped.

    Returns:
        dict split -> DONE record.
    """
    spec = spec or ToyWorldSpec()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cats = _categories_json()
    _atomic_write_json(root / "categories.json", cats)
    records = {}
    for split in splits or list(spec.splits):
        if split not in spec.splits:
            raise KeyError(f"unknown toy-world split {split!r}; known: {sorted(spec.splits)}")
        done = split_done(root, split)
        want = {**asdict(spec), "splits": {split: asdict(spec.splits[split])}}
        if done is not None and not force and _same_spec(done.get("spec"), want, split):
            logger.info("toy world %s: %s already complete, skipped", root, split)
            records[split] = done
            continue
        records[split] = generate_split(root, spec, split, workers=workers)
        logger.info(
            "toy world %s: %s, %d images at %.0f images/s",
            root,
            split,
            records[split]["num_images"],
            records[split]["images_per_s"],
        )
    return records
