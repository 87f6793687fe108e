"""``dsgd profile --commits``: capture ``dsgd profile`` for one commit, several, or a range,
each from its own source.

    dsgd profile --commits HEAD~1 HEAD --workload bert-mini --mesh batch=2,model=4
    dsgd profile --commits v0.1..HEAD --commits-diff --xla on --steps 3
    python scripts/profile_commits.py HEAD~1 HEAD --diff -- --workload bert-mini   # the same, as before

For every commit: a temporary ``git worktree`` of it is made, ``import dsgd`` is checked there
(the "build"), then ``python -m dsgd profile --commit <sha7> --out <OUT> <profile args>`` runs
with ``PYTHONPATH`` pointing at that worktree, so the commit's own optimizer and harness are
profiled; the worktree is removed afterwards.  A commit that does not import, has no
``dsgd profile``, or whose capture fails is reported and the rest go on.  Everything lands in one
``profiles/`` (default: ``<repo>/profiles``), its ledger and TensorBoard runs included; ``--diff``
(``--commits-diff``) prints the first and last commits' summaries side by side at the end.
The other ``dsgd profile`` options given are passed on to every commit's own ``dsgd profile``
(only those that differ from their defaults, so older commits need not know newer options).

Exit status: 0 when every commit was captured (runs already there are skipped unless ``--force``
is passed on to ``dsgd profile``), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from dsgd.harness import gitutil

COMMIT_TIMEOUT_S = 7200.0
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds the running dsgd/


def git(repo: str, *args: str) -> str:
    try:
        return gitutil.git(repo, *args)
    except gitutil.GitError as e:
        raise SystemExit(f"dsgd profile --commits: {e}") from None


def resolve(repo: str, revs: Sequence[str]) -> list[str]:
    """Full SHAs, oldest first within a range, in the order given, without repeats."""
    out: list[str] = []
    for rev in revs or ["HEAD"]:
        if ".." in rev:
            shas = git(repo, "rev-list", "--reverse", rev).split()
            if not shas:
                print(f"dsgd profile --commits: range {rev} holds no commits", file=sys.stderr)
        else:
            shas = [git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")]
        out += [s for s in shas if s not in out]
    return out


def _tail(text: str, n: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def profile_commit(repo: str, sha: str, out: str, profile_args: list[str], timeout: float,
                   keep: bool = False) -> dict:
    t0 = time.perf_counter()
    res = _profile_commit(repo, sha, out, profile_args, timeout, keep)
    res["seconds"] = time.perf_counter() - t0
    return res


def _profile_commit(repo: str, sha: str, out: str, profile_args: list[str], timeout: float, keep: bool) -> dict:
    short = sha[:7]  # git's short form, as dsgd profile names commits
    wt = tempfile.mkdtemp(prefix=f"dsgd-{short}-")
    os.rmdir(wt)  # git worktree add wants to create it
    res = {"commit": short, "status": "ok", "detail": ""}
    try:
        try:
            gitutil.git(repo, "worktree", "add", "--detach", wt, sha)
        except gitutil.GitError as e:
            return dict(res, status="failed", detail=f"git worktree add: {_tail(str(e))}")
        env = dict(os.environ, PYTHONPATH=wt + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
                   TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
        if not os.path.exists(os.path.join(wt, "dsgd", "__init__.py")):
            return dict(res, status="failed", detail="this commit has no dsgd package (so no `dsgd profile`)")
        check = subprocess.run(
            [sys.executable, "-c", "import os, dsgd, dsgd.cli; print(os.path.dirname(os.path.dirname(dsgd.__file__)))"],
            capture_output=True, text=True, env=env, cwd=wt, timeout=600)
        if check.returncode != 0:
            return dict(res, status="failed", detail=f"does not build/import: {_tail(check.stderr, 3)}")
        if os.path.realpath(check.stdout.strip().splitlines()[-1]) != os.path.realpath(wt):
            return dict(res, status="failed", detail=f"imported dsgd from {check.stdout.strip()}, not from the worktree")
        if not any(os.path.exists(os.path.join(wt, "dsgd", *sub, "profile.py")) for sub in ((), ("harness",))):
            return dict(res, status="failed", detail="this commit has no `dsgd profile`")
        cmd = [sys.executable, "-m", "dsgd", "profile", "--commit", short, "--out", out, *profile_args]
        print(f"\n=== {short} {git(repo, 'show', '-s', '--format=%s', sha)[:70]}\n$ {' '.join(cmd)}", flush=True)
        try:
            run = subprocess.run(cmd, env=env, cwd=wt, timeout=timeout, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired:
            return dict(res, status="failed", detail=f"dsgd profile ran over {timeout:.0f} s")
        for line in run.stdout.splitlines():
            if line.startswith(("ok ", "FAILED ", "skipped ", "dsgd profile", "browse:")) or " captured, " in line:
                print(f"  {line}", flush=True)
        if run.returncode == 0:
            return res
        if run.returncode == 3:
            return dict(res, status="partial", detail="some configs failed (see FAILED lines)")
        return dict(res, status="failed", detail=f"dsgd profile exited {run.returncode}: {_tail(run.stdout, 4)}")
    finally:
        if not keep and os.path.isdir(wt):
            gitutil.git_or_none(repo, "worktree", "remove", "--force", wt, timeout=None)
            shutil.rmtree(wt, ignore_errors=True)
            gitutil.git_or_none(repo, "worktree", "prune", timeout=None)


def run(repo: str, revs: Sequence[str], out: str, profile_args: Sequence[str], *, timeout: float = COMMIT_TIMEOUT_S,
        keep: bool = False, diff: bool = False) -> int:
    """Profile every commit of ``revs`` (commits or ranges ``A..B``) into ``out``; 0 when all were captured."""
    repo = git(repo, "rev-parse", "--show-toplevel")
    out = os.path.abspath(out)
    shas = resolve(repo, list(revs))
    if not shas:
        print("dsgd profile --commits: no commits to profile", file=sys.stderr)
        return 1
    results = [profile_commit(repo, s, out, list(profile_args), timeout, keep) for s in shas]
    print("\ncommit        status   seconds  detail")
    for r in results:
        print(f"{r['commit']:<13} {r['status']:<8} {r['seconds']:7.0f}  {r['detail']}")
    captured = [r["commit"] for r in results if r["status"] in ("ok", "partial")]
    if diff and len(captured) >= 2:
        print()
        here = CHECKOUT
        env = dict(os.environ, PYTHONPATH=here + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        subprocess.run([sys.executable, "-m", "dsgd", "profile", "--out", out, "--diff", captured[0], captured[-1]],
                       env=env, cwd=here)
    print(f"\nbrowse: tensorboard --logdir {out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


#: dsgd profile's own options that --commits handles here rather than passing on
_NOT_PASSED = {"out", "commits", "commits_diff", "keep_worktrees", "repo", "commit_timeout", "diff", "commit",
               "command", "_main"}


def passed_on_args(args, defaults: dict) -> list[str]:
    """The ``dsgd profile`` options of ``args`` that differ from ``defaults``, as an argv for
    each commit's own ``dsgd profile``."""
    argv: list[str] = []
    for key, value in vars(args).items():
        if key in _NOT_PASSED or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def main(argv=None) -> int:
    """``python scripts/profile_commits.py [REV | A..B]... [--diff] [-- dsgd profile args]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    profile_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, profile_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="profile_commits.py [REV | A..B]... [options] [-- dsgd profile args]")
    p.add_argument("revs", nargs="*", help="commits or ranges A..B (default HEAD)")
    p.add_argument("--repo", default=CHECKOUT,
                   help="git repository (default: this checkout)")
    p.add_argument("--out", help="profiles directory (default: <repo>/profiles)")
    p.add_argument("--timeout", type=float, default=COMMIT_TIMEOUT_S, help=f"seconds per commit (default {COMMIT_TIMEOUT_S:.0f})")
    p.add_argument("--keep-worktrees", action="store_true", help="leave the temporary worktrees in place")
    p.add_argument("--diff", action="store_true", help="print the first and last commits' summary diff at the end")
    a = p.parse_args(argv)
    out = a.out or os.path.join(git(a.repo, "rev-parse", "--show-toplevel"), "profiles")
    return run(a.repo, a.revs, out, profile_args, timeout=a.timeout, keep=a.keep_worktrees, diff=a.diff)
