"""Shared fixtures: a tiny generated toy world (session-scoped), torch threads, ../shared paths."""

import os
from pathlib import Path

import pytest
import torch

# One torch thread: the test models are tiny (64 px), where a second thread buys little on an idle
# machine and costs 3-30x on cores shared with other jobs (OpenMP threads waiting for each other).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def toyworld_root(tmp_path_factory):
    """A small toy world (64 px; 48 train, 24 val, 64 web images) registered as ``toyworld``."""
    from ov_seg.data.datasets.register_toyworld import register_toyworld
    from ov_seg.data.toyworld import ToyWorldSpec, default_splits, generate_toyworld

    root = tmp_path_factory.mktemp("d2datasets") / "toyworld"
    spec = ToyWorldSpec(image_size=64, seed=0)
    spec.splits = default_splits(num_train=48, num_val=24, num_web=64)
    generate_toyworld(root, spec)
    register_toyworld("toyworld", root)
    os.environ["DETECTRON2_DATASETS"] = str(root.parent)
    return root


@pytest.fixture(scope="session")
def shared_dir():
    """``../shared`` beside the checkout; tests using it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED
