"""A resumable chain of command-line stages (the main job).

Each stage is a normal launch (``tools/train_net.py ...``, ``tools/mine_captions.py ...``) run in a
process of its own with its own log file. A stage is skipped on rerun when its record says it
finished with the same command line *and* every declared output still exists with the recorded size
*and* no earlier stage ran in this invocation (the chain is linear: a stage that ran may have
changed any later stage's inputs); a failed stage stops the chain and names its log.

With ``preload`` (module names), Python-script stages are forked from a fork server that has
imported those modules once (``multiprocessing``'s forkserver), instead of each paying the imports
of a fresh interpreter (torch + detectron2: ≈ 4 s a launch). The server never imports the project:
each forked stage imports it when it starts (to unpickle ``_run_script``, and the driver's script as
``__mp_main__``), after the earlier stages finished, so whatever the project reads at import time
(dataset registration reads ``$DETECTRON2_DATASETS`` and files earlier stages wrote) is read fresh.
The server's environment is the driver's when the first forked stage starts; a stage with its own
``env`` always gets a fresh interpreter.
"""

import atexit
import ctypes
import json
import multiprocessing
import os
import resource
import runpy
import shlex
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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


def _python_script(cmd: Sequence[str]) -> Optional[Tuple[str, List[str]]]:
    """(script, arguments) of a command that runs a Python script with this interpreter
    (``[x.py, ...]`` or ``[sys.executable, x.py, ...]``), else None."""
    if cmd and cmd[0].endswith(".py"):
        return cmd[0], list(cmd[1:])
    if len(cmd) >= 2 and cmd[0] == sys.executable and cmd[1].endswith(".py"):
        return cmd[1], list(cmd[2:])
    return None


def _run_script(script: str, args: List[str], log: str, rss_conn) -> None:
    """The forked stage: ``python script args >> log 2>&1`` (the driver created the log), in this
    process. Sends the peak RSS (KiB, this process and its reaped children) through ``rss_conn``
    and exits with the script's exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # a forkserver child defaults to the forkserver start method: back to the platform's, as in a
    # fresh interpreter (DataLoader workers, pools), and fresh numpy randomness like a new process
    multiprocessing.set_start_method(None, force=True)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    script = os.path.abspath(script)  # as __file__ / argv[0] of `python script` (3.9+)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))  # as `python script` does
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # sys.exit(n) / argparse errors: the status a fresh interpreter gives
        if isinstance(e.code, int):
            code = e.code
        elif e.code is not None:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + 2  # the shell's status of a process stopped by SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    # what interpreter exit runs before os._exit skips the rest: join the non-daemon threads, the
    # exit handlers (log files flushed and closed), Python's and C's stdio buffers
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    rss_conn.send(peak)
    rss_conn.close()
    os._exit(code)


def _stop(proc) -> None:
    """Terminate a running stage (SIGTERM, then SIGKILL after 30 s) and reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_subprocess(cmd: List[str], log: Path, env: Dict[str, str]) -> Tuple[int, float]:
    """Run ``cmd`` in a fresh process, output to ``log``: (exit status, peak RSS in KiB)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        except BaseException:  # Ctrl-C / SIGTERM of the driver: do not leave the stage running
            _stop(proc)
            raise
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss


def _run_forked(script: str, args: List[str], log: Path, preload: Sequence[str]):
    """Run a Python script forked from the fork server that preloaded ``preload``: (exit status,
    peak RSS in KiB)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))  # read when the server starts (the first stage)
    log.write_text("")  # created (emptied) here: the log of a stage that dies early is not stale
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_script, args=(script, args, str(log), send), name=log.stem)
    proc.start()
    send.close()
    try:
        proc.join()
    except BaseException:  # Ctrl-C / SIGTERM of the driver: do not leave the stage running
        proc.terminate()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise
    try:
        rss = recv.recv()
    except (EOFError, OSError):  # the stage died before sending it (a signal, os._exit)
        rss = 0
    recv.close()
    return proc.exitcode, rss


def run_stages(
    stages: List[Stage], workdir, force: Sequence[str] = (), preload: Sequence[str] = ()
) -> Dict[str, dict]:
    """Run ``stages`` in order, skipping finished ones; one progress line per stage.

    Args:
        stages: the chain.
        workdir: the job folder (``logs/``, ``stages/`` records).
        force: names of stages to run even when finished.
        preload: modules for the fork server of Python-script stages (see the module doc);
            empty: every stage in a fresh interpreter.

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
        script = _python_script(cmd)
        if preload and script is not None and not stage.env:
            returncode, rss_kib = _run_forked(*script, log, preload)
        else:
            returncode, rss_kib = _run_subprocess(cmd, log, stage.env)
        seconds = time.perf_counter() - t0
        remaining -= stage.estimate_s
        if returncode != 0:
            raise RuntimeError(f"stage {stage.name!r} failed (exit {returncode}); see {log}")
        missing = [o for o in stage.outputs if not Path(o).is_file()]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} did not write {missing}; see {log}")
        rss = round(rss_kib / 1024.0, 1)
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
