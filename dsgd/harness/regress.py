"""Regression detection on asv results: which benchmarks got slower (or faster) between commits.

    dsgd regress compare [[BASE] HEAD]     # HEAD (default HEAD) vs BASE (default: HEAD's parent)
    dsgd regress history [RANGE]           # every commit with results vs its parent
    dsgd regress continuous [BASE] [HEAD]  # asv continuous --interleave-rounds, then compare
    dsgd regress abba [BASE] [HEAD]        # rounds in ABBA order (drift cancels), then compare

(``python scripts/regress.py ...`` is the same command.)

Results are read from asv's own files (``<results_dir>/<machine>/<commit>-<env>.json``, as
written by ``asv run``, ``asv run --python=same --set-commit-hash`` or ``asv continuous``) into
a pandas frame, one row per benchmark, parameter set and commit.

A change counts as *confirmed* only when

* the ratio of the two values (medians) is beyond ``--factor`` in the worse direction,
* asv's statistics say the two measurements differ: the Mann-Whitney U test on the recorded
  samples (``asv._stats.is_different``, p < ``--p-threshold``), or, without enough samples,
  non-overlapping 99% confidence intervals of the medians (asv's own fallback), and
* (``--criterion strict``, the default) the medians' 99% confidence intervals do not overlap
  either.  On a shared machine the load drifts between two runs and shifts every sample of a
  run together; the rank test alone then "confirms" a 1.6x change between two runs of the
  same code (seen here), the confidence intervals do not.

A change beyond the factor that the statistics do not confirm (noise, one sample only, a
``--quick`` run) is reported as ``slower?`` / ``faster?`` and does not fail the gate.  Results
without statistics (``track_`` benchmarks) are compared by value only for the benchmarks that
``--deterministic`` names (counts such as bytes per device); the others are reported only.

Exit status: 0 no confirmed regression; 1 a confirmed regression (or, unless
``--allow-new-failures``, a benchmark that ran at BASE and fails at HEAD); 2 bad input (no
results for a commit, a missing or corrupt results file, a bad revision); 3 asv itself failed
(``continuous``: asv's exit status is reported, never taken as the verdict); 4 an internal
error of this command (never 1, which means "regression").
"""

import argparse
import shlex
import subprocess
import sys
import time
from typing import Iterable, Optional, Sequence

from dsgd.harness.asv_results import (RegressError, Setup, benchmark_meta, commits_in_range, commits_with_results,
                                      first_parents, load_commit, load_setup, pick_machine, read_results_file,
                                      result_files, rev_parse)
from dsgd.harness.regress_compare import (DEFAULT_DETERMINISTIC, DEFAULT_FACTOR, DEFAULT_HIGHER_IS_BETTER, DEFAULT_P,
                                          EXIT_ASV_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, Policy, apply_round_check,
                                          compare, verdict)
from dsgd.harness.regress_report import summary, write_outputs


def compare_commits(setup: Setup, base_rev: Optional[str], head_rev: str = "HEAD", *, machine=None, env=None,
                    policy: Policy = Policy()):
    head = rev_parse(setup.repo, head_rev)
    base = rev_parse(setup.repo, base_rev) if base_rev else rev_parse(setup.repo, f"{head}^")
    machine = pick_machine(setup, machine)
    meta = benchmark_meta(setup)
    return compare(load_commit(setup, machine, base, env, meta), load_commit(setup, machine, head, env, meta), policy)


def cmd_compare(args) -> int:
    setup = load_setup(args.config, args.results_dir)
    policy = _policy(args)
    revs = list(args.revisions)
    if len(revs) > 2:
        raise RegressError(f"compare takes at most two revisions (BASE HEAD), got {len(revs)}")
    base, head = (None, revs[0] if revs else "HEAD") if len(revs) < 2 else revs
    df = compare_commits(setup, base, head, machine=args.machine, env=args.env, policy=policy)
    write_outputs(df, args, policy)
    return verdict(df, policy)


def cmd_history(args) -> int:
    """Each commit in the range that has results, against its nearest first-parent ancestor with results."""
    import pandas as pd

    setup = load_setup(args.config, args.results_dir)
    policy = _policy(args)
    machine = pick_machine(setup, args.machine)
    have = commits_with_results(setup, machine)
    commits = [c for c in commits_in_range(setup.repo, args.range) if c[:setup.hash_length] in have]
    if len(commits) < 2:
        raise RegressError(f"fewer than two commits in {args.range!r} have results on machine {machine!r}")
    meta = benchmark_meta(setup)
    frames = []
    for c in commits:
        parent = next((p for p in first_parents(setup.repo, c, limit=200) if p[:setup.hash_length] in have), None)
        if parent is None:
            continue
        df = compare(load_commit(setup, machine, parent, args.env, meta),
                     load_commit(setup, machine, c, args.env, meta), policy)
        frames.append(df)
        print(f"# {c[:8]} vs {parent[:8]}: " + summary(df, policy).split(": ", 1)[1], file=sys.stderr)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_outputs(df, args, policy)
    return verdict(df, policy)


def asv_continuous_command(base: str, head: str, factor: float, bench: Sequence[str] = (),
                           machine: Optional[str] = None, config: Optional[str] = None,
                           extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "asv", "continuous", "--factor", str(factor), "--interleave-rounds",
           "--split", "--record-samples"]
    if config:
        cmd += ["--config", str(config)]
    if machine:
        cmd += ["--machine", machine]
    for b in bench:
        cmd += ["--bench", b]
    return cmd + list(extra) + [base, head]


def cmd_continuous(args) -> int:
    """``asv continuous`` (fresh environments, both commits, rounds interleaved), then the
    same comparison as ``compare`` on the results it saved.

    asv continuous exits 1 both for "performance decreased" and for its own errors, and 2
    when any benchmark failed — before comparing at all — so its status is reported but the
    verdict comes from reading the saved results.
    """
    setup = load_setup(args.config, args.results_dir)
    policy = _policy(args)
    head = rev_parse(setup.repo, args.head)
    base = rev_parse(setup.repo, args.base)
    cmd = asv_continuous_command(base, head, policy.factor, args.bench, args.machine, setup.config,
                                 shlex.split(args.asv_args or ""))
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    started = time.time()
    proc = subprocess.run(cmd, cwd=setup.root, capture_output=not args.show_asv_output, text=True)
    meaning = {0: "no significant slowdown", 1: "slowdown found, or an asv error",
               2: "some benchmarks failed, asv skipped its comparison"}.get(proc.returncode, "unexpected status")
    print(f"asv continuous exited {proc.returncode} ({meaning}); the verdict below is read from its results",
          file=sys.stderr)
    tail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:]
    return _verdict_from_fresh_results(setup, args, policy, base, head, started, tail)


def _verdict_from_fresh_results(setup: Setup, args, policy: Policy, base: str, head: str, started: float,
                                tail: str, rounds=None) -> int:
    try:
        machine = pick_machine(setup, args.machine)
        # Only results this run wrote: older files for the same commits must not stand in.
        fresh = {c: [f for f in result_files(setup, machine, c) if f.stat().st_mtime >= started - 1]
                 for c in (base, head)}
        missing = [c[:8] for c, files in fresh.items() if not files]
        if missing:
            raise RegressError(f"asv wrote no results for {', '.join(missing)} in {setup.results_dir / machine}")
        envs = {f.stem.split("-", 1)[1] for f in fresh[base]} & {f.stem.split("-", 1)[1] for f in fresh[head]}
        env = args.env or (sorted(envs)[0] if len(envs) == 1 else None)
        meta = benchmark_meta(setup)
        base_frame = load_commit(setup, machine, base, env, meta)
        head_frame = load_commit(setup, machine, head, env, meta)
        df = compare(base_frame, head_frame, policy)
        if rounds is not None and policy.criterion == "strict":
            apply_round_check(df, base_frame, head_frame, rounds)
    except RegressError as e:
        print(f"regress: asv produced no usable results: {e}\n--- asv output (tail) ---\n{tail}",
              file=sys.stderr)
        return EXIT_ASV_FAILED
    write_outputs(df, args, policy)
    return verdict(df, policy)


def cmd_abba(args) -> int:
    """Both commits measured in alternating order, head-base-base-head-..., one asv round each
    (``asv run <commit>^! -a rounds=1 --append-samples``), then the comparison.

    asv continuous --interleave-rounds measures head then base in every round, so a load
    that falls (or rises) during the run favours one side every time; here each commit goes
    first as often as last, and the drift cancels.  With ``--criterion strict`` a confirmed
    change must also separate the rounds (:func:`apply_round_check`).
    """
    setup = load_setup(args.config, args.results_dir)
    policy = _policy(args)
    head = rev_parse(setup.repo, args.head)
    base = rev_parse(setup.repo, args.base)
    if args.rounds < 2 or args.rounds % 2:
        raise RegressError(f"--rounds must be an even number >= 2, got {args.rounds}")
    started = time.time()
    seen: set[str] = set()
    bounds: dict = {}
    tail = ""
    for i in range(args.rounds):
        for c in ((head, base) if i % 2 == 0 else (base, head)):
            cmd = [sys.executable, "-m", "asv", "run", "--record-samples", "-a", "rounds=1",
                   "--config", str(setup.config)]
            if c in seen:
                cmd.append("--append-samples")
            seen.add(c)
            if args.machine:
                cmd += ["--machine", args.machine]
            for b in args.bench:
                cmd += ["--bench", b]
            cmd += shlex.split(args.asv_args or "") + [f"{c}^!"]
            print(f"[round {i + 1}/{args.rounds}] $ " + " ".join(shlex.quote(x) for x in cmd), file=sys.stderr,
                  flush=True)
            proc = subprocess.run(cmd, cwd=setup.root, capture_output=not args.show_asv_output, text=True)
            tail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:]
            if proc.returncode == 2:  # asv run: some benchmarks failed; they are recorded as failed
                print(f"asv run exited 2 for {c[:8]}: some benchmarks failed (recorded as failed)", file=sys.stderr)
            elif proc.returncode != 0:
                print(f"regress: asv run exited {proc.returncode} for {c[:8]}\n--- asv output (tail) ---\n{tail}",
                      file=sys.stderr)
                return EXIT_ASV_FAILED
            _note_round(setup, args.machine, c, started, bounds)
    return _verdict_from_fresh_results(setup, args, policy, base, head, started, tail,
                                       rounds=(bounds.get(base, {}), bounds.get(head, {})))


def _note_round(setup: Setup, machine: Optional[str], commit: str, started: float, bounds: dict) -> None:
    """Remember how many samples each (benchmark, params, env) of ``commit`` has after a round,
    so that the appended samples can be split back into rounds (processes)."""
    try:
        machine = pick_machine(setup, machine)
        files = [f for f in result_files(setup, machine, commit) if f.stat().st_mtime >= started - 1]
        frames = [read_results_file(f) for f in files]
    except RegressError:
        return
    for df in frames:
        for r in df.itertuples(index=False):
            n = len(r.samples) if isinstance(r.samples, list) else 0
            bounds.setdefault(commit, {}).setdefault((r.benchmark, r.params, r.env), []).append(n)


def _policy(args) -> Policy:
    if args.factor <= 1:
        raise RegressError(f"--factor must be > 1, got {args.factor}")
    return Policy(factor=args.factor, p_threshold=args.p_threshold, higher_is_better=args.higher_is_better,
                  deterministic=args.deterministic, allow_new_failures=args.allow_new_failures,
                  criterion=args.criterion)


def _common_parser() -> argparse.ArgumentParser:
    """The options every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="asv.conf.json", help="asv config (default ./asv.conf.json)")
    common.add_argument("--results-dir", help="asv results directory (default: the config's results_dir)")
    common.add_argument("--machine", help="asv machine name (default: the only one with results)")
    common.add_argument("--env", help="compare only this asv environment")
    common.add_argument("-f", "--factor", type=float, default=DEFAULT_FACTOR,
                        help=f"ratio beyond which a change counts (default {DEFAULT_FACTOR}; "
                             "1.5-2 on shared, noisy machines)")
    common.add_argument("--p-threshold", type=float, default=DEFAULT_P,
                        help=f"Mann-Whitney p-value below which samples differ (default {DEFAULT_P}, asv's)")
    common.add_argument("--higher-is-better", default=DEFAULT_HIGHER_IS_BETTER,
                        help="regex on benchmark names whose values are better when higher")
    common.add_argument("--deterministic", default=DEFAULT_DETERMINISTIC,
                        help="regex on benchmark names compared by value alone (exact counts)")
    common.add_argument("--criterion", choices=["strict", "asv"], default="strict",
                        help="strict (default): Mann-Whitney on the samples and non-overlapping 99%% CIs of the "
                             "medians must both confirm a change; asv: asv compare's test alone")
    common.add_argument("--allow-new-failures", action="store_true",
                        help="a benchmark failing at HEAD that ran at BASE does not fail the gate")
    common.add_argument("--format", choices=["table", "markdown", "csv"], default="table",
                        help="what to print (default table)")
    common.add_argument("--markdown", metavar="PATH", help="also write the Markdown report here")
    common.add_argument("--csv", metavar="PATH", help="also write the full CSV report here")
    common.add_argument("--only-changed", action="store_true", help="table/Markdown: only rows beyond the factor")

    return common


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommands, on ``p`` (``dsgd regress`` or the script's own parser)."""
    common = _common_parser()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__.split("\n\n")[0]
    sub = p.add_subparsers(dest="regress_command", required=True)
    c = sub.add_parser("compare", parents=[common], help="compare two commits' results (HEAD vs its parent by default)")
    c.add_argument("revisions", nargs="*", metavar="REV",
                   help="none: HEAD vs its parent; one: REV vs its parent; two: BASE HEAD")
    c.set_defaults(func=cmd_compare)
    h = sub.add_parser("history", parents=[common], help="each commit with results vs its parent with results")
    h.add_argument("range", nargs="?", default="HEAD", help="git revision range, e.g. main~10..main (default HEAD)")
    h.set_defaults(func=cmd_history)
    k = sub.add_parser("continuous", parents=[common],
                       help="run asv continuous --interleave-rounds on BASE and HEAD, then compare")
    k.add_argument("base", nargs="?", default="main", help="baseline revision (default main)")
    k.add_argument("head", nargs="?", default="HEAD", help="revision under test (default HEAD)")
    k.add_argument("-b", "--bench", action="append", default=[], help="benchmark regex (repeatable)")
    k.add_argument("--asv-args", help="more arguments for asv continuous, as one string")
    k.add_argument("--show-asv-output", action="store_true", help="let asv print as it runs")
    k.set_defaults(func=cmd_continuous)
    a = sub.add_parser("abba", parents=[common],
                       help="measure BASE and HEAD in alternating order (ABBA rounds), then compare")
    a.add_argument("base", nargs="?", default="main", help="baseline revision (default main)")
    a.add_argument("head", nargs="?", default="HEAD", help="revision under test (default HEAD)")
    a.add_argument("--rounds", type=int, default=4, help="rounds (even; default 4: head, base, base, head, ...)")
    a.add_argument("-b", "--bench", action="append", default=[], help="benchmark regex (repeatable)")
    a.add_argument("--asv-args", help="more arguments for each asv run, as one string")
    a.add_argument("--show-asv-output", action="store_true", help="let asv print as it runs")
    a.set_defaults(func=cmd_abba)


def build_parser(prog: str = "dsgd regress") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    add_arguments(p)
    return p


def main(args: "argparse.Namespace | Iterable[str] | None" = None) -> int:
    """Run a parsed ``dsgd regress`` (or an argv list) and return its exit status."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(list(args) if args is not None else None)
    try:
        return args.func(args)
    except RegressError as e:
        print(f"regress: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - a bug here must not read as "regression" (exit 1)
        import traceback

        traceback.print_exc()
        print("regress: internal error (exit 4)", file=sys.stderr)
        return EXIT_INTERNAL
