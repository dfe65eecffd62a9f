"""What the web demo (``tools/web_demo.py``) does per request, without the web page: check the
upload and the vocabulary, segment with the chosen model (exact or fast), draw the picture with its
legend and list each name's share of the pixels. Requests run one at a time (a lock), since the
models are not thread-safe and a CPU serves one at a time anyway.

Text embeddings are cached across requests by the models themselves (``TextClassifier``: per
vocabulary and per name), so a repeated vocabulary is not embedded again.
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import MetadataCatalog

from ov_seg.data.image_io import UnreadableImageError, read_image
from ov_seg.data.vocabulary import VocabularyError, normalize_vocabulary
from ov_seg.engine.predictor import OVSegPredictor
from ov_seg.engine.trainer import Trainer
from ov_seg.utils.visualize import (
    draw_panoptic,
    draw_semantic,
    format_share,
    panoptic_summary,
    semantic_summary,
)

__all__ = [
    "DemoInputError",
    "DemoMethod",
    "DemoResult",
    "DemoService",
    "BENCHMARK_VOCABULARIES",
    "preset_vocabularies",
    "split_vocabulary",
]

# (menu name, registered dataset whose stuff_classes are the preset)
BENCHMARK_VOCABULARIES = (
    ("toy world", "toyworld_sem_seg_val"),
    ("Pascal VOC (20)", "pascalvoc20_sem_seg_val"),
    ("Pascal Context (59)", "pascal_context_59_sem_seg_val"),
    ("ADE20K (150)", "ade20k_sem_seg_val"),
    ("COCO-Stuff (171)", "coco_2017_val_stuff_sem_seg"),
    ("Pascal Context (459)", "pascal_context_459_sem_seg_val"),
    ("ADE20K (847)", "ade20k_full_sem_seg_val"),
)
VIEWS = ("semantic", "panoptic")
# the picture's longer side is brought up to about this many pixels (small images, e.g. 64-px toy
# images, are enlarged by a whole factor so that names and legend can be read)
MIN_PICTURE_SIDE = 448


class DemoInputError(ValueError):
    """A request the demo cannot serve; the message says what to change."""


def split_vocabulary(text: str) -> List[str]:
    """Class names of the vocabulary box: comma-separated, or one per line when the text has line
    breaks (then commas stay inside names: "building, edifice"). Whitespace runs become one space;
    empty names are dropped; the spelling is kept."""
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    return [" ".join(p.split()) for p in parts if p.strip()]


def preset_vocabularies(max_names: int = 0) -> Dict[str, str]:
    """{menu name: vocabulary box text} of the benchmark vocabularies the project registers (the
    toy world's names first), at most ``max_names`` names each (0: any); one name per line when a
    name holds a comma, else comma-separated."""
    presets = {}
    for label, dataset in BENCHMARK_VOCABULARIES:
        if dataset not in MetadataCatalog.list():
            continue
        names = list(MetadataCatalog.get(dataset).get("stuff_classes", None) or [])
        if not names or (max_names and len(names) > max_names):
            continue
        sep = "\n" if any("," in n for n in names) else ", "
        presets[label] = sep.join(names)
    return presets


class DemoMethod:
    """One model of the demo: its exact predictor and, for models with fast modes
    (``prepare_fast_modes``, the two-stage model), a fast one built on first use from the same
    config with ``fast_opts`` merged (``MODEL.TWO_STAGE.FAST.*``) and the exact model's weights.

    Args:
        cfg: the model's config (frozen).
        model: the built model (None: built from ``cfg``, ``MODEL.WEIGHTS`` loaded).
        fast_opts: config overrides of the fast modes, ``[KEY, VALUE, ...]`` (empty: no fast
            mode).
    """

    def __init__(self, cfg, model=None, fast_opts: Sequence = ()):
        self.exact = OVSegPredictor(cfg, model)
        self.fast_opts = list(fast_opts)
        self._fast: Optional[OVSegPredictor] = None

    @property
    def has_fast(self) -> bool:
        return bool(self.fast_opts) and hasattr(self.exact.model, "prepare_fast_modes")

    def predictor(self, fast: bool) -> OVSegPredictor:
        """The exact predictor, or the fast one (built now if needed) when ``fast`` and the model
        has fast modes."""
        if not (fast and self.has_fast):
            return self.exact
        if self._fast is None:
            cfg = self.exact.cfg.clone()
            cfg.defrost()
            cfg.merge_from_list(self.fast_opts)
            cfg.freeze()
            model = Trainer.build_model(cfg)
            model.load_state_dict(self.exact.model.state_dict())
            self._fast = OVSegPredictor(cfg, model)
        return self._fast


@dataclass
class DemoResult:
    """A served request: the picture (RGB), a (name, share) row per name (found ones first,
    largest share first; names found nowhere at 0%), and one line saying what was found, with any
    notes (image reduced, fast mode unavailable, ...)."""

    picture: np.ndarray
    table: List[Tuple[str, str]]
    message: str
    vocabulary: List[str] = field(default_factory=list)
    seconds: float = 0.0


class DemoService:
    """The demo's models and its per-request work.

    Args:
        methods: {name shown in the page: ``DemoMethod``}, the first the default.
        max_names: most class names of one request.
        max_side: a larger upload is reduced to this many pixels on its longer side.
    """

    def __init__(self, methods: Dict[str, DemoMethod], max_names: int = 300, max_side: int = 1024):
        if not methods:
            raise ValueError("the demo needs at least one model")
        self.methods = dict(methods)
        self.max_names = int(max_names)
        self.max_side = int(max_side)
        self.lock = threading.Lock()

    def vocabulary(self, text: str) -> Tuple[List[str], List[str]]:
        """(names as typed, names as the model gets them: ``normalize_vocabulary``).

        Raises:
            DemoInputError: no name, more than ``max_names``, near-duplicates or control
                characters.
        """
        typed = split_vocabulary(text or "")
        if not typed:
            raise DemoInputError(
                "The vocabulary is empty: type class names separated by commas (e.g. "
                "'red star, grass, sky') or pick a preset."
            )
        if len(typed) > self.max_names:
            raise DemoInputError(
                f"The vocabulary has {len(typed)} names; this demo takes at most "
                f"{self.max_names} (each name costs memory and time per pixel): remove some."
            )
        try:
            return typed, normalize_vocabulary(typed, "the vocabulary")
        except VocabularyError as e:
            raise DemoInputError(f"{str(e)[0].upper()}{str(e)[1:]}") from e

    def read(self, path: Optional[str], input_format: str) -> Tuple[np.ndarray, str]:
        """(image in ``input_format``, note) of an upload, reduced to ``max_side`` if larger.

        Raises:
            DemoInputError: no upload, or a file that is no readable image.
        """
        if not path:
            raise DemoInputError("No image: upload one or pick an example.")
        try:
            image = read_image(path, input_format)
        except UnreadableImageError as e:
            name = str(e).split(": ", 1)[-1]
            raise DemoInputError(f"The upload is not a readable image ({name}).") from e
        height, width = image.shape[:2]
        if max(height, width) <= self.max_side:
            return image, ""
        f = self.max_side / max(height, width)
        size = (max(1, round(width * f)), max(1, round(height * f)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return image, f"reduced from {width}x{height} to {size[0]}x{size[1]}"

    def segment(
        self,
        image_path: Optional[str],
        vocabulary_text: str,
        method: str = "",
        fast: bool = False,
        view: str = "semantic",
        side_by_side: bool = False,
    ) -> DemoResult:
        """Serve one request (see the class).

        Raises:
            DemoInputError: an unknown method or view, a bad vocabulary or upload.
        """
        method = method or next(iter(self.methods))
        if method not in self.methods:
            raise DemoInputError(f"Unknown model {method!r}; loaded: {', '.join(self.methods)}.")
        if view not in VIEWS:
            raise DemoInputError(f"Unknown view {view!r}; one of {', '.join(VIEWS)}.")
        typed, names = self.vocabulary(vocabulary_text)
        entry = self.methods[method]
        notes = []
        if fast and not entry.has_fast:
            notes.append(f"{method} has no fast modes: ran as usual")
        image, reduced = self.read(image_path, entry.exact.input_format)
        with self.lock:
            start = time.perf_counter()
            predictor = entry.predictor(fast)
            out = predictor(image, names, image_path or "")
            seconds = time.perf_counter() - start
        if reduced:
            notes.append(reduced)
        # the model's names (a background name may be appended), shown as typed
        shown = typed + list(out["vocabulary"][len(names) :])
        rgb = predictor.to_rgb(image)
        scale = max(1, MIN_PICTURE_SIDE // max(rgb.shape[:2]))
        draw = {"scale": scale, "side_by_side": side_by_side}
        if view == "panoptic" and not predictor.has_panoptic:
            notes.append(f"{method} gives no panoptic output: semantic shown")
            view = "semantic"
        if view == "panoptic":
            pan, segments = out["panoptic_seg"]
            pan = pan.cpu().numpy()
            summary = panoptic_summary(pan, segments, shown)
            notice = predictor.notice(panoptic=True)
            picture = draw_panoptic(rgb, pan, segments, shown, notice=notice, **draw)
        else:
            labels, _ = OVSegPredictor.labels(out)
            summary = semantic_summary(labels.numpy(), shown)
            notice = predictor.notice()
            picture = draw_semantic(rgb, labels.numpy(), shown, notice=notice, **draw)
        table = [(e.name, format_share(e.share)) for e in summary.entries]
        table += [(name, format_share(0.0)) for name in summary.missing]
        mode = "fast" if fast and entry.has_fast else "exact"
        message = summary.line(f"{method} ({mode}, {seconds:.2f} s)", notice)
        if notes:
            message += " — " + "; ".join(notes)
        return DemoResult(picture, table, message, shown, seconds)
