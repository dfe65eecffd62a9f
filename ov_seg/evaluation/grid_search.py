"""Helpers shared by the test-time grid searches (``tools/search_ensemble.py``,
``tools/search_calibration.py``): grid / subset parsing, atomic progress files, and the 2-fold
cross-validation that picks a grid cell on one image set and scores it on the other."""

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from ov_seg.evaluation.open_vocab_sem_seg import sem_seg_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "TABLE_METRICS",
    "add_image_set_arguments",
    "cross_validate_cells",
    "load_state",
    "parse_grid",
    "parse_subset",
    "save_state",
    "search_key",
]

# metrics shown in the search tables (when the dataset defines them)
TABLE_METRICS = ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU")


def parse_grid(text: str) -> List[float]:
    """Grid values: "0.6,0.7" → [0.6, 0.7]; "0:1:0.25" (start:stop:step, stop included) → [0, .25,
    .5, .75, 1]."""
    if ":" in text:
        start, stop, step = (float(v) for v in text.split(":"))
        if step <= 0 or stop < start:
            raise argparse.ArgumentTypeError(f"bad range {text!r}: need start <= stop and step > 0")
        n = int(np.floor((stop - start) / step + 1e-9)) + 1
        return [round(start + i * step, 6) for i in range(n)]
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"empty grid {text!r}")
    return values


def parse_subset(text: str) -> slice:
    """Subset "a:b" → slice(a, b) over the dataset's dicts (either side may be empty)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--subset must be START:END, got {text!r}")
    return slice(*(int(p) if p.strip() else None for p in parts))


def add_image_set_arguments(p: argparse.ArgumentParser, metric: str, holdout_help: str) -> None:
    """The image-set and progress options shared by the searches: --dataset, --subset, --holdout,
    --metric (default ``metric``), --save-every, --resume."""
    p.add_argument(
        "--dataset", default="", help="registered semantic dataset (default: DATASETS.TEST[0])"
    )
    p.add_argument(
        "--subset", type=parse_subset, default=slice(None), help="START:END of the dataset's images"
    )
    p.add_argument("--holdout", type=parse_subset, default=None, help=holdout_help)
    p.add_argument(
        "--metric", default=metric, help="metric that picks (mIoU, hIoU, mIoU-unseen...)"
    )
    p.add_argument("--save-every", type=int, default=50, help="images between progress saves")
    p.add_argument(
        "--resume", action="store_true", help="continue from the saved progress of the same search"
    )


def load_state(path: Path, key: str, conf: np.ndarray, resume: bool) -> Tuple[int, np.ndarray]:
    """(images done, confusion matrices) of a saved search with the same ``key``; (0, ``conf``)
    when not resuming, when nothing was saved, or when the saved search is another one."""
    path = Path(path)
    if not (resume and path.is_file()):
        return 0, conf
    with np.load(path) as state:
        if str(state["key"]) == key and state["conf"].shape == conf.shape:
            logger.info("%s: resuming after %d images", path, int(state["done"]))
            return int(state["done"]), state["conf"].copy()
    logger.warning("%s: saved progress belongs to another search: starting over", path)
    return 0, conf


def search_key(cfg, grids: Sequence, args, dataset: str, num_images: int) -> str:
    """Hash that identifies a search (config, grids, dataset, ``args.subset`` / ``args.holdout``,
    number of images): a resume never mixes two searches."""
    text = json.dumps(
        [
            cfg.dump(),
            list(grids),
            dataset,
            [args.subset.start, args.subset.stop],
            [args.holdout.start, args.holdout.stop] if args.holdout else None,
            num_images,
        ]
    )
    return hashlib.sha1(text.encode()).hexdigest()


def save_state(
    path: Path, key: str, done: int, conf: np.ndarray, extra: Optional[Dict[str, np.ndarray]] = None
) -> None:
    """Write a search's progress (its key, images done, confusion matrices and any ``extra``
    arrays, read back by ``load_extra_state``) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrays = {f"extra_{k}": np.asarray(v) for k, v in (extra or {}).items()}
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, key=np.array(key), done=np.array(done), conf=conf, **arrays)
    os.replace(tmp, path)


def load_extra_state(path: Path, key: str, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """The ``extra`` arrays ``names`` of a saved search with the same ``key`` (empty when the file,
    the key or an array is missing): call after ``load_state`` resumed."""
    path = Path(path)
    if not path.is_file():
        return {}
    with np.load(path) as state:
        if str(state["key"]) != key or any(f"extra_{n}" not in state for n in names):
            return {}
        return {n: state[f"extra_{n}"].copy() for n in names}


def cross_validate_cells(
    conf: Callable[[int, Hashable], np.ndarray],
    cells: Sequence[Hashable],
    metric: str,
    class_names: Sequence[str],
    seen=None,
    unseen=None,
    keys: Sequence[str] = (),
) -> Tuple[List[Hashable], Dict[str, float]]:
    """2-fold cross-validation of one selection over two image sets: the cell best by ``metric``
    on set 0 is scored on set 1 and the other way round; the two held-out confusion matrices are
    summed, so every image is scored once by a cell that was not chosen on it.

    Args:
        conf: (set, cell) → (K+1, K+1) confusion matrix of that image set (0 or 1) at that cell.
        cells: the grid cells the selection may pick.
        keys: metrics returned (all of ``sem_seg_metrics`` when empty).

    Returns:
        ([cell picked on set 0, cell picked on set 1], metrics of the pooled held-out matrices).
    """
    if not cells:
        raise ValueError("cross-validation needs at least one cell")
    pooled, picks = None, []
    for part in (0, 1):
        scores = [sem_seg_metrics(conf(part, c), class_names, seen, unseen)[metric] for c in cells]
        cell = cells[int(np.nanargmax(np.where(np.isnan(scores), -np.inf, scores)))]
        picks.append(cell)
        held = conf(1 - part, cell)
        pooled = held.copy() if pooled is None else pooled + held
    metrics = sem_seg_metrics(pooled, class_names, seen, unseen)
    return picks, {k: metrics[k] for k in (keys or metrics) if k in metrics}
