"""The ``dsgd`` command line itself (:mod:`dsgd.cli`): a command whose module cannot be loaded stays
listed and, when run, names what is missing (exit 2) -- never argparse's "invalid choice"."""
from __future__ import annotations

import importlib

import pytest

from dsgd import cli


@pytest.fixture
def missing(monkeypatch):
    """Importing ``dsgd.harness.profile`` fails as a missing ``xprof`` would make it fail."""
    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == "dsgd.harness.profile":
            raise ModuleNotFoundError("No module named 'xprof'", name="xprof")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)


@pytest.mark.parametrize("argv", [["profile"], ["profile", "--mesh", "batch=2", "--out", "x"], ["profile", "--help"]])
def test_a_command_that_cannot_load_names_the_missing_module(missing, capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dsgd profile: cannot load: No module named 'xprof' (install it: ")
    assert "-m pip install xprof" in lines[0] and "bash scripts/setup.sh" in lines[0]


def test_the_other_commands_still_work_and_the_broken_one_is_listed(missing, capsys):
    p = cli.build_parser()
    assert p.parse_args(["bench", "--steps", "3"]).steps == 3
    text = p.format_help()
    assert "profile" in text and "cannot load: No module named 'xprof'" in " ".join(text.split())
    with pytest.raises(SystemExit) as e:  # a command that does not exist is still argparse's error
        p.parse_args(["nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_options_that_cannot_be_built_name_the_missing_module(monkeypatch, capsys):
    """A command whose options import something missing (when its parser is built) is handled alike."""
    from dsgd.harness import bench

    def add_arguments(p):
        raise ModuleNotFoundError("No module named 'tqdm'", name="tqdm")

    monkeypatch.setattr(bench, "add_arguments", add_arguments)
    assert cli.main(["bench", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsgd bench: cannot load: No module named 'tqdm'") and "pip install tqdm" in err


def test_pip_names_where_they_differ():
    err = ModuleNotFoundError("No module named 'tf_keras'", name="tf_keras")
    assert "pip install tf-keras," in cli.cannot_load_message("bench", err)
    other = ImportError("cannot import name 'x' from 'y'")  # not a missing module: reinstall
    assert cli.cannot_load_message("bench", other).endswith("(reinstall dsgd's harness: bash scripts/setup.sh)")


def test_launch_names_a_clients_command_that_cannot_load(missing, capsys):
    """`dsgd launch -- profile`: refused before any client starts, naming the missing module."""
    assert cli.main(["launch", "--clients", "2", "--", "profile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dsgd profile: cannot load: No module named 'xprof'" in err[0], err
