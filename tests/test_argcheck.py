"""Bad command-line values are refused before anything starts (:mod:`dsgd.argcheck`'s checkers, called
by each command's checks beside it: ``bench_args``, ``profile_args``, ``layouts_args``, ``launch_args``).

Each command, given one wrong value, must exit 2 with one line on stderr naming the value and
the fix, print nothing on stdout, start no worker or client process, and write nothing (no
ledger, no results file).  The in-process tests make starting a process an error; one
subprocess test times the whole refusal as a user sees it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsgd import argcheck
from dsgd.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_processes(monkeypatch):
    """Starting any worker or client process fails the test."""
    import dsgd.harness.isolate
    import dsgd.harness.launch

    def refuse(*a, **k):
        raise AssertionError(f"a process was started: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(dsgd.harness.isolate, "run_isolated", refuse)
    monkeypatch.setattr(dsgd.harness.launch, "run_clients", refuse)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A scratch working directory with a small workload and layout maps; yields a snapshot function."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps([{"name": "k", "shape": [6, 4]}, {"name": "b", "shape": [4]}]))
    (tmp_path / "bad_axis.json").write_text(json.dumps({"k": "expert,unsharded"}))
    (tmp_path / "bad_split.json").write_text(json.dumps({"k": "model,unsharded"}))  # 6 rows over model=4
    (tmp_path / "broken.json").write_text("{not json")

    def snapshot():
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    return snapshot


BAD = [  # (argv, text the one line must hold)
    (["bench", "--workload", "nope"], "'nope'"),
    (["bench", "--workload", "broken.json"], "not valid JSON"),
    (["bench", "--mesh", "batch=3,model=4"], "--devices 12"),
    (["bench", "--mesh", "x=0"], "'x=0'"),
    (["bench", "--mesh", "batch=2,model=4", "--devices", "4"], "--devices 8"),
    (["bench", "--layout", "nope"], "'nope'"),
    (["bench", "--workload", "tiny.json", "--mesh", "batch=2,model=4", "--layout", "bad_axis.json"], "'expert'"),
    (["bench", "--workload", "tiny.json", "--mesh", "batch=2,model=4", "--layout", "bad_split.json"],
     "does not divide"),
    (["bench", "--dtype", "float8"], "'float8'"),
    (["bench", "--implementation", "fast"], "'fast'"),
    (["bench", "--options", "turbo"], "'turbo'"),
    (["bench", "--format", "html"], "'html'"),
    (["bench", "--steps", "0"], "--steps 0"),
    (["bench", "--output", "missing_dir/out.csv"], "missing_dir"),
    (["bench", "--output", "."], "is a directory"),
    (["bench", "--plot", "chart.txt"], ".txt"),
    (["bench", "--compare", "absent.csv"], "absent.csv"),
    (["profile", "--mesh", "x=0", "--out", "profiles"], "'x=0'"),
    (["profile", "--workload", "nope", "--out", "profiles"], "'nope'"),
    (["profile", "--mesh", "batch=16", "--out", "profiles"], "--devices 16"),
    (["profile", "--implementation", "fast", "--out", "profiles"], "'fast'"),
    (["profile", "--commit", "a/b", "--out", "profiles"], "'a/b'"),
    (["profile", "--out", "tiny.json"], "not a directory"),
    (["layouts", "--model", "nope"], "'nope'"),
    (["layouts", "--model", "no_such_module:build"], "no_such_module"),
    (["layouts", "--model", "missing.py:build"], "missing.py"),
    (["layouts", "--model", "bert-mini", "--mesh", "batch=4,model=4"], "--devices 16"),
    (["layouts", "--model", "bert-mini", "--target-mesh", "x"], "'x'"),
    (["layouts", "--model", "bert-mini", "--implementation", "fast"], "'fast'"),
    (["layouts", "--model", "bert-mini", "--force", "emb"], "REGEX=LAYOUT"),
    (["layouts", "--model", "bert-mini", "--emit-layout-map", "missing_dir/map.json"], "missing_dir"),
    (["layouts", "--validate", "--from-measurements", "absent.jsonl"], "absent.jsonl"),
    (["layouts"], "--model"),
    (["launch", "--clients", "2", "--", "bench", "--mesh", "batch=4"], "must use all 8"),
    (["launch", "--clients", "2", "--", "bench", "--workload", "nope"], "'nope'"),
    (["launch", "--clients", "2", "--", "bench", "--steps", "x"], "'x'"),
    (["launch", "--clients", "2", "--", "python", "absent_script.py"], "absent_script.py"),
    (["launch", "--clients", "2", "--", "layouts", "--model", "nope"], "'nope'"),  # as dsgd layouts checks it
    (["launch", "--clients", "0", "--", "bench"], "--clients 0"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_exits_2_with_one_line_and_starts_nothing(argv, needle, files, no_processes, capsys):
    before = files()
    try:
        rc = cli_main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dsgd {argv[0]}") and ": error: " in lines[0], err
    assert needle in lines[0], lines[0]
    assert out == ""
    assert files() == before, "nothing written"


def test_refused_within_seconds_as_a_user_sees_it(tmp_path):
    """`dsgd bench --mesh batch=3,model=4` and `dsgd profile --mesh x=0`, as processes: exit 2 fast, one line,
    and no ledger."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in (["bench", "--mesh", "batch=3,model=4"], ["profile", "--mesh", "x=0", "--out", str(tmp_path / "p")]):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "dsgd", *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        took = time.monotonic() - t0
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert took < 15, f"refused after {took:.1f} s"  # no TensorFlow start (~8 s alone here)
    assert "--devices 12" in subprocess.run([sys.executable, "-m", "dsgd", "bench", "--mesh", "batch=3,model=4"],
                                            capture_output=True, text=True, env=env, cwd=tmp_path).stderr
    assert not (tmp_path / "p").exists() and list(tmp_path.iterdir()) == []


def test_good_values_pass_without_tensorflow(files):
    """The defaults and a full set of good values pass; checking them imports no TensorFlow."""
    args = subprocess.run(
        [sys.executable, "-c",
         "import sys; from dsgd.harness.launch_args import CHECKS; from dsgd.cli import build_parser\n"
         "for argv in (['bench'], ['bench', '--workload', 'tiny.json', '--mesh', 'batch=2,model=4', '--layout',"
         " 'replicated', '--implementation', 'grouped', '--plot', 'x.png', '-o', 'x.csv'], ['profile'],"
         " ['layouts', '--model', 'bert-mini', '--target-mesh', 'batch=16,model=64']):\n"
         "    a = build_parser().parse_args(argv)\n"
         "    CHECKS[a.command](a)\n"
         "print('tensorflow' in sys.modules)"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert args.returncode == 0 and args.stdout.strip() == "False", args.stderr


def test_names_match_the_registries():
    """dsgd.names keeps the names so that checking needs no TensorFlow; they must be the real ones, and
    the modules that use them must take them from there."""
    from dsgd import impl, names
    from dsgd.harness import bench_args, grid, measure

    assert names.IMPLEMENTATIONS == impl.CHOICES  # the same names, in the registry's order
    for name in ("REFERENCE", "NO_UPDATE", "MODES", "MODEL_MODES", "FLOOR_MODES", "OPTION_PRESETS", "DTYPE_BYTES"):
        assert getattr(measure, name) is getattr(names, name), name  # re-exported (the asv suite reads measure's)
    assert grid.IMPLEMENTATIONS is argcheck.IMPLEMENTATIONS is names.IMPLEMENTATIONS
    assert set(bench_args.DEFAULT_IMPLEMENTATIONS) <= set(names.IMPLEMENTATIONS) | {names.REFERENCE}


def test_profile_defaults_have_one_home():
    """dsgd profile's defaults are profile_args' (the command imports them; its checks check them)."""
    from dsgd.harness import profile, profile_args

    for name in ("DEFAULT_WORKLOADS", "DEFAULT_MESHES", "DEFAULT_IMPLEMENTATIONS"):
        assert getattr(profile, name) == getattr(profile_args, name), name


def _profile_args(**kw):
    import argparse

    base = dict(diff=None, ledger=None, out="profiles", steps=3, devices=8, time_steps=5, timeout=None, workload=None,
                mesh=None, layout=None, implementation=None, commit=None, mode=None, model=None)
    return argparse.Namespace(**dict(base, **kw))


def test_profile_checks_workloads_for_step_modes_and_models_for_whole_steps(files):
    """check_profile as check_bench: a model mode checks --model (and refuses a layout map it cannot use);
    an eager/graph mode checks the workloads and layouts against them."""
    from dsgd.harness.profile_args import check_profile

    check_profile(_profile_args())  # the defaults
    check_profile(_profile_args(mode=["fit"], model=["resmlp-small"], layout=["replicated"]))
    with pytest.raises(argcheck.UsageError, match="--model 'nope'"):
        check_profile(_profile_args(mode=["train_step"], model=["nope"]))
    with pytest.raises(argcheck.UsageError, match="names axis 'expert', which mesh"):  # a map it cannot use
        check_profile(_profile_args(mode=["fit"], layout=["bad_axis.json"]))
    with pytest.raises(argcheck.UsageError, match="by a policy .* or a layout-map .json file"):
        check_profile(_profile_args(mode=["fit"], layout=["nope"]))
    with pytest.raises(argcheck.UsageError, match="'expert'"):  # the layout map against the workload: graph mode
        check_profile(_profile_args(mode=["graph"], workload=["tiny.json"], mesh=["batch=2,model=4"],
                                    layout=["bad_axis.json"]))
    with pytest.raises(argcheck.UsageError, match="--mode 'jit'"):
        check_profile(_profile_args(mode=["jit"]))
    with pytest.raises(argcheck.UsageError, match="'nope'"):  # a workload given is checked whatever the mode
        check_profile(_profile_args(mode=["fit"], workload=["nope"]))


def test_launch_checks_a_command_that_cannot_check_its_values(files, no_processes, capsys):
    """`dsgd launch -- dsgd regress ...`: regress checks its own values when it runs; the launch's checks
    pass the command on instead of failing on it."""
    import argparse

    from dsgd.harness.launch_args import check_launch

    args = argparse.Namespace(clients=2, devices_per_client=4, start_timeout=None, grace=None, timeout=None,
                              log_dir=None)
    check_launch(args, ["regress", "compare"])


def test_multiclient_mesh_must_use_every_device():
    dev = argcheck.Devices(8, True, "2 clients x 4 devices")
    assert argcheck.check_mesh("batch=2,model=4", dev) == [("batch", 2), ("model", 4)]
    with pytest.raises(argcheck.UsageError, match="must use all 8"):
        argcheck.check_mesh("1", dev)
    assert argcheck.check_mesh("1", argcheck.worker_devices(8)) == [("batch", 1)]  # a worker may use fewer
