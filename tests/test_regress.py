"""``dsgd regress`` (and its shim scripts/regress.py) catches a real slowdown measured by the real asv, and stays quiet when
nothing changed.

A throwaway git repository (tmp) holds a tiny pure-Python package and an asv suite: commit 1
sleeps 20 ms per call, commit 2 sleeps 60 ms (3x slower), commit 3 only adds a README.  Each
commit is checked out and measured with ``asv run --python=same --set-commit-hash`` (no
environment builds, no TensorFlow), then the report compares them.

The session fixture ``tiny_results`` is shared with tests/test_asv_dashboard.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("asv")
pd = pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]
REGRESS = ROOT / "scripts" / "regress.py"

FAST_S, SLOW_S = 0.020, 0.060


def load_asv_results():
    from dsgd.harness import asv_results

    return asv_results


def load_regress_compare():
    from dsgd.harness import regress_compare

    return regress_compare


@dataclass
class Tiny:
    repo: Path
    env: dict
    commits: list  # [fast, slow, docs-only]
    machine: str = "tinybox"

    def run(self, *args, check=False, timeout=120):
        return subprocess.run(list(args), cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def regress(self, *args):
        return self.run(sys.executable, str(REGRESS), *args)


ASV_CONF = {
    "version": 1, "project": "tinypkg", "repo": ".", "branches": ["main"], "dvcs": "git",
    "environment_type": "virtualenv", "benchmark_dir": "benchmarks",
    "results_dir": ".asv/results", "env_dir": ".asv/env", "html_dir": ".asv/html",
}

BENCH = '''
try:  # installed (asv's own environments) ...
    import tinypkg
except ImportError:  # ... or the checkout under test (asv run --python=same)
    import os, sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tinypkg


class Work:
    number = 1
    repeat = 12
    rounds = 1
    warmup_time = 0

    def time_work(self):
        tinypkg.work()


class Scaled:
    params = [[1, 2]]
    param_names = ["scale"]
    number = 1
    repeat = 12
    rounds = 1
    warmup_time = 0

    def time_scaled(self, scale):
        tinypkg.work(scale)

    def track_calls(self, scale):
        return 10 * scale
'''


def _git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo, *args) -> str:
    _git(repo, "commit", *args)
    return _git(repo, "rev-parse", "HEAD")


def make_tiny_repo(root: Path) -> Tiny:
    """The throwaway repository, its three commits, and an env for asv (HOME in tmp)."""
    repo = root / "repo"
    (repo / "tinypkg").mkdir(parents=True)
    (repo / "benchmarks").mkdir()
    home = root / "home"
    home.mkdir()
    (repo / "asv.conf.json").write_text(json.dumps(ASV_CONF, indent=1))
    (repo / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tinypkg"
        version = "0.1"
        """))
    (repo / ".gitignore").write_text(".asv/\n")
    (repo / "benchmarks" / "__init__.py").write_text("")
    (repo / "benchmarks" / "bench_work.py").write_text(BENCH)
    pkg = repo / "tinypkg" / "__init__.py"
    pkg.write_text(f"import time\n\nDELAY = {FAST_S}\n\n\ndef work(scale=1):\n    time.sleep(DELAY * scale)\n")
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    _git(repo, "add", "-A")
    c1 = _commit(repo, "-qm", "fast")
    pkg.write_text(pkg.read_text().replace(f"DELAY = {FAST_S}", f"DELAY = {SLOW_S}"))
    c2 = _commit(repo, "-qam", "3x slower")
    (repo / "README").write_text("docs only\n")
    _git(repo, "add", "README")
    c3 = _commit(repo, "-qm", "docs only")
    env = dict(os.environ, HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    env.pop("ASV_RUNNER_PATH", None)
    tiny = Tiny(repo, env, [c1, c2, c3])
    tiny.run(sys.executable, "-m", "asv", "machine", "--yes", "--machine", tiny.machine, check=True)
    return tiny


def asv_run_each(tiny: Tiny) -> None:
    """``asv run --python=same`` on each commit, checked out in turn (asv saves results only
    with --set-commit-hash in an existing environment)."""
    for c in tiny.commits:
        _git(tiny.repo, "checkout", "-q", c)
        p = tiny.run(sys.executable, "-m", "asv", "run", "--python=same", f"--set-commit-hash={c}",
                     "--record-samples", "--machine", tiny.machine, "--launch-method", "spawn", timeout=180)
        assert p.returncode == 0, f"asv run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    _git(tiny.repo, "checkout", "-q", "main")


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory) -> Tiny:
    tiny = make_tiny_repo(tmp_path_factory.mktemp("asv_tiny"))
    asv_run_each(tiny)
    return tiny


# ----------------------------------------------------------------------------- end to end
def test_slower_commit_is_flagged(tiny_results, tmp_path):
    fast, slow, _ = tiny_results.commits
    md, csv = tmp_path / "report.md", tmp_path / "report.csv"
    p = tiny_results.regress("compare", fast, slow, "--factor", "1.5", "--markdown", str(md), "--csv", str(csv))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "REGRESSION" in p.stdout
    df = pd.read_csv(csv)
    timed = df[df["benchmark"].str.contains("time_")]
    assert len(timed) == 3  # time_work and time_scaled x 2 parameter sets
    assert set(timed["status"]) == {"regression"}, timed[["benchmark", "params", "status", "ratio"]]
    assert timed["ratio"].between(1.8, 6).all()
    assert (timed["significant"] == True).all()  # noqa: E712 - CSV booleans
    assert (timed[["n_base", "n_head"]] == 12).all().all()
    tracks = df[df["benchmark"].str.contains("track_")]
    assert set(tracks["status"]) == {"same"}
    assert set(df["param:scale"].dropna().astype(int)) == {1, 2}
    text = md.read_text()
    assert text.startswith("### asv regression report") and "| regression |" in text


def test_parent_is_the_default_base(tiny_results):
    """``compare`` with one revision compares it with its parent."""
    p = tiny_results.regress("compare", tiny_results.commits[1], "--factor", "1.5", "--only-changed")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"{tiny_results.commits[1][:8]} vs {tiny_results.commits[0][:8]}" in p.stdout


def test_dsgd_regress_is_the_script(tiny_results):
    """``dsgd regress`` and ``python scripts/regress.py`` are one command: same report, same exit status."""
    fast, slow, docs = tiny_results.commits
    for revs, code in (((fast, slow), 1), ((slow, docs), 0)):
        script = tiny_results.regress("compare", *revs, "--factor", "1.5")
        cli = tiny_results.run(sys.executable, "-m", "dsgd", "regress", "compare", *revs, "--factor", "1.5")
        assert script.returncode == cli.returncode == code, cli.stdout + cli.stderr
        assert script.stdout == cli.stdout
    bad = tiny_results.run(sys.executable, "-m", "dsgd", "regress", "compare", "no-such-rev")
    assert bad.returncode == 2 and "regress: error:" in bad.stderr


def test_unchanged_commit_is_not_flagged(tiny_results):
    _, slow, docs = tiny_results.commits
    p = tiny_results.regress("compare", slow, docs, "--factor", "1.5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no confirmed regression" in p.stdout
    assert "regression " not in p.stdout.split("\n\n")[0]


def test_history_flags_only_the_slow_commit(tiny_results, tmp_path):
    csv = tmp_path / "history.csv"
    p = tiny_results.regress("history", "main", "--factor", "1.5", "--csv", str(csv), "--format", "markdown")
    assert p.returncode == 1, p.stdout + p.stderr
    df = pd.read_csv(csv)
    flagged = set(df.loc[df["status"] == "regression", "commit_head"])
    assert flagged == {tiny_results.commits[1]}
    assert "2 commits, each vs its parent" in p.stdout


def test_continuous_reports_asv_failure_not_regression(tiny_results):
    """asv continuous exits 1 for its own errors too: the wrapper must not read that as a
    regression (nor reuse older results), but say asv failed (exit 3)."""
    fast, slow, _ = tiny_results.commits
    p = tiny_results.regress("continuous", fast, slow, "--asv-args=--python=same")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "asv continuous exited 1" in p.stderr
    assert "no usable results" in p.stderr


# ----------------------------------------------------------------------------- bad input
def test_corrupt_results_file_is_named(tiny_results, tmp_path):
    asv_results = load_asv_results()
    src = tiny_results.repo / ".asv" / "results"
    results = tmp_path / "results"
    shutil.copytree(src, results)
    fast, slow, _ = tiny_results.commits
    victim = next((results / tiny_results.machine).glob(f"{slow[:8]}-*.json"))
    victim.write_text(victim.read_text()[:200])  # truncated mid-write
    p = tiny_results.regress("compare", fast, slow, "--results-dir", str(results))
    assert p.returncode == 2, p.stdout + p.stderr
    assert str(victim) in p.stderr and "corrupt" in p.stderr
    assert "Traceback" not in p.stderr

    # the same, as a library call: a RegressError naming the file
    with pytest.raises(asv_results.RegressError, match=str(victim)):
        asv_results.read_results_file(victim)

    # valid JSON that is not an asv results file
    victim.write_text(json.dumps({"hello": 1}))
    with pytest.raises(asv_results.RegressError, match="not an asv results file"):
        asv_results.read_results_file(victim)

    # binary garbage
    victim.write_bytes(b"\xff\xfe\x00garbage")
    p = tiny_results.regress("compare", fast, slow, "--results-dir", str(results))
    assert p.returncode == 2 and str(victim) in p.stderr, p.stderr


def test_missing_results_are_a_clear_error(tiny_results, tmp_path):
    asv_results = load_asv_results()
    p = tiny_results.regress("compare", tiny_results.commits[1], "--results-dir", str(tmp_path / "nothing"))
    assert p.returncode == 2 and "no asv results under" in p.stderr, p.stderr
    p = tiny_results.regress("compare", tiny_results.commits[0])
    assert p.returncode == 2 and "has no parent" in p.stderr, p.stderr
    with pytest.raises(asv_results.RegressError, match="does not exist"):
        asv_results.read_results_file(tmp_path / "absent.json")
    # a commit never measured
    _git(tiny_results.repo, "commit", "-q", "--allow-empty", "-m", "unmeasured")
    try:
        p = tiny_results.regress("compare", "HEAD~1", "HEAD")
        assert p.returncode == 2 and "no results for commit" in p.stderr, p.stderr
    finally:
        _git(tiny_results.repo, "reset", "-q", "--hard", "HEAD~1")
    p = tiny_results.regress("compare", "no-such-rev", "HEAD")
    assert p.returncode == 2 and "unknown revision 'no-such-rev'" in p.stderr, p.stderr


# ----------------------------------------------------------------------------- the classifier
def _frame(values, samples=None, commit="a" * 40, benchmark="b.T.time_x", version="v1"):
    rows = []
    for i, v in enumerate(values):
        sm = None if samples is None else samples[i]
        st = None
        if sm is not None:
            s = sorted(sm)
            st = {"ci_99_a": s[0], "ci_99_b": s[-1], "q_25": s[len(s) // 4], "q_75": s[3 * len(s) // 4],
                  "repeat": len(s), "number": 1}
        rows.append(dict(benchmark=benchmark, params=str(i), param_dict={"p": str(i)},
                         value=float("nan") if v is None else v, failed=v is None, stats=st, samples=sm,
                         type=benchmark.rsplit(".", 1)[1].split("_")[0], unit="seconds", version=version,
                         commit=commit, env="e", machine="m", file="f"))
    return pd.DataFrame(rows)


def test_classifier_needs_both_factor_and_statistics():
    regress_compare = load_regress_compare()
    quiet = [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99]
    noisy = [1.0, 3.0, 0.5, 2.5, 0.6, 2.8, 0.7, 2.9]
    base = _frame([1.0, 1.0, 1.0, 1.0, 1.0], [quiet, quiet, quiet, noisy, quiet])
    head = _frame([2.0, 1.05, 0.5, 2.0, None], [[x * 2 for x in quiet], [x * 1.05 for x in quiet],
                                              [x / 2 for x in quiet], [x * 2 for x in noisy], None], commit="b" * 40)
    df = regress_compare.compare(base, head, regress_compare.Policy(factor=1.5)).set_index("params")
    assert df.loc["0", "status"] == "regression"   # 2x, samples separate
    assert df.loc["1", "status"] == "same"         # 5%, within the factor
    assert df.loc["2", "status"] == "faster"       # 2x faster, confirmed
    assert df.loc["3", "status"] == "slower?"      # 2x on the medians, but the samples overlap
    assert df.loc["4", "status"] == "new failure"
    assert regress_compare.verdict(df.reset_index(), regress_compare.Policy()) == 1
    assert regress_compare.verdict(df.reset_index(), regress_compare.Policy(allow_new_failures=True)) == 1  # "0" still
    only_noise = df[df.index.isin(["1", "3"])].reset_index()
    assert regress_compare.verdict(only_noise, regress_compare.Policy()) == 0


def test_strict_criterion_needs_the_confidence_intervals_apart():
    """A whole run shifted (load drift between two runs): the rank test says "different", the
    medians' 99% CIs overlap.  strict (default): not confirmed; asv's test alone: regression."""
    regress_compare = load_regress_compare()
    a = [1.0 + 0.05 * i for i in range(20)]
    b = [x + 0.45 for x in a]
    base, head = _frame([1.475], [a]), _frame([1.925], [b], commit="b" * 40)
    assert regress_compare.significant(base.stats[0], a, head.stats[0], b, 0.002) is True
    assert regress_compare.ci_apart(base.stats[0], head.stats[0]) is False
    assert regress_compare.compare(base, head, regress_compare.Policy(factor=1.2))["status"].tolist() == ["slower?"]
    assert regress_compare.compare(base, head, regress_compare.Policy(factor=1.2, criterion="asv"))["status"].tolist() == ["regression"]


def test_classifier_directions_and_tracks():
    regress_compare = load_regress_compare()
    # higher is better: GB/s halving is a regression (an exact count needs no samples; GB/s does)
    base = _frame([10.0], benchmark="b.M.track_achieved_gbps")
    head = _frame([5.0], benchmark="b.M.track_achieved_gbps", commit="b" * 40)
    df = regress_compare.compare(base, head, regress_compare.Policy(factor=1.5))
    assert df.loc[0, "status"] == "slower?" and df.loc[0, "worse_ratio"] == pytest.approx(2.0)
    base = _frame([100.0], benchmark="b.M.track_state_bytes_per_device")
    head = _frame([200.0], benchmark="b.M.track_state_bytes_per_device", commit="b" * 40)
    assert regress_compare.compare(base, head, regress_compare.Policy())["status"].tolist() == ["regression"]
    # changed benchmark code: not comparable; one sample (a --quick run): never confirmed
    head = _frame([200.0], benchmark="b.M.track_state_bytes_per_device", commit="b" * 40, version="v2")
    assert regress_compare.compare(base, head, regress_compare.Policy())["status"].tolist() == ["incomparable"]
    base, head = _frame([1.0], [[1.0]]), _frame([3.0], [[3.0]], commit="b" * 40)
    assert regress_compare.compare(base, head, regress_compare.Policy())["status"].tolist() == ["slower?"]
    # skipped on one side
    base, head = _frame([None]), _frame([1.0], commit="b" * 40)
    base.loc[0, "failed"] = False
    assert regress_compare.compare(base, head, regress_compare.Policy())["status"].tolist() == ["skipped"]


def test_abba_round_check_demotes_effects_of_single_processes():
    """abba: samples are split back into rounds (processes); a change that not every round
    shows is not confirmed, however many samples the rank test sees."""
    regress_compare = load_regress_compare()
    assert regress_compare.round_medians([1, 2, 3, 10, 11, 12], [3, 6]) == [2, 11]
    quiet = [1.0 + 0.01 * i for i in range(10)]
    # base: 4 rounds at ~1.0; head: rounds at ~2.0, except one process that ran at ~1.0
    base_s = quiet * 4
    head_ok = [2 * x for x in quiet] * 4
    head_mixed = [2 * x for x in quiet] * 3 + quiet
    counts = {("b.T.time_x", "0", "e"): [10, 20, 30, 40], ("b.T.time_x", "1", "e"): [10, 20, 30, 40]}
    base = _frame([1.05, 1.05], [base_s, base_s])
    head = _frame([2.1, 2.0], [head_ok, head_mixed], commit="b" * 40)
    # stats spanning the samples would overlap for the mixed one; make them tight to isolate the round rule
    for f in (base, head):
        for i in range(2):
            v = f.loc[i, "value"]
            f.at[i, "stats"] = {"ci_99_a": v * 0.99, "ci_99_b": v * 1.01, "q_25": v, "q_75": v, "repeat": 40}
    df = regress_compare.compare(base, head, regress_compare.Policy(factor=1.5))
    assert df["status"].tolist() == ["regression", "regression"]
    regress_compare.apply_round_check(df, base, head, (counts, counts))
    got = df.set_index("params")
    assert got.loc["0", "status"] == "regression" and got.loc["0", "rounds_apart"] == True  # noqa: E712
    assert got.loc["1", "status"] == "slower?" and got.loc["1", "rounds_apart"] == False  # noqa: E712
