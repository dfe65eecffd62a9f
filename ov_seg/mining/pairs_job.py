"""Stage 2 job: nouns per image + mask proposals + CLIP -> mask-category pairs (COCO-style JSON).

For each image: proposals (a trained ``ProposalMaskFormer`` / precomputed masks through
``ov_seg.modeling.proposal_sources``, or the ground-truth segments of a dataset for the ablation);
masked crops of every valid proposal through CLIP (``MaskedCropClassifier``); cosine score of every
noun against every crop; each noun takes its best proposal (``assign_nouns``; optional minimum
score). Outputs in the job folder:

- ``pairs.json``: ``images`` (id, file_name, height, width), ``annotations`` (id, image_id,
  category_id, category, score, segmentation (COCO RLE, counts as str), area, bbox, proposal;
  ``proposal_category`` with ground-truth proposals), ``categories`` (id, name, count; names
  sorted), ``info`` (job parameters);
- ``pairs_vocab.json``: pair counts per noun, ``classes`` (the sorted names: the dataset's
  vocabulary);
- ``crops/`` + ``crops.tsv`` with ``--crops``: lossless PNG masked crops (background = the CLIP
  pixel mean) and an OpenCLIP-style table (``filepath<TAB>title``, title = the noun);
- ``pairs_summary.json``: images, pairs, unique nouns, nouns per image, elapsed, images/s.
"""

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ov_seg.data.image_io import read_image

from .assign import assign_nouns, cosine_scores
from .job import ChunkedJob, JobSpec, atomic_write_json, atomic_write_text, merge_parts

__all__ = [
    "MiningProposals",
    "GroundTruthProposals",
    "ModelProposals",
    "NounEmbeddings",
    "mine_image_pairs",
    "run_pairs_job",
    "finalize_pairs",
    "read_nouns_file",
    "image_nouns",
]

logger = logging.getLogger(__name__)

# what a finished job leaves in its folder (deleted when --overwrite replaces another job)
PAIR_OUTPUTS = ("pairs.json", "pairs_vocab.json", "pairs_summary.json", "crops.tsv", "crops")


def read_nouns_file(path) -> List[dict]:
    """The records of a stage-1 ``nouns.jsonl``.

    Raises:
        ValueError: a line is not a record with ``image_id``, ``file_name`` and ``nouns``
        (file:line).
    """
    import json

    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not {"image_id", "file_name", "nouns"} <= set(rec):
                raise ValueError(f"{path}:{lineno}: needs 'image_id', 'file_name' and 'nouns'")
            records.append(rec)
    return records


def image_nouns(record: dict, captions_per_image: int = 1) -> List[str]:
    """Unique nouns of an image's first ``captions_per_image`` captions (0 = all), in order."""
    caps = record["nouns"] if captions_per_image <= 0 else record["nouns"][:captions_per_image]
    return list(dict.fromkeys(p for phrases in caps for p in phrases))


class MiningProposals(NamedTuple):
    """The proposals of one image for mining."""

    masks: torch.Tensor  # (Q, H, W) float probabilities or bool, at the image's size
    objectness: Optional[torch.Tensor] = None  # (Q,) in [0, 1] (a proposal generator's scores)
    names: Optional[List[str]] = None  # class names of ground-truth segments (the ablation)


class GroundTruthProposals:
    """Ground-truth segments of a registered panoptic or semantic dataset as the proposals (the
    ablation: mining with perfect masks). Images are matched by ``image_id``.

    Args:
        dataset_name: e.g. ``toyworld_panoptic_web`` (one proposal per segment) or a ``*_sem_seg_*``
        dataset
            (one per category present).
    """

    def __init__(self, dataset_name: str):
        from detectron2.data import DatasetCatalog, MetadataCatalog

        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.by_id = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)}
        self.ignore_label = meta.get("ignore_label", 255)
        self.classes = list(
            meta.get("stuff_classes", None) or meta.get("thing_classes", None) or []
        )

    def __call__(self, records: Sequence[dict], images: Sequence[np.ndarray]):
        """Per image ``MiningProposals(masks (Q, H, W) bool, None, names of the Q segments)``."""
        from ov_seg.data.dataset_mappers.panoptic import read_segments

        out = []
        for rec in records:
            d = self.by_id.get(rec["image_id"])
            if d is None:
                raise KeyError(
                    f"image_id {rec['image_id']!r} is not in the dataset {self.dataset_name!r}"
                )
            index, classes = read_segments(d, self.ignore_label)
            index = torch.from_numpy(index.astype(np.int64))
            masks = index.unsqueeze(0) == torch.arange(len(classes)).view(-1, 1, 1)
            names = [self.classes[c] if 0 <= c < len(self.classes) else str(c) for c in classes]
            out.append(MiningProposals(masks, None, names))
        return out


class ModelProposals:
    """Proposals of a proposal source of the two-stage model (``MODEL.TWO_STAGE.PROPOSAL_SOURCE``:
    "maskformer" with ``MODEL.TWO_STAGE.PROPOSAL_WEIGHTS``, or "precomputed").

    Images are resized as at test time (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``); the mask
    probabilities are resized back to the original image.

    The source is built by the caller (``ov_seg.modeling.proposal_sources.build_proposal_source``):
    mining does not import the models.

    Args:
        cfg: a config with the proposal generator (e.g. ``configs/toyworld/two_stage_R18.yaml``).
        source: the proposal source built from ``cfg``; moved to ``MODEL.DEVICE``, eval mode.
        max_proposals: keep the proposals with the highest objectness (0 = all).
    """

    def __init__(self, cfg, source, max_proposals: int = 0):
        from detectron2.data import transforms as T

        self.source = source.to(cfg.MODEL.DEVICE).eval()
        self.input_format = cfg.INPUT.FORMAT
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.max_proposals = int(max_proposals)

    def __call__(self, records: Sequence[dict], images: Sequence[np.ndarray]):
        """Per image ``MiningProposals(masks (Q, H, W) probabilities, objectness (Q,))``."""
        inputs = []
        for rec, image in zip(records, images):
            img = image[:, :, ::-1] if self.input_format == "BGR" else image
            img = self.resize.get_transform(img).apply_image(img)
            inputs.append(
                {
                    "image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))),
                    "file_name": rec["file_name"],
                    "height": image.shape[0],
                    "width": image.shape[1],
                }
            )
        out = []
        for image, p in zip(images, self.source(inputs, ["object"])):
            masks, scores = p.masks.float(), p.scores.float()
            if self.max_proposals > 0 and masks.shape[0] > self.max_proposals:
                keep = scores.topk(self.max_proposals).indices.sort().values
                masks, scores = masks[keep], scores[keep]
            if tuple(masks.shape[-2:]) != tuple(image.shape[:2]):
                masks = F.interpolate(
                    masks[None], size=image.shape[:2], mode="bilinear", align_corners=False
                )[0]
            out.append(MiningProposals(masks.cpu(), scores.cpu()))
        return out


class NounEmbeddings:
    """Prompt-ensembled text embeddings of nouns, cached per noun (through a ``TextClassifier``).

    Each noun is encoded alone (its templates in one batch): batching nouns together made an
    embedding depend, in its last bits, on which nouns were new in the same call, so on the chunk
    size and the shard, and near-tied pairs flipped.
    """

    def __init__(self, text_classifier):
        self.text_classifier = text_classifier
        self._cache: Dict[str, torch.Tensor] = {}

    def __call__(self, nouns: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of ``nouns``."""
        for n in dict.fromkeys(nouns):
            if n not in self._cache:
                self._cache[n] = self.text_classifier.class_embeddings((n,))[0].cpu()
        return torch.stack([self._cache[n] for n in nouns])


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_crop(
    path: Path, image: np.ndarray, mask: np.ndarray, fill: Tuple[int, int, int]
) -> None:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = image[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = fill
    ok, buf = cv2.imencode(".png", crop[:, :, ::-1])
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


@torch.no_grad()
def mine_image_pairs(
    records: Sequence[dict],
    images: Sequence[np.ndarray],
    proposals: Sequence[MiningProposals],
    crop_classifier,
    noun_embeddings: NounEmbeddings,
    captions_per_image: int = 1,
    min_score: Optional[float] = None,
    one_to_one: bool = False,
    objectness_weight: float = 0.0,
) -> List[dict]:
    """Mask-category pairs of a batch of images (one CLIP pass over all their crops).

    Args:
        records: stage-1 records (``image_id``, ``file_name``, ``nouns``).
        images: (H, W, 3) uint8 RGB images.
        proposals: per image ``MiningProposals`` (masks, optional objectness, optional names).
        crop_classifier: a ``MaskedCropClassifier`` (its ``mask_thr`` binarises the proposals).
        noun_embeddings: cached text embeddings.
        captions_per_image, min_score, one_to_one: see ``image_nouns`` / ``assign_nouns``
            (``min_score`` applies to the cosine).
        objectness_weight: β > 0 selects by cos + β · log(objectness) (proposals with objectness
            only; not in OVSeg, which uses the cosine alone: β = 0).

    Returns:
        per image ``{"image_id", "file_name", "height", "width", "nouns", "num_proposals",
        "num_valid", "pairs": [{"category", "score" (cosine), "proposal", "segmentation", "area",
        "bbox"[, "objectness"][, "proposal_category"]}]}`` with pairs in noun order (kept pairs
        only).
    """
    thr = crop_classifier.mask_thr
    binary = [p.masks if p.masks.dtype == torch.bool else p.masks > thr for p in proposals]
    tensors = [
        torch.as_tensor(np.ascontiguousarray(im.transpose(2, 0, 1))).float() for im in images
    ]
    emb, valid = crop_classifier.embed(tensors, binary)
    emb = emb.cpu()
    out, start = [], 0
    for rec, image, prop, bin_masks, v in zip(records, images, proposals, binary, valid):
        v = v.cpu()
        n_valid = int(v.sum())
        crops = emb[start : start + n_valid]
        start += n_valid
        nouns = image_nouns(rec, captions_per_image)
        result = {
            "image_id": rec["image_id"],
            "file_name": rec["file_name"],
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "nouns": nouns,
            "num_proposals": int(prop.masks.shape[0]),
            "num_valid": n_valid,
            "pairs": [],
        }
        if nouns and n_valid:
            cosine = cosine_scores(noun_embeddings(nouns), crops, v)
            select = cosine
            if objectness_weight > 0 and prop.objectness is not None:
                prior = prop.objectness.float().clamp_min(1e-6).log()
                select = cosine + objectness_weight * prior.unsqueeze(0)
            a = assign_nouns(select, v, one_to_one=one_to_one)
            bin_np = bin_masks.cpu().numpy()
            for j, noun in enumerate(nouns):
                q = int(a.proposal[j])
                if q < 0 or (min_score is not None and float(cosine[j, q]) < min_score):
                    continue
                rle = _rle(bin_np[q])
                pair = {
                    "category": noun,
                    "score": round(float(cosine[j, q]), 6),
                    "proposal": q,
                    "segmentation": rle,
                    "area": int(mask_util.area(rle)),
                    "bbox": [round(float(x), 2) for x in mask_util.toBbox(rle)],
                }
                if prop.objectness is not None:
                    pair["objectness"] = round(float(prop.objectness[q]), 6)
                if prop.names is not None:
                    pair["proposal_category"] = prop.names[q]
                result["pairs"].append(pair)
        out.append(result)
    return out


def _file_digest(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_pairs_job(
    nouns_file,
    proposal_fn,
    crop_classifier,
    output_dir,
    params: dict,
    captions_per_image: int = 1,
    min_score: Optional[float] = None,
    one_to_one: bool = False,
    objectness_weight: float = 0.0,
    crops: bool = False,
    batch_size: int = 16,
    chunk_size: int = 500,
    shard: Tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
    max_chunks: Optional[int] = None,
) -> dict:
    """Mine the pairs of every image of a stage-1 ``nouns.jsonl`` (resumable, shardable; finalized
    when the folder holds every chunk).

    Args:
        nouns_file: stage-1 output.
        proposal_fn: ``GroundTruthProposals`` / ``ModelProposals`` (or any callable (records,
        images) -> per
            image (masks, names or None)).
        crop_classifier: ``MaskedCropClassifier`` (eval mode).
        output_dir: job folder.
        params: what else determines the output (proposal source, CLIP weights, ...): part of
        ``pairs_job.json``.
        captions_per_image: nouns of the first this many captions (OVSeg: 1; 0 = all).
        min_score: minimum cosine score of a kept pair.
        one_to_one: no two nouns of an image share a proposal.
        objectness_weight: β of ``mine_image_pairs`` (0: OVSeg's cosine-only choice).
        crops: also write PNG crops + ``crops.tsv``.
        batch_size: images per CLIP forward (the pairs may differ in near ties between batch
            sizes: float rounding; it is part of the job's parameters).
        chunk_size: images per part file, rounded up to a multiple of ``batch_size``; the pairs
            do not depend on it, nor on the shards.
        shard, overwrite, progress, max_chunks: see ``run_nouns_job``.

    Returns:
        the summary (written to ``pairs_summary.json`` when the job is complete).
    """
    start_t = time.perf_counter()
    records = read_nouns_file(nouns_file)
    params = {
        **params,
        "captions_per_image": int(captions_per_image),
        "min_score": min_score,
        "one_to_one": bool(one_to_one),
        "objectness_weight": float(objectness_weight),
        "crops": bool(crops),
        "batch_size": int(batch_size),
        "mask_thr": float(crop_classifier.mask_thr),
    }
    if chunk_size % batch_size:
        # batches on one grid of batch_size images whatever the chunking: a batched forward's
        # rounding depends on its other images, so a batch cut by a chunk boundary changed pairs
        aligned = -(-int(chunk_size) // int(batch_size)) * int(batch_size)
        logger.info(
            "chunk size %d rounded up to %d, a multiple of the batch size %d (the pairs do not "
            "depend on the chunk size)",
            chunk_size,
            aligned,
            batch_size,
        )
        chunk_size = aligned
    spec = JobSpec("pairs", params, _file_digest(nouns_file), len(records), int(chunk_size))
    job = ChunkedJob(output_dir, spec, shard=shard, overwrite=overwrite, outputs=PAIR_OUTPUTS)
    pending = job.pending()
    if max_chunks is not None:
        pending = pending[: max(0, int(max_chunks))]
    embeddings = NounEmbeddings(crop_classifier.text_classifier)
    fill = tuple(int(round(c)) for c in crop_classifier.pixel_mean)
    bar = tqdm(
        total=sum(len(job.chunk_range(k)) for k in pending),
        unit="img",
        desc=f"pairs {Path(output_dir).name}",
        disable=not progress,
        mininterval=1.0,
        smoothing=0.1,
    )
    n_images = 0
    for k in pending:
        idx = list(job.chunk_range(k))
        results = []
        for b in range(0, len(idx), batch_size):
            batch = [records[i] for i in idx[b : b + batch_size]]
            images = [read_image(r["file_name"], "RGB") for r in batch]
            props = proposal_fn(batch, images)
            mined = mine_image_pairs(
                batch,
                images,
                props,
                crop_classifier,
                embeddings,
                captions_per_image,
                min_score,
                one_to_one,
                objectness_weight,
            )
            if crops:
                for i, (res, image) in enumerate(zip(mined, images)):
                    for j, pair in enumerate(res["pairs"]):
                        rel = f"crops/{k:06d}/{idx[b + i]:08d}_{j:02d}.png"
                        mask = mask_util.decode(pair["segmentation"]).astype(bool)
                        _write_crop(Path(output_dir) / rel, image, mask, fill)
                        pair["crop"] = rel
            results.extend(mined)
            bar.update(len(batch))
        job.write_part(k, results)
        n_images += len(idx)
    bar.close()
    elapsed = time.perf_counter() - start_t
    summary = {"complete": job.complete(), "chunks_run": len(pending), "images_run": n_images}
    if summary["complete"]:
        summary.update(finalize_pairs([output_dir], output_dir))
    summary.update(
        elapsed_s=round(elapsed, 2), images_per_s=round(n_images / max(elapsed, 1e-9), 2)
    )
    if summary["complete"]:
        atomic_write_json(Path(output_dir) / "pairs_summary.json", summary, indent=1)
    return summary


def finalize_pairs(folders: Sequence, output_dir) -> dict:
    """Join the parts of ``folders`` (one job, possibly sharded) into ``pairs.json``,
    ``pairs_vocab.json`` and (with crops) ``crops.tsv`` under ``output_dir``.

    Returns:
        statistics: images, images with pairs, pairs, unique nouns, nouns per image, pairs per
        image.
    """
    from collections import Counter

    spec, records = merge_parts(folders, "pairs", with_folder=True)
    out = Path(output_dir)
    images, anns, tsv = [], [], []
    counts: Counter = Counter()
    num_nouns = 0
    for folder, rec in records:
        images.append(
            {
                "id": rec["image_id"],
                "file_name": rec["file_name"],
                "height": rec["height"],
                "width": rec["width"],
            }
        )
        num_nouns += len(rec["nouns"])
        for pair in rec["pairs"]:
            counts[pair["category"]] += 1
            ann = {"id": len(anns) + 1, "image_id": rec["image_id"], **pair}
            crop = ann.pop("crop", None)
            if crop is not None:
                path = os.path.relpath(
                    os.path.abspath(os.path.join(folder, crop)), os.path.abspath(out)
                )
                tsv.append(f"{path}\t{pair['category']}\n")
            anns.append(ann)
    classes = sorted(counts)
    cat_ids = {name: i + 1 for i, name in enumerate(classes)}
    for ann in anns:
        ann["category_id"] = cat_ids[ann["category"]]
    categories = [{"id": cat_ids[c], "name": c, "count": counts[c]} for c in classes]
    stats = {
        "num_images": len(images),
        "images_with_pairs": len({a["image_id"] for a in anns}),
        "num_pairs": len(anns),
        "num_unique": len(classes),
        "nouns_per_image": round(num_nouns / max(1, len(images)), 4),
        "pairs_per_image": round(len(anns) / max(1, len(images)), 4),
    }
    coco = {
        "info": {"description": "mask-category pairs mined from captions", "params": spec.params},
        "images": images,
        "annotations": anns,
        "categories": categories,
    }
    atomic_write_json(out / "pairs.json", coco)
    vocab_counts = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    atomic_write_json(
        out / "pairs_vocab.json", {**stats, "classes": classes, "counts": vocab_counts}, indent=1
    )
    if tsv:
        atomic_write_text(out / "crops.tsv", "filepath\ttitle\n" + "".join(tsv))
    return stats
