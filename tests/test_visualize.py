"""ov_seg.utils.visualize: legends with shares, names on regions, nothing-found notices, error
tiles of the comparison grid."""

import numpy as np
import pytest

from ov_seg.utils.visualize import (
    ERROR_COLOR,
    NOTICE_COLOR,
    PALETTE,
    comparison_grid,
    comparison_row,
    confusions,
    draw_errors,
    draw_legend,
    draw_panoptic,
    draw_semantic,
    format_share,
    name_colors,
    panoptic_summary,
    semantic_summary,
)

VOCABULARY = ["sky", "grass", "red star", "blue circle"]


@pytest.fixture
def scene():
    """A 40 x 60 image: sky on top, grass below, a 16 x 16 red star, a 2 x 2 blue circle."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    labels = np.zeros((40, 60), np.int64)
    labels[20:] = 1
    labels[22:38, 30:46] = 2
    labels[2:4, 2:4] = 3
    return image, labels


def _count(picture: np.ndarray, color) -> int:
    return int((picture == np.asarray(color, np.uint8)).all(-1).sum())


def test_colors_are_distinct_and_never_shared_by_names_in_one_picture():
    colors = name_colors(69)
    assert len(set(colors)) == 69 and all(len(set(c)) > 1 for c in colors)  # no greys
    n = len(PALETTE) + 1
    assert name_colors(n)[0] == name_colors(n)[n - 1]  # cycled past the palette ...
    shown = name_colors(n, present=[0, n - 1])
    assert shown[0] != shown[n - 1] == PALETTE[1]  # ... not when both are shown


def test_summary_shares_order_missing_and_unlabelled(scene):
    _, labels = scene
    labels = labels.copy()
    labels[0, :6] = 255  # unlabelled
    s = semantic_summary(labels, VOCABULARY)
    assert [e.name for e in s.entries] == ["sky", "grass", "red star", "blue circle"]
    assert s.entries[2].share == pytest.approx(256 / 2400)
    assert s.unlabelled == pytest.approx(6 / 2400) and s.missing == []
    assert sum(s.shares().values()) + s.unlabelled == pytest.approx(1.0)
    assert s.line("a.jpg") == (
        "a.jpg: sky 49.6%, grass 39.3%, red star 10.7%, blue circle 0.2% "
        "(4 of 4 names; 0.2% unlabelled)"
    )
    only_sky = semantic_summary(np.zeros((4, 4), int), VOCABULARY)
    assert only_sky.missing == VOCABULARY[1:] and only_sky.shares()["grass"] == 0.0
    nothing = semantic_summary(np.full((4, 4), 255), VOCABULARY)
    assert not nothing.found and nothing.line("b.jpg", "no proposal") == (
        "b.jpg: NOTHING FOUND (no proposal)"
    )
    assert [format_share(x) for x in (0, 0.0004, 0.1234)] == ["0%", "<0.1%", "12.3%"]


def test_semantic_picture_blends_names_regions_and_has_a_legend(scene):
    image, labels = scene
    pic = draw_semantic(image, labels, VOCABULARY, scale=4)
    assert pic.shape[1] == 240 and pic.shape[0] > 160  # 4x the image, legend below
    top = pic[:160].astype(int)
    big = np.kron(image, np.ones((4, 4, 1), np.uint8)).astype(int)
    colors = name_colors(4, present=range(4))
    # the blue circle (2 x 2 px -> 8 x 8) is too small for its name: plain blend, outline aside
    blend = (big[9:15, 9:15] + np.asarray(colors[3])) / 2
    assert np.abs(top[9:15, 9:15] - blend).max() <= 1
    # the red star carries its name: a dark box in its middle
    star = top[88:152, 120:184]
    star_blend = (big[88:152, 120:184] + np.asarray(colors[2])) / 2
    assert (np.abs(star - star_blend).max(-1) > 20).mean() > 0.05
    legend = pic[160:]
    for k in range(4):  # a swatch per name in its colour
        assert _count(legend, colors[k]) >= 36, VOCABULARY[k]
    side = draw_semantic(image, labels, VOCABULARY, scale=4, side_by_side=True)
    assert (side[:160, :240] == big).all() and side.shape[1] > 480


def test_names_are_drawn_as_given_and_unicode_works(scene):
    image, labels = scene
    plain = draw_legend(semantic_summary(labels, ["a", "b", "c", "d"]), 400)
    names = ["Crème brûlée", "Grass (wet)", "Ελιά", "x" * 30]
    legend = draw_legend(semantic_summary(labels, names), 400)
    assert semantic_summary(labels, names).entries[0].name == "Crème brûlée"  # untouched
    assert legend.shape[0] >= plain.shape[0]  # longer names: fewer columns, not cut names
    assert (legend < 128).all(-1).sum() > (plain < 128).all(-1).sum()


def test_nothing_found_banner_and_notice(scene):
    image, _ = scene
    empty = np.full(image.shape[:2], 255)
    pic = draw_semantic(image, empty, VOCABULARY, scale=4, notice="no proposal survived")
    top = pic[:160]
    big = np.kron(image, np.ones((4, 4, 1), np.uint8))
    assert (top[-40:] == big[-40:]).all()  # no colour anywhere ...
    assert (top[:8] != big[:8]).any() and top[:8].mean() < big[:8].mean()  # ... a dark banner
    legend = pic[160:].astype(int)
    reddish = (np.abs(legend - np.asarray(NOTICE_COLOR)).max(-1) < 60).sum()
    assert reddish > 20  # "nothing found: no proposal survived" in red
    pan = draw_panoptic(image, np.zeros(image.shape[:2], int), [], VOCABULARY, notice="x")
    assert (pan[:8] != image[:8]).any()


def test_panoptic_counts_instances_and_shades_them(scene):
    image, labels = scene
    panoptic = np.zeros((40, 60), np.int64)
    panoptic[22:38, 30:38], panoptic[22:38, 38:46], panoptic[:20] = 1, 2, 3
    info = [
        {"id": 1, "category_id": 2},
        {"id": 2, "category_id": 2},
        {"id": 3, "category_id": 0},
    ]
    s = panoptic_summary(panoptic, info, VOCABULARY)
    assert [(e.name, e.segments) for e in s.entries] == [("sky", 1), ("red star", 2)]
    assert "red star ×2" in s.entries[1].text()
    pic = draw_panoptic(image, panoptic, info, VOCABULARY, scale=2, alpha=1.0, legend=False)
    left, right = pic[46:74, 62:74], pic[46:74, 80:90]  # inside the two instances

    def most_common(tile):
        colors, counts = np.unique(tile.reshape(-1, 3), axis=0, return_counts=True)
        return tuple(colors[np.argmax(counts)])

    color = name_colors(4, present=[0, 2])[2]
    assert most_common(left) == color and most_common(right) not in (color, most_common(left))
    void = np.kron(image, np.ones((2, 2, 1), np.uint8))[42:, :30]
    assert (pic[42:, :30] == void).all()  # void: the image as it is


def test_errors_and_confusions():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [1, 1, 0, 1]])
    image = np.full((2, 4, 3), 100, np.uint8)
    tile, wrong = draw_errors(image, pred, gt)
    assert wrong == pytest.approx(3 / 7)
    assert _count(tile, ERROR_COLOR) == 3 and (tile[1, 2] < tile[0, 0]).all()  # ignored: darker
    assert confusions(pred, gt, ["a", "b", "c"]) == [("c", "b", 0.25), ("a", "b", 0.125)]


def test_comparison_row_and_grid(scene):
    image, labels = scene
    pred = labels.copy()
    pred[labels == 2] = 3  # the star called a circle
    row = comparison_row(image, labels, [pred, labels], VOCABULARY, scale=2)
    assert row.shape[1] == 6 * 120 + 5 * 3 and row.shape[0] > 80
    first_errors = row[:80, 3 * 123 : 3 * 123 + 120]
    assert _count(first_errors, ERROR_COLOR) == 4 * 256  # the star's pixels, 2x2 each
    second_errors = row[:80, 5 * 123 : 5 * 123 + 120]
    assert _count(second_errors, ERROR_COLOR) == 0
    assert confusions(pred, labels, VOCABULARY) == [("red star", "blue circle", 256 / 2400)]
    grid = comparison_grid([row, row], ["image", "gt", "A", "A: errors", "B", "B: errors"], "n")
    assert grid.shape[1] == row.shape[1] and grid.shape[0] > 2 * row.shape[0]


def test_a_long_list_of_names_found_nowhere_is_cut_to_two_lines():
    labels = np.zeros((8, 8), int)
    names = [f"name {i}" for i in range(847)]  # ADE20K-847-sized vocabulary
    legend = draw_legend(semantic_summary(labels, names), 300, max_missing_lines=2)
    none_missing = draw_legend(semantic_summary(labels, names[:1]), 300).shape[0]
    one_line = draw_legend(semantic_summary(labels, names[:3]), 300).shape[0]
    assert legend.shape[0] - none_missing == 2 * (one_line - none_missing)
