"""``OpenVocabSegmentor``: what every open-vocabulary meta-architecture shares.

The shape follows detectron2's ``SemanticSegmentor`` (``preprocess_image`` → model → one place that
resizes back) with the text side as a value (SAN / open_clip): a (K, D) matrix of class embeddings,
computed once per vocabulary by the one ``TextClassifier`` of the model and cached there.

The base owns:

- the **vocabulary** of an input (``vocabulary``): the call's ``InferenceOptions.vocabulary``, else
  the input's ``vocabulary`` (set by the dataset mappers), else the ``stuff_classes`` of its
  ``dataset_name``, else the model's default (the first test dataset's classes);
- the **background rule** split (``split_background``): vocabulary entries named in
  ``background_names`` are not scored by text; each method fills their channels its own way;
- **seen-class calibration** (``calibration``): γ of the call's options with the model's seen names;
- **preprocessing** (``preprocess_image``: channel order, CLIP normalisation, padding to the size
  divisibility) and **postprocessing** (``postprocess``: scores → the input's padded size → crop →
  the output size), in one place each, so that a bounded-memory version can replace them;
- **sliding windows** (``SlidingWindow``) for the methods that use them;
- the **forward** dispatch: training → ``losses``; eval → ``inference(batched_inputs, options)``
  = ``predict(encode_inputs(batched_inputs), options)``.

Every method supplies ``losses``, ``encode_inputs`` (everything that depends neither on the
vocabulary nor on the options, once per input) and ``predict`` (the outputs of encoded inputs under
some options); tools sweep options over cached encodings through them (encode once, score many).
``PerImageSegmentor`` implements the two for methods that encode each image alone and score it
densely (PACL, MGCA, MixReorg): they supply ``encode(image)`` and ``score(encoded, vocabulary,
options)`` ((K, h, w) scores). ``TwoStageOVSeg`` encodes a batch (proposals, then CLIP crops) and
implements ``encode_inputs`` / ``predict`` itself.

``InferenceOptions`` is an immutable value passed per call; ``model.default_options`` holds the
config's values. ``StageTimer`` collects per-stage wall times recorded by the model's own code path
when one is passed (``tools/benchmark.py``).
"""

import abc
import dataclasses
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import ImageList
from torch import nn

from ov_seg.modeling.calibration import SeenCalibration
from ov_seg.modeling.clip import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from ov_seg.modeling.postprocess import budget_bytes, semantic_postprocess

__all__ = [
    "EncodedInput",
    "FastModes",
    "InferenceOptions",
    "OpenVocabSegmentor",
    "PerImageSegmentor",
    "SlidingWindow",
    "StageTimer",
    "dataset_vocabulary",
    "default_test_vocabulary",
]


@dataclasses.dataclass(frozen=True)
class FastModes:
    """The per-call fast modes of the two-stage model (``MODEL.TWO_STAGE.FAST``; the module
    transforms, int8 quantization and channels-last, and the crop sizes are fixed at build time).

    Attributes:
        min_objectness: skip proposals with a lower objectness (0 = keep all).
        duplicate_iou: proposals whose binarised masks overlap a higher-scoring one with IoU >=
            this share its CLIP result (1.0 = identical masks only, exact; > 1 = off).
    """

    min_objectness: float = 0.0
    duplicate_iou: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.min_objectness <= 1.0:
            raise ValueError(f"min_objectness must lie in [0, 1], got {self.min_objectness}")
        if self.duplicate_iou <= 0.0:
            raise ValueError(f"duplicate_iou must be > 0, got {self.duplicate_iou}")

    def replace(self, **changes) -> "FastModes":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """Inference settings of one call (a value; ``model.default_options`` holds the config's).

    Attributes:
        ensemble_weight: λ of the two-stage geometric ensemble (1 = CLIP only, 0 = proposal head
            only); the single-stage models ignore it.
        seen_ensemble_weight: λ_s, the two-stage ensemble's CLIP exponent for the names its
            proposal head was trained on (``MODEL.TWO_STAGE.SEEN_ENSEMBLE_WEIGHT``); None = λ (the
            uniform ensemble); the single-stage models ignore it.
        mask_thr: binarisation threshold of the two-stage proposals before cropping
            (``MODEL.CLIP.MASK_THR``); the single-stage models ignore it.
        seen_gamma: γ of the seen-class calibration (``MODEL.SEEN_CALIBRATION.GAMMA``; 0 = off).
        fast: the two-stage fast modes that can change per call (``FastModes``).
        vocabulary: class names of every input of the call; None = each input's own (its
            ``vocabulary`` / ``dataset_name``, else the model's default).
    """

    ensemble_weight: float = 0.7
    seen_ensemble_weight: Optional[float] = None
    mask_thr: float = 0.5
    seen_gamma: float = 0.0
    fast: FastModes = FastModes()
    vocabulary: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise ValueError(f"ensemble_weight λ must lie in [0, 1], got {self.ensemble_weight}")
        if self.seen_ensemble_weight is not None and not 0.0 <= self.seen_ensemble_weight <= 1.0:
            raise ValueError(
                f"seen_ensemble_weight λ_s must lie in [0, 1], got {self.seen_ensemble_weight}"
            )
        if self.seen_gamma < 0:
            raise ValueError(f"seen_gamma γ must be >= 0, got {self.seen_gamma}")
        if self.vocabulary is not None:
            if isinstance(self.vocabulary, str):
                raise TypeError("vocabulary must be a sequence of class names, not one string")
            names = tuple(self.vocabulary)
            if not names:
                raise ValueError("an options vocabulary needs at least one class name")
            object.__setattr__(self, "vocabulary", names)

    def replace(self, **changes) -> "InferenceOptions":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


class StageTimer:
    """Wall times (ms) of named stages, recorded by a model's own code path.

    ``with timer("clip"): ...`` appends one duration to ``ms["clip"]``; on CUDA the device is
    synchronised at both ends. ``counts`` holds the last value recorded by ``count``.
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.ms: Dict[str, List[float]] = defaultdict(list)
        self.counts: Dict[str, Any] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name].append(1e3 * (time.perf_counter() - start))

    def count(self, name: str, value: Any) -> None:
        self.counts[name] = value


def stage(timer: Optional[StageTimer], name: str):
    """``timer(name)``, or a no-op context without a timer."""
    return nullcontext() if timer is None else timer(name)


def dataset_vocabulary(dataset_name: str) -> List[str]:
    """The ``stuff_classes`` of a registered dataset.

    Raises:
        KeyError: unknown dataset. ValueError: no ``stuff_classes``.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"unknown dataset name {dataset_name!r}: not registered (pass an explicit 'vocabulary' "
            "instead)"
        )
    classes = MetadataCatalog.get(dataset_name).get("stuff_classes", None)
    if not classes:
        raise ValueError(
            f"dataset {dataset_name!r} has no 'stuff_classes' metadata to use as vocabulary"
        )
    return list(classes)


def default_test_vocabulary(cfg) -> List[str]:
    """The ``stuff_classes`` of the first test dataset (empty without one): the vocabulary of inputs
    that name none."""
    if not cfg.DATASETS.TEST:
        return []
    return list(MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("stuff_classes", None) or [])


class SlidingWindow:
    """Square windows of side ``window`` every ``stride`` pixels, the last one flush with the end.

    Args:
        window: side in pixels (0 = off: the whole image).
        stride: step in pixels, 0 < stride <= window when on.
    """

    def __init__(self, window: int = 0, stride: int = 0):
        if window > 0 and not 0 < stride <= window:
            raise ValueError(f"SLIDE_STRIDE must lie in (0, SLIDE_WINDOW], got {stride} / {window}")
        self.window, self.stride = int(window), int(stride)

    def active(self, height: int, width: int) -> bool:
        """Whether an image of this size is split (on, and larger than one window)."""
        return self.window > 0 and max(height, width) > self.window

    def starts(self, size: int) -> List[int]:
        """Window starts along one axis of ``size`` pixels."""
        if size <= self.window:
            return [0]
        return sorted(set(list(range(0, size - self.window, self.stride)) + [size - self.window]))

    def boxes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """(top, left) of every window, row-major."""
        return [(y, x) for y in self.starts(height) for x in self.starts(width)]

    def average(
        self,
        image: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor],
        out_stride: int = 1,
    ) -> torch.Tensor:
        """Mean of ``fn`` over the windows of one image, where they overlap.

        Args:
            image: (C, H, W).
            fn: window (C, h, w) → map (C', h / out_stride, w / out_stride) (at most that size).
            out_stride: pixels per cell of ``fn``'s output.

        Returns:
            (C', H / out_stride, W / out_stride).
        """
        h, w = image.shape[-2:]
        out = count = None
        for y, x in self.boxes(h, w):
            z = fn(image[:, y : y + self.window, x : x + self.window])
            if out is None:
                out = z.new_zeros(z.shape[0], h // out_stride, w // out_stride)
                count = z.new_zeros(1, h // out_stride, w // out_stride)
            fy, fx = y // out_stride, x // out_stride
            out[:, fy : fy + z.shape[1], fx : fx + z.shape[2]] += z
            count[:, fy : fy + z.shape[1], fx : fx + z.shape[2]] += 1
        return out / count.clamp_min(1)


class EncodedInput(NamedTuple):
    """One input and its ``encode`` output (``OpenVocabSegmentor.encode_inputs``)."""

    input: dict  # the detectron2 input dict (its vocabulary, dataset name and output size)
    encoded: Any  # the method's encoding of the preprocessed image
    padded_size: Tuple[int, int]  # (H', W') of the preprocessed image
    image_size: Tuple[int, int]  # (H, W) before padding


class OpenVocabSegmentor(nn.Module, abc.ABC):
    """Base of the open-vocabulary meta-architectures (see the module doc).

    Subclasses call ``super().__init__(...)`` with the shared parts, set ``text_classifier`` (a
    ``TextClassifier``: ``text_classifier(names)`` → (K, D) normalised, cached per vocabulary) and
    implement ``losses``, ``encode_inputs`` and ``predict`` (``PerImageSegmentor``: ``encode`` and
    ``score``).
    """

    def __init__(
        self,
        *,
        seen_calibration: Optional[SeenCalibration] = None,
        default_vocabulary: Sequence[str] = (),
        background_names: Sequence[str] = (),
        size_divisibility: int = 1,
        input_format: str = "RGB",
        memory_budget_mb: float = 0.0,
    ):
        """
        Args:
            seen_calibration: the config's γ and the model's seen names; None = off.
            default_vocabulary: class names of inputs that name none (the first test dataset's).
            background_names: vocabulary names scored by the method's background rule, not by text.
            size_divisibility: images are padded (bottom / right, after normalisation) to a
                multiple of this (the patch size of a ViT).
            input_format: "RGB" or "BGR", the channel order of the input images.
            memory_budget_mb: MiB of full-resolution output maps per image
                (``TEST.MEMORY_BUDGET_MB``; 0 = unbounded): a larger ``sem_seg`` becomes the
                (height, width) label map (``ov_seg.modeling.postprocess.semantic_postprocess``).
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR for CLIP, got {input_format!r}")
        self.seen_calibration = seen_calibration or SeenCalibration(gamma=0.0)
        self.default_vocabulary = list(default_vocabulary)
        self.background_names = frozenset(background_names)
        self.size_divisibility = int(size_divisibility)
        self.input_format = input_format
        self.output_budget = budget_bytes(memory_budget_mb)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ options
    @property
    def default_options(self) -> InferenceOptions:
        """The config's options (``forward`` / ``inference`` without ``options``)."""
        return InferenceOptions(seen_gamma=self.seen_calibration.gamma)

    def resolve_options(self, options: Optional[InferenceOptions]) -> InferenceOptions:
        if options is None:
            return self.default_options
        if not isinstance(options, InferenceOptions):
            raise TypeError(f"options must be InferenceOptions, got {type(options).__name__}")
        return options

    def calibration(self, options: InferenceOptions) -> SeenCalibration:
        """The seen-class calibration with γ of ``options`` and the model's seen names."""
        if options.seen_gamma == self.seen_calibration.gamma:
            return self.seen_calibration
        return SeenCalibration(
            gamma=options.seen_gamma, seen_names=self.seen_calibration.seen_names
        )

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(self, x: dict, options: Optional[InferenceOptions] = None) -> List[str]:
        """The class names of one input (see the module doc for the order of the sources).

        Raises:
            ValueError: an empty vocabulary, or none at all. KeyError: unknown ``dataset_name``.
        """
        if options is not None and options.vocabulary is not None:
            return list(options.vocabulary)
        if x.get("vocabulary") is not None:
            vocabulary = list(x["vocabulary"])
            if not vocabulary:
                name = x.get("dataset_name")
                where = f" (dataset {name!r} has no stuff_classes?)" if name else ""
                raise ValueError(
                    f"input has an empty vocabulary{where}: give at least one class name"
                )
            return vocabulary
        if x.get("dataset_name"):
            return dataset_vocabulary(x["dataset_name"])
        if not self.default_vocabulary:
            raise ValueError(
                f"{type(self).__name__} inference needs a vocabulary: the input has no "
                "'vocabulary' nor 'dataset_name', and the config has no test dataset with "
                "stuff_classes"
            )
        return list(self.default_vocabulary)

    def split_background(self, vocabulary: Sequence[str]) -> Tuple[List[int], List[str]]:
        """Indices and names of the entries scored by text (not in ``background_names``).

        Raises:
            ValueError: every entry is a background name.
        """
        ids = [k for k, name in enumerate(vocabulary) if name not in self.background_names]
        if not ids:
            raise ValueError(f"the vocabulary has no class besides background: {list(vocabulary)}")
        return ids, [vocabulary[k] for k in ids]

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(K, D) normalised class-name embeddings (cached per vocabulary by the classifier)."""
        return self.text_classifier(list(names)).to(self.device)

    # ------------------------------------------------------------------ images
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) RGB 0-255 → CLIP-normalised float on the model's device."""
        return (images.to(self.device).float() - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, x: dict) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """One input image → (3, H', W') RGB, CLIP-normalised, zero-padded to a multiple of
        ``size_divisibility``, and its unpadded size (H, W)."""
        image = x["image"]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image (3, H, W), got {tuple(image.shape)}")
        image = self.normalize(image.flip(0) if self.input_format == "BGR" else image)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        d = self.size_divisibility
        if d > 1:
            image = F.pad(image, (0, -size[1] % d, 0, -size[0] % d))
        return image, size

    def preprocess_images(self, batched_inputs: List[dict]) -> ImageList:
        """``preprocess_image`` of every input, zero-padded to a common size (training batches)."""
        images = [self.preprocess_image(x)[0] for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def draw_caption(self, x: dict, index: int = 0) -> Tuple[int, List[str]]:
        """One caption of a caption-supervised training input, drawn uniformly with torch's RNG.

        Args:
            x: the input (its ``captions``: a list of str, or one str).
            index: its position in the batch (for the message).

        Returns:
            (k, captions): the drawn index and the input's captions as a list.

        Raises:
            ValueError: the input has no captions.
        """
        captions = x.get("captions")
        if not captions:
            raise ValueError(
                f"training input {index} (image_id {x.get('image_id')}) has no 'captions': train "
                f"{type(self).__name__} on a caption dataset with INPUT.DATASET_MAPPER_NAME caption"
            )
        captions = [captions] if isinstance(captions, str) else list(captions)
        return int(torch.randint(len(captions), ())), captions

    def caption_nouns(self, x: dict, k: int, index: int = 0) -> List[str]:
        """The noun phrases of caption ``k`` of a training input: its ``nouns`` field, set by the
        caption mapper (``ov_seg.data.caption_nouns``: one phrase list per caption, computed with
        the extractor the method's config asks for).

        Args:
            x: the input.
            k: index of the caption in ``x["captions"]``.
            index: its position in the batch (for the message).

        Raises:
            KeyError: the input has no ``nouns`` (not mapped by the caption mapper of this method's
                config).
        """
        nouns = x.get("nouns")
        if nouns is None:
            raise KeyError(
                f"training input {index} (image_id {x.get('image_id')}) has no 'nouns': "
                f"{type(self).__name__} reads the caption nouns that INPUT.DATASET_MAPPER_NAME "
                "caption adds for its config (ov_seg.data.caption_nouns)"
            )
        return list(nouns[k])

    def postprocess(
        self,
        scores: torch.Tensor,
        padded_size: Tuple[int, int],
        image_size: Tuple[int, int],
        x: dict,
    ) -> Dict[str, Any]:
        """Scores of one image → its output size (the one resizing path of every method), within
        the output memory budget.

        Args:
            scores: (K, h, w) at the padded input size or a lower resolution of it (then
                upsampled bilinearly to ``padded_size`` first).
            padded_size: (H', W') of the preprocessed image.
            image_size: (H, W) before padding.
            x: the input (its ``height`` / ``width``, default ``image_size``, is the output size).

        Returns:
            ``{"sem_seg": (K, height, width)}``, or where that exceeds the budget the (height,
            width) label map of the same argmax (``semantic_postprocess``).
        """
        if tuple(scores.shape[-2:]) != tuple(padded_size):
            scores = F.interpolate(
                scores[None], size=tuple(padded_size), mode="bilinear", align_corners=False
            )[0]
        height = int(x.get("height", image_size[0]))
        width = int(x.get("width", image_size[1]))
        return semantic_postprocess(scores, image_size, (height, width), self.output_budget)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[dict], options: Optional[InferenceOptions] = None):
        """Training: the loss dict of ``losses``. Eval: ``inference(batched_inputs, options)``."""
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs, options)

    @abc.abstractmethod
    def encode_inputs(self, batched_inputs: List[dict], timer: Optional[StageTimer] = None) -> list:
        """What ``predict`` scores under any options, one encoding per input (encode once, score
        many); stage times go into ``timer``."""

    @abc.abstractmethod
    def predict(
        self,
        encoded: Sequence[Any],
        options: Optional[InferenceOptions] = None,
        timer: Optional[StageTimer] = None,
    ) -> List[Dict[str, Any]]:
        """Per-input outputs (``sem_seg``, see ``postprocess``) of ``encode_inputs`` encodings under
        ``options`` (default: the config's)."""

    def inference(
        self,
        batched_inputs: List[dict],
        options: Optional[InferenceOptions] = None,
        timer: Optional[StageTimer] = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """``predict(encode_inputs(batched_inputs), options)``: ``[{"sem_seg": (K, height,
        width)}]`` per input. Stage times go into ``timer`` when given."""
        options = self.resolve_options(options)
        for x in batched_inputs:  # a missing vocabulary fails before any encoding
            self.vocabulary(x, options)
        return self.predict(self.encode_inputs(batched_inputs, timer), options, timer)

    @abc.abstractmethod
    def losses(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """Training losses of a batch."""


class PerImageSegmentor(OpenVocabSegmentor):
    """An ``OpenVocabSegmentor`` that encodes each image alone (``encode``) and scores the encoding
    densely against a vocabulary (``score``): PACL, MGCA, MixReorg."""

    @torch.no_grad()
    def encode_inputs(
        self, batched_inputs: List[dict], timer: Optional[StageTimer] = None
    ) -> List[EncodedInput]:
        """``preprocess_image`` and ``encode`` of every input (stage ``encode`` of ``timer``): what
        ``predict`` scores under any options (encode once, score many)."""
        out = []
        for x in batched_inputs:
            image, image_size = self.preprocess_image(x)
            with stage(timer, "encode"):
                encoded = self.encode(image)
            out.append(EncodedInput(x, encoded, tuple(image.shape[-2:]), image_size))
        return out

    @torch.no_grad()
    def predict(
        self,
        encoded: Sequence[EncodedInput],
        options: Optional[InferenceOptions] = None,
        timer: Optional[StageTimer] = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """``[{"sem_seg": (K, height, width)}]`` of encoded inputs under ``options`` (K = the
        input's vocabulary): ``score`` then ``postprocess`` (stages ``score``, ``postprocess``)."""
        options = self.resolve_options(options)
        results = []
        for e in encoded:
            vocabulary = self.vocabulary(e.input, options)
            with stage(timer, "score"):
                scores = self.score(e.encoded, vocabulary, options)
            with stage(timer, "postprocess"):
                results.append(self.postprocess(scores, e.padded_size, e.image_size, e.input))
        return results

    @abc.abstractmethod
    def encode(self, image: torch.Tensor) -> Any:
        """The vocabulary- and options-independent encoding of one preprocessed image (3, H', W')
        (method-specific)."""

    @abc.abstractmethod
    def score(self, encoded: Any, vocabulary: Sequence[str], options: InferenceOptions):
        """(K, h, w) class scores of an ``encode`` output for the K names of ``vocabulary``."""
