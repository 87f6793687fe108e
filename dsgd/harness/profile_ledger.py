"""The profile ledger (``profiles/ledger.csv``: one row per commit and config, written by ``dsgd
profile``) and the diff of two commits in it (``dsgd profile --diff A B``)."""
from __future__ import annotations

import json
import os
from typing import Sequence

# One row per (commit, config) in profiles/ledger.csv, in this column order.
LEDGER_COLUMNS = [
    "commit", "commit_order", "commit_date", "captured_at", "config", "status",
    "workload", "mesh", "layout", "dtype", "implementation", "impl_used", "xla", "options", "device", "mode",
    "steps", "median_ms", "p10_ms", "p90_ms", "first_step_s",
    "ops_per_step", "op_types", "kernels_per_step", "host_op_ms_per_step", "top_ops",
    "hlo_modules", "hlo_programs", "fusions", "hlo_modules_dumped", "hlo_files", "hlo_ops_per_step", "top_hlo_ops",
    "peak_bytes_in_use", "peak_rss_mib", "trace", "error",
]
KEY = ["commit", "config"]

# Columns compared by the diff, with how a change is shown.
DIFF_METRICS = ["median_ms", "first_step_s", "ops_per_step", "hlo_modules", "fusions", "peak_bytes_in_use",
                "peak_rss_mib"]


def read_ledger(path: str):
    import pandas as pd

    if not os.path.exists(path):
        return pd.DataFrame(columns=LEDGER_COLUMNS)
    df = pd.read_csv(path, dtype={"commit": str, "config": str})
    for c in LEDGER_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df


def ledger_row(row: dict) -> dict:
    """A result dict flattened to ledger columns (lists/dicts as compact text)."""
    out = {}
    for c in LEDGER_COLUMNS:
        v = row.get(c)
        if c == "top_ops" and isinstance(v, list):
            v = "; ".join(f"{o['type']} {o['self_us_per_step']:.0f}us ({o['pct']:.0f}%)" for o in v)
        elif c == "top_hlo_ops" and isinstance(v, list):
            v = "; ".join(f"{o['hlo_op']} {o['us_per_step']:.0f}us ({o['pct']:.0f}%)" for o in v)
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
        elif c == "xla" and isinstance(v, bool):
            v = "on" if v else "off"
        out[c] = v
    return out


def append_ledger(path: str, rows: Sequence[dict]) -> "object":
    """Append rows to the ledger CSV, replacing earlier rows of the same (commit, config).

    Returns the whole ledger as a DataFrame.
    """
    import pandas as pd

    new = pd.DataFrame([ledger_row(r) for r in rows], columns=LEDGER_COLUMNS)
    old = read_ledger(path)
    if len(old) and len(new):
        keys = set(zip(new["commit"], new["config"]))
        old = old[[k not in keys for k in zip(old["commit"], old["config"])]]
    frames = [f for f in (old, new) if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else new
    df = df[LEDGER_COLUMNS]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return df


def resolve_commit(df, name: str) -> str:
    """A ledger commit from a full or abbreviated name (unique prefix either way)."""
    commits = sorted(set(df["commit"].astype(str)))
    exact = [c for c in commits if c == name]
    if exact:
        return exact[0]
    hits = [c for c in commits if c.startswith(name) or name.startswith(c)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ValueError(f"commit {name!r} is not in the ledger; it has {commits}")
    raise ValueError(f"commit {name!r} is ambiguous in the ledger: {hits}")


def config_key(row) -> str:
    """The run name of a ledger row, recomputed from its fields by today's naming
    (:func:`dsgd.harness.profile_names.config_name`), so that rows written under an older naming
    (``<workload>_<mesh>_<layout>_..._xla-on_<options>``) still meet their counterparts."""
    from dsgd.harness.measure import MODES, Case
    from dsgd.harness.profile_names import config_name

    fields = ("workload", "mesh", "layout", "dtype", "implementation", "xla", "options")
    vals = {f: row.get(f) for f in fields}
    if any(v is None or v != v for v in vals.values()):
        return str(row.get("config"))
    xla = vals.pop("xla")
    device = row.get("device")
    mode = row.get("mode")
    if not isinstance(mode, str) or mode not in MODES:  # rows from before the ledger had a mode: the name's suffix
        suffix = str(row.get("config", "")).split("_")[-1]
        mode = suffix if suffix in MODES else "eager"
    case = Case(**{k: str(v) for k, v in vals.items()}, xla=str(xla).lower() in ("on", "true", "1"),
                device=str(device) if isinstance(device, str) else "CPU", mode=mode)
    return config_name(case)


def diff_commits(df, a: str, b: str):
    """Configs of commits ``a`` and ``b`` side by side: metrics of each and ``b/a`` ratios.

    Configs are matched by :func:`config_key` (today's run name, from the row's fields)."""
    import pandas as pd

    a, b = resolve_commit(df, a), resolve_commit(df, b)
    df = df.assign(config=[config_key(r) for r in df.to_dict(orient="records")])
    left = df[df["commit"].astype(str) == a].drop_duplicates("config", keep="last").set_index("config")
    right = df[df["commit"].astype(str) == b].drop_duplicates("config", keep="last").set_index("config")
    configs = sorted(set(left.index) | set(right.index))
    rows = []
    for c in configs:
        ra = left.loc[c] if c in left.index else None
        rb = right.loc[c] if c in right.index else None
        row = {"config": c,
               "status_a": ra["status"] if ra is not None else "absent",
               "status_b": rb["status"] if rb is not None else "absent"}
        for m in DIFF_METRICS:
            va = pd.to_numeric(ra[m], errors="coerce") if ra is not None else float("nan")
            vb = pd.to_numeric(rb[m], errors="coerce") if rb is not None else float("nan")
            row[f"{m}_a"], row[f"{m}_b"] = va, vb
            row[f"{m}_ratio"] = (vb / va) if (va == va and vb == vb and va) else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["a"], out.attrs["b"] = a, b
    return out


def _fmt(v, kind: str = "g") -> str:
    if v is None or v != v:
        return "-"
    if kind == "bytes":
        return f"{v / 2**20:.1f}M"
    if kind == "int":
        return f"{v:.0f}"
    return f"{v:.3g}"


def render_diff(diff) -> str:
    """A readable table of :func:`diff_commits` (A -> B and the ratio B/A)."""
    a, b = diff.attrs.get("a", "A"), diff.attrs.get("b", "B")
    kinds = {"median_ms": "g", "first_step_s": "g", "ops_per_step": "int", "hlo_modules": "int", "fusions": "int",
             "peak_bytes_in_use": "bytes", "peak_rss_mib": "int"}
    heads = {"median_ms": "step ms", "first_step_s": "first s", "ops_per_step": "ops/step", "hlo_modules": "HLO mods",
             "fusions": "fusions", "peak_bytes_in_use": "peak mem", "peak_rss_mib": "RSS MiB"}
    shown = [m for m in kinds if f"{m}_a" in diff.columns and
             (diff[f"{m}_a"].notna().any() or diff[f"{m}_b"].notna().any())]
    lines = [f"profile diff: A = {a}   B = {b}   (each cell: A -> B, and B/A for times)", ""]
    header = ["config"] + [heads[m] for m in shown] + ["status"]
    table = [header]
    for r in diff.itertuples(index=False):
        d = r._asdict()
        cells = [d["config"]]
        for m in shown:
            cell = f"{_fmt(d[m + '_a'], kinds[m])} -> {_fmt(d[m + '_b'], kinds[m])}"
            if m in ("median_ms", "first_step_s") and d[m + "_ratio"] == d[m + "_ratio"]:
                cell += f" ({d[m + '_ratio']:.2f}x)"
            cells.append(cell)
        st = d["status_a"] if d["status_a"] == d["status_b"] else f"{d['status_a']} -> {d['status_b']}"
        cells.append(st)
        table.append(cells)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
