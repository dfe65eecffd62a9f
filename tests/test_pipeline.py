"""The main-job stage runner: skip finished stages (outputs checked), stop on failure naming the
log."""

import sys

import pytest
from helpers import REPO

from ov_seg.engine.pipeline import Stage, run_stages

PIPELINE = REPO / "ov_seg" / "engine" / "pipeline.py"


def _writer(path, text):
    return [sys.executable, "-c", f"open({str(path)!r}, 'w').write({text!r})"]


def test_skip_rerun_and_output_check(tmp_path):
    out = tmp_path / "a.txt"
    stages = [Stage("write", _writer(out, "hello"), outputs=[str(out)])]
    first = run_stages(stages, tmp_path / "job")
    assert not first["write"]["skipped"] and out.read_text() == "hello"
    assert first["write"]["peak_rss_mib"] > 0
    assert run_stages(stages, tmp_path / "job")["write"]["skipped"]
    out.write_text("changed size")  # output no longer matches the record: the stage runs again
    again = run_stages(
        [Stage("write", _writer(out, "hello"), outputs=[str(out)])], tmp_path / "job"
    )
    assert not again["write"]["skipped"] and out.read_text() == "hello"


def test_failure_names_log_and_stops(tmp_path):
    never = tmp_path / "never.txt"
    stages = [
        Stage("boom", [sys.executable, "-c", "raise SystemExit(3)"]),
        Stage("after", _writer(never, "x"), outputs=[str(never)]),
    ]
    with pytest.raises(RuntimeError, match=r"boom.*exit 3.*logs/boom\.log"):
        run_stages(stages, tmp_path / "job")
    assert not never.exists()


def test_missing_output_is_a_failure(tmp_path):
    stages = [Stage("lazy", [sys.executable, "-c", "pass"], outputs=[str(tmp_path / "x")])]
    with pytest.raises(RuntimeError, match="did not write"):
        run_stages(stages, tmp_path / "job")


def test_changed_command_runs_again(tmp_path):
    out = tmp_path / "a.txt"
    run_stages([Stage("write", _writer(out, "hello"), outputs=[str(out)])], tmp_path / "job")
    # same outputs, same size, but a different command line (e.g. a new config option): not skipped
    again = run_stages(
        [Stage("write", _writer(out, "world"), outputs=[str(out)])], tmp_path / "job"
    )
    assert not again["write"]["skipped"] and out.read_text() == "world"


def test_a_stage_that_ran_reruns_the_later_ones(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    copy = [sys.executable, "-c", f"open({str(b)!r}, 'w').write(open({str(a)!r}).read())"]
    stages = [
        Stage("make", _writer(a, "one"), outputs=[str(a)]),
        Stage("copy", copy, outputs=[str(b)]),
    ]
    run_stages(stages, tmp_path / "job")
    stages[0] = Stage("make", _writer(a, "two"), outputs=[str(a)])  # same size, new content
    again = run_stages(stages, tmp_path / "job")
    assert not again["copy"]["skipped"] and b.read_text() == "two"
    assert all(r["skipped"] for r in run_stages(stages, tmp_path / "job").values())


def test_interrupting_the_driver_stops_the_running_stage(tmp_path):
    import os
    import signal
    import subprocess
    import textwrap
    import time

    pid_file = tmp_path / "stage.pid"
    stage = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(" "str(os.getpid())); time.sleep(60)",
    ]
    driver = textwrap.dedent(f"""
        import signal
        # a background shell starts its children with SIGINT ignored: restore Ctrl-C's handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # the module alone (standard library only), not the ov_seg package: seconds of imports
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("pipeline", {str(PIPELINE)!r})
        pipeline = sys.modules["pipeline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pipeline)
        Stage, run_stages = pipeline.Stage, pipeline.run_stages
        run_stages([Stage("sleep", {stage!r})], {str(tmp_path / "job")!r})
        """)
    proc = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.time() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    with pytest.raises(ProcessLookupError):  # the stage was terminated and reaped
        os.kill(child, 0)
