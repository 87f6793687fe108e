"""asv's results as pandas frames: the asv config (:class:`Setup`), the benchmarked repository's
revisions, and the results files (``<results_dir>/<machine>/<commit>-<env>.json``, as written by
``asv run``, ``asv run --python=same --set-commit-hash`` or ``asv continuous``) read into one row
per benchmark, parameter set and commit.  Bad input raises :class:`RegressError`."""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsgd.harness.gitutil import GitError, git

PARAM_SEP = " / "  # between parameter values in the ``params`` column (no '|': Markdown tables)


class RegressError(Exception):
    """Bad input: a missing or corrupt results file, no results for a commit, a bad revision."""


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
