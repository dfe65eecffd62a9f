"""Register Conceptual Captions 3M (CC3M) as a caption dataset (MGCA's training data).

Expected layout under ``$DETECTRON2_DATASETS/cc3m`` (OpenCLIP's TSV convention, e.g. as written by
img2dataset plus a two-column index)::

    cc3m/
      cc3m_train.tsv      header "filepath<TAB>title"; one row per image-caption pair
      cc3m_val.tsv
      images/...          the image files, paths in the TSV relative to cc3m/

Names: ``cc3m_train``, ``cc3m_val`` (dicts with ``file_name``, ``image_id``, ``captions``; use
``INPUT.DATASET_MAPPER_NAME caption``). Registration reads no file.
"""

import os

from .register_captions import register_caption_csv

__all__ = ["register_cc3m"]

CC3M_SPLITS = ("train", "val")


def register_cc3m(root: str = "") -> None:
    """Register ``cc3m_{train,val}`` read from ``<root>/cc3m_{split}.tsv`` (default root:
    ``$DETECTRON2_DATASETS/cc3m``)."""
    root = root or os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "cc3m")
    for split in CC3M_SPLITS:
        register_caption_csv(
            f"cc3m_{split}", os.path.join(root, f"cc3m_{split}.tsv"), image_root=root
        )


register_cc3m()
