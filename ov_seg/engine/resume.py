"""What a checkpoint needs so that kill -9 + ``--resume`` continues exactly like the
uninterrupted run (under a fixed ``SEED``): the RNG states and the train loader's position.

* RNG states (python ``random``, numpy, torch CPU and CUDA) are saved with every checkpoint
  (``Trainer.state_dict``) and restored right before the first resumed iteration.
* The loader's position: the resumed sampler skips the ``start_iter × batch`` indices the run
  already consumed (:class:`SkipSampler`); the sampler's own shuffle generator is seeded, so the
  order is the same.
* Evaluation during training does not touch the training RNG streams (:func:`preserved_rng`), so
  an evaluation between the checkpoint and the kill changes nothing.

Not restored (the README says so): the RNG of data-loader worker processes
(``DATALOADER.NUM_WORKERS > 0``: a resumed run draws new augmentation randomness) and of ranks
other than 0 in multi-process training; images held back by aspect-ratio grouping at the
checkpoint (non-square datasets) are skipped.
"""

import contextlib
import itertools
import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from detectron2.data.common import ToIterableDataset
from torch.utils.data import DataLoader, Sampler

__all__ = [
    "SkipSampler",
    "capture_rng_state",
    "restore_rng_state",
    "preserved_rng",
    "resume_train_loader",
]


class SkipSampler(Sampler):
    """``sampler`` without its first ``skip`` indices (of this rank's stream)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler = sampler
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


def capture_rng_state() -> Dict[str, Any]:
    """The global RNG states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set the global RNG states from ``capture_rng_state``'s output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run the block without changing the global RNG states seen after it."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def _loader_chain(loader) -> List[Any]:
    """The loader and the datasets / loaders it wraps (``dataset`` / ``_dataset`` attributes)."""
    chain, obj = [], loader
    while obj is not None and len(chain) < 16:
        chain.append(obj)
        inner = getattr(obj, "dataset", None)  # (no truth test: it would call len())
        obj = inner if inner is not None else getattr(obj, "_dataset", None)
    return chain


def resume_train_loader(loader, skip: int, seed: Optional[int]) -> bool:
    """Make a (not yet iterated) detectron2 train loader start ``skip`` indices into its sampler,
    and keep its iterator from drawing from the global torch RNG (its worker seeds come from a
    generator seeded with ``seed``).

    Returns:
        whether a sampler was found (False for an iterable dataset without one).
    """
    found = False
    for part in _loader_chain(loader):
        if isinstance(part, ToIterableDataset):
            part.sampler = SkipSampler(part.sampler, skip)
            found = True
        if isinstance(part, DataLoader):
            part.generator = torch.Generator().manual_seed(int(seed or 0) + int(skip))
    return found
