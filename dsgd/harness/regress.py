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
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from dsgd.harness.gitutil import GitError, git

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_ASV_FAILED, EXIT_INTERNAL = 0, 1, 2, 3, 4

DEFAULT_FACTOR = 1.1
DEFAULT_P = 0.002  # asv's own threshold
# Higher is better for these (by benchmark name); lower is better for everything else.
DEFAULT_HIGHER_IS_BETTER = r"(gbps|roofline_fraction|throughput|speedup)$"
# track_ benchmarks that are exact counts: compared by value and factor, no statistics needed.
DEFAULT_DETERMINISTIC = r"(state_bytes_per_device|bytes_per_device)$"

PARAM_SEP = " / "  # between parameter values in the ``params`` column (no '|': Markdown tables)
STATUS_ORDER = ["regression", "new failure", "slower?", "faster", "fixed", "faster?", "same", "incomparable",
                "skipped", "failed", "only in base", "only in head"]


class RegressError(Exception):
    """Bad input: a missing or corrupt results file, no results for a commit, a bad revision."""


# ----------------------------------------------------------------------------- configuration
@dataclass
class Setup:
    config: Path
    root: Path          # directory of asv.conf.json
    repo: Path          # the git repository benchmarked
    results_dir: Path
    hash_length: int = 8


def load_setup(config: str | os.PathLike = "asv.conf.json", results_dir: Optional[str] = None) -> Setup:
    from asv import util
    from asv.config import Config

    path = Path(config).resolve()
    if not path.is_file():
        raise RegressError(f"asv config {path} does not exist (give --config)")
    try:
        conf = Config.load(str(path))
    except (util.UserError, ValueError) as e:
        raise RegressError(f"asv config {path} cannot be read: {e}") from None
    root = path.parent
    repo = (root / conf.repo).resolve() if conf.repo and "://" not in str(conf.repo) else root
    res = Path(results_dir).resolve() if results_dir else (root / conf.results_dir).resolve()
    return Setup(path, root, repo, res, int(getattr(conf, "hash_length", 8) or 8))


# ----------------------------------------------------------------------------- git
def _git(repo: Path, *args: str) -> str:
    try:
        return git(str(repo), *args)
    except GitError as e:  # bad input for regress (exit 2), not an internal error
        raise RegressError(str(e)) from None


def rev_parse(repo: Path, rev: str) -> str:
    try:
        out = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RegressError:
        out = ""
    if not out:
        if rev.endswith("^"):
            raise RegressError(f"commit {rev[:-1][:12]} has no parent in {repo}: give the base revision")
        raise RegressError(f"unknown revision {rev!r} in {repo}")
    return out


def first_parents(repo: Path, commit: str, limit: int = 50) -> list[str]:
    """The first-parent ancestors of ``commit`` (nearest first), at most ``limit``."""
    out = _git(repo, "rev-list", "--first-parent", f"--max-count={limit + 1}", commit)
    return out.split()[1:]


def commits_in_range(repo: Path, spec: str) -> list[str]:
    """Oldest first: ``A..B`` as git means it, or one revision (that commit and its ancestors)."""
    return list(reversed(_git(repo, "rev-list", "--first-parent", spec).split()))


# ----------------------------------------------------------------------------- reading results
def machines(setup: Setup) -> list[str]:
    if not setup.results_dir.is_dir():
        return []
    return sorted(p.name for p in setup.results_dir.iterdir() if (p / "machine.json").is_file())


def pick_machine(setup: Setup, machine: Optional[str]) -> str:
    found = machines(setup)
    if machine:
        if machine not in found:
            raise RegressError(f"no results for machine {machine!r} under {setup.results_dir} (have: {found or 'none'})")
        return machine
    if len(found) == 1:
        return found[0]
    if not found:
        raise RegressError(f"no asv results under {setup.results_dir}: run `asv run` first "
                           "(with --python=same, add --set-commit-hash=$(git rev-parse HEAD) so asv saves them)")
    raise RegressError(f"results for several machines under {setup.results_dir}: {found}; choose one with --machine")


def result_files(setup: Setup, machine: str, commit: str) -> list[Path]:
    d = setup.results_dir / machine
    return sorted(p for p in d.glob(f"{commit[:setup.hash_length]}-*.json"))


def benchmark_meta(setup: Setup) -> dict:
    """``benchmarks.json`` (units, types, parameter names); empty if absent."""
    path = setup.results_dir / "benchmarks.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RegressError(f"results file {path} is corrupt: {e}") from None
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def read_results_file(path: Path, meta: Optional[dict] = None):
    """One asv results file as a pandas frame (one row per benchmark and parameter set)."""
    import pandas as pd
    from asv import util
    from asv.results import Results

    meta = meta or {}
    path = Path(path)
    if not path.is_file():
        raise RegressError(f"results file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise RegressError(f"results file {path} is corrupt (not text: {e})") from None
    except json.JSONDecodeError as e:
        raise RegressError(f"results file {path} is corrupt (invalid JSON at line {e.lineno}, "
                           f"column {e.colno}: {e.msg})") from None
    if not isinstance(raw, dict) or "commit_hash" not in raw or "results" not in raw:
        raise RegressError(f"results file {path} is not an asv results file (no commit_hash/results)")
    try:
        res = Results.load(str(path))
    except (util.UserError, KeyError, TypeError, ValueError, IndexError) as e:
        raise RegressError(f"results file {path} is corrupt or from another asv version: "
                           f"{type(e).__name__}: {e}") from None

    rows = []
    for key in sorted(res.get_all_result_keys()):
        try:
            params = res.get_result_params(key)
            values = res.get_result_value(key, params)
            stats = res.get_result_stats(key, params)
            samples = res.get_result_samples(key, params)
        except (KeyError, TypeError, ValueError) as e:
            raise RegressError(f"results file {path}: benchmark {key} is corrupt: {e}") from None
        m = meta.get(key, {})
        names = m.get("param_names") or [f"param{i + 1}" for i in range(len(params))]
        btype = m.get("type") or key.rsplit(".", 1)[-1].split("_", 1)[0]
        unit = m.get("unit") or {"time": "seconds", "peakmem": "bytes"}.get(btype, "unit")
        for combo, value, st, sm in itertools.zip_longest(itertools.product(*params), values, stats, samples):
            rows.append(dict(
                benchmark=key, params=PARAM_SEP.join(_unquote(p) for p in combo),
                param_dict={n: _unquote(p) for n, p in zip(names, combo)},
                value=math.nan if value is None else _num(value), failed=value is None or _num(value) is None,
                stats=st or None, samples=sm or None, type=btype, unit=unit,
                version=res.benchmark_version.get(key), commit=res.commit_hash, env=res.env_name,
                machine=res.params.get("machine"), file=str(path)))
    cols = ["benchmark", "params", "param_dict", "value", "failed", "stats", "samples", "type", "unit", "version", "commit",
            "env", "machine", "file"]
    return pd.DataFrame(rows, columns=cols)


def _unquote(p) -> str:
    p = str(p)
    return p[1:-1] if len(p) >= 2 and p[0] == p[-1] and p[0] in "'\"" else p


def _num(v):
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load_commit(setup: Setup, machine: str, commit: str, env: Optional[str] = None, meta: Optional[dict] = None):
    """All results of one commit on one machine (every environment, or ``env``)."""
    import pandas as pd

    files = result_files(setup, machine, commit)
    if env:
        files = [f for f in files if f.stem.split("-", 1)[1] == env]
    if not files:
        raise RegressError(f"no results for commit {commit[:setup.hash_length]} on machine {machine!r} in "
                           f"{setup.results_dir / machine}" + (f" (environment {env})" if env else "") +
                           "; run `asv run` for it first")
    meta = benchmark_meta(setup) if meta is None else meta
    return pd.concat([read_results_file(f, meta) for f in files], ignore_index=True)


def commits_with_results(setup: Setup, machine: str) -> dict[str, str]:
    """``{short hash: full hash}`` of the commits that have results files."""
    out = {}
    for f in (setup.results_dir / machine).glob("*.json"):
        if f.name == "machine.json":
            continue
        out.setdefault(f.name.split("-", 1)[0], None)
    return out


# ----------------------------------------------------------------------------- comparing
@dataclass
class Policy:
    factor: float = DEFAULT_FACTOR
    p_threshold: float = DEFAULT_P
    higher_is_better: str = DEFAULT_HIGHER_IS_BETTER
    deterministic: str = DEFAULT_DETERMINISTIC
    allow_new_failures: bool = False
    criterion: str = "strict"  # "strict": samples differ AND the 99% CIs are apart; "asv": asv's test alone


def _has_stats(stats) -> bool:
    return isinstance(stats, dict) and "ci_99_a" in stats and "ci_99_b" in stats


def significant(a_stats, a_samples, b_stats, b_samples, p_threshold: float) -> Optional[bool]:
    """asv's test: Mann-Whitney U on the samples, else non-overlapping 99% CIs.  None: no stats
    (a track_), or one sample on a side (a --quick run): nothing to test with."""
    from asv import _stats

    a_samples = list(a_samples) if isinstance(a_samples, (list, tuple)) else None
    b_samples = list(b_samples) if isinstance(b_samples, (list, tuple)) else None
    if not (_has_stats(a_stats) and _has_stats(b_stats)):
        return None
    if a_stats.get("repeat", 0) == 1 and not a_samples or b_stats.get("repeat", 0) == 1 and not b_samples:
        return None
    if (a_samples and len(a_samples) < 2) or (b_samples and len(b_samples) < 2):
        return None
    return bool(_stats.is_different(a_samples or None, b_samples or None, a_stats, b_stats, p_threshold=p_threshold))


def ci_apart(a_stats, b_stats) -> Optional[bool]:
    """Whether the 99% confidence intervals of the two medians do not overlap (None: no CIs)."""
    if not (_has_stats(a_stats) and _has_stats(b_stats)):
        return None
    vals = [a_stats["ci_99_a"], a_stats["ci_99_b"], b_stats["ci_99_a"], b_stats["ci_99_b"]]
    if any(_isnull(v) or math.isinf(v) for v in vals):
        return None
    return vals[1] < vals[2] or vals[3] < vals[0]


def compare(base, head, policy: Policy = Policy()):
    """Join two commits' frames and classify each (benchmark, params, env) pair.

    ``ratio`` is head / base; ``worse_ratio`` is the ratio oriented so that > 1 is worse.
    ``status``: regression / faster (confirmed), slower? / faster? (beyond the factor, not
    confirmed), same, new failure, fixed, failed, skipped, incomparable (benchmark code
    changed between the commits), only in base / only in head.
    """
    import pandas as pd

    key = ["benchmark", "params", "env"]
    if set(base["env"]) != set(head["env"]) and base["env"].nunique() == 1 and head["env"].nunique() == 1:
        # e.g. one commit measured with --python=same, the other in asv's virtualenv
        head = head.assign(env=base["env"].iloc[0])
    m = base.merge(head, on=key, how="outer", suffixes=("_base", "_head"), indicator="merge_")
    hib = re.compile(policy.higher_is_better) if policy.higher_is_better else None
    det = re.compile(policy.deterministic) if policy.deterministic else None
    rows = []
    for r in m.itertuples(index=False):
        r = r._asdict()
        b = None if _true(r["failed_base"]) else float(r["value_base"])
        h = None if _true(r["failed_head"]) else float(r["value_head"])
        ratio = worse = math.nan
        higher_better = bool(hib and hib.search(r["benchmark"]))
        sig = None
        both = r["merge_"] == "both"
        if not both:
            status = "only in base" if r["merge_"] == "left_only" else "only in head"
        elif (r["version_base"] and r["version_head"] and r["version_base"] != r["version_head"]):
            status = "incomparable"
        elif b is not None and not _isnan(b) and h is None:
            status = "new failure"
        elif b is None and h is not None and not _isnan(h):
            status = "fixed"
        elif b is None and h is None:
            status = "failed"
        elif _isnan(b) or _isnan(h):
            status = "skipped"
        else:
            ratio = h / b if b else (math.inf if h else 1.0)
            worse = (1 / ratio if ratio else math.inf) if higher_better else ratio
            sig = significant(r["stats_base"], r["samples_base"], r["stats_head"], r["samples_head"],
                              policy.p_threshold)
            if sig and policy.criterion == "strict" and ci_apart(r["stats_base"], r["stats_head"]) is False:
                # Samples of one run are correlated (the machine's load drifts between runs): a
                # rank test alone then calls a shift of the whole run "significant".  Confirmed
                # means asv's test and the medians' 99% confidence intervals agree.
                sig = False
            if sig is None and det and det.search(r["benchmark"]):
                sig = True  # exact counts: the value is the measurement
            beyond_worse = worse > policy.factor
            beyond_better = worse < 1 / policy.factor
            if beyond_worse:
                status = "regression" if sig else "slower?"
            elif beyond_better:
                status = "faster" if sig else "faster?"
            else:
                status = "same"
        rows.append(dict(
            benchmark=r["benchmark"], params=r["params"], env=r["env"],
            type=r["type_base"] if both or r["merge_"] == "left_only" else r["type_head"],
            unit=r["unit_base"] if isinstance(r["unit_base"], str) else r["unit_head"],
            base=b, head=h,
            base_err=_err(r["stats_base"]), head_err=_err(r["stats_head"]),
            n_base=_n(r["samples_base"], r["stats_base"]), n_head=_n(r["samples_head"], r["stats_head"]),
            ratio=ratio, worse_ratio=worse, higher_is_better=higher_better,
            significant=sig, status=status,
            commit_base=r["commit_base"], commit_head=r["commit_head"],
            param_dict=r["param_dict_base"] if isinstance(r["param_dict_base"], dict) else r["param_dict_head"]))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["_order"] = df["status"].map({s: i for i, s in enumerate(STATUS_ORDER)})
    df = df.sort_values(["_order", "worse_ratio", "benchmark", "params"], ascending=[True, False, True, True],
                        na_position="last").drop(columns="_order").reset_index(drop=True)
    return df


def _true(v) -> bool:
    return not _isnull(v) and bool(v)


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _err(stats):
    if _has_stats(stats) and "q_25" in stats and "q_75" in stats:
        err = (stats["q_75"] - stats["q_25"]) / 2  # asv_runner.statistics.get_err
        return None if _isnull(err) else err
    return None


def _n(samples, stats):
    if isinstance(samples, (list, tuple)) and samples:
        return len(samples)
    if isinstance(stats, dict) and stats.get("repeat"):
        return int(stats["repeat"])
    return 0


def verdict(df, policy: Policy = Policy()) -> int:
    if df is None or df.empty:
        return EXIT_OK
    bad = {"regression"} | (set() if policy.allow_new_failures else {"new failure"})
    return EXIT_REGRESSION if df["status"].isin(bad).any() else EXIT_OK


# ----------------------------------------------------------------------------- rendering
REPORT_COLUMNS = ["status", "benchmark", "params", "base", "head", "ratio", "significant", "n_base", "n_head"]


def _fmt_value(v, unit, err=None) -> str:
    from asv.util import human_value

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "failed" if v is None else "n/a"
    err = None if _isnull(err) else err
    if unit in ("seconds", "bytes"):
        return human_value(v, unit, err=err)
    s = f"{v:.4g}"
    return s + (f"±{err:.2g}" if err else "")


def table_frame(df, changed_only: bool = False):
    """The report as display strings (what the terminal and Markdown show): every row but the
    skipped ones (counted in the summary; the CSV has them all), or only the changed ones."""
    import pandas as pd

    if df.empty:
        return pd.DataFrame(columns=REPORT_COLUMNS)
    hide = ["same", "skipped", "failed"] if changed_only else ["skipped"]
    view = df[~df["status"].isin(hide)]
    out = pd.DataFrame({
        "status": view["status"],
        "benchmark": view["benchmark"],
        "params": view["params"].fillna(""),
        "base": [_fmt_value(v, u, e) for v, u, e in zip(view["base"], view["unit"], view["base_err"])],
        "head": [_fmt_value(v, u, e) for v, u, e in zip(view["head"], view["unit"], view["head_err"])],
        "ratio": [("n/a" if _isnull(x) else f"{x:.2f}") for x in view["ratio"]],
        "significant": view["significant"].map({True: "yes", False: "no"}).fillna("-"),
        "n_base": view["n_base"], "n_head": view["n_head"],
    })
    if "rounds_apart" in view:
        out["rounds apart"] = view["rounds_apart"].map({True: "yes", False: "no"}).fillna("-")
    return out.reset_index(drop=True)


def summary(df, policy: Policy) -> str:
    if df.empty:
        return "no benchmarks in common"
    counts = df["status"].value_counts()
    parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if s in counts]
    pairs = df[["commit_head", "commit_base"]].dropna().drop_duplicates()
    if len(pairs) == 1:
        which = f"{pairs.iloc[0, 0][:8]} vs {pairs.iloc[0, 1][:8]}"
    else:
        which = f"{len(pairs)} commits, each vs its parent"
    v = verdict(df, policy)
    word = "REGRESSION" if v else "no confirmed regression"
    return (f"{which}: {word} (factor {policy.factor:g}, p < {policy.p_threshold:g}): " + ", ".join(parts))


def render(df, fmt: str, policy: Policy, changed_only: bool = False) -> str:
    if fmt == "csv":
        cols = [c for c in df.columns if c != "param_dict"]
        flat = df[cols].copy() if not df.empty else df
        if not df.empty:
            params = df["param_dict"].apply(lambda d: d if isinstance(d, dict) else {})
            names = sorted({k for d in params for k in d})
            for n in names:
                flat[f"param:{n}"] = params.apply(lambda d, n=n: d.get(n))
        return flat.to_csv(index=False)
    view = table_frame(df, changed_only)
    if fmt == "markdown":
        head = f"### asv regression report\n\n{summary(df, policy)}\n\n"
        if view.empty:
            return head + "_nothing changed beyond the factor_\n"
        return head + _markdown(view) + "\n"
    text = view.to_string(index=False) if not view.empty else "(no rows)"
    return text + "\n\n" + summary(df, policy) + "\n"


def _markdown(view) -> str:
    try:
        return view.to_markdown(index=False)
    except ImportError:  # tabulate missing: a plain pipe table
        cols = list(view.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in view.itertuples(index=False):
            lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |")
        return "\n".join(lines)


def write_outputs(df, args, policy: Policy) -> None:
    print(render(df, args.format, policy, changed_only=args.only_changed), end="")
    if args.markdown:
        Path(args.markdown).write_text(render(df, "markdown", policy, changed_only=args.only_changed))
    if args.csv:
        Path(args.csv).write_text(render(df, "csv", policy))


# ----------------------------------------------------------------------------- commands
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


def round_medians(samples, counts) -> list:
    """Medians of the samples each round added (``counts``: sample count after each round)."""
    import statistics

    out, prev = [], 0
    for n in counts:
        chunk = [x for x in samples[prev:n] if not _isnull(x)]
        if chunk:
            out.append(statistics.median(chunk))
        prev = max(prev, n)
    return out


def apply_round_check(df, base_frame, head_frame, rounds) -> None:
    """ABBA runs: a confirmed change must also separate the rounds — every round (process) of
    the worse commit beyond every round of the other.  Samples within one process share its
    fate (memory placement, threads, the load at that moment); the rounds are the independent
    repetitions, so an effect that only some processes show is noise, however many samples."""
    if df.empty:
        return
    base_b, head_b = rounds
    samples = {}
    for name, frame in (("base", base_frame), ("head", head_frame)):
        for r in frame.itertuples(index=False):
            samples[(name, r.benchmark, r.params)] = (r.samples if isinstance(r.samples, list) else [], r.env)
    apart_col = []
    for i, r in df.iterrows():
        sb, env_b = samples.get(("base", r["benchmark"], r["params"]), ([], None))
        sh, env_h = samples.get(("head", r["benchmark"], r["params"]), ([], None))
        mb = round_medians(sb, base_b.get((r["benchmark"], r["params"], env_b), []))
        mh = round_medians(sh, head_b.get((r["benchmark"], r["params"], env_h), []))
        apart = None
        if len(mb) >= 2 and len(mh) >= 2:
            apart = min(mh) > max(mb) or max(mh) < min(mb)
        apart_col.append(apart)
        if r["status"] in ("regression", "faster") and apart is False:
            df.at[i, "status"] = "slower?" if r["status"] == "regression" else "faster?"
            df.at[i, "significant"] = False
    df["rounds_apart"] = apart_col


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

