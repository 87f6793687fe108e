"""A new user's first minutes: what the set-up installs, and the one-time kernel build saying so.

* ``scripts/setup.sh`` (the main job) installs dsgd with its harness and no browser;
  ``scripts/setup.sh --test`` adds the test tools and Chromium (run here with stub pip/apt-get);
* the kernel build announces itself once per process on stderr (run with a stub compiler), and a
  worker's ``dsgd: `` notes reach the user through :mod:`dsgd.harness.isolate`.
"""
from __future__ import annotations

import io
import os
import subprocess
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)


def _setup(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run scripts/setup.sh with pip, apt-get, dpkg and id stubbed; returns the run and the commands they logged."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    _stub(bin_dir / "python-stub", f'echo "python $*" >> {log}\n')
    _stub(bin_dir / "apt-get", f'echo "apt-get $*" >> {log}\n')
    _stub(bin_dir / "dpkg", "exit 1\n")  # nothing installed
    _stub(bin_dir / "id", "echo 0\n")  # as root
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", PYTHON=str(bin_dir / "python-stub"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=60)
    return proc, log.read_text()


def test_setup_main_job_installs_no_browser(tmp_path):
    proc, calls = _setup(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pip install" in calls and "-e .[harness]" in calls
    assert "apt-get" not in calls and "chromium" not in calls + proc.stderr


def test_setup_for_the_tests_adds_the_browser(tmp_path):
    proc, calls = _setup(tmp_path, "--test")
    assert proc.returncode == 0, proc.stderr
    assert "-e .[test]" in calls
    assert "apt-get install" in calls and "chromium" in calls
    bad, _ = _setup(tmp_path, "--tests")
    assert bad.returncode == 2 and "--test" in bad.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh --test && python3 -m pytest" in readme
    assert "bash scripts/setup.sh --test\n" in ci
    assert "bash scripts/setup.sh && dsgd bench" in readme


def test_kernel_build_announces_itself_once(tmp_path, monkeypatch, capsys):
    """A cache miss: one line saying what, why, how long and where; one 'compiled' line per library;
    a cache hit says nothing."""
    from dsgd import kernels

    cxx = tmp_path / "fake-g++"
    # --version for the cache key; otherwise write the file named after -o
    _stub(cxx, 'if [ "$1" = --version ]; then echo "fake 1.0"; exit 0; fi\n'
               'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then echo lib > "$2"; fi; shift; done\n')
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("DSGD_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DSGD_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_announced", False)
    kernels.build(source=kernels.SOURCE)
    kernels.build(source=kernels.DISPATCH_SOURCE)
    err = capsys.readouterr().err.splitlines()
    notes = [ln for ln in err if ln.startswith(kernels.NOTE)]
    assert len(notes) == 3, err
    assert "building dsgd's C++ kernels" in notes[0] and "~20 s" in notes[0] and str(tmp_path / "cache") in notes[0]
    assert notes[1].startswith("dsgd: compiled multi_momentum.cc in ")
    assert notes[2].startswith("dsgd: compiled dispatch.cc in ")
    kernels.build(source=kernels.SOURCE)  # cached now
    assert capsys.readouterr().err == ""


def test_worker_notes_reach_the_user(capsys):
    from dsgd.harness import isolate

    lines: list[str] = []
    isolate._read_stderr(io.StringIO("W0000 tensorflow noise\ndsgd: building the kernels\n"), lines)
    assert len(lines) == 2  # all kept for failure messages
    err = capsys.readouterr().err
    assert "dsgd: building the kernels" in err and "noise" not in err
