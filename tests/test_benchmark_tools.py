"""tools/benchmark.py: every sub-command's --help parses, a missing sub-command is ``two-stage``,
and the deprecated tools/benchmark_<name>.py shims forward to their sub-command (in-process)."""

import json

import pytest
from helpers import REPO, load_tool

SUBCOMMANDS = (
    "two-stage",
    "clip",
    "clip-options",
    "mining",
    "mixreorg",
    "pacl",
    "proposals",
    "dataset",
)
SHIMS = {
    "benchmark_clip": "clip",
    "benchmark_clip_options": "clip-options",
    "benchmark_mining": "mining",
    "benchmark_mixreorg": "mixreorg",
    "benchmark_pacl": "pacl",
    "benchmark_proposals": "proposals",
}


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark")


def test_the_sub_commands_are_the_listed_ones(tool, capsys):
    assert tuple(tool.SUBCOMMANDS) == SUBCOMMANDS
    assert tool.main(["--help"]) is None
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_of_every_sub_command_parses(tool, name, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: benchmark.py {name}" in capsys.readouterr().out


def _record(tool, monkeypatch, name):
    seen = []
    doc, add_arguments, _ = tool.SUBCOMMANDS[name]
    fake = (doc, add_arguments, lambda args, parser: seen.append(args) or "ran")
    monkeypatch.setitem(tool.SUBCOMMANDS, name, fake)
    return seen


def test_missing_sub_command_is_two_stage_with_todays_flags(tool, monkeypatch):
    seen = _record(tool, monkeypatch, "two-stage")
    argv = ["--config-file", "c.yaml", "--size", "64x64", "--proposals", "16", "MODEL.X", "1"]
    assert tool.main(argv) == "ran"
    assert tool.main(["two-stage", *argv]) == "ran"
    for args in seen:
        assert (args.config_file, args.size, args.proposals) == ("c.yaml", "64x64", 16)
        assert args.opts == ["MODEL.X", "1"] and not args.text_only and args.memory == ""


def test_sub_command_gets_its_own_flags(tool, monkeypatch):
    seen = _record(tool, monkeypatch, "proposals")
    tool.main(["proposals", "--config-files", "a.yaml", "b.yaml", "--size", "32", "48", "K", "v"])
    (args,) = seen
    assert args.config_files == ["a.yaml", "b.yaml"] and args.size == [32, 48]
    assert args.opts == ["K", "v"]


@pytest.mark.parametrize("shim,name", sorted(SHIMS.items()))
def test_old_tools_forward_to_their_sub_command(shim, name, capsys):
    with pytest.warns(DeprecationWarning, match=f"tools/benchmark.py {name}"):
        with pytest.raises(SystemExit) as e:
            load_tool(shim).main(["--help"])
    assert e.value.code == 0
    assert f"usage: benchmark.py {name}" in capsys.readouterr().out


def test_old_tool_runs_the_sub_command(tmp_path, capsys):
    """The clip shim runs `benchmark.py clip` itself: its result, its line, its --json file."""
    with pytest.warns(DeprecationWarning):
        out = load_tool("benchmark_clip").main(
            ["--models", "ovseg-tiny-vit8-64", "--crops", "2", "--image-sizes", "32"]
            + ["--repeats", "1", "--json", str(tmp_path / "clip.json")]
        )
    (r,) = out["models"]
    assert r["model"] == "ovseg-tiny-vit8-64" and r["image_size"] == 32
    assert (tmp_path / "clip.json").is_file()
    assert "crops/s" in capsys.readouterr().out


def test_two_stage_command_line_runs_and_writes_its_json(tool, toyworld_root, tmp_path, capsys):
    """Today's flag-only invocation, end to end on the toy config (tiny settings)."""
    out = tmp_path / "sub" / "two_stage.json"
    argv = ["--config-file", str(REPO / "configs/toyworld/two_stage_R18.yaml"), "--size", "32x32"]
    argv += ["--proposals", "4", "--iters", "1", "--warmup", "0", "--vocabulary-size", "3"]
    argv += ["--skip-text", "--label", "toy", "--json", str(out)]
    argv += ["MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]
    result = tool.main(argv)
    saved = json.loads(out.read_text())
    assert saved["label"] == "toy" and saved["proposals"] == 4 and saved["threads"] == 1
    assert saved["end_to_end_ms"] == result["end_to_end_ms"]
    assert saved["opts"] == ["MODEL.CLIP.PRETRAINED", "", "RUNTIME.NUM_THREADS", "1"]
    assert "end_to_end:" in capsys.readouterr().out
