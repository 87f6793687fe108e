"""Profile summaries without the UI, the per-commit ledger, and the diff of two commits.

Everything here reads files that ``dsgd profile`` wrote (``.xplane.pb`` traces, HLO text) and
returns plain data (dicts, pandas frames) that tests check and renderers print:

* :func:`summarize_xplane` — xprof's headless converters
  (``xprof.convert.raw_to_tool_data.xspace_to_tool_data``) for ``framework_op_stats``,
  ``kernel_stats`` and ``memory_profile``, plus the HLO modules the profiler stored in the
  trace's ``/host:metadata`` plane (one ``HloProto`` per compiled XLA program) and their fusions;
* :func:`hlo_text_stats` — module and fusion counts of HLO text files (``XLA_FLAGS=--xla_dump_to``
  and :func:`dsgd.impl.xla.capture_hlo`);
* :func:`append_ledger`, :func:`read_ledger`, :func:`diff_commits`, :func:`render_diff`.

Step time is never taken from xprof (its step detection on CPU is unreliable); it comes from the
harness (:mod:`dsgd.measure`).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterable, Optional, Sequence

# One row per (commit, config) in profiles/ledger.csv, in this column order.
LEDGER_COLUMNS = [
    "commit", "commit_order", "commit_date", "captured_at", "config", "status",
    "workload", "mesh", "layout", "dtype", "implementation", "impl_used", "xla", "options", "device",
    "steps", "median_ms", "p10_ms", "p90_ms", "first_step_s",
    "ops_per_step", "op_types", "kernels_per_step", "host_op_ms_per_step", "top_ops",
    "hlo_modules", "hlo_programs", "fusions", "hlo_modules_dumped", "hlo_files",
    "peak_bytes_in_use", "peak_rss_mib", "trace", "error",
]
KEY = ["commit", "config"]

# Columns compared by the diff, with how a change is shown.
DIFF_METRICS = ["median_ms", "first_step_s", "ops_per_step", "hlo_modules", "fusions", "peak_bytes_in_use",
                "peak_rss_mib"]


# ------------------------------------------------------------------------------ xprof
def find_xplanes(run_dir: str) -> list[str]:
    """The ``.xplane.pb`` files of the newest profiler session under ``run_dir``."""
    sessions = sorted(glob.glob(os.path.join(run_dir, "plugins", "profile", "*")))
    for s in reversed(sessions):
        files = sorted(glob.glob(os.path.join(s, "*.xplane.pb")))
        if files:
            return files
    return []


def xprof_table(paths: Sequence[str], tool: str) -> list[dict]:
    """The rows of an xprof tool's (first) data table as dicts (column id -> value)."""
    from xprof.convert import raw_to_tool_data

    data, _ = raw_to_tool_data.xspace_to_tool_data(list(paths), tool, {})
    if not data:
        return []
    j = json.loads(data)
    t = j[0] if isinstance(j, list) else j
    cols = [c["id"] for c in t.get("cols", [])]
    return [dict(zip(cols, [c.get("v") if isinstance(c, dict) else None for c in row["c"]])) for row in t.get("rows", [])]


def xprof_json(paths: Sequence[str], tool: str) -> dict:
    from xprof.convert import raw_to_tool_data

    data, _ = raw_to_tool_data.xspace_to_tool_data(list(paths), tool, {})
    return json.loads(data) if data else {}


def trace_hlo_modules(paths: Sequence[str]) -> list[tuple[str, int]]:
    """``(module name, fusion count)`` of every HLO module the profiler stored in the trace.

    TensorFlow's profiler puts one ``HloProto`` (the optimised module) per XLA executable that
    ran during the trace into the ``/host:metadata`` plane; a path that executes no XLA has none.
    """
    from tensorflow.compiler.xla.service import hlo_pb2
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    out = []
    for p in paths:
        xs = xplane_pb2.XSpace()
        with open(p, "rb") as f:
            xs.ParseFromString(f.read())
        for plane in xs.planes:
            if plane.name != "/host:metadata":
                continue
            stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
            for em in plane.event_metadata.values():
                for st in em.stats:
                    if stat_names.get(st.metadata_id) != "Hlo Proto" or not st.bytes_value:
                        continue
                    proto = hlo_pb2.HloProto()
                    proto.ParseFromString(st.bytes_value)
                    fusions = sum(1 for c in proto.hlo_module.computations for i in c.instructions
                                  if i.opcode == "fusion")
                    out.append((em.name, fusions))
    return out


def eager_op_rows(paths: Sequence[str]) -> list[dict]:
    """framework_op_stats-like rows from the host plane's ``EagerLocalExecute: <op>`` events.

    On CPU, xprof's op statistics leave out eagerly executed single ops; the host tracer still
    records one event per op dispatch (its wall time includes the kernel, which runs inline).
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    prefix = "EagerLocalExecute: "
    agg: dict[str, list[float]] = {}
    for p in paths:
        xs = xplane_pb2.XSpace()
        with open(p, "rb") as f:
            xs.ParseFromString(f.read())
        for plane in xs.planes:
            if not plane.name.startswith("/host:"):
                continue
            for line in plane.lines:
                for ev in line.events:
                    name = plane.event_metadata[ev.metadata_id].name
                    if name.startswith(prefix):
                        a = agg.setdefault(name[len(prefix):], [0.0, 0.0])
                        a[0] += 1
                        a[1] += ev.duration_ps / 1e6
    return [{"type": op, "operation": op, "occurrences": n, "total_self_time": us} for op, (n, us) in agg.items()]


def _program_name(module: str) -> str:
    """A module name without the per-executable ``(N)`` suffix: the program it compiles."""
    return re.sub(r"\(\d+\)$", "", module)


def summarize_xplane(paths: Sequence[str], steps: int, top: int = 5) -> dict:
    """Per-step numbers from a trace of ``steps`` annotated steps (xprof, headless)."""
    steps = max(int(steps), 1)
    rows = [r for r in xprof_table(paths, "framework_op_stats") if r.get("type") != "IDLE"]
    if not rows:  # a step of eager single ops only (the local domain): xprof lists no framework ops
        rows = eager_op_rows(paths)
    occurrences = sum(float(r.get("occurrences") or 0) for r in rows)
    self_us = sum(float(r.get("total_self_time") or 0) for r in rows)
    by_time = sorted(rows, key=lambda r: -float(r.get("total_self_time") or 0))[:top]
    top_ops = [{"type": r["type"], "name": str(r.get("operation"))[:120],
                "self_us_per_step": round(float(r.get("total_self_time") or 0) / steps, 1),
                "pct": round(100.0 * float(r.get("total_self_time") or 0) / self_us, 1) if self_us else 0.0}
               for r in by_time]
    try:
        kernels = sum(float(r.get("occurrences") or 0) for r in xprof_table(paths, "kernel_stats"))
    except Exception:  # noqa: BLE001 - no device kernels on CPU
        kernels = 0.0
    peak = None
    try:
        mem = xprof_json(paths, "memory_profile").get("memoryProfilePerAllocator", {})
        peaks = [int(a.get("profileSummary", {}).get("peakBytesUsageLifetime", 0)) for a in mem.values()]
        peak = max(peaks) if peaks else None
    except Exception:  # noqa: BLE001 - memory events are recorded only by tracking allocators
        peak = None
    modules = trace_hlo_modules(paths)
    return {
        "ops_per_step": occurrences / steps,
        "op_types": len({r["type"] for r in rows}),
        "kernels_per_step": kernels / steps,
        "host_op_ms_per_step": self_us / steps / 1e3,
        "top_ops": top_ops,
        "hlo_modules": len(modules),
        "hlo_programs": len({_program_name(m) for m, _ in modules}),
        "fusions": sum(f for _, f in modules),
        "peak_bytes_in_use": peak,
    }


# ------------------------------------------------------------------------------ HLO text
def hlo_text_stats(files: Iterable[str]) -> dict:
    """Module and fusion counts of HLO text files (dump or capture_hlo output).

    ``before_optimizations`` files count modules; fusions are counted in the optimised ones.
    """
    from dsgd.impl.xla import count_fusions  # light: no TensorFlow work at import

    files = list(files)
    before = [f for f in files if "before_optimizations" in os.path.basename(f)]
    after = [f for f in files if re.search(r"after_optimizations(\.hlo)?\.txt$", os.path.basename(f))]
    fusions = 0
    for f in after:
        with open(f, errors="replace") as fh:
            fusions += count_fusions(fh.read())
    return {"modules": len(before), "optimized": len(after), "fusions": fusions}


# ------------------------------------------------------------------------------ ledger
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


def diff_commits(df, a: str, b: str):
    """Configs of commits ``a`` and ``b`` side by side: metrics of each and ``b/a`` ratios."""
    import pandas as pd

    a, b = resolve_commit(df, a), resolve_commit(df, b)
    left = df[df["commit"].astype(str) == a].set_index("config")
    right = df[df["commit"].astype(str) == b].set_index("config")
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


def xprof_diff_sessions(dir_a: str, dir_b: str, timeout: float = 300) -> Optional[dict]:
    """``xprof diff_sessions`` of two profiler sessions (``.../plugins/profile/<session>`` dirs).

    Its kernel and device-time diffs need device traces (GPU/TPU); on CPU it has only its own
    (unreliable) step time.  Returns the parsed JSON, or None if the CLI is missing or fails.
    """
    import shutil
    import subprocess

    exe = shutil.which("xprof")
    if not exe:
        return None
    proc = subprocess.run([exe, "diff_sessions", f"--baseline_session_id={os.path.abspath(dir_a)}",
                           f"--optimized_session_id={os.path.abspath(dir_b)}"],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None
