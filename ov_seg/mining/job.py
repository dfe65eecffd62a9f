"""Chunked, resumable, shardable jobs: the file mechanics of ``tools/mine_captions.py``.

A job over N items (images) is cut into chunks of ``chunk_size`` consecutive items; chunk k is
written as one part file ``<kind>_parts/part-{k:06d}.jsonl`` (one JSON line per item) with an atomic
rename, so a killed run leaves only complete parts (and stray ``*.tmp*`` files, ignored and
removed). A rerun skips the chunks whose part exists. ``--shard i/n`` runs the chunks k with k % n
== i; the shards may write into one folder (shared file system) or into separate folders joined by
``merge_parts``. ``<kind>_job.json`` records what the job computes (kind, parameters, input digest,
sizes); a folder holding a different job is refused. The final outputs are a deterministic function
of the parts, so a resumed or sharded job ends byte-identical to an uninterrupted one.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "JobSpec",
    "ChunkedJob",
    "JobMismatchError",
    "parse_shard",
    "atomic_write_text",
    "atomic_write_json",
    "digest",
    "merge_parts",
    "job_file",
    "parts_dir",
]


def job_file(folder, kind: str) -> Path:
    """``<folder>/<kind>_job.json``: the record of a job (stages 1 and 2 can share a folder)."""
    return Path(folder) / f"{kind}_job.json"


def parts_dir(folder, kind: str) -> Path:
    """``<folder>/<kind>_parts``: the part files of a job."""
    return Path(folder) / f"{kind}_parts"


class JobMismatchError(RuntimeError):
    """An output folder holds a job with other parameters or input."""


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj, indent: Optional[int] = None) -> None:
    """``atomic_write_text`` of ``json.dumps(obj)`` (keys in insertion order, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def digest(items: Iterable) -> str:
    """SHA-1 of the JSON lines of ``items`` (a job's input fingerprint)."""
    h = hashlib.sha1()
    for item in items:
        h.update(json.dumps(item, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def parse_shard(text: str) -> Tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n.

    Raises:
        ValueError: malformed shard.
    """
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard must be 'i/n' (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n


@dataclass(frozen=True)
class JobSpec:
    """What a job computes: identical specs give identical outputs."""

    kind: str  # "nouns" or "pairs"
    params: dict  # settings that change the output
    input_digest: str  # ``digest`` of the input items
    num_items: int
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return (self.num_items + self.chunk_size - 1) // self.chunk_size

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


class ChunkedJob:
    """The chunks of one job (or of one shard of it) in an output folder.

    Args:
        output_dir: the folder (created).
        spec: the job; must equal the ``<kind>_job.json`` already in the folder, if any.
        shard: (i, n): this process runs the chunks k with k % n == i.
        overwrite: replace a folder holding another job (its parts and its ``outputs`` are
            deleted, so the folder never mixes the two jobs).
        outputs: the final outputs of this kind of job (files or folders in ``output_dir``).

    Raises:
        JobMismatchError: the folder holds another job and ``overwrite`` is False.
    """

    def __init__(
        self,
        output_dir,
        spec: JobSpec,
        shard: Tuple[int, int] = (0, 1),
        overwrite: bool = False,
        outputs: Sequence[str] = (),
    ):
        if spec.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {spec.chunk_size}")
        self.output_dir = Path(output_dir)
        self.parts_dir = parts_dir(self.output_dir, spec.kind)
        self.spec = spec
        self.shard = shard
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        record = job_file(self.output_dir, spec.kind)
        if record.is_file():
            old = json.loads(record.read_text())
            if old != spec.to_dict():
                if not overwrite:
                    changed = _differences(old, spec.to_dict())
                    raise JobMismatchError(
                        f"{self.output_dir} holds a different {old.get('kind')!r} job (differs in "
                        f"{changed}); use another output folder, or --overwrite to discard it"
                    )
                for p in self.parts_dir.glob("part-*.jsonl"):
                    p.unlink()
                for name in outputs:
                    path = self.output_dir / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
        for stale in self.parts_dir.glob("*.tmp*"):
            stale.unlink()
        if not record.is_file() or json.loads(record.read_text()) != spec.to_dict():
            atomic_write_json(record, spec.to_dict(), indent=1)

    # ----------------------------------------------------------------------------------------------
    def part_path(self, k: int) -> Path:
        return self.parts_dir / f"part-{k:06d}.jsonl"

    def chunk_range(self, k: int) -> range:
        """Item indices of chunk ``k``."""
        start = k * self.spec.chunk_size
        return range(start, min(start + self.spec.chunk_size, self.spec.num_items))

    def chunks(self) -> List[int]:
        """This shard's chunk ids."""
        i, n = self.shard
        return [k for k in range(self.spec.num_chunks) if k % n == i]

    def done(self, k: int) -> bool:
        return self.part_path(k).is_file()

    def pending(self) -> List[int]:
        """This shard's chunks without a part file."""
        return [k for k in self.chunks() if not self.done(k)]

    def write_part(self, k: int, records: Sequence[dict]) -> None:
        """Write chunk ``k``'s records (one JSON line each) atomically."""
        if len(records) != len(self.chunk_range(k)):
            raise ValueError(
                f"chunk {k}: {len(records)} records for {len(self.chunk_range(k))} items"
            )
        atomic_write_text(self.part_path(k), "".join(json.dumps(r) + "\n" for r in records))

    def complete(self) -> bool:
        """Whether every chunk of the whole job (all shards) has its part in this folder."""
        return all(self.done(k) for k in range(self.spec.num_chunks))


def _differences(a: dict, b: dict, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_differences(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _read_spec(folder: Path, kind: str) -> dict:
    path = job_file(folder, kind)
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {kind!r} mining job (no {path.name})")
    return json.loads(path.read_text())


def merge_parts(
    folders: Sequence, kind: str, with_folder: bool = False
) -> Tuple[JobSpec, Iterator]:
    """The records of a job whose chunks lie in one or several folders (the shards' outputs).

    Args:
        folders: job folders of one job (a chunk present in several is read from the first).
        kind: the job kind ("nouns" / "pairs").
        with_folder: yield (folder of the part, record) instead of records.

    Returns:
        (the common ``JobSpec``, an iterator over all records in item order).

    Raises:
        JobMismatchError: the folders hold different jobs. FileNotFoundError: chunks are missing
        (the
            message lists them).
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("merge needs at least one job folder")
    specs = [_read_spec(f, kind) for f in folders]
    for f, s in zip(folders[1:], specs[1:]):
        if s != specs[0]:
            raise JobMismatchError(
                f"{f} holds a different job than {folders[0]}; cannot merge them"
            )
    spec = JobSpec(**specs[0])
    where: Dict[int, Path] = {}
    for f in folders:
        for k in range(spec.num_chunks):
            p = parts_dir(f, kind) / f"part-{k:06d}.jsonl"
            if k not in where and p.is_file():
                where[k] = p
    missing = [k for k in range(spec.num_chunks) if k not in where]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {spec.num_chunks} chunks have no part in "
            f"{[str(f) for f in folders]}: {shown} (run the missing shards, or rerun to resume)"
        )

    def records() -> Iterator:
        for k in range(spec.num_chunks):
            folder = where[k].parent.parent
            with open(where[k], encoding="utf-8") as fh:
                for line in fh:
                    yield (folder, json.loads(line)) if with_folder else json.loads(line)

    return spec, records()
