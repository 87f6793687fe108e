"""``dsgd profile``: TensorBoard profiles and XLA HLO of the optimizer step, per commit and config.

For each configuration (workload x mesh x layout x dtype x implementation x XLA on/off x options)
a fresh worker process (:func:`dsgd.harness.isolate.run_isolated`, with ``XLA_FLAGS=--xla_dump_to`` set
to that run's directory) builds the case with :func:`dsgd.harness.measure.build_case`, times the first
step and then the warm step with :mod:`dsgd.harness.measure`, profiles ``--steps`` more steps under
``tf.profiler.experimental.start/stop`` with ``Trace('train', step_num=i, _r=1)`` markers, and
captures the HLO of XLA paths (:func:`dsgd.impl.xla.capture_hlo`).  Layout on disk::

    profiles/
      ledger.csv                          one row per (commit, config): the summary numbers
      <config>/<commit>/
        plugins/profile/<session>/*.xplane.pb   the trace (TensorBoard's Profile tab)
        events.out.tfevents.*              per-step times of this run (Scalars tab)
        hlo/*.hlo.txt, hlo/hlo_programs.json    HLO per device program, before/after optimisation
        hlo/xla_dump/                      what XLA itself dumped (--xla_dump_to)
        summary.json                       the run's summary (also in the ledger)
      history/<config>/events.out.tfevents.*.<commit>   step time per commit (Scalars tab)

so ``tensorboard --logdir profiles`` lists runs as ``<config>/<commit>`` (what tells runs apart first,
see :func:`config_name`).  A config that claims XLA (``--xla on``) but whose trace holds no HLO module
fails loudly.  ``dsgd profile`` refuses a bad value (unknown workload, a mesh that does not fit, ...)
before anything starts (exit 2, :mod:`dsgd.argcheck`); :func:`capture` called directly reports such a
config and skips it without writing it to the ledger, and a config whose worker fails is recorded as
failed; the rest
go on.  Runs already captured are never overwritten without ``--force``.

``dsgd profile --diff A B`` prints the ledger's summaries of two commits side by side.

This module names runs and drives the captures (and is the command); the worker that captures one
configuration is :mod:`dsgd.harness.profile_capture`, the ledger :mod:`dsgd.harness.profile_ledger`,
the summaries of xprof's files :mod:`dsgd.harness.profile_summary`, ``--commits``
:mod:`dsgd.harness.profile_commits`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict
from typing import Optional, Sequence

from dsgd.harness.gitutil import git_or_none
from dsgd.harness.profile_names import config_name, mesh_tag  # noqa: F401 (the command's names)
from dsgd.harness.grid import DEFAULT_MODELS, add_grid_arguments
from dsgd.harness.measure import MODEL_MODES, MODES, NO_UPDATE, Case
from dsgd.harness.profile_args import DEFAULT_IMPLEMENTATIONS, DEFAULT_MESHES, DEFAULT_MODES, DEFAULT_WORKLOADS


COMMIT_CHARS = 7  # git's own short form: leaves room for the config in TensorBoard's picker


def source_repo() -> Optional[str]:
    """The git work tree the running ``dsgd`` package comes from (None outside git)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return git_or_none(here, "rev-parse", "--show-toplevel")


def commit_info(commit: Optional[str] = None, repo: Optional[str] = None) -> dict:
    """``{"commit", "commit_order", "commit_date"}`` for ``commit`` (default: the source's HEAD).

    Without ``commit``, a work tree with uncommitted changes to tracked files is named
    ``<sha>+dirty``.  ``commit_order`` (``git rev-list --count``) orders commits along history:
    it is the step of the per-commit TensorBoard scalars.
    """
    repo = repo or source_repo()
    name, order, date = commit, None, None
    if repo:
        rev = commit or "HEAD"
        full = git_or_none(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        if full:
            if commit is None:
                name = full[:COMMIT_CHARS]
                if git_or_none(repo, "status", "--porcelain", "--untracked-files=no"):
                    name += "+dirty"
            cnt = git_or_none(repo, "rev-list", "--count", full)
            order = int(cnt) if cnt and cnt.isdigit() else None
            date = git_or_none(repo, "show", "-s", "--format=%cI", full)
    if not name:
        name = "nocommit"
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ValueError(f"commit name {name!r} may hold only letters, digits and . _ + -")
    return {"commit": name, "commit_order": order, "commit_date": date}


# ------------------------------------------------------------------------------ the driver
def _existing_ok(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("status") == "ok"
    except (OSError, ValueError):
        return False


def precheck(case: Case, devices: int) -> Optional[str]:
    """Why a case cannot run (checked without TensorFlow), or None."""
    from dsgd.workloads import LAYOUT_POLICIES, get_workload

    try:
        if case.mode in MODEL_MODES:
            from dsgd.harness import models

            models.get_model_spec(case.workload)
        else:
            get_workload(case.workload, case.dtype)
        spec = case.mesh_spec
    except ValueError as e:
        return str(e)
    if spec.size > devices:
        return (f"mesh {case.mesh!r} needs {spec.size} devices but the worker has {devices} "
                f"(--devices)")
    if case.mode in MODEL_MODES:
        return None  # a model is laid out by a policy (checked with the arguments)
    if case.layout not in LAYOUT_POLICIES and not os.path.exists(case.layout):
        return f"layout {case.layout!r} is neither one of {list(LAYOUT_POLICIES)} nor a layout-map file"
    return None


def capture(cases: Sequence[Case], out: str, *, commit: Optional[str] = None, steps: int = 3,
            time_steps: int = 10, force: bool = False, devices: int = 8, timeout: Optional[float] = 900,
            ledger: Optional[str] = None, echo=print, allocator: str = "default") -> list[dict]:
    """Capture every case into ``out/<config>/<commit>``; append the ledger; return one row per case.

    Rows have ``status`` ``ok``, ``failed`` (with ``error``) or ``skipped`` (already captured).
    """
    from dsgd.harness import profile_ledger
    from dsgd.harness.isolate import run_isolated

    out = os.path.abspath(out)
    info = commit_info(commit)
    ledger = ledger or os.path.join(out, "ledger.csv")
    rows = []
    for case in cases:
        name = config_name(case)
        run_dir = os.path.join(out, name, info["commit"])
        base = dict(asdict(case), config=name, **info)
        if os.path.isdir(run_dir) and _existing_ok(run_dir) and not force:
            row = dict(base, status="skipped", error=f"{os.path.relpath(run_dir, out)} exists (use --force to replace it)")
            echo(f"skipped  {name}/{info['commit']}: already captured (use --force to replace)")
            rows.append(row)
            continue
        why = precheck(case, devices)
        if why:  # reported, not written: a typo must not enter the per-commit history
            row = dict(base, status="failed", error=why)
            echo(f"FAILED   {name}/{info['commit']}: {why}")
            rows.append(row)
            continue
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # --force, or an earlier failed capture
        os.makedirs(run_dir)
        env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={run_dir}/hlo/xla_dump").strip()}
        if allocator == "bfc":
            env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
        payload = {"case": asdict(case), "config": name, "run_dir": run_dir, "out": out, "steps": steps,
                   "time_steps": time_steps, **info}
        t0 = time.perf_counter()
        res = run_isolated("dsgd.harness.profile_capture:capture_config", [payload], devices=devices, timeout=timeout, env=env,
                           device_type=case.device)[0]
        row = dict(base, **{k: v for k, v in res.items() if k != "traceback"})
        if row.get("status") == "ok":
            echo(f"ok       {name}/{info['commit']}: step {row['median_ms']:.3g} ms (first {row['first_step_s']:.2f} s), "
                 f"{row['ops_per_step']:.0f} ops/step, {row['hlo_modules']} HLO modules, {row['fusions']} fusions "
                 f"[{row['impl_used']}] ({time.perf_counter() - t0:.0f} s)")
        else:
            row["status"] = "failed"
            echo(f"FAILED   {name}/{info['commit']}: {str(row.get('error'))[:500]}")
            with open(os.path.join(run_dir, "summary.json"), "w") as f:
                json.dump(row, f, indent=1, default=str)
        rows.append(row)
        profile_ledger.append_ledger(ledger, [row])
    return rows


def where_the_time_goes(rows: Sequence[dict], top: int = 12) -> str:
    """For each whole-step configuration captured with its floor: the op types' self time per step
    (summed over the devices' threads) of the floor and of each optimizer side by side, largest
    difference from the floor first -- where an optimizer's share of the step goes."""
    from dsgd.harness import profile_summary as ps

    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("mode") in MODEL_MODES and r.get("op_types_table"):
            key = (r["workload"], r["mesh"], r["layout"], r["dtype"], r["options"], r["mode"], r["xla"])
            groups.setdefault(key, {})[r["implementation"]] = r
    out = []
    for key, by_impl in groups.items():
        if NO_UPDATE not in by_impl or len(by_impl) < 2:
            continue
        names = [NO_UPDATE] + [i for i in by_impl if i != NO_UPDATE]
        out.append(f"where the time goes: {key[0]} on {key[1]}, {key[5]} (self ms per step, summed over the devices' "
                   "threads; floor = the same step applying nothing)")
        out.append(ps.render_op_type_comparison({n: by_impl[n]["op_types_table"] for n in names},
                                                {n: by_impl[n].get("median_ms") for n in names}, top=top))
    return "\n\n".join(out)


# ------------------------------------------------------------------------------ CLI
def add_arguments(p) -> None:
    p.add_argument("--out", default="profiles", help="profiles directory (default: profiles)")
    add_grid_arguments(p, workloads=DEFAULT_WORKLOADS, meshes=DEFAULT_MESHES,
                       implementations=DEFAULT_IMPLEMENTATIONS, xla="both")
    p.add_argument("--mode", action="append", choices=list(MODES),
                   help="where the step runs (repeatable; default: eager): eager / graph = the optimizer step "
                        "(apply_gradients eagerly / inside a tf.function) of --workload; train_step / fit = the whole "
                        "training step of --model (a custom tf.function step / one model.fit step), captured beside "
                        "the floor: the same step with an optimizer that applies nothing")
    p.add_argument("--model", action="append",
                   help=f"model of the train_step and fit modes (repeatable; default {DEFAULT_MODELS[0]}; "
                        "dsgd.harness.models.MODELS)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per config (default 3)")
    p.add_argument("--time-steps", type=int, default=10, help="steps timed by the harness before profiling (default 10)")
    p.add_argument("--force", action="store_true", help="replace runs already captured for this commit")
    p.add_argument("--commit", help="name the runs after this commit (default: the source tree's HEAD, +dirty if modified)")
    p.add_argument("--allocator", choices=["default", "bfc"], default="default",
                   help="CPU allocator of the workers; 'bfc' also records the memory profile (peak bytes in use)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per config before its worker is killed")
    p.add_argument("--ledger", help="ledger CSV (default: OUT/ledger.csv)")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"),
                   help="print the ledger summaries of commits A and B side by side (ledger names or git revisions)")
    g = p.add_argument_group("commit ranges", "profile other commits, each from a temporary git worktree of it "
                             "with its own dsgd profile (the options above that differ from their defaults are "
                             "passed on)")
    g.add_argument("--commits", nargs="+", metavar="REV|A..B", help="commits or ranges to profile, oldest first")
    g.add_argument("--commits-diff", action="store_true",
                   help="with --commits: print the first and last commits' summaries side by side at the end")
    g.add_argument("--repo", help="with --commits: the git repository (default: the one dsgd runs from)")
    g.add_argument("--commit-timeout", type=float, default=7200.0,
                   help="with --commits: seconds per commit before it is stopped (default 7200)")
    g.add_argument("--keep-worktrees", action="store_true", help="with --commits: leave the worktrees in place")


def _ledger_commit(df, name: str) -> str:
    """A ledger commit name, or a git revision (``HEAD~1``, a branch) of the source tree mapped to one."""
    known = set(df["commit"].astype(str))
    if any(c.startswith(name) or c == name for c in known):
        return name
    repo = source_repo()
    full = git_or_none(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}") if repo else None
    if full:
        hits = [c for c in known if full.startswith(c.split("+")[0])]
        if hits:
            return sorted(hits, key=len)[0]  # the clean capture before a +dirty one
        return full[:COMMIT_CHARS]
    return name


def _profile_commits(args) -> int:
    """``--commits``: every commit's own ``dsgd profile`` with this one's non-default options."""
    import argparse

    from dsgd.harness import profile_commits

    fresh = argparse.ArgumentParser()
    add_arguments(fresh)
    repo = args.repo or source_repo()
    if not repo:
        raise ValueError("--commits: dsgd does not run from a git work tree; give --repo DIR")
    return profile_commits.run(repo, args.commits, args.out,
                               profile_commits.passed_on_args(args, vars(fresh.parse_args([]))),
                               timeout=args.commit_timeout, keep=args.keep_worktrees, diff=args.commits_diff)


def main(args) -> int:
    from dsgd.harness import profile_ledger
    from dsgd.harness.grid import cases_from_args
    from dsgd.harness.profile_args import check_profile

    check_profile(args)  # before any worker starts or anything is written
    ledger = args.ledger or os.path.join(args.out, "ledger.csv")
    if args.diff:
        df = profile_ledger.read_ledger(ledger)
        if df.empty:
            raise FileNotFoundError(f"no ledger at {ledger}: capture profiles first")
        names = [_ledger_commit(df, name) for name in args.diff]
        print(profile_ledger.render_diff(profile_ledger.diff_commits(df, *names)))
        return 0
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if args.commits:
        return _profile_commits(args)
    cases = cases_from_args(args, workloads=DEFAULT_WORKLOADS, meshes=DEFAULT_MESHES,
                            implementations=DEFAULT_IMPLEMENTATIONS, modes=args.mode or DEFAULT_MODES,
                            models=args.model or DEFAULT_MODELS)
    info = commit_info(args.commit)
    print(f"dsgd profile: {len(cases)} config(s) for commit {info['commit']} into {os.path.abspath(args.out)}",
          file=sys.stderr)
    rows = capture(cases, args.out, commit=args.commit, steps=args.steps, time_steps=args.time_steps,
                   force=args.force, devices=args.devices, timeout=args.timeout, ledger=ledger,
                   allocator=args.allocator)
    table = where_the_time_goes(rows)
    if table:
        print("\n" + table)
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"\n{ok} captured, {skipped} skipped, {len(failed)} failed; ledger: {ledger}\n"
          f"browse: tensorboard --logdir {args.out}")
    return 3 if failed else 0
