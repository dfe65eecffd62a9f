"""The main-job stage runner: skip finished stages (outputs checked), stop on failure naming the
log."""

import os
import signal
import subprocess
import sys
import textwrap
import time

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
    _assert_gone(_interrupt(driver, pid_file))  # the stage was terminated and reaped


def _interrupt(driver: str, pid_file) -> int:
    """Start ``python -c driver`` (in the repository), wait for its stage to write its pid to
    ``pid_file``, Ctrl-C the driver; the driver must fail. Returns the stage's pid."""

    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=str(REPO))
    deadline = time.time() + 120
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    return int(pid_file.read_text())


def _assert_gone(pid: int, timeout: float = 30.0) -> None:
    """The process ``pid`` ends (and is reaped) within ``timeout`` seconds."""

    deadline = time.time() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, f"process {pid} survived the driver"
        time.sleep(0.1)


# the fork server of these tests (one per pytest process: the first forked stage starts it)
PRELOAD = ("torch", "detectron2.engine")


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_forked_stage_is_a_script_run(tmp_path):
    """A Python-script stage forked from the fork server runs like ``python script args``: its
    ``__main__`` block, argv, output in the log, files written at exit, peak RSS; not a child of
    the driver."""
    out = tmp_path / "out.txt"
    script = _script(
        tmp_path,
        "tool.py",
        "import atexit, ctypes, multiprocessing, os, sys\n"
        "if __name__ == '__main__':\n"
        "    f = open(sys.argv[1], 'w')  # closed (flushed) by the exit handlers only\n"
        "    atexit.register(f.close)\n"
        "    f.write(f'{os.getppid()} {sys.argv[2:]} {\"torch\" in sys.modules} ')\n"
        "    f.write(multiprocessing.get_start_method())  # the platform's, as in a new process\n"
        "    print('to stdout'); print('to stderr', file=sys.stderr)\n"
        "    ctypes.CDLL(None).printf(b'from C stdio')  # buffered in C until the exit\n",
    )
    stages = [Stage("tool", [script, str(out), "a", "b c"], outputs=[str(out)])]
    rec = run_stages(stages, tmp_path / "job", preload=PRELOAD)["tool"]
    ppid, rest = out.read_text().split(" ", 1)
    assert int(ppid) != os.getpid()  # forked by the server, not launched by this process
    # arguments as given; the preloaded modules are there; a fork server's child would say
    # "forkserver"
    assert rest == "['a', 'b c'] True fork"
    log = (tmp_path / "job" / "logs" / "tool.log").read_text()
    assert "to stdout" in log and "to stderr" in log and "from C stdio" in log
    assert rec["peak_rss_mib"] > 0 and not rec["skipped"]
    assert run_stages(stages, tmp_path / "job", preload=PRELOAD)["tool"]["skipped"]


@pytest.mark.parametrize(
    "body, status, logged",
    [
        ("import sys\nsys.exit(3)\n", 3, None),
        ("raise ValueError('bad input')\n", 1, "ValueError: bad input"),
        ("import sys\nsys.exit('usage: tool.py X')\n", 1, "usage: tool.py X"),
    ],
    ids=["exit_status", "exception", "exit_message"],
)
def test_forked_stage_failure(tmp_path, body, status, logged):
    never = tmp_path / "never.txt"
    stages = [
        Stage("boom", [sys.executable, _script(tmp_path, "boom.py", body)]),
        Stage("after", _writer(never, "x"), outputs=[str(never)]),
    ]
    with pytest.raises(RuntimeError, match=rf"boom.*exit {status}\).*logs/boom\.log"):
        run_stages(stages, tmp_path / "job", preload=PRELOAD)
    assert not never.exists()
    if logged:
        assert logged in (tmp_path / "job" / "logs" / "boom.log").read_text()


def test_forked_stage_killed_by_a_signal(tmp_path):
    """A stage that dies without a word (SIGKILL: the OOM killer) is a failure naming its exit,
    and its log is this run's, not a stale one."""
    log = tmp_path / "job" / "logs" / "killed.log"
    log.parent.mkdir(parents=True)
    log.write_text("stale text of an earlier run")
    body = "import os, signal\nprint('started', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    stages = [Stage("killed", [_script(tmp_path, "killed.py", body)])]
    with pytest.raises(RuntimeError, match=r"killed.*exit -9"):
        run_stages(stages, tmp_path / "job", preload=PRELOAD)
    assert log.read_text() == "started\n"


def test_stage_with_env_gets_a_fresh_interpreter(tmp_path):
    out = tmp_path / "out.txt"
    script = _script(
        tmp_path,
        "env.py",
        "import os, sys\n"
        "open(sys.argv[1], 'w').write(f'{os.getppid()} {os.environ[\"X_STAGE\"]}')\n",
    )
    stages = [Stage("env", [script, str(out)], outputs=[str(out)], env={"X_STAGE": "42"})]
    run_stages(stages, tmp_path / "job", preload=PRELOAD)
    assert out.read_text() == f"{os.getpid()} 42"


def test_interrupting_the_driver_stops_a_forked_stage(tmp_path):
    pid_file = tmp_path / "stage.pid"
    script = _script(
        tmp_path,
        "sleep.py",
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n",
    )
    driver = textwrap.dedent(f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from ov_seg.engine.pipeline import Stage, run_stages
        run_stages([Stage("sleep", [{script!r}])], {str(tmp_path / "job")!r}, preload=("json",))
        """)
    _assert_gone(_interrupt(driver, pid_file))  # terminated; the fork server, its parent, reaps it
