"""The packages show the architecture: the optimizer (top of ``dsgd/``) never imports the harness
(``dsgd/harness/``) or the advisor (``dsgd/advisor/``); each module has one home."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DSGD = Path(__file__).resolve().parents[1] / "dsgd"
HARNESS = ("measure", "grid", "bench", "profile", "profile_summary", "profile_commits", "regress", "isolate",
           "launch", "gitutil", "models")
ADVISOR = ("plans", "costmodel", "layouts")


def test_optimizer_imports_neither_harness_nor_advisor():
    code = ("import sys, pkgutil, importlib, dsgd, dsgd.impl; import dsgd.optimizer, dsgd.layoutmap, dsgd.mesh, "
            "dsgd.workloads, dsgd.reference64, dsgd.multiclient\n"
            "for m in pkgutil.iter_modules(dsgd.impl.__path__): importlib.import_module('dsgd.impl.' + m.name)\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('dsgd.harness', 'dsgd.advisor')))\n"
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(DSGD.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_one_home_per_module():
    for name in HARNESS:
        assert (DSGD / "harness" / f"{name}.py").is_file() or (DSGD / "harness" / name).is_dir(), name
        assert not (DSGD / f"{name}.py").exists(), f"dsgd/{name}.py: the module lives in dsgd/harness/"
    for name in ADVISOR:
        assert (DSGD / "advisor" / f"{name}.py").is_file() or (DSGD / "advisor" / name).is_dir(), name
        assert not (DSGD / f"{name}.py").exists(), f"dsgd/{name}.py: the module lives in dsgd/advisor/"
