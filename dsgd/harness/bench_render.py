"""``dsgd bench``'s output: the compact table that fits 120 columns, the verdict and what each column
shown means, the wide table, CSV/JSON, and the bar chart."""
from __future__ import annotations

import math
import os
import textwrap
from typing import Optional, Sequence

import numpy as np

from dsgd.harness.bench_frame import compact, config_columns, floor_violations
from dsgd.names import MODEL_MODES

TABLE_COLUMNS = ["mode", "workload", "mesh", "layout", "dtype", "options", "xla", "implementation", "impl_used",
                 "median_ms", "p10_ms", "p90_ms", "speedup", "share_ms", "share_speedup", "first_step_s", "build_s",
                 "achieved_gbps", "roofline_ms", "roofline_frac", "state_bytes_per_device", "status"]
WIDTH = 120  # the default table fits a terminal this wide
FORMATS = ("table", "wide", "csv", "json")


def _num(x) -> str:
    """A number in 3 significant digits without exponents; '-' when missing."""
    if x is None or x != x:
        return "-"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if a >= 0.01 else (f"{x:.1e}" if a else "0")


def _pair(a, b, fmt=_num) -> str:
    return f"{fmt(a)}/{fmt(b)}" if a == a or b == b else "-"


def _frac(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.0f} s"


def _text(key: str, v) -> str:
    """A configuration value as shown: xla on/off, a JSON file by its base name."""
    if isinstance(v, (bool, np.bool_)):
        return "on" if v else "off"
    v = "-" if v is None or v != v else str(v)
    return os.path.basename(v) if v.endswith(".json") else v


def _grid(header: list[tuple[str, str]], cells: list[list[str]], nleft: int) -> list[str]:
    """Columns two spaces apart, a two-line header; the first ``nleft`` left-aligned, the rest right."""
    widths = [max([len(h[0]), len(h[1])] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    right = [i >= nleft for i in range(len(header))]

    def line(vals):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(vals, widths, right)).rstrip()

    return [line([h[0] for h in header]), line([h[1] for h in header])] + [line(c) for c in cells]


# optional columns, dropped in this order until the table fits
_OPTIONAL = ("spread", "first", "roofline")


def format_compact(c, *, width: int = WIDTH) -> tuple[list[str], list[str]]:
    """The lines of the default table from :func:`compact`'s frame, and the columns it shows beyond the
    configuration: configuration values that are the same on every row go in one line above it; to
    keep lines within ``width``, the optional columns are dropped (:data:`_OPTIONAL`, in order), then
    long values shortened."""
    keys = config_columns(c)
    c = c.copy()
    c["dsgd"] = [("-" if i != i else str(i)) + (f" ({u})" if u == u and u and u != i else "")
                 for i, u in zip(c["implementation"], c["impl_used"])]
    same = [k for k in keys if c[k].astype(str).nunique() <= 1]
    if c["dsgd"].nunique() <= 1:
        same.append("dsgd")
    shown = [k for k in keys if k not in same] + ([] if "dsgd" in same else ["dsgd"])

    floors = "floor_ms" in c and bool(c["floor_ms"].notna().any())
    lines = []
    if len(c) and same:
        lines += textwrap.wrap("every row: " + ", ".join(f"{k} {_text(k, c[k].iloc[0])}" for k in same), width)
    drop: list[str] = []
    limit = 40  # longest configuration value shown; shortened further if the table is still too wide
    while True:
        header = [(k, "") if k != "dsgd" else ("dsgd", "implementation") for k in shown] + [("dsgd", "ms")]
        if "spread" not in drop:
            header.append(("spread", "p10-p90"))
        header += [("tf_keras", "ms"), ("speed-up", "")]
        if floors:
            header += [("floor", "ms"), ("share", "speed-up")]
        if "roofline" not in drop:
            header.append(("roofline", "dsgd/tf_keras"))
        if "first" not in drop:
            header.append(("first step s", "dsgd/tf_keras"))
        cells = []
        for r in c.itertuples(index=False):
            d = r._asdict()
            row = [_text(k, d[k]) for k in shown]
            row = [v if len(v) <= limit else v[:limit - 1] + "~" for v in row]
            row.append(_num(d["median_ms"]) if d["status"] == "ok" or d["median_ms"] == d["median_ms"] else "failed")
            if "spread" not in drop:
                row.append(f"{100 * d['spread']:.0f}%" if d["spread"] == d["spread"] else "-")
            row += [_num(d["reference_ms"]), f"{d['speedup']:.2f}x" if d["speedup"] == d["speedup"] else "-"]
            if floors:
                sh = d.get("share_speedup", np.nan)
                row += [_num(d.get("floor_ms", np.nan)), f"{sh:.2f}x" if sh == sh else "-"]
            if "roofline" not in drop:
                row.append(_pair(d["roofline_frac"], d["reference_roofline_frac"], _frac))
            if "first" not in drop:
                row.append(_pair(d["first_step_s"], d["reference_first_step_s"]))
            cells.append(row)
        table = _grid(header, cells, len(shown))
        if max(map(len, table)) <= width or limit <= 8:
            break
        nxt = next((o for o in _OPTIONAL if o not in drop), None)
        if nxt:
            drop.append(nxt)
        else:
            limit -= 4
    columns = ["dsgd", "tf_keras", "speed-up"] + (["floor", "share"] if floors else [])
    columns += [o for o in _OPTIONAL if o not in drop]
    return lines + table, columns


def _judge(g, varying: list[str]) -> str:
    """The geometric-mean speed-up of rows ``g`` as it reads: faster/slower than tf_keras, of how many
    rows, the worst and best (the worst named by its ``varying`` configuration values)."""
    sp = g["speedup"].astype(float)
    geo = math.exp(float(np.log(sp).mean()))
    how = f"{geo:.2f}x faster than tf_keras" if geo >= 1 else \
        f"{1 / geo:.2f}x slower than tf_keras (speed-up {geo:.2f}x)"
    w = g.loc[sp.idxmin()]
    where = ", ".join(f"{k} {_text(k, w[k])}" for k in varying) or "the one configuration"
    if len(g) == 1:  # named only where the table has other rows
        return f"{how} ({where})" if varying else how
    return f"{how}, geometric mean of {len(g)} configurations; worst {sp.min():.2f}x ({where}), best {sp.max():.2f}x"


def verdict(c, *, run_s: Optional[float] = None) -> list[str]:
    """Who won by how much: one line per dsgd implementation -- the geometric-mean speed-up over the
    reference per optimizer step (eager, graph) with the worst and best configuration, then per whole
    training step (train_step, fit: the step users feel, not the noisier share) -- and the run time."""
    keys = config_columns(c)
    c = c.assign(_whole=c["mode"].isin(MODEL_MODES) if "mode" in c else False)
    out = []
    for impl, g in c[c["speedup"].notna()].groupby("implementation", sort=False):
        parts = []
        for is_whole, what in ((False, "per optimizer step"), (True, "per whole training step")):
            rows = g[g["_whole"] == is_whole]
            if len(rows):  # one row is named by what tells it from the others in the table
                varying = [k for k in keys if (rows if len(rows) > 1 else c)[k].astype(str).nunique() > 1]
                parts.append(f"{what}: {_judge(rows, varying)}")
        out.append(f"verdict: dsgd ({impl}) " + "; ".join(parts))
    if not out:
        out.append("verdict: no configuration has both dsgd and tf_keras measured, so no speed-up")
    failed = int((c["status"] != "ok").sum())
    tail = [f"{failed} row{'s' if failed != 1 else ''} with a failed case (below)"] if failed else []
    if run_s is not None:
        tail.append(f"run time {_duration(run_s)}")
    if tail:
        out[-1] += "; " + ", ".join(tail)
    return out


FLOOR = ("floor = the same step with an optimizer that brings every gradient to its variable's layout and hands "
         "them to one stateful no-op: the forward and backward pass and the gradient reductions every optimizer "
         "needs, nothing applied")
_MODE_TEXT = {
    "eager": "eager: apply_gradients of random gradients to every variable of the workload, on the mesh, called "
             "eagerly (tf_keras' in a tf.function, its faster mode)",
    "graph": "graph: apply_gradients inside a tf.function, for both",
    "train_step": "train_step: a whole custom tf.function training step of the model (forward, backward, update)",
    "fit": "fit: one model.fit step of the model",
}


def legend(df, columns: Sequence[str]) -> list[str]:
    """What a row measures, then one entry per column of ``columns`` (:func:`format_compact`'s) -- only those."""
    modes = [m for m in _MODE_TEXT if "mode" in df and (df["mode"] == m).any()] or ["eager"]
    steps = int(df["steps"].max()) if "steps" in df and df["steps"].notna().any() else None
    bw = df["copy_gbps"].dropna().median() if "copy_gbps" in df and df["copy_gbps"].notna().any() else None
    paired = "paired" in df and bool(df["paired"].eq(True).any())
    opt, whole = [m for m in modes if m not in MODEL_MODES], [m for m in modes if m in MODEL_MODES]
    step = " or ".join(f"{what} ({', '.join(ms)})" if opt and whole else what
                       for what, ms in (("one optimizer step", opt), ("one whole training step", whole)) if ms)
    out = [f"A row: {step}; dsgd, tf_keras = the median ms of {steps or 'the'} timed steps of dsgd and of tf_keras' "
           "DTensor SGD" + (", interleaved in one process" if paired else "") + ".",
           "mode " + "; ".join(_MODE_TEXT[m] for m in modes),
           "speed-up = tf_keras ms / dsgd ms"]
    if "spread" in columns:
        out.append("spread = (p90 - p10) / median of dsgd's steps")
    if "floor" in columns:
        out.append(FLOOR + ("; in graph there is no forward or backward pass: the floor is the call that hands the "
                            "gradients and variables in" if "graph" in modes else ""))
        out.append("share speed-up = (tf_keras - floor) / (dsgd - floor)"
                   + (" (optimizer's share of a whole training step)" if whole else "")
                   + ", '-' where a share is not clearly above zero (within twice the standard error of the "
                     "difference of the two medians)")
    if "roofline" in columns:
        out.append("roofline = the update's ideal memory traffic at the copy bandwidth"
                   + (f" measured in this run ({bw:.1f} GB/s)" if bw else "")
                   + (" / the optimizer's share (dsgd - floor; the step where there is no floor)" if "floor" in columns
                      else " / the step's time") + " (1 = memory-bound), dsgd/tf_keras")
    if "first" in columns:
        out.append("first step s = trace + compile + one step, dsgd/tf_keras")
    return out


def render_table(df, *, run_s: Optional[float] = None, width: int = WIDTH) -> str:
    """The default output: the compact table, the verdict, what the columns shown mean (<= ``width`` columns)."""
    if df.empty:
        return "no cases"
    c = compact(df)
    table, columns = format_compact(c, width=width)
    lines = table + [""]
    lines += [w for v in verdict(c, run_s=run_s) for w in textwrap.wrap(v, width)]
    first, *entries = legend(df, columns)
    lines += textwrap.wrap(first, width)
    lines += [w for e in entries for w in textwrap.wrap(e, width, initial_indent="  ", subsequent_indent="    ")]
    notes = []
    if "clients" in df and df["clients"].notna().any():
        n = int(df["clients"].max())
        b = df["barrier_ms"].dropna().median() if "barrier_ms" in df else float("nan")
        notes.append(f"Multi-client ({n} clients): a step's time is the whole mesh's: the timed region ends with a "
                     f"barrier of all {n} clients, so it ends when the slowest client's step is done (the barrier "
                     f"alone: {_num(b)} ms, included).")
    if "build_s" in df and df["build_s"].fillna(0).max() > 0.5:
        notes.append(f"One-time C++ kernel build/load: {df['build_s'].max():.1f} s before the first step, not counted "
                     "in first-step times (cached for later runs).")
    for v in floor_violations(df):
        notes.append(f"WARNING: the floor ({_num(v['floor_ms'])} ms) is slower than {v['implementation']}'s whole step "
                     f"({_num(v['step_ms'])} ms) on {v['workload']}, {v['mesh']}, {v['mode']}: it does more than an "
                     "optimizer needs, so its shares mean nothing here.")
    for n in notes:
        lines += textwrap.wrap(n, width)
    failed = df[df["status"] != "ok"]
    if len(failed):  # each failed case once (a failed reference is shared by its configuration's rows)
        keys = config_columns(df)
        varying = [k for k in keys if df[k].astype(str).nunique() > 1]
        lines += ["", "failed:"]
        for _, r in failed.iterrows():
            label = " ".join(_text(k, r[k]) for k in varying + ["implementation"])
            lines += textwrap.wrap(f"{label}: {str(r.get('error'))[:300]}", width, initial_indent="  ",
                                   subsequent_indent="    ")
    return "\n".join(lines)


def render_wide(df) -> str:
    """Every measured column of every case (``--format wide``)."""
    cols = [c for c in TABLE_COLUMNS if c in df.columns] + [c for c in ("clients", "barrier_ms") if c in df.columns]
    view = df[cols].copy()
    if "xla" in view:
        view["xla"] = view["xla"].map({True: "on", False: "off"})
    if "state_bytes_per_device" in view:
        view["state_MiB/dev"] = view.pop("state_bytes_per_device") / 2**20
    text = view.to_string(index=False, float_format=lambda x: f"{x:.3g}", na_rep="-")
    failed = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    if len(failed):
        text += "\n\nfailed cases:\n" + "\n".join(
            f"  {r.workload}|{r.mesh}|{r.layout}|{r.dtype}|{r.implementation}: {str(r.error)[:200]}"
            for r in failed.itertuples())
    if "copy_gbps" in df and df["copy_gbps"].notna().any():
        text += f"\n\nroofline: copy bandwidth {df['copy_gbps'].dropna().median():.1f} GB/s measured in this run; " \
                "traffic per step = params x device copies x bytes x (5 momentum | 3 sgd, +2 EMA, +1 norm clip)"
    return text


def render(df, fmt: str = "table", *, run_s: Optional[float] = None) -> str:
    """The results as text: ``table`` (compact, fits 120 columns, with the verdict), ``wide``
    (every column), ``csv`` or ``json`` (every field of every row)."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=1)
    if fmt == "wide":
        return render_wide(df)
    return render_table(df, run_s=run_s)


def plot(df, path: str) -> None:
    """Bar chart of median step ms per case, dsgd vs reference, with the roofline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"].copy()
    ok["config"] = ok["workload"] + "\n" + ok["mesh"] + " " + ok["layout"] + " " + ok["dtype"]
    pivot = ok.pivot_table(index="config", columns="implementation", values="median_ms", aggfunc="median")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(pivot)), 5.5))
    pivot.plot.bar(ax=ax, logy=True, rot=45)
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor", fontsize=8)
    roof = ok.groupby("config")["roofline_ms"].median().reindex(pivot.index)
    ax.scatter(range(len(roof)), roof.values, marker="_", s=600, color="k", label="roofline", zorder=3)
    ax.set_ylabel("median ms per step (log)")
    ax.set_title("dsgd bench: one optimizer step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
