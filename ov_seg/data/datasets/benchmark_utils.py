"""Shared pieces of the benchmark registrations and of ``datasets/prepare_*.py``.

Registration side: :func:`load_sem_seg_dir` (dataset dicts from a converted ground-truth folder,
with an error naming the prepare command when it is missing) and :func:`register_sem_seg`.
Preparation side: label maps read and written with their bit depth checked, id look-up tables,
atomic writes, and a resumable progress-bar loop (:func:`run_conversion`).
"""

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

__all__ = [
    "LABEL_MODES",
    "load_sem_seg_dir",
    "register_sem_seg",
    "require_path",
    "read_split_file",
    "read_label_image",
    "label_bit_depth",
    "build_lut",
    "apply_lut",
    "save_image_atomic",
    "run_conversion",
    "split_metadata",
]

logger = logging.getLogger(__name__)

# PIL modes of single-channel label images -> bit depth
LABEL_MODES = {"L": 8, "P": 8, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}


def require_path(path: Path, what: str, hint: str) -> Path:
    """``path`` if it exists, else ``FileNotFoundError`` naming it and how to get it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}. {hint}")
    return path


def read_split_file(path: Path, hint: str) -> List[str]:
    """Image ids, one per line (blanks skipped), of an upstream split file such as ``val.txt``."""
    path = require_path(path, "split file", hint)
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no image")
    return ids


def label_bit_depth(path: Path) -> int:
    """Bit depth (8 or 16) of a single-channel label image; ``ValueError`` for any other kind."""
    with Image.open(path) as im:
        mode = im.mode
    if mode not in LABEL_MODES:
        raise ValueError(
            f"{path}: not a single-channel 8/16-bit label map (PIL mode {mode!r}; expected one of "
            f"{', '.join(LABEL_MODES)})"
        )
    return LABEL_MODES[mode]


def read_label_image(path: Path, bit_depth: Optional[int] = None, dtype=np.int64) -> np.ndarray:
    """Read a label map (H, W), checking it is single-channel and, if given, of ``bit_depth`` bits.

    Raises:
        ValueError: wrong number of channels or bit depth (e.g. an 8-bit file where a 16-bit
            one with ignore 65535 is expected: its labels above 255 would be lost).
    """
    with Image.open(path) as im:
        mode = im.mode
        if mode not in LABEL_MODES:
            raise ValueError(
                f"{path}: not a single-channel 8/16-bit label map (PIL mode {mode!r}; expected one "
                f"of {', '.join(LABEL_MODES)})"
            )
        if bit_depth is not None and LABEL_MODES[mode] != bit_depth:
            raise ValueError(
                f"{path}: {LABEL_MODES[mode]}-bit label map (PIL mode {mode!r}), expected "
                f"{bit_depth}-bit"
            )
        return np.asarray(im).astype(dtype)


def build_lut(mapping: Mapping[int, int], ignore_label: int, dtype=np.uint16) -> np.ndarray:
    """Look-up table ``lut[raw id] = contiguous id`` (``ignore_label`` for other ids)."""
    size = max(mapping) + 1 if mapping else 1
    lut = np.full(size, ignore_label, dtype=dtype)
    for raw, contiguous in mapping.items():
        lut[raw] = contiguous
    return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray, ignore_label: int) -> np.ndarray:
    """Map an integer label map through ``lut``; ids outside the table (or negative) → ignore."""
    raw = np.asarray(raw).astype(np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    out = np.full(raw.shape, ignore_label, dtype=lut.dtype)
    out[inside] = lut[raw[inside]]
    return out


def save_image_atomic(image: np.ndarray, path: Path, format: Optional[str] = None) -> None:
    """Write ``image`` with PIL to a temporary file beside ``path``, then rename it into place.

    ``uint8`` arrays are written 8-bit, ``uint16`` ones 16-bit (PNG, or deflate-compressed TIFF);
    the format is taken from ``path``'s extension unless given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = format or Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path}")
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    # lossless deflate: a 512 px 16-bit label map takes ~10 KB instead of ~700 KB
    options = {"compression": "tiff_adobe_deflate"} if fmt == "TIFF" else {}
    Image.fromarray(image).save(tmp, format=fmt, **options)
    os.replace(tmp, path)


def _run_one(job):
    fn, item = job
    return fn(item)


def run_conversion(
    convert: Callable[[Dict], None],
    jobs: Sequence[Dict],
    desc: str,
    workers: int = 1,
    force: bool = False,
) -> Dict[str, int]:
    """Run ``convert(job)`` for every job, with a progress bar; resumable.

    Each job is a dict with an ``"outputs"`` list of paths; a job whose outputs all exist is skipped
    unless ``force`` (outputs are written atomically, so an existing file is complete).

    Args:
        convert: a module-level function (picklable when ``workers > 1``).
        jobs: the work items.
        desc: progress-bar label.
        workers: processes (1 = in this process).
        force: redo jobs whose outputs exist.

    Returns:
        ``{"done": converted, "skipped": already present}``.
    """
    from tqdm import tqdm

    todo = [j for j in jobs if force or not all(Path(p).exists() for p in j["outputs"])]
    skipped = len(jobs) - len(todo)
    if skipped:
        logger.info(f"{desc}: {skipped} of {len(jobs)} already converted, skipping them")
    if workers <= 1:
        for job in tqdm(todo, desc=desc, unit="img"):
            convert(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_run_one, [(convert, j) for j in todo], chunksize=8)
            for _ in tqdm(results, total=len(todo), desc=desc, unit="img"):
                pass
    return {"done": len(todo), "skipped": skipped}


def load_sem_seg_dir(
    gt_dir: Path,
    image_dir: Path,
    gt_ext: str,
    image_ext: str,
    prepare_cmd: str,
) -> List[Dict]:
    """Dataset dicts (``file_name``, ``sem_seg_file_name``, ``image_id``) for every label map in
    ``gt_dir``, paired with the image of the same stem in ``image_dir``.

    Raises:
        FileNotFoundError: ``gt_dir`` is missing or empty (the message names ``prepare_cmd``),
            or an image is missing.
    """
    gt_dir, image_dir = Path(gt_dir), Path(image_dir)
    hint = f"Create it with: {prepare_cmd} (reads and writes under $DETECTRON2_DATASETS)"
    require_path(gt_dir, "converted ground-truth folder", hint)
    gt_files = sorted(gt_dir.glob(f"*.{gt_ext}"))
    if not gt_files:
        raise FileNotFoundError(f"no *.{gt_ext} ground truth in {gt_dir}. {hint}")
    require_path(image_dir, "image folder", "See datasets/README.md for the expected layout.")
    out = []
    for gt in gt_files:
        image = image_dir / f"{gt.stem}.{image_ext}"
        if not image.is_file():
            raise FileNotFoundError(f"image {image} for ground truth {gt} not found")
        out.append({"file_name": str(image), "sem_seg_file_name": str(gt), "image_id": gt.stem})
    return out


def register_sem_seg(
    name: str,
    image_dir: Path,
    gt_dir: Path,
    gt_ext: str,
    image_ext: str,
    prepare_cmd: str,
    metadata: Dict,
) -> None:
    """Register a semantic-segmentation dataset loaded by :func:`load_sem_seg_dir` (no file read).

    ``metadata`` must hold ``stuff_classes``, ``ignore_label`` and ``evaluator_type``;
    ``image_root``, ``sem_seg_root`` and ``prepare_cmd`` are added. A name registered before is
    replaced.
    """
    missing = {"stuff_classes", "ignore_label", "evaluator_type"} - set(metadata)
    if missing:
        raise KeyError(f"metadata for {name!r} lacks {sorted(missing)}")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name,
        lambda: load_sem_seg_dir(gt_dir, image_dir, gt_ext, image_ext, prepare_cmd),
    )
    MetadataCatalog.get(name).set(
        image_root=str(image_dir),
        sem_seg_root=str(gt_dir),
        prepare_cmd=prepare_cmd,
        **metadata,
    )


def split_metadata(class_names: Sequence[str], unseen: Iterable[str]) -> Dict:
    """Seen/unseen metadata (names and contiguous ids) for a protocol's unseen class names."""
    unseen = list(unseen)
    unknown = [u for u in unseen if u not in class_names]
    if unknown:
        raise KeyError(f"unseen classes not in the vocabulary: {unknown}")
    unseen_set = set(unseen)
    return {
        "seen_classes": [c for c in class_names if c not in unseen_set],
        "unseen_classes": [c for c in class_names if c in unseen_set],
        "seen_class_ids": [i for i, c in enumerate(class_names) if c not in unseen_set],
        "unseen_class_ids": [i for i, c in enumerate(class_names) if c in unseen_set],
    }
