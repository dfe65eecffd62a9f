"""Caption readers: COCO captions JSON, CSV / TSV tables, JSON lines and registered caption
datasets.

Every reader returns a ``CaptionSet``: images in order of first appearance, each with its captions
in file order (whitespace runs collapsed to one space), plus the problems found (malformed lines /
entries as ``file:line: reason``). Malformed entries are skipped, or raise ``MalformedCaptionError``
on the first one with ``strict=True``.

Files are read as UTF-8 with or without a BOM by default; another ``encoding`` (e.g. "latin-1") is
an option, and a file that does not decode is a ``MalformedCaptionError`` naming the file, the line
and the byte. Image keys must be strings or integers (a list or an object is a malformed line).
Captions that are not English (``is_english``: the extractor is an English spaCy model) are skipped
with ``english_only=True`` (the default) and counted under "language" in ``CaptionSet.skipped``.
"""

import csv
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

__all__ = [
    "CaptionImage",
    "CaptionSet",
    "MalformedCaptionError",
    "CAPTION_FORMATS",
    "load_captions",
    "is_english",
    "read_coco_captions",
    "read_caption_table",
    "read_caption_jsonl",
    "read_dataset_captions",
]

# Header names recognised in CSV / TSV / JSONL inputs (first match wins, case-insensitive).
IMAGE_KEYS = ("image", "filepath", "file_name", "filename", "image_id", "image_name", "path", "url")
CAPTION_KEYS = ("caption", "title", "text", "sentence", "raw")
DEFAULT_ENCODING = "utf-8-sig"  # UTF-8, a BOM before the header allowed

# Function words for ``is_english``: frequent English ones, and frequent ones of the languages of
# other caption sets (Spanish, French, German, Italian, Portuguese, Swedish) that English lacks.
ENGLISH_WORDS = frozenset(
    "a an the of in on at to with and or is are was were be his her their its this that these "
    "those some two three four five several many near next by from for into onto over under "
    "while who there has have it he she they one".split()
)
OTHER_LANGUAGE_WORDS = frozenset(
    "de la el los las del le les des du et un une ein eine einer der die das und mit auf im ist "
    "sind il gli di che per sul sulla con en y una uno och på är ett zwei drei vor von zu den dem "
    "beim dans sur avec deux trois est sont au aux pour par dos tres por para su sus al es está "
    "están due tre nel nella sono alla della um uma dois na em".split()
)


def is_english(text: str) -> bool:
    """A cheap test that a caption is English: most letters are Latin, and it does not hold more
    function words of other languages than English ones (at least two, or one with accented
    letters). 0 of the 5000 Flickr8k captions are rejected; "Un perro corre en la playa",
    "Zwei Kinder spielen im Park" and non-Latin scripts are. A Latin-script caption without any
    of the listed function words passes (a limit, not a guarantee)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return True
    latin = sum(1 for c in letters if unicodedata.name(c, "").startswith("LATIN"))
    if latin < 0.5 * len(letters):
        return False
    words = re.findall(r"[^\W\d_]+", text.lower())
    english = sum(w in ENGLISH_WORDS for w in words)
    other = sum(w in OTHER_LANGUAGE_WORDS for w in words)
    accented = any(ord(c) > 127 for c in letters)
    return not (other > english and (other >= 2 or accented))


def read_text(path, encoding: str = DEFAULT_ENCODING) -> str:
    """The text of ``path`` in ``encoding``.

    Raises:
        MalformedCaptionError: the file does not decode (``file:line``, the byte, what to pass).
    """
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MalformedCaptionError(
            f"{path}:{line}: not valid {encoding} text (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); pass the file's encoding, e.g. --encoding latin-1"
        ) from None
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} for {path}") from None


def _image_key_problem(value) -> Optional[str]:
    """Why ``value`` cannot identify an image (None when it can: a string or an integer)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"image key must be a string or an integer, got {type(value).__name__}"
    return None


class MalformedCaptionError(ValueError):
    """A malformed caption entry in strict mode; the message starts with ``file:line``."""


@dataclass
class CaptionImage:
    """One image and its captions."""

    image_id: Union[int, str]
    file_name: str
    captions: List[str] = field(default_factory=list)
    height: Optional[int] = None
    width: Optional[int] = None

    def to_dict(self) -> dict:
        d = {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "captions": list(self.captions),
        }
        if self.height is not None and self.width is not None:
            d.update(height=self.height, width=self.width)
        return d


@dataclass
class CaptionSet:
    """Images with captions read from ``source``; ``problems`` lists the skipped entries and
    ``skipped`` counts them by reason ("malformed", "language")."""

    source: str
    images: List[CaptionImage]
    problems: List[str] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)

    @property
    def num_captions(self) -> int:
        return sum(len(im.captions) for im in self.images)


class _Collector:
    """Groups (image, caption) rows by image in order of first appearance; records problems."""

    def __init__(self, source: str, strict: bool, english_only: bool = True):
        self.source = source
        self.strict = strict
        self.english_only = english_only
        self.images: Dict[Union[int, str], CaptionImage] = {}
        self.problems: List[str] = []
        self.skipped: Counter = Counter()

    def problem(self, where, reason: str, kind: str = "malformed") -> None:
        msg = f"{self.source}:{where}: {reason}"
        if self.strict and kind == "malformed":
            raise MalformedCaptionError(msg)
        self.problems.append(msg)
        self.skipped[kind] += 1

    def add(self, image_id, file_name: str, caption: str, where, height=None, width=None) -> None:
        if not isinstance(caption, str) or not caption.strip():
            self.problem(where, "empty caption")
            return
        bad_key = _image_key_problem(image_id)
        if bad_key:
            self.problem(where, bad_key)
            return
        if self.english_only and not is_english(caption):
            self.problem(where, f"not English, skipped: {caption[:60]!r}", kind="language")
            return
        im = self.images.get(image_id)
        if im is None:
            im = self.images[image_id] = CaptionImage(image_id, file_name, [], height, width)
        im.captions.append(" ".join(caption.split()))

    def result(self) -> CaptionSet:
        return CaptionSet(
            self.source, list(self.images.values()), self.problems, dict(self.skipped)
        )


def _resolve(image_root: Optional[str], name: str) -> str:
    return name if image_root is None or os.path.isabs(name) else os.path.join(image_root, name)


def _default_image_root(path: Path) -> str:
    """``<caption file dir>/images`` when it exists, else the caption file's directory."""
    parent = Path(os.path.abspath(path)).parent
    images = parent / "images"
    return str(images if images.is_dir() else parent)


def read_coco_captions(
    path,
    image_root: Optional[str] = None,
    strict: bool = False,
    english_only: bool = True,
    encoding: str = DEFAULT_ENCODING,
) -> CaptionSet:
    """A COCO captions file (``captions_train2017.json`` layout: ``images`` with
    ``id``/``file_name``/ ``height``/``width``, ``annotations`` with ``image_id``/``caption``).

    Problems are located as ``file:annotations[i]`` (COCO files are one JSON document). Images
    without a caption are not returned.

    Raises:
        MalformedCaptionError: invalid JSON or missing top-level keys (always), a malformed entry
        (strict).
    """
    path = Path(path)
    try:
        data = json.loads(read_text(path, encoding))
    except json.JSONDecodeError as e:
        raise MalformedCaptionError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise MalformedCaptionError(
            f"{path}:1: not a COCO captions file (needs 'images' and 'annotations')"
        )
    root = image_root if image_root is not None else _default_image_root(path)
    col = _Collector(str(path), strict, english_only)
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            col.problem(f"images[{i}]", "image entry without 'id' / 'file_name'")
            continue
        if _image_key_problem(im["id"]):
            col.problem(f"images[{i}]", _image_key_problem(im["id"]))
            continue
        images[im["id"]] = im
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            col.problem(where, "annotation without 'image_id' / 'caption'")
            continue
        if _image_key_problem(ann["image_id"]):
            col.problem(where, _image_key_problem(ann["image_id"]))
            continue
        im = images.get(ann["image_id"])
        if im is None:
            col.problem(where, f"image_id {ann['image_id']!r} is not in 'images'")
            continue
        col.add(
            im["id"],
            _resolve(root, im["file_name"]),
            ann["caption"],
            where,
            im.get("height"),
            im.get("width"),
        )
    return col.result()


def _pick(
    names: Sequence[str], wanted: Optional[Union[str, int]], keys: Sequence[str], what: str, path
):
    if isinstance(wanted, int):
        return wanted
    lower = [n.strip().lower() for n in names]
    for key in [wanted] if wanted else keys:
        if key.lower() in lower:
            return lower.index(key.lower())
    raise MalformedCaptionError(
        f"{path}:1: no {what} column: header {list(names)}; expected one of {list(keys)} "
        f"(or pass the column name / index explicitly)"
    )


def read_caption_table(
    path,
    image_root: Optional[str] = None,
    strict: bool = False,
    delimiter: Optional[str] = None,
    image_column: Optional[Union[str, int]] = None,
    caption_column: Optional[Union[str, int]] = None,
    header: Optional[bool] = None,
    encoding: str = DEFAULT_ENCODING,
    english_only: bool = True,
) -> CaptionSet:
    """A CSV / TSV table of (image, caption) rows, one per line: Flickr8k ``image,caption``,
    OpenCLIP / CC3M ``filepath<TAB>title``.

    Args:
        path: the table.
        image_root: folder image names are relative to (default: ``<dir>/images`` if present, else
        ``<dir>``).
        strict: raise on the first malformed line instead of skipping it.
        delimiter: "," or "\\t" (default: tab for ``.tsv``, comma otherwise).
        image_column, caption_column: header names or 0-based indices (default: the first header
        name in
            ``IMAGE_KEYS`` / ``CAPTION_KEYS``).
        header: whether the first line is a header (default: when it names a caption column). A
        table
            without a header needs integer ``image_column`` and ``caption_column``.
        encoding: the file's text encoding (default: UTF-8, BOM allowed).
        english_only: skip captions that are not English (``is_english``).

    Raises:
        MalformedCaptionError: no usable columns (always); a malformed line (strict): wrong number
        of
            fields, empty image or caption, unparsable quoting.
    """
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    root = image_root if image_root is not None else _default_image_root(path)
    col = _Collector(str(path), strict, english_only)
    lines = read_text(path, encoding).splitlines()
    if not lines:
        return col.result()

    def parse(line: str) -> List[str]:
        return next(csv.reader([line], delimiter=delimiter, strict=True))

    first = parse(lines[0])
    if header is None:
        header = any(c.strip().lower() in CAPTION_KEYS for c in first)
    if header:
        ncols = len(first)
        i_img = _pick(first, image_column, IMAGE_KEYS, "image", path)
        i_cap = _pick(first, caption_column, CAPTION_KEYS, "caption", path)
        start = 1
    else:
        if not isinstance(image_column, int) or not isinstance(caption_column, int):
            raise MalformedCaptionError(
                f"{path}:1: no header naming a caption column ({list(CAPTION_KEYS)}); pass integer "
                "image_column and caption_column (e.g. CC3M's raw TSV: caption_column=0, "
                "image_column=1)"
            )
        ncols, i_img, i_cap, start = len(first), image_column, caption_column, 0
    for lineno in range(start + 1, len(lines) + 1):
        line = lines[lineno - 1]
        if not line.strip():
            continue
        try:
            row = parse(line)
        except csv.Error as e:
            col.problem(lineno, f"unparsable line ({e})")
            continue
        if len(row) != ncols:
            col.problem(lineno, f"expected {ncols} fields, got {len(row)}")
            continue
        image = row[i_img].strip()
        if not image:
            col.problem(lineno, "empty image name")
            continue
        col.add(image, _resolve(root, image), row[i_cap], lineno)
    return col.result()


def read_caption_jsonl(
    path,
    image_root: Optional[str] = None,
    strict: bool = False,
    encoding: str = DEFAULT_ENCODING,
    english_only: bool = True,
    **_unused,
) -> CaptionSet:
    """JSON lines, one object per line with an image key (``IMAGE_KEYS``) and a caption key
    (``CAPTION_KEYS``, a string) or ``captions`` (a list of strings); optional ``height`` /
    ``width``.

    Raises:
        MalformedCaptionError: a malformed line (strict).
    """
    path = Path(path)
    root = image_root if image_root is not None else _default_image_root(path)
    col = _Collector(str(path), strict, english_only)
    for lineno, line in enumerate(read_text(path, encoding).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            col.problem(lineno, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            col.problem(lineno, "not a JSON object")
            continue
        image = next((obj[k] for k in IMAGE_KEYS if k in obj), None)
        caps = obj.get("captions")
        if caps is None:
            cap = next((obj[k] for k in CAPTION_KEYS if k in obj), None)
            caps = None if cap is None else [cap]
        if image is None or image == "" or not isinstance(caps, list):
            col.problem(lineno, "needs an image key and a caption (or a 'captions' list)")
            continue
        if _image_key_problem(image):
            col.problem(lineno, _image_key_problem(image))
            continue
        file_name = obj.get("file_name", image)
        for cap in caps:
            col.add(
                image,
                _resolve(root, str(file_name)),
                cap,
                lineno,
                obj.get("height"),
                obj.get("width"),
            )
    return col.result()


def read_dataset_captions(
    dataset_name: str, strict: bool = False, english_only: bool = True, **_unused
) -> CaptionSet:
    """A registered detectron2 caption dataset (dicts with ``image_id``, ``file_name``,
    ``captions``; e.g. ``toyworld_captions_web``).

    Raises:
        KeyError: the dataset is not registered. MalformedCaptionError: a dict without captions
        (strict).
    """
    from detectron2.data import DatasetCatalog

    dicts = DatasetCatalog.get(dataset_name)
    col = _Collector(dataset_name, strict, english_only)
    for i, d in enumerate(dicts):
        caps = d.get("captions")
        if not isinstance(caps, list) or "image_id" not in d or "file_name" not in d:
            col.problem(f"[{i}]", "dataset dict without 'image_id' / 'file_name' / 'captions' list")
            continue
        for cap in caps:
            col.add(d["image_id"], d["file_name"], cap, f"[{i}]", d.get("height"), d.get("width"))
    return col.result()


# format name -> reader(path_or_name, image_root=..., strict=..., **options)
CAPTION_FORMATS: Dict[str, Callable[..., CaptionSet]] = {
    "coco": read_coco_captions,
    "csv": read_caption_table,
    "tsv": lambda path, **kw: read_caption_table(path, **{"delimiter": "\t", **kw}),
    "jsonl": read_caption_jsonl,
    "dataset": read_dataset_captions,
}
_SUFFIX_FORMATS = {".json": "coco", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


def load_captions(source: str, fmt: str = "auto", strict: bool = False, **options) -> CaptionSet:
    """Read captions from a file or a registered dataset.

    Args:
        source: a file path, or a registered detectron2 caption dataset name.
        fmt: one of ``CAPTION_FORMATS`` or "auto" (a registered dataset name, else by file suffix).
        strict: raise on the first malformed entry.
        options: passed to the reader (``image_root``, ``delimiter``, ``image_column``, ...).

    Raises:
        FileNotFoundError: ``source`` is neither a file nor a registered dataset.
        KeyError: unknown ``fmt``. MalformedCaptionError: see the readers.
    """
    if fmt == "auto":
        from detectron2.data import DatasetCatalog

        if source in DatasetCatalog.list() and not os.path.exists(source):
            fmt = "dataset"
        else:
            fmt = _SUFFIX_FORMATS.get(Path(source).suffix.lower(), "")
            if not fmt:
                raise KeyError(
                    f"cannot tell the caption format of {source!r} from its suffix; pass one of "
                    f"{sorted(CAPTION_FORMATS)}"
                )
    if fmt not in CAPTION_FORMATS:
        raise KeyError(f"unknown caption format {fmt!r}; known: {sorted(CAPTION_FORMATS)}")
    if fmt != "dataset" and not os.path.isfile(source):
        raise FileNotFoundError(
            f"caption file not found: {source} (nor a registered caption dataset)"
        )
    return CAPTION_FORMATS[fmt](source, strict=strict, **options)
