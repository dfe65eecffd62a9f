"""Reference levels for open-vocabulary numbers: what a model that reads only part of a name gets.

On the toy world a name is "colour shape". A model that knows colour and no shape, given perfect
masks, labels every object with a name of the right colour and a shape drawn at random: its mIoU is
what colour alone gives, the level an unseen-class number must clear to show that the model reads
the shape in the name.
"""

from typing import Dict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .open_vocab_sem_seg import sem_seg_metrics

__all__ = ["attribute_only_miou"]


def attribute_only_miou(
    dataset_name: str, attribute: str = "colour", draws: int = 5, seed: int = 0
) -> Dict[str, float]:
    """mIoU (all / seen / unseen, in %) of an oracle that knows the ground-truth segments and only
    ``attribute`` of their class: each segment of a class with that attribute gets a uniformly
    random class sharing it (every name of the vocabulary may be drawn, seen or unseen); other
    segments (stuff) keep their class. Mean over ``draws`` random draws.

    Args:
        dataset_name: a registered panoptic dataset whose metadata has ``class_attributes``
            (``{attribute: (C,) index per contiguous class, -1 = none}``), ``stuff_classes`` and the
            seen / unseen ``*_class_ids``.
    """
    meta = MetadataCatalog.get(dataset_name)
    values = np.asarray(meta.class_attributes[attribute])
    names = list(meta.stuff_classes)
    c = len(names)
    rng = np.random.default_rng(seed)
    conf = np.zeros((draws, c + 1, c + 1), np.int64)
    for d in DatasetCatalog.get(dataset_name):
        rgb = np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB"), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        for s in d["segments_info"]:
            k = s["category_id"]  # contiguous (detectron2's loaded panoptic dicts)
            area = int((ids == s["id"]).sum())
            if values[k] < 0:
                conf[:, k, k] += area
                continue
            same = np.flatnonzero(values == values[k])
            for t in range(draws):
                conf[t, same[rng.integers(len(same))], k] += area
    out = {"mIoU": 0.0, "mIoU-seen": 0.0, "mIoU-unseen": 0.0}
    for t in range(draws):
        m = sem_seg_metrics(conf[t], names, meta.seen_class_ids, meta.unseen_class_ids)
        for key in out:
            out[key] += m[key] / draws
    return out
