"""Pictures of segmentations that people can read, in the style of detectron2's ``Visualizer``: the
image with each region's colour blended over it and its outline drawn, the name on each region large
enough to hold it, and a legend under the picture (colour → name, with the share of the image's
pixels each name covers; the names found nowhere; the unlabelled share), for semantic and panoptic
output, optionally beside the plain image. ``draw_errors`` marks the pixels a prediction gets wrong
against the ground truth.

Names are drawn exactly as given (with DejaVu Sans, shipped by matplotlib: Latin, Greek and Cyrillic
scripts; glyphs it lacks, e.g. CJK, show as boxes). Colours follow the vocabulary's order
(``name_colors``: distinct, saturated colours; names found in the same picture never share one).
Small regions get no name on the picture (it would cover them): the legend names every region.
"""

import colorsys
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "LegendEntry",
    "SegmentationSummary",
    "name_colors",
    "semantic_summary",
    "panoptic_summary",
    "draw_semantic",
    "draw_panoptic",
    "draw_legend",
    "draw_errors",
    "format_share",
    "confusions",
    "comparison_row",
    "comparison_grid",
]

Color = Tuple[int, int, int]
# detectron2's colour map (utils/colormap.py) without its greys, black, white and repeats ...
_D2_COLORS = [
    (0, 113, 188), (216, 82, 24), (236, 176, 31), (125, 46, 141), (118, 171, 47), (76, 189, 237),
    (161, 19, 46), (255, 0, 0), (255, 127, 0), (190, 190, 0), (0, 255, 0), (0, 0, 255),
    (170, 0, 255), (84, 84, 0), (84, 170, 0), (84, 255, 0), (170, 84, 0), (170, 170, 0),
    (170, 255, 0), (255, 84, 0), (255, 170, 0), (255, 255, 0), (0, 84, 127), (0, 170, 127),
    (0, 255, 127), (84, 0, 127), (84, 84, 127), (84, 170, 127), (84, 255, 127), (170, 0, 127),
    (170, 84, 127), (170, 170, 127), (170, 255, 127), (255, 0, 127), (255, 84, 127),
    (255, 170, 127), (255, 255, 127), (0, 84, 255), (0, 170, 255), (0, 255, 255), (84, 0, 255),
    (84, 84, 255), (84, 170, 255), (84, 255, 255), (170, 84, 255), (170, 170, 255),
    (170, 255, 255), (255, 0, 255), (255, 84, 255), (255, 170, 255), (84, 0, 0), (127, 0, 0),
    (170, 0, 0), (212, 0, 0), (0, 84, 0), (0, 127, 0), (0, 170, 0), (0, 212, 0), (0, 0, 127),
    (0, 0, 170), (0, 0, 212),
]  # fmt: skip
# ... then hues spaced by the golden ratio at alternating saturation / value
_EXTRA_COLORS = 256
LEGEND_BACKGROUND = (255, 255, 255)
NOTICE_COLOR = (200, 0, 0)
ERROR_COLOR = (255, 0, 80)


def _palette() -> List[Color]:
    colors = list(_D2_COLORS)
    for i in range(_EXTRA_COLORS):
        s, v = ((0.9, 0.95), (0.6, 0.8), (0.75, 0.6))[i % 3]
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, s, v)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return list(dict.fromkeys(colors))


PALETTE: List[Color] = _palette()


def name_colors(num_names: int, present: Optional[Sequence[int]] = None) -> List[Color]:
    """RGB colour of each of ``num_names`` names: ``PALETTE[i]`` for name ``i`` (cycled past the
    palette's length); when ``present`` (the indices drawn in one picture) holds two names of one
    colour, the later ones take the first palette colours no present name uses."""
    colors = [PALETTE[i % len(PALETTE)] for i in range(num_names)]
    if present is None:
        return colors
    present = sorted(set(int(i) for i in present if 0 <= i < num_names))
    used = {colors[i] for i in present}
    free = (c for c in PALETTE if c not in used)
    seen = set()
    for i in present:
        if colors[i] in seen:
            colors[i] = next(free, colors[i])
        seen.add(colors[i])
    return colors


def format_share(share: float) -> str:
    """A share of pixels (0-1) as a percentage: "12.3%", "<0.1%" for a few pixels, "0%" for none."""
    if share <= 0:
        return "0%"
    if share < 0.001:
        return "<0.1%"
    return f"{100 * share:.1f}%"


@dataclass(frozen=True)
class LegendEntry:
    """One name of a picture's legend."""

    name: str
    color: Color
    share: float  # fraction of the image's pixels
    segments: int = 1  # panoptic: the name's segments (instances)
    index: int = -1  # the name's index in the vocabulary

    def text(self) -> str:
        count = f" ×{self.segments}" if self.segments > 1 else ""
        return f"{self.name}{count}  {format_share(self.share)}"


@dataclass
class SegmentationSummary:
    """What a picture shows: the names found (largest share first), the names found nowhere, and
    the share of pixels without a name."""

    entries: List[LegendEntry]
    missing: List[str] = field(default_factory=list)
    unlabelled: float = 0.0

    @property
    def found(self) -> bool:
        return bool(self.entries)

    def shares(self) -> Dict[str, float]:
        """{name: share of pixels} of every name, found or not (vocabulary names found nowhere:
        0)."""
        out = {e.name: e.share for e in self.entries}
        out.update({n: 0.0 for n in self.missing})
        return out

    def line(self, title: str, notice: str = "") -> str:
        """One console line: ``title: name 40.1%, name 12.0%, ... (2 of 5 names; 3.0% unlabelled)``
        or ``title: NOTHING FOUND (notice)``."""
        if not self.entries:
            why = f" ({notice})" if notice else ""
            return f"{title}: NOTHING FOUND{why}"
        names = ", ".join(e.text().replace("  ", " ") for e in self.entries)
        total = len(self.entries) + len(self.missing)
        extra = f"; {format_share(self.unlabelled)} unlabelled" if self.unlabelled > 0 else ""
        return f"{title}: {names} ({len(self.entries)} of {total} names{extra})"


def _shares(ids: np.ndarray, num: int) -> np.ndarray:
    """(num,) fraction of the pixels of each id in [0, num) (others count as unlabelled)."""
    ids = ids.reshape(-1)
    valid = (ids >= 0) & (ids < num)
    counts = np.bincount(ids[valid].astype(np.int64), minlength=num)[:num]
    return counts / max(ids.size, 1)


def semantic_summary(
    labels: np.ndarray, vocabulary: Sequence[str], colors: Optional[Sequence[Color]] = None
) -> SegmentationSummary:
    """The names of an (H, W) label map (values outside [0, K) are unlabelled)."""
    labels = np.asarray(labels)
    shares = _shares(labels, len(vocabulary))
    present = np.flatnonzero(shares > 0)
    colors = list(colors) if colors is not None else name_colors(len(vocabulary), present)
    order = sorted(present.tolist(), key=lambda k: (-shares[k], k))
    entries = [
        LegendEntry(vocabulary[k], tuple(colors[k]), float(shares[k]), index=k) for k in order
    ]
    missing = [n for k, n in enumerate(vocabulary) if shares[k] == 0]
    return SegmentationSummary(entries, missing, float(1.0 - shares.sum()))


def _panoptic_classes(
    panoptic: np.ndarray, segments_info: Sequence[dict], num: int
) -> Tuple[np.ndarray, np.ndarray]:
    """(H, W) class per pixel (-1 = void) and (num,) segment count per class."""
    lut = np.full(int(panoptic.max(initial=0)) + 1, -1, np.int64)
    counts = np.zeros(num, np.int64)
    for s in segments_info:
        if 0 <= s["id"] < len(lut) and 0 <= s["category_id"] < num:
            lut[s["id"]] = s["category_id"]
            counts[s["category_id"]] += 1
    classes = lut[np.clip(panoptic, 0, len(lut) - 1)]
    classes[panoptic < 0] = -1
    return classes, counts


def panoptic_summary(
    panoptic: np.ndarray,
    segments_info: Sequence[dict],
    vocabulary: Sequence[str],
    colors: Optional[Sequence[Color]] = None,
) -> SegmentationSummary:
    """The names of a panoptic segmentation ((H, W) segment ids, 0 = void; ``segments_info``
    dicts with ``id`` and ``category_id``), with each name's segment count."""
    classes, counts = _panoptic_classes(np.asarray(panoptic), segments_info, len(vocabulary))
    summary = semantic_summary(classes, vocabulary, colors)
    summary.entries = [
        LegendEntry(e.name, e.color, e.share, int(counts[e.index]), e.index)
        for e in summary.entries
    ]
    return summary


# ------------------------------------------------------------------------------------ drawing
@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        from matplotlib import font_manager

        path = font_manager.findfont("DejaVu Sans", fallback_to_default=False)
        return ImageFont.truetype(path, size)
    except (ImportError, ValueError, OSError):
        return ImageFont.load_default(size=size)


def default_font_size(height: int, width: int) -> int:
    """Font size (pixels) for a picture of this size: 11 to 24."""
    return int(np.clip(round(math.sqrt(height * width) / 40), 11, 24))


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left


def _line_metrics(font) -> Tuple[int, int]:
    """(height of a line of text, offset of its top below the drawing position)."""
    _, top, _, bottom = font.getbbox("Ag")
    return bottom - top, top


def _write(draw: ImageDraw.ImageDraw, xy: Tuple[int, int], text: str, font, fill) -> None:
    """Text whose ink starts at ``xy`` (left, top of a line), whatever its letters."""
    left = font.getbbox(text)[0]
    draw.text((xy[0] - left, xy[1] - _line_metrics(font)[1]), text, font=font, fill=fill)


def _resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """The image ``scale`` times its size: nearest-neighbour for whole numbers (pixel art stays
    sharp), else area (down) / bilinear (up)."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale == int(scale):
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def _outline(ids: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another id (1-px region borders)."""
    edge = np.zeros(ids.shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def _darker(color: Color, factor: float = 0.55) -> Color:
    return tuple(int(c * factor) for c in color)


def _lighter(color: Color, factor: float = 0.5) -> Color:
    return tuple(int(c + (255 - c) * factor) for c in color)


def _boxes_overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _label_regions(
    picture: Image.Image,
    ids: np.ndarray,
    regions: Sequence[Tuple[int, str, Color]],
    font_size: int,
) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """Write each region's name inside it, at the point farthest from its border, on a dark box:
    on its largest connected part and on any part over 5% of the picture, when the part is large
    enough for a line of text and the box overlaps no other name. Returns (name, box) drawn."""
    font = _font(font_size)
    height, width = ids.shape
    min_area = (1.5 * font_size) ** 2
    candidates = []
    for rid, text, color in regions:
        mask = (ids == rid).astype(np.uint8)
        n, cc, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if n <= 1:
            continue
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        for c in range(1, n):
            area = int(stats[c, cv2.CC_STAT_AREA])
            if area >= min_area and (c == largest or area > 0.05 * height * width):
                candidates.append((area, c, cc, text, color))
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    placed: List[Tuple[str, Tuple[int, int, int, int]]] = []
    pad = max(2, font_size // 5)
    for area, c, cc, text, color in sorted(candidates, key=lambda t: -t[0]):
        part = np.pad((cc == c).astype(np.uint8), 1)
        dist = cv2.distanceTransform(part, cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        bw, bh = _text_width(font, text) + 2 * pad, _line_metrics(font)[0] + 2 * pad
        x0 = int(np.clip(x - bw // 2, 0, max(0, width - bw)))
        y0 = int(np.clip(y - bh // 2, 0, max(0, height - bh)))
        box = (x0, y0, x0 + bw, y0 + bh)
        if any(_boxes_overlap(box, b) for _, b in placed):
            continue
        draw.rectangle(box, fill=(0, 0, 0, 170))
        _write(draw, (x0 + pad, y0 + pad), text, font, _lighter(color) + (255,))
        placed.append((text, box))
    picture.alpha_composite(overlay)
    return placed


def _banner(picture: Image.Image, text: str, font_size: int) -> None:
    """A dark banner with ``text`` across the top of the picture (wrapped to its width)."""
    font = _font(font_size)
    pad = max(3, font_size // 3)
    lines = _wrap(text, font, picture.width - 2 * pad)
    line_h = _line_metrics(font)[0] + pad
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, 0, picture.width, line_h * len(lines) + pad), fill=(0, 0, 0, 190))
    for i, line in enumerate(lines):
        _write(draw, (pad, pad + i * line_h), line, font, (255, 255, 255, 255))
    picture.alpha_composite(overlay)


def _wrap(text: str, font, width: int) -> List[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and _text_width(font, trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _wrap_list(title: str, names: Sequence[str], font, width: int, max_lines: int) -> List[str]:
    """``title name, name, ...`` wrapped to ``width`` in at most ``max_lines`` lines (names kept
    whole); names that do not fit are counted at the end: "... (+N more)". Each name is measured
    once per line it is tried on, so long lists (847 names) are cheap."""
    pieces = [f"{n}," for n in names[:-1]] + list(names[-1:])
    lines: List[str] = []
    line = [title]
    shown = 0
    for piece in pieces:
        if _text_width(font, " ".join(line + [piece])) <= width or len(line) == 1:
            line.append(piece)
            shown += 1
        elif len(lines) + 1 < max_lines:
            lines.append(" ".join(line))
            line = [piece]
            shown += 1
        else:
            break
    if shown == len(pieces):
        return lines + [" ".join(line)]
    while True:  # end the last line with the count of the names left out
        more = f"... (+{len(pieces) - shown} more)"
        if len(line) == 1 or _text_width(font, " ".join(line + [more])) <= width:
            return lines + [" ".join(line + [more])]
        line.pop()
        shown -= 1


def draw_legend(
    summary: SegmentationSummary,
    width: int,
    font_size: int = 12,
    notice: str = "",
    max_missing_lines: int = 2,
    notes: Sequence[Tuple[str, Color]] = (),
) -> np.ndarray:
    """(H, width, 3) uint8 legend: a colour swatch and ``name  share`` per found name (largest
    share first, in as many columns as fit), then the unlabelled share, ``notice`` (in red) when
    nothing was found, the names found nowhere (at most ``max_missing_lines`` lines, then "+N
    more"; 0: not listed) and the lines of ``notes`` ((text, colour) each)."""
    font = _font(font_size)
    room = width - 2 * _legend_pad(font_size)
    items: List[Tuple[Optional[Color], str]] = [(e.color, e.text()) for e in summary.entries]
    if summary.unlabelled > 0 and summary.entries:
        items.append((None, f"no name  {format_share(summary.unlabelled)}"))
    lines: List[Tuple[str, Color]] = []
    if not summary.entries:
        text = "nothing found" + (f": {notice}" if notice else "")
        lines += [(t, NOTICE_COLOR) for t in _wrap(text, font, room)]
    if summary.missing and max_missing_lines > 0:
        wrapped = _wrap_list("not found:", summary.missing, font, room, max_missing_lines)
        lines += [(t, (90, 90, 90)) for t in wrapped]
    lines += [(t, color) for text, color in notes for t in _wrap(text, font, room)]
    return _render_legend(items, lines, width, font_size)


def _legend_pad(font_size: int) -> int:
    return max(4, font_size // 2)


def _render_legend(
    items: Sequence[Tuple[Optional[Color], str]],
    lines: Sequence[Tuple[str, Color]],
    width: int,
    font_size: int,
) -> np.ndarray:
    """Swatch + text ``items`` in as many columns as fit (colour None: a hatched swatch, for
    pixels without a name), then text ``lines``, on white."""
    font = _font(font_size)
    pad = _legend_pad(font_size)
    text_h = _line_metrics(font)[0]
    line_h = text_h + font_size // 2
    swatch = max(8, font_size - 2)
    col_w = max((swatch + 3 * pad + _text_width(font, t) for _, t in items), default=1)
    ncols = max(1, min(len(items), (width - pad) // col_w)) if items else 1
    rows = math.ceil(len(items) / ncols)
    legend = Image.new("RGB", (width, 2 * pad + line_h * (rows + len(lines))), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(legend)
    for i, (color, text) in enumerate(items):
        r, c = divmod(i, ncols)
        x, y = pad + c * col_w, pad + r * line_h
        sy = y + (line_h - swatch) // 2
        if color is None:
            draw.rectangle((x, sy, x + swatch, sy + swatch), outline=(120, 120, 120))
            draw.line((x, sy + swatch, x + swatch, sy), fill=(120, 120, 120))
        else:
            draw.rectangle((x, sy, x + swatch, sy + swatch), fill=color, outline=_darker(color))
        _write(draw, (x + swatch + pad, y + (line_h - text_h) // 2), text, font, (0, 0, 0))
    for j, (text, color) in enumerate(lines):
        _write(draw, (pad, pad + (rows + j) * line_h + (line_h - text_h) // 2), text, font, color)
    return np.asarray(legend)


def _compose(
    image: np.ndarray,
    ids: np.ndarray,
    regions: Sequence[Tuple[int, str, Color]],
    segment_colors: Dict[int, Color],
    summary: SegmentationSummary,
    scale: float,
    alpha: float,
    side_by_side: bool,
    notice: str,
    legend: bool,
    font_size: Optional[int],
) -> np.ndarray:
    image = _resize_image(np.ascontiguousarray(image[:, :, :3]).astype(np.uint8), scale)
    ids = cv2.resize(ids.astype(np.int32), image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    height, width = ids.shape
    font_size = font_size or default_font_size(height, width)
    lut = np.zeros((int(max(segment_colors, default=0)) + 2, 3), np.float32)
    known = np.zeros(len(lut), bool)
    for sid, color in segment_colors.items():
        if sid >= 0:
            lut[sid], known[sid] = color, True
    safe = np.clip(ids, 0, len(lut) - 1)
    labelled = known[safe] & (ids >= 0)
    blended = image.astype(np.float32)
    blended[labelled] = (1 - alpha) * blended[labelled] + alpha * lut[safe][labelled]
    edge = _outline(np.where(labelled, ids, -1)) & labelled
    dark = np.array([_darker(tuple(int(v) for v in c)) for c in lut], np.float32)
    blended[edge] = dark[safe][edge]
    picture = Image.fromarray(blended.round().astype(np.uint8)).convert("RGBA")
    _label_regions(picture, np.where(labelled, ids, -1), regions, font_size)
    if not summary.found:
        _banner(picture, "nothing found", font_size)  # the legend says why
    out = np.asarray(picture.convert("RGB"))
    if side_by_side:
        gap = np.full((height, max(4, width // 100), 3), 255, np.uint8)
        out = np.concatenate([image, gap, out], 1)
    if legend:
        out = np.concatenate([out, draw_legend(summary, out.shape[1], font_size, notice)], 0)
    return np.ascontiguousarray(out)


def draw_semantic(
    image: np.ndarray,
    labels: np.ndarray,
    vocabulary: Sequence[str],
    *,
    colors: Optional[Sequence[Color]] = None,
    scale: float = 1.0,
    alpha: float = 0.5,
    side_by_side: bool = False,
    notice: str = "",
    legend: bool = True,
    font_size: Optional[int] = None,
) -> np.ndarray:
    """Picture of a semantic segmentation.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) int name index per pixel; values outside [0, K) are unlabelled (left
            uncoloured).
        vocabulary: the K names.
        colors: K RGB colours (default ``name_colors`` of the names present).
        scale: size of the picture relative to the image (nearest-neighbour for whole numbers).
        alpha: opacity of the colours over the image.
        side_by_side: the plain image on the left, the segmentation on the right.
        notice: why nothing was found (in the legend, when no pixel has a name; the picture then
            carries a "nothing found" banner).
        legend: append the legend under the picture.
        font_size: of the names (default: from the picture's size, 11-24 px).

    Returns:
        (H', W', 3) uint8 RGB.
    """
    labels = np.asarray(labels).astype(np.int64)
    summary = semantic_summary(labels, vocabulary, colors)
    color_of = {e.index: e.color for e in summary.entries}
    regions = [(e.index, e.name, e.color) for e in summary.entries]
    return _compose(
        image, labels, regions, color_of, summary, scale, alpha, side_by_side, notice, legend,
        font_size,
    )  # fmt: skip


def _jitter(color: Color, k: int) -> Color:
    """The ``k``-th instance's shade of a class colour (k = 0: the colour itself)."""
    if k == 0:
        return color
    rng = np.random.default_rng(k)
    shifted = np.asarray(color, np.float32) + rng.uniform(-0.35, 0.35, 3) * 255
    return tuple(int(v) for v in np.clip(shifted, 0, 255))


def draw_panoptic(
    image: np.ndarray,
    panoptic: np.ndarray,
    segments_info: Sequence[dict],
    vocabulary: Sequence[str],
    *,
    colors: Optional[Sequence[Color]] = None,
    scale: float = 1.0,
    alpha: float = 0.5,
    side_by_side: bool = False,
    notice: str = "",
    legend: bool = True,
    font_size: Optional[int] = None,
) -> np.ndarray:
    """Picture of a panoptic segmentation: each segment in its name's colour (further instances
    of a name in shades of it), outlined and named; the legend counts each name's segments.

    Args:
        panoptic: (H, W) int segment ids (0 = void, left uncoloured).
        segments_info: dicts with ``id`` and ``category_id`` (index into ``vocabulary``).
        other arguments: see ``draw_semantic``.
    """
    panoptic = np.asarray(panoptic).astype(np.int64)
    summary = panoptic_summary(panoptic, segments_info, vocabulary, colors)
    color_of = {e.index: e.color for e in summary.entries}
    seen: Dict[int, int] = {}
    segment_colors: Dict[int, Color] = {}
    regions = []
    ids = panoptic.copy()
    for s in segments_info:
        k = s["category_id"]
        if k not in color_of:  # a name outside the vocabulary, or a segment hidden by others
            ids[panoptic == s["id"]] = -1
            continue
        color = _jitter(color_of[k], seen.get(k, 0))
        seen[k] = seen.get(k, 0) + 1
        segment_colors[s["id"]] = color
        regions.append((s["id"], vocabulary[k], color_of[k]))
    ids[ids == 0] = -1
    return _compose(
        image, ids, regions, segment_colors, summary, scale, alpha, side_by_side, notice, legend,
        font_size,
    )  # fmt: skip


def draw_errors(
    image: np.ndarray, prediction: np.ndarray, ground_truth: np.ndarray, ignore_label: int = 255
) -> Tuple[np.ndarray, float]:
    """The image in faint grey with the pixels whose predicted name differs from the ground truth
    in ``ERROR_COLOR`` (pixels of ``ignore_label`` count as neither).

    Returns:
        ((H, W, 3) uint8 RGB, share of the evaluated pixels that are wrong).
    """
    grey = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_RGB2GRAY)
    out = np.repeat((128 + grey // 2)[:, :, None], 3, axis=2).astype(np.uint8)
    valid = ground_truth != ignore_label
    wrong = valid & (prediction != ground_truth)
    out[wrong] = ERROR_COLOR
    out[~valid] = (out[~valid] * 0.6).astype(np.uint8)
    return out, float(wrong.sum() / max(int(valid.sum()), 1))


def confusions(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    vocabulary: Sequence[str],
    ignore_label: int = 255,
    top: int = 3,
) -> List[Tuple[str, str, float]]:
    """The ``top`` most frequent errors: (true name, predicted name, share of the image's pixels),
    largest first (a prediction outside the vocabulary is "no name")."""
    valid = (ground_truth != ignore_label) & (prediction != ground_truth)
    k = len(vocabulary)
    pred = np.where((prediction >= 0) & (prediction < k), prediction, k)[valid].astype(np.int64)
    pairs = np.bincount(ground_truth[valid].astype(np.int64) * (k + 1) + pred)
    names = list(vocabulary) + ["no name"]
    out = []
    for idx in np.argsort(-pairs, kind="stable")[:top]:
        if pairs[idx] == 0:
            break
        gt, p = divmod(int(idx), k + 1)
        out.append((names[gt], names[p], float(pairs[idx] / ground_truth.size)))
    return out


TILE_GAP = 3  # white pixels between the tiles of a comparison grid


def _stack_columns(columns: Sequence[Tuple[np.ndarray, Optional[np.ndarray]]]) -> np.ndarray:
    """Tiles side by side (``TILE_GAP`` apart), each with its legend under it, legends padded
    with white to the tallest."""
    legend_h = max((legend.shape[0] for _, legend in columns if legend is not None), default=0)
    tile_h = max(tile.shape[0] for tile, _ in columns)
    out = []
    for i, (tile, legend) in enumerate(columns):
        column = np.full((tile_h + legend_h, tile.shape[1], 3), 255, np.uint8)
        column[: tile.shape[0]] = tile
        if legend is not None:
            column[tile_h : tile_h + legend.shape[0]] = legend
        if i:
            out.append(np.full((column.shape[0], TILE_GAP, 3), 255, np.uint8))
        out.append(column)
    return np.concatenate(out, 1)


def comparison_row(
    image: np.ndarray,
    ground_truth: np.ndarray,
    predictions: Sequence[np.ndarray],
    vocabulary: Sequence[str],
    *,
    scale: float = 3.0,
    ignore_label: int = 255,
    font_size: int = 10,
) -> np.ndarray:
    """One row of a method-comparison grid: the image, the ground truth, then per prediction the
    prediction and its errors (``draw_errors``: wrong pixels in ``ERROR_COLOR``; under it the
    wrong share and the largest confusions "true → predicted"). Names are written on the regions
    and listed with their shares under each tile; one colour per name (``name_colors``), so two
    names never share a colour.

    Args:
        image: (H, W, 3) uint8 RGB. ground_truth, predictions: (H, W) int name indices.
        vocabulary: the names (indices into it).

    Returns:
        (H', W', 3) uint8 RGB: ``2 + 2 P`` tiles of ``scale`` times the image's size, ``TILE_GAP``
        apart, legends below.
    """
    colors = name_colors(len(vocabulary))
    gt = np.asarray(ground_truth).astype(np.int64)
    draw = {"colors": colors, "scale": scale, "alpha": 0.6, "legend": False, "font_size": font_size}
    plain = _resize_image(np.ascontiguousarray(image[:, :, :3]), scale)
    width = plain.shape[1]

    def legend(labels: np.ndarray) -> np.ndarray:
        summary = semantic_summary(labels, vocabulary, colors)
        return draw_legend(summary, width, font_size, max_missing_lines=0)

    columns = [(plain, None), (draw_semantic(image, gt, vocabulary, **draw), legend(gt))]
    for pred in predictions:
        pred = np.asarray(pred).astype(np.int64)
        columns.append((draw_semantic(image, pred, vocabulary, **draw), legend(pred)))
        errors, wrong = draw_errors(image, pred, gt, ignore_label)
        notes = [(f"wrong: {format_share(wrong)} of the pixels", ERROR_COLOR)]
        notes += [
            (f"{t} → {p}  {format_share(share)}", (0, 0, 0))
            for t, p, share in confusions(pred, gt, vocabulary, ignore_label)
        ]
        lines = [(t, c) for text, c in notes for t in _wrap(text, _font(font_size), width - 8)]
        columns.append((_resize_image(errors, scale), _render_legend([], lines, width, font_size)))
    return _stack_columns(columns)


def comparison_grid(
    rows: Sequence[np.ndarray], column_names: Sequence[str], note: str = "", font_size: int = 12
) -> np.ndarray:
    """Rows of ``comparison_row`` under a header naming each column (wrapped to the tile's width)
    and above ``note``; rows are ``TILE_GAP`` apart."""
    ncols = len(column_names)
    width = max(r.shape[1] for r in rows)
    tile_w = (rows[0].shape[1] - (ncols - 1) * TILE_GAP) // ncols
    font = _font(font_size)
    wrapped = [_wrap(name, font, tile_w - 4) for name in column_names]
    line_h = _line_metrics(font)[0] + font_size // 3
    header = Image.new("RGB", (width, 6 + line_h * max(map(len, wrapped))), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(header)
    for k, lines in enumerate(wrapped):
        for j, text in enumerate(lines):
            _write(draw, (k * (tile_w + TILE_GAP) + 2, 3 + j * line_h), text, font, (0, 0, 0))
    parts = [np.asarray(header)]
    for row in rows:
        padded = np.full((row.shape[0] + TILE_GAP, width, 3), 255, np.uint8)
        padded[: row.shape[0], : row.shape[1]] = row
        parts.append(padded)
    if note:
        lines = [(t, (60, 60, 60)) for t in _wrap(note, font, width - 8)]
        parts.append(_render_legend([], lines, width, font_size))
    return np.concatenate(parts, 0)
