"""A resumable chain of command-line stages (the main job).

Each stage is a normal launch (``tools/train_net.py ...``, ``tools/mine_captions.py ...``) run as a
subprocess with its own log file. A stage is skipped on rerun when its record says it finished with
the same command line *and* every declared output still exists with the recorded size *and* no
earlier stage ran in this invocation (the chain is linear: a stage that ran may have changed any
later stage's inputs); a failed stage stops the chain and names its log.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["Stage", "run_stages", "atomic_write_json"]


@dataclass
class Stage:
    """One step of the chain.

    Attributes:
        name: unique stage name (used for the log and record file names).
        command: argv of the launch (run with the current Python when it starts with a ``.py``
            path).
        outputs: files that must exist after the stage (checked to decide whether to skip on rerun).
        estimate_s: expected duration, for the ETA before a first run has measured it.
        env: extra environment variables.
    """

    name: str
    command: Sequence[str]
    outputs: Sequence[str] = ()
    estimate_s: float = 60.0
    env: Dict[str, str] = field(default_factory=dict)


def atomic_write_json(path, obj) -> None:
    """Write JSON to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _record_path(workdir: Path, stage: Stage) -> Path:
    return workdir / "stages" / f"{stage.name}.json"


def _finished(workdir: Path, stage: Stage) -> Optional[dict]:
    rec_path = _record_path(workdir, stage)
    if not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text())
    if rec.get("command") != list(stage.command):
        return None  # the stage changed (config, options, inputs): run it again
    for out, size in rec.get("outputs", {}).items():
        p = Path(out)
        if not p.is_file() or p.stat().st_size != size:
            return None
    return rec


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_stages(stages: List[Stage], workdir, force: Sequence[str] = ()) -> Dict[str, dict]:
    """Run ``stages`` in order, skipping finished ones; one progress line per stage.

    Returns:
        stage name -> record (seconds, peak RSS of the stage process in MiB, outputs, skipped flag).

    Raises:
        RuntimeError: a stage failed or did not write its outputs (the message names its log file).
    """
    workdir = Path(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    records, start = {}, time.perf_counter()
    remaining = sum(s.estimate_s for s in stages)
    upstream_ran = False  # a stage that ran may have changed the inputs of every later stage
    for k, stage in enumerate(stages, 1):
        skip_ok = stage.name not in force and not upstream_ran
        done = _finished(workdir, stage) if skip_ok else None
        if done is not None:
            records[stage.name] = {**done, "skipped": True}
            remaining -= stage.estimate_s
            print(
                f"[{k}/{len(stages)}] {stage.name:<28} done before ({_fmt(done['seconds'])}), "
                "skipped",
                flush=True,
            )
            continue
        log = workdir / "logs" / f"{stage.name}.log"
        cmd = list(stage.command)
        if cmd and cmd[0].endswith(".py"):
            cmd = [sys.executable] + cmd
        print(
            f"[{k}/{len(stages)}] {stage.name:<28} running  "
            f"(elapsed {_fmt(time.perf_counter() - start)}"
            f", ETA {_fmt(remaining)})  $ {shlex.join(cmd)}",
            flush=True,
        )
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **stage.env}
            )
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
            except BaseException:  # Ctrl-C / SIGTERM of the driver: do not leave the stage running
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        remaining -= stage.estimate_s
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage.name!r} failed (exit {proc.returncode}); see {log}")
        missing = [o for o in stage.outputs if not Path(o).is_file()]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} did not write {missing}; see {log}")
        rss = round(usage.ru_maxrss / 1024.0, 1)
        rec = {
            "seconds": round(seconds, 1),
            "peak_rss_mib": rss,
            "log": str(log),
            "command": list(stage.command),
            "outputs": {o: Path(o).stat().st_size for o in stage.outputs},
        }
        atomic_write_json(_record_path(workdir, stage), rec)
        records[stage.name] = {**rec, "skipped": False}
        upstream_ran = True
        print(
            f"[{k}/{len(stages)}] {stage.name:<28} finished in {_fmt(seconds)}, "
            f"peak {rss:.0f} MiB",
            flush=True,
        )
    return records
