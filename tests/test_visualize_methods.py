"""tools/visualize_methods.py (the main job's prediction grid) with a tiny random model: its command
line, the columns (image, ground truth, each method's prediction and errors), the rows."""

import numpy as np
from helpers import load_tool
from PIL import Image

from ov_seg.utils.visualize import ERROR_COLOR, TILE_GAP


def test_grid_has_an_errors_column_per_method(toyworld_root, tmp_path):
    out = tmp_path / "grid.png"
    spec = "tiny=configs/toyworld/two_stage_R18.yaml::MODEL.CLIP.PRETRAINED ''"
    args = ["--num-images", "2", "--scale", "2", "--output", str(out), "--method", spec]
    load_tool("visualize_methods").main(args)
    grid = np.asarray(Image.open(out).convert("RGB"))
    tile = 64 * 2
    assert grid.shape[1] == 4 * tile + 3 * TILE_GAP  # image | truth | tiny | tiny: errors
    assert grid.shape[0] > 2 * tile  # header, two rows with their legends, the note
    errors = grid[:, 3 * (tile + TILE_GAP) :]
    assert (errors == np.asarray(ERROR_COLOR, np.uint8)).all(-1).sum() > 0  # a random model errs
    truth = grid[:, tile + TILE_GAP : 2 * tile + TILE_GAP]
    assert (truth == np.asarray(ERROR_COLOR, np.uint8)).all(-1).sum() == 0
