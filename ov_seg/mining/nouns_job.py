"""Stage 1 job: captions -> nouns per image (``nouns.jsonl``), vocabulary counts, summary.

Outputs in the job folder:

- ``nouns.jsonl``: one line per image, in input order: ``{"image_id", "file_name", ["height",
  "width"], "captions": [...], "nouns": [[...] per caption]}``;
- ``nouns_vocab.json``: ``{"num_images", "num_captions", "num_unique", "nouns_per_caption",
  "counts": {noun: captions mentioning it}}`` (counts sorted by decreasing count, then
  alphabetically);
- ``nouns_summary.json``: the above numbers plus the skipped input lines, elapsed time and
  throughput (the only output that changes from run to run).
"""

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from .captions import CaptionSet
from .job import ChunkedJob, JobSpec, atomic_write_json, atomic_write_text, digest, merge_parts
from .nouns import NounExtractor, noun_vocabulary

__all__ = ["run_nouns_job", "finalize_nouns", "nouns_job_spec"]

logger = logging.getLogger(__name__)

# what a finished job leaves in its folder (deleted when --overwrite replaces another job)
NOUN_OUTPUTS = ("nouns.jsonl", "nouns_vocab.json", "nouns_summary.json", "nouns_problems.txt")


def nouns_job_spec(captions: CaptionSet, extractor: NounExtractor, chunk_size: int) -> JobSpec:
    """The ``JobSpec`` of extracting ``captions`` with ``extractor``."""
    items = [[im.image_id, im.file_name, im.captions] for im in captions.images]
    params = {**extractor.settings.output_dict(), "spacy_model": extractor.model_version()}
    params["stoplist"] = list(params["stoplist"])
    return JobSpec("nouns", params, digest(items), len(items), int(chunk_size))


def run_nouns_job(
    captions: CaptionSet,
    extractor: NounExtractor,
    output_dir,
    chunk_size: int = 2000,
    shard: Tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
    max_chunks: Optional[int] = None,
) -> dict:
    """Extract the nouns of every caption, chunk by chunk (resumable, shardable); finalize when the
    folder holds every chunk.

    Args:
        captions: the input (``load_captions``).
        extractor: the noun extractor.
        output_dir: job folder.
        chunk_size: images per part file.
        shard: (i, n) of ``--shard i/n``.
        overwrite: discard a different job in ``output_dir``.
        progress: show a tqdm bar (captions/s).
        max_chunks: stop after this many chunks (a time-boxed run; rerun to continue).

    Returns:
        the summary (also written to ``nouns_summary.json`` when the job is complete).
    """
    start = time.perf_counter()
    spec = nouns_job_spec(captions, extractor, chunk_size)
    job = ChunkedJob(output_dir, spec, shard=shard, overwrite=overwrite, outputs=NOUN_OUTPUTS)
    pending = job.pending()
    if max_chunks is not None:
        pending = pending[: max(0, int(max_chunks))]
    todo_captions = sum(
        len(captions.images[i].captions) for k in pending for i in job.chunk_range(k)
    )
    done_captions = 0
    bar = tqdm(
        total=todo_captions,
        unit="cap",
        desc=f"nouns {Path(output_dir).name}",
        disable=not progress,
        mininterval=1.0,
        smoothing=0.1,
    )
    for k in pending:
        images = [captions.images[i] for i in job.chunk_range(k)]
        texts = [c for im in images for c in im.captions]
        phrases = extractor.extract(texts)
        records, pos = [], 0
        for im in images:
            rec = im.to_dict()
            rec["nouns"] = phrases[pos : pos + len(im.captions)]
            pos += len(im.captions)
            records.append(rec)
        job.write_part(k, records)
        bar.update(len(texts))
        done_captions += len(texts)
    bar.close()
    elapsed = time.perf_counter() - start
    summary = {
        "complete": job.complete(),
        "chunks_run": len(pending),
        "captions_run": done_captions,
    }
    if summary["complete"]:
        summary.update(
            finalize_nouns(
                [output_dir], output_dir, problems=captions.problems, skipped=captions.skipped
            )
        )
        reasons = summary["skipped_captions"]
        if any(reasons.values()):
            details = Path(output_dir) / "nouns_problems.txt"
            logger.warning(
                "captions without nouns, by reason: %s%s",
                ", ".join(f"{k} {v}" for k, v in reasons.items()),
                f" (skipped lines: {details})" if captions.problems else "",
            )
    summary.update(
        elapsed_s=round(elapsed, 2), captions_per_s=round(done_captions / max(elapsed, 1e-9), 1)
    )
    if summary["complete"]:
        atomic_write_json(Path(output_dir) / "nouns_summary.json", summary, indent=1)
    return summary


def finalize_nouns(
    folders: Sequence,
    output_dir,
    problems: Optional[Sequence[str]] = None,
    skipped: Optional[Dict[str, int]] = None,
) -> dict:
    """Join the parts of ``folders`` (one job, possibly sharded) into ``nouns.jsonl`` and
    ``nouns_vocab.json`` under ``output_dir``.

    Args:
        problems: the skipped input entries (``CaptionSet.problems``), written to
            ``nouns_problems.txt`` (a stale one is removed when there is none); None (``merge``:
            not known) leaves the file alone.
        skipped: ``CaptionSet.skipped`` (counts by reason).

    Returns:
        the vocabulary statistics (``nouns_vocab.json`` without the counts), ``skipped_lines``
        and ``skipped_captions``: captions without output by reason ("malformed", "language",
        "no_noun").
    """
    import json

    spec, records = merge_parts(folders, "nouns")
    lines: List[str] = []
    per_caption: List[List[str]] = []
    num_captions = 0
    for rec in records:
        lines.append(json.dumps(rec) + "\n")
        per_caption.extend(rec["nouns"])
        num_captions += len(rec["captions"])
    counts = noun_vocabulary(per_caption)
    stats = {
        "num_images": len(lines),
        "num_captions": num_captions,
        "num_unique": len(counts),
        "nouns_per_caption": round(sum(len(p) for p in per_caption) / max(1, num_captions), 4),
    }
    out = Path(output_dir)
    atomic_write_text(out / "nouns.jsonl", "".join(lines))
    atomic_write_json(
        out / "nouns_vocab.json", {**stats, "params": spec.params, "counts": counts}, indent=1
    )
    if problems:
        atomic_write_text(out / "nouns_problems.txt", "".join(p + "\n" for p in problems))
    elif problems is not None and (out / "nouns_problems.txt").exists():
        (out / "nouns_problems.txt").unlink()
    skipped = skipped or {}
    reasons = {k: int(skipped.get(k, 0)) for k in ("malformed", "language")}
    reasons["no_noun"] = sum(1 for p in per_caption if not p)
    return {**stats, "skipped_lines": len(problems or ()), "skipped_captions": reasons}
