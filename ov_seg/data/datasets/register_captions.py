"""Register generic image-caption files (OpenCLIP's CSV / TSV layout) as caption datasets.

A file with a header row naming an image-path column (OpenCLIP: ``filepath``) and a caption column
(OpenCLIP: ``title``), tab-separated by default (``--csv-separator "\\t"`` in OpenCLIP)::

    filepath	title
    images/000001.jpg	a dog running on the beach

Rows with the same image path become one dataset dict with several ``captions`` (the layout of
``toyworld_captions_*`` and ``coco_2017_captions_*``), usable with ``INPUT.DATASET_MAPPER_NAME
caption``.
"""

import csv
import os
from collections import OrderedDict
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["register_caption_csv", "load_caption_csv"]


def load_caption_csv(
    csv_path: str,
    image_root: str = "",
    separator: str = "\t",
    image_key: str = "filepath",
    caption_key: str = "title",
) -> List[Dict]:
    """Caption dataset dicts (``file_name``, ``image_id``, ``captions``) from a CSV / TSV file.

    Relative image paths are joined to ``image_root``. Empty captions are skipped.

    Raises:
        FileNotFoundError: ``csv_path`` missing. KeyError: a named column is absent from the header.
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"caption file not found: {csv_path}")
    by_image: "OrderedDict[str, List[str]]" = OrderedDict()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        header = reader.fieldnames or []
        for key in (image_key, caption_key):
            if key not in header:
                raise KeyError(
                    f"{csv_path}: no column {key!r} in the header {header} "
                    f"(separator {separator!r})"
                )
        for row in reader:
            caption = (row[caption_key] or "").strip()
            if caption:
                by_image.setdefault(row[image_key], []).append(caption)
    return [
        {"file_name": os.path.join(image_root, path), "image_id": i, "captions": caps}
        for i, (path, caps) in enumerate(by_image.items())
    ]


def register_caption_csv(
    name: str,
    csv_path: str,
    image_root: str = "",
    separator: str = "\t",
    image_key: str = "filepath",
    caption_key: str = "title",
    metadata: Optional[Dict] = None,
) -> None:
    """Register ``name`` as a caption dataset read lazily from ``csv_path`` (``evaluator_type``
    "caption").

    Args:
        name: dataset name for ``DATASETS.TRAIN``.
        csv_path: the CSV / TSV file.
        image_root: directory that relative image paths are relative to.
        separator: column separator (OpenCLIP default: tab).
        image_key, caption_key: column names (OpenCLIP defaults: "filepath", "title").
        metadata: extra metadata (e.g. ``stuff_classes``).
    """
    DatasetCatalog.register(
        name, lambda: load_caption_csv(csv_path, image_root, separator, image_key, caption_key)
    )
    MetadataCatalog.get(name).set(
        evaluator_type="caption", image_root=image_root, csv_path=csv_path, **(metadata or {})
    )
