"""Register mask-category pairs mined from captions (``tools/mine_captions.py pairs``) as datasets.

Dataset dicts (the ``mask_category`` mapper's ``pairs`` input; images without a pair are left out)::

    {"file_name", "image_id", "height", "width",
     "pairs": [{"segmentation": COCO RLE, "category": noun, "score": CLIP cosine}, ...]}

Builtin names (``MINED_DATASETS``) point at job folders under ``$DETECTRON2_DATASETS``: mine into
that folder and train ``MaskAdaptedCLIP`` with one config line, e.g. ``DATASETS.TRAIN
("toyworld_mined_train",)``. Registration reads at most the small ``pairs_vocab.json`` of a finished
job (for the ``stuff_classes`` metadata); loading a job that was not mined raises
``FileNotFoundError`` naming the command that writes it. Any other job folder:
``register_mined_pairs(name, "<folder>/pairs.json")``.
"""

import json
import os
from pathlib import Path
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from .register_toyworld import datasets_root

__all__ = [
    "MINED_DATASETS",
    "load_mined_pairs",
    "register_mined_pairs",
    "register_all_mined",
    "mined_command",
]

# name -> (job folder relative to $DETECTRON2_DATASETS, caption source, proposals) for the builtin
# names;
# "gt:<dataset>" proposals are the ground-truth-mask ablation
MINED_DATASETS = {
    "toyworld_mined_train": ("toyworld/mined_train", "toyworld_captions_train", "maskformer"),
    "toyworld_mined_web": ("toyworld/mined_web", "toyworld_captions_web", "maskformer"),
    "toyworld_mined_gt_train": (
        "toyworld/mined_gt_train",
        "toyworld_captions_train",
        "gt:toyworld_panoptic_train",
    ),
    "toyworld_mined_gt_web": (
        "toyworld/mined_gt_web",
        "toyworld_captions_web",
        "gt:toyworld_panoptic_web",
    ),
    "coco_mined_train2017": ("coco/mined_train2017", "coco_2017_captions_train", "maskformer"),
}


def mined_command(folder: str, captions: str, proposals: str) -> str:
    """The two commands that write a mined job folder."""
    if proposals.startswith("gt:"):
        prop = f"--proposals gt --gt-dataset {proposals[3:]}"
    else:
        prop = f"--proposals {proposals} --config-file <config> <weights options>"
    tool = "python tools/mine_captions.py"
    return (
        f"{tool} nouns --captions {captions} --mode chunk --output-dir {folder} && "
        f"{tool} pairs --nouns {folder}/nouns.jsonl {prop} --output-dir {folder}"
    )


def load_mined_pairs(json_file, image_root: Optional[str] = None, hint: str = "") -> List[dict]:
    """Dataset dicts of a ``pairs.json`` (see the module docstring).

    Args:
        json_file: the job's ``pairs.json``.
        image_root: prefix for relative ``file_name`` entries.
        hint: how to create the file (appended to the error).

    Raises:
        FileNotFoundError: no such file.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise FileNotFoundError(f"mined pairs not found: {json_file}. {hint}".strip())
    with open(json_file) as f:
        data = json.load(f)
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(
            {
                "segmentation": ann["segmentation"],
                "category": ann["category"],
                "score": ann["score"],
            }
        )
    out = []
    for im in data["images"]:
        pairs = by_image.get(im["id"])
        if not pairs:
            continue
        file_name = im["file_name"]
        if image_root is not None and not os.path.isabs(file_name):
            file_name = os.path.join(image_root, file_name)
        out.append(
            {
                "file_name": file_name,
                "image_id": im["id"],
                "height": im["height"],
                "width": im["width"],
                "pairs": pairs,
            }
        )
    return out


def register_mined_pairs(
    name: str, json_file, image_root: Optional[str] = None, hint: str = ""
) -> None:
    """Register (or re-register) ``name`` for the pairs in ``json_file``; ``stuff_classes`` = the
    mined nouns (from the ``pairs_vocab.json`` beside it, when the job is finished)."""
    json_file = Path(json_file)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_mined_pairs(json_file, image_root, hint))
    meta = {"json_file": str(json_file), "dataset_root": str(json_file.parent)}
    vocab = json_file.parent / "pairs_vocab.json"
    if vocab.is_file():
        with open(vocab) as f:
            meta["stuff_classes"] = list(json.load(f).get("classes", []))
    MetadataCatalog.get(name).set(**meta)


def register_all_mined(root=None) -> None:
    """Register the builtin names of ``MINED_DATASETS`` under ``root`` (default
    ``$DETECTRON2_DATASETS``)."""
    root = Path(root) if root is not None else datasets_root()
    for name, (folder, captions, proposals) in MINED_DATASETS.items():
        path = root / folder
        hint = f"Mine it: {mined_command(str(path), captions, proposals)}"
        register_mined_pairs(name, path / "pairs.json", hint=hint)


register_all_mined()
