"""Reading images without silently decoding broken files.

OpenCV decodes a truncated JPEG without an error (grey rows where the data stops, a libjpeg warning
on stderr) and PIL does too when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set. :func:`read_image`
raises :class:`UnreadableImageError` naming the file for a truncated JPEG (no end-of-image marker
and PIL cannot decode it strictly) and for any file neither library decodes.

:class:`UnreadableImages` is how evaluation loops and the demo skip such images: a warning naming
each, a count at the end, or the first error raised when skipping is off.
"""

import logging
from typing import Callable, List

import cv2
import numpy as np
from detectron2.data import detection_utils as utils
from PIL import ImageFile

__all__ = [
    "UnreadableImageError",
    "UnreadableImages",
    "SkipUnreadableLoader",
    "read_image",
    "skip_unreadable",
]

logger = logging.getLogger(__name__)


class UnreadableImageError(OSError):
    """An image file that cannot be decoded completely; the message starts with the file name."""


def _jpeg_incomplete(data: bytes) -> bool:
    """A JPEG whose data does not end with the end-of-image marker (trailing padding allowed)."""
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9")


def _read_strict_pil(file_name: str, image_format) -> np.ndarray:
    """detectron2's ``read_image`` (PIL) with truncated files refused."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        return utils.read_image(file_name, format=image_format)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def read_image(file_name: str, image_format=None, fast: bool = False) -> np.ndarray:
    """Read an image as detectron2's ``read_image`` does (``image_format`` "RGB", "BGR", "L", ...
    or None), refusing incomplete files.

    Args:
        fast: decode "RGB" / "BGR" with OpenCV (about 3x faster than PIL on small PNGs; JPEG
            pixels may differ from PIL's by the decoder's rounding).

    Raises:
        UnreadableImageError: missing, truncated or undecodable file (the message names it).
    """
    try:
        with open(file_name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImageError(f"{file_name}: cannot read the image ({e})") from e
    suspect = _jpeg_incomplete(data)
    if fast and image_format in ("RGB", "BGR") and not suspect:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is not None:
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image_format == "RGB" else image
    try:
        return _read_strict_pil(file_name, image_format)
    except Exception as e:  # noqa: BLE001 (PIL raises OSError, ValueError, SyntaxError, ...)
        reason = "truncated JPEG (no end-of-image marker)" if suspect else "cannot decode"
        raise UnreadableImageError(f"{file_name}: {reason}: {type(e).__name__}: {e}") from e


class UnreadableImages:
    """Skipped unreadable images of one run: ``skip(error)`` warns (or re-raises when
    ``fatal``), ``report(total)`` logs the count at the end."""

    def __init__(self, fatal: bool = False, what: str = "images"):
        self.fatal = fatal
        self.what = what
        self.skipped: List[str] = []

    def skip(self, error: Exception) -> None:
        """Record ``error`` (an ``UnreadableImageError``); raise it when fatal."""
        if self.fatal:
            raise error
        self.skipped.append(str(error))
        logger.warning("skipped an unreadable image: %s", error)

    def report(self, total: int) -> None:
        """Log how many of ``total`` were skipped (nothing when none)."""
        if self.skipped:
            logger.warning(
                "%d of %d %s skipped as unreadable: %s",
                len(self.skipped),
                total,
                self.what,
                "; ".join(self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else ""),
            )


def skip_unreadable(mapper: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """``mapper`` for a test loader: an image (or ground-truth file) that cannot be read becomes
    ``{"file_name", "unreadable": message}``, which :class:`SkipUnreadableLoader` drops."""

    def mapped(dataset_dict: dict) -> dict:
        try:
            return mapper(dataset_dict)
        except OSError as e:
            name = str(dataset_dict.get("file_name", "?"))
            msg = str(e) if name in str(e) else f"{name}: {type(e).__name__}: {e}"
            return {"file_name": name, "unreadable": msg}

    return mapped


class SkipUnreadableLoader:
    """A test loader (batches of ``skip_unreadable`` outputs) without the unreadable images: each
    is logged as skipped and counted at the end of the pass, or raised when ``fatal``
    (``TEST.FAIL_ON_UNREADABLE_IMAGE``)."""

    def __init__(self, loader, fatal: bool = False):
        self.loader = loader
        self.fatal = fatal
        self.last: UnreadableImages = UnreadableImages(fatal)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.last = UnreadableImages(self.fatal, "test images")
        total = 0
        for batch in self.loader:
            total += len(batch)
            kept = []
            for x in batch:
                if "unreadable" in x:
                    self.last.skip(UnreadableImageError(x["unreadable"]))
                else:
                    kept.append(x)
            if kept:
                yield kept
        self.last.report(total)
