"""``dsgd bench``: time one optimizer step across workloads, meshes, layouts, dtypes,
implementations and XLA on/off, side by side with tf_keras' reference, in one run.

Cases run in a worker process (:mod:`dsgd.harness.isolate`) with the requested logical devices;
the numbers come from :mod:`dsgd.harness.measure`; the table is rendered from a pandas frame.
"""
from __future__ import annotations

import math
import os
import textwrap
import time
from dataclasses import asdict, fields
from typing import Optional, Sequence

import numpy as np

from dsgd.harness import measure
from dsgd.harness.grid import (DEFAULT_MODELS, add_grid_arguments, cases_from_args,  # noqa: F401 - bench.make_cases
                               make_cases)
from dsgd.harness.measure import MODEL_MODES, MODES, NO_UPDATE, REFERENCE, Case

DEFAULT_WORKLOADS = ("one-big", "bert-mini", "many-small")
DEFAULT_MESHES = ("1", "batch=8", "batch=2,model=4")
DEFAULT_IMPLEMENTATIONS = ("auto", REFERENCE)
# where users train: eagerly, in a tf.function, under model.fit (train_step on request: a custom
# tf.function step measures like fit's, and the default run stays a few minutes)
DEFAULT_MODES = ("eager", "graph", "fit")
KEY = ["workload", "mesh", "layout", "dtype", "xla", "options", "mode"]

_COPY_GBPS: Optional[float] = None


def copy_gbps() -> float:
    global _COPY_GBPS
    if _COPY_GBPS is None:
        _COPY_GBPS = measure.copy_bandwidth_gbps()
    return _COPY_GBPS


def resolved_implementations(opt) -> str:
    """Which implementation(s) actually ran each group (for ``auto``)."""
    used = getattr(opt, "implementations_used", None)
    if used is None:  # tf_keras' optimizer
        return REFERENCE
    return "+".join(used()) or "?"


def _row(built, t_ms: np.ndarray) -> dict:
    """The result row of one built case from its per-step times (ms)."""
    row = asdict(built.case)
    b = measure.bytes_for_case(built)
    bw = copy_gbps()
    stats = measure.step_stats(t_ms, (10, 90))
    roof = measure.roofline(b.step_traffic_total, stats["median_ms"], bw)
    row.update(
        status="ok",
        first_step_s=built.first_step_s,
        impl_used=NO_UPDATE if built.case.implementation == NO_UPDATE else resolved_implementations(built.optimizer),
        **stats,
        params=b.params_total,
        param_bytes_per_device=b.params_per_device,
        state_bytes_per_device=measure.optimizer_state_bytes(built.optimizer),  # what the slots hold (ZeRO-1 too)
        traffic_bytes=b.step_traffic_total,
        achieved_gbps=roof["achieved_gbps"],
        copy_gbps=bw,
        roofline_ms=roof["roofline_ms"],
    )
    row["roofline_frac"] = roof["roofline_frac"]
    return row


def run_case(payload: dict) -> dict:
    """Measure one case (a :class:`Case` as a dict plus ``steps``); returns a result row."""
    steps = int(payload.pop("steps", 10))
    built = measure.build_case(Case(**payload))
    measure.time_first_step(built)
    return _row(built, measure.time_steps(built.step, steps=steps, warmup=1) * 1e3)


BLOCK = 4  # timed steps per implementation per round of run_paired


def run_paired(payload: dict) -> dict:
    """Measure several implementations of one configuration side by side, in one process.

    ``payload``: a :class:`Case` as a dict whose ``implementation`` is a list, plus ``steps``.
    Each implementation is built and its first step timed on its own; then their steps are
    interleaved in rounds (every implementation once per round, in reverse order on odd
    rounds), so a slow spell of the machine falls on all of them alike and their ratio holds.
    In a round an implementation runs one untimed step, then :data:`BLOCK` timed ones: every
    timed step follows a step of its own, as in a loop of steps (and as when measured alone),
    not a step of another implementation that left the caches full of its own buffers.
    Returns ``{"rows": [one row per implementation, in order]}``; an implementation that
    fails is a failed row and the others are still measured.
    """
    steps = int(payload.pop("steps", 10))
    impls = list(payload.pop("implementation"))
    built: dict[int, measure.Built] = {}
    rows: list[Optional[dict]] = [None] * len(impls)
    for k, impl in enumerate(impls):
        try:
            b = measure.build_case(Case(**payload, implementation=impl))
            measure.time_first_step(b)
            b.step()  # warm-up
            measure.sync()
            built[k] = b
        except Exception as e:  # noqa: BLE001 - recorded as failed; the others go on
            rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    times: dict[int, list[float]] = {k: [] for k in built}
    rounds = -(-steps // BLOCK)
    for r in range(rounds):
        for k in (list(built) if r % 2 == 0 else list(built)[::-1]):
            if k not in times:
                continue
            try:  # the warm-up step is untimed: the caches were the other implementation's
                n = min(BLOCK, steps - len(times[k]))
                times[k].extend(measure.time_steps(built[k].step, steps=n, warmup=1) * 1e3)
            except Exception as e:  # noqa: BLE001
                rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                del times[k]
    for k, t in times.items():
        rows[k] = _row(built[k], np.asarray(t))
        rows[k]["paired"] = True
    return {"rows": rows}


def _jobs(cases: Sequence[Case], steps: int, paired: bool) -> list[tuple[str, dict, list[int]]]:
    """(worker function, payload, indices of the cases it measures) for each unit of work."""
    if not paired:
        return [("run_case", dict(asdict(c), steps=steps), [i]) for i, c in enumerate(cases)]
    by_config: dict[tuple, list[int]] = {}
    for i, c in enumerate(cases):
        config = tuple((k, v) for k, v in asdict(c).items() if k != "implementation")
        by_config.setdefault(config, []).append(i)
    jobs = []
    for config, idx in by_config.items():
        if len(idx) == 1:
            jobs.append(("run_case", dict(asdict(cases[idx[0]]), steps=steps), idx))
        else:
            jobs.append(("run_paired", dict(config, implementation=[cases[i].implementation for i in idx],
                                            steps=steps), idx))
    return jobs


def _split(res: dict, n: int) -> list[dict]:
    """A job's result as one result per case (a failed job fails each of its cases)."""
    if "rows" in res:
        return [r if r is not None else {"status": "failed", "error": "not measured"} for r in res["rows"]]
    return [res] * n if n > 1 else [res]


def run(cases: Sequence[Case], *, steps: int = 10, devices: int = 8, isolate: bool = True,
        progress: bool = True, on_row=None, paired: bool = True):
    """Run cases; returns a pandas DataFrame with one row per case (failed ones included).

    ``paired`` (the default): the implementations of one configuration are measured side by
    side in one process, their steps interleaved (:func:`run_paired`), so the speed-up is a
    ratio of times taken in the same moments; otherwise each case runs on its own.

    As a DTensor client (:mod:`dsgd.multiclient`) the cases run in this process, whatever
    ``isolate`` says: every client runs the same cases in the same order, each case's mesh
    spanning all clients (the cluster cannot be re-formed in a worker process).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from dsgd import multiclient

    client = multiclient.is_client()
    if client:
        isolate = False
    jobs = _jobs(cases, steps, paired)
    rows: list[Optional[dict]] = [None] * len(cases)
    bar = tqdm(total=len(cases), desc="dsgd bench", unit="case", disable=not progress, leave=False)

    def got(j, res):
        idx = jobs[j][2]
        for i, r in zip(idx, _split(res, len(idx))):
            row = dict(asdict(cases[i]))
            row.update(r)
            rows[i] = row
            bar.update(1)
            bar.set_postfix_str(cases[i].label[:60])
            if on_row:
                on_row(row)

    if isolate:
        from dsgd.harness.isolate import run_isolated

        # one worker function per sweep keeps run_isolated's one-func interface
        payloads = [dict(p, _func=func) for func, p, _ in jobs]
        run_isolated("dsgd.harness.bench:run_job", payloads, devices=devices, on_result=got,
                     device_type=cases[0].device if cases else "CPU")
    else:
        for j, (func, p, idx) in enumerate(jobs):
            try:
                res = run_job(dict(p, _func=func))
            except Exception as e:  # noqa: BLE001 - recorded as failed; the sweep goes on
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if client:  # a case failed on some clients only: the others may be stuck in it, stop all
                ok = all(r.get("status", "ok") == "ok" for r in _split(res, len(idx)))
                oks = multiclient.agree(f"bench-job-{j}", ok)
                if len(set(oks)) > 1:
                    bad = [k for k, o in enumerate(oks) if not o]
                    msg = f"case {cases[idx[0]].label} failed on client(s) {bad} only: {res.get('error', '')}"
                    multiclient.report_error(msg)
                    raise RuntimeError(msg)
            got(j, res)
    bar.close()
    df = add_ratios(pd.DataFrame(rows))
    if client:  # every client gets here together (the jobs agreed)
        cfg = multiclient.config_from_env()
        df["clients"] = cfg.num_clients
        df["barrier_ms"] = multiclient.barrier_ms()  # included in every step time: say how much
    return df


def prepare_kernels(implementations: Sequence[str]) -> float:
    """Build (once per machine) and load dsgd's C++ kernels before any step is timed, so that
    the ~20 s build is not a first step's time; the seconds it took here (0: not needed, or
    already loaded).  Only ``auto`` and ``grouped`` use the kernels."""
    if not {"auto", "grouped"} & set(implementations):
        return 0.0
    from dsgd import kernels

    return kernels.prepare()


def run_job(payload: dict) -> dict:
    """A worker's entry point: ``payload["_func"]`` is ``run_case`` or ``run_paired``.

    The kernels are built/loaded first; every row of the job gets that time as ``build_s``.
    """
    func = payload.pop("_func", "run_case")
    impl = payload.get("implementation", "auto")
    build_s = prepare_kernels([impl] if isinstance(impl, str) else impl)
    res = {"run_case": run_case, "run_paired": run_paired}[func](payload)
    for r in res["rows"] if "rows" in res else [res]:
        if r is not None:
            r["build_s"] = build_s
    return res


def add_ratios(df):
    """``speedup`` = reference median / this median, for the same configuration (:data:`KEY`).

    Whole-step modes (``train_step``, ``fit``) also get the optimizer's *share* of the step:
    ``share_ms`` = this median - the :data:`NO_UPDATE` median of the same configuration (the
    forward and backward pass alone), and ``share_speedup`` = the reference's share / this share.
    """
    if df.empty or "median_ms" not in df:
        return df
    if "mode" not in df:
        df["mode"] = "eager"
    ok_all = df[df["status"] == "ok"]
    ok = ok_all[ok_all["implementation"] == REFERENCE]
    ref = ok.set_index(KEY)["median_ms"].to_dict()
    ref_first = ok.set_index(KEY)["first_step_s"].to_dict()
    keys = list(zip(*(df[k] for k in KEY)))
    df["speedup"] = [ref.get(k, np.nan) / m if m == m else np.nan for k, m in zip(keys, df["median_ms"])]
    df["first_step_speedup"] = [ref_first.get(k, np.nan) / f if f == f else np.nan
                                for k, f in zip(keys, df.get("first_step_s", np.nan))]
    floor = ok_all[ok_all["implementation"] == NO_UPDATE].set_index(KEY)["median_ms"].to_dict()
    if floor:
        df["floor_ms"] = [floor.get(k, np.nan) for k in keys]
        df["share_ms"] = df["median_ms"] - df["floor_ms"]
        df["share_speedup"] = [_share_ratio(ref.get(k, np.nan), m, floor.get(k, np.nan))
                               for k, m in zip(keys, df["median_ms"])]
        df.loc[df["implementation"] == NO_UPDATE, ["speedup", "share_ms", "share_speedup"]] = np.nan
        # a whole step's roofline is its update's: compare it with the optimizer's share, not the step
        whole = df["floor_ms"].notna()
        if "roofline_ms" in df:
            df.loc[whole, "roofline_frac"] = df.loc[whole, "roofline_ms"] / df.loc[whole, "share_ms"]
            df.loc[df["implementation"] == NO_UPDATE, "roofline_frac"] = np.nan
    return df


TABLE_COLUMNS = ["mode", "workload", "mesh", "layout", "dtype", "options", "xla", "implementation", "impl_used",
                 "median_ms", "p10_ms", "p90_ms", "speedup", "share_ms", "share_speedup", "first_step_s", "build_s",
                 "achieved_gbps", "roofline_ms", "roofline_frac", "state_bytes_per_device", "status"]
WIDTH = 120  # the default table fits a terminal this wide
FORMATS = ("table", "wide", "csv", "json")


def config_columns(df) -> list[str]:
    """The configuration key: every :class:`Case` field in the frame but the implementation, so
    a field added to :class:`Case` (and so to the rows) becomes part of it by itself."""
    return [f.name for f in fields(Case) if f.name != "implementation" and f.name in df.columns]


def compact(df):
    """One row per configuration and dsgd implementation, the reference beside it (plain data).

    Columns: the configuration key (:func:`config_columns`), ``implementation``/``impl_used``
    (dsgd's), ``median_ms``, ``spread`` ((p90 - p10) / median), ``reference_ms``, ``speedup``
    (reference / dsgd), ``roofline_frac`` and ``reference_roofline_frac``, ``first_step_s`` and
    ``reference_first_step_s``, ``status`` and ``error`` (dsgd's, else the reference's); in the
    whole-step modes ``floor_ms`` (the no-update step) and ``share_speedup`` (the reference's share of
    the step over dsgd's).  A configuration with only the reference measured is one row with the
    dsgd fields empty.
    """
    import pandas as pd

    keys = config_columns(df)
    out = []
    groups = df.groupby(keys, sort=False, dropna=False) if keys else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        ref = g[g["implementation"] == REFERENCE]
        ref = ref.iloc[0] if len(ref) else None
        floor = g[(g["implementation"] == NO_UPDATE) & (g["status"] == "ok")]
        floor_ms = float(floor["median_ms"].iloc[0]) if len(floor) else np.nan
        mine = g[~g["implementation"].isin([REFERENCE, NO_UPDATE])]

        def get(r, col):
            return r[col] if r is not None and col in r and r[col] == r[col] else np.nan

        for _, r in (mine.iterrows() if len(mine) else [(None, None)]):
            row = dict(zip(keys, key))
            ok = r is not None and get(r, "status") == "ok"
            ref_ok = ref is not None and get(ref, "status") == "ok"
            med, ref_med = get(r, "median_ms") if ok else np.nan, get(ref, "median_ms") if ref_ok else np.nan
            row.update(
                implementation=get(r, "implementation"), impl_used=get(r, "impl_used"),
                median_ms=med, spread=(get(r, "p90_ms") - get(r, "p10_ms")) / med if ok else np.nan,
                reference_ms=ref_med, speedup=ref_med / med if ok and ref_ok else np.nan,
                roofline_frac=get(r, "roofline_frac") if ok else np.nan,
                reference_roofline_frac=get(ref, "roofline_frac") if ref_ok else np.nan,
                first_step_s=get(r, "first_step_s") if ok else np.nan,
                reference_first_step_s=get(ref, "first_step_s") if ref_ok else np.nan,
                floor_ms=floor_ms, share_speedup=_share_ratio(ref_med, med, floor_ms) if ok and ref_ok else np.nan)
            bad = [x for x in (r, ref) if x is not None and get(x, "status") != "ok"]
            row["status"] = "ok" if not bad else "failed"
            row["error"] = str(get(bad[0], "error")) if bad else ""
            if bad and bad[0] is ref:
                row["error"] = "reference: " + row["error"]
            out.append(row)
    return pd.DataFrame(out)


def _share_ratio(ref_ms: float, ms: float, floor_ms: float) -> float:
    """(reference - floor) / (dsgd - floor); NaN when a share is not positive (the floor, measured
    beside them, was as slow as the step: noise larger than the share, no ratio to report)."""
    mine, ref = ms - floor_ms, ref_ms - floor_ms
    return ref / mine if mine > 0 and ref > 0 else np.nan


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


def format_compact(c, *, width: int = WIDTH) -> list[str]:
    """The lines of the default table from :func:`compact`'s frame: configuration values that
    are the same on every row go in one line above it; to keep lines within ``width``, the
    optional columns are dropped (:data:`_OPTIONAL`, in order), then long values shortened."""
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
        header = [(k, "") for k in shown] + [("dsgd", "ms")]
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
    return lines + table


def verdict(c, *, run_s: Optional[float] = None) -> list[str]:
    """Who won by how much: per dsgd implementation, the geometric-mean speed-up over the
    reference and the worst configuration; then the run time."""
    keys = config_columns(c)
    varying = [k for k in keys if c[k].astype(str).nunique() > 1]
    out = []
    c = c.copy()
    whole = c["mode"].isin(MODEL_MODES) if "mode" in c else np.zeros(len(c), bool)
    c["judged"] = np.where(whole, c.get("share_speedup", np.nan), c["speedup"])
    c["what"] = np.where(whole, "optimizer's share of a whole training step", "the step")
    for (impl, what), g in c[c["judged"].notna()].groupby(["implementation", "what"], sort=False):
        sp = g["judged"].astype(float)
        geo = math.exp(float(np.log(sp).mean()))
        w = g.loc[sp.idxmin()]
        where = ", ".join(f"{k} {_text(k, w[k])}" for k in varying) or "the one configuration"
        how = f"{geo:.2f}x faster than tf_keras" if geo >= 1 else \
            f"{1 / geo:.2f}x slower than tf_keras (speed-up {geo:.2f}x)"
        out.append(f"verdict: dsgd ({impl}) {how}" + (f" ({what})" if what != "the step" else "") +
                   f", geometric mean of {len(g)} configuration{'s' if len(g) != 1 else ''}; worst "
                   f"{sp.min():.2f}x ({where}), best {sp.max():.2f}x")
    if not out:
        out.append("verdict: no configuration has both dsgd and tf_keras measured, so no speed-up")
    failed = int((c["status"] != "ok").sum())
    tail = [f"{failed} row{'s' if failed != 1 else ''} with a failed case (below)"] if failed else []
    if run_s is not None:
        tail.append(f"run time {_duration(run_s)}")
    if tail:
        out[-1] += "; " + ", ".join(tail)
    return out


def render_table(df, *, run_s: Optional[float] = None, width: int = WIDTH) -> str:
    """The default output: the compact table, the verdict, what a row measures (<= ``width`` columns)."""
    if df.empty:
        return "no cases"
    c = compact(df)
    lines = format_compact(c, width=width) + [""]
    notes = verdict(c, run_s=run_s)
    steps = int(df["steps"].max()) if "steps" in df and df["steps"].notna().any() else None
    bw = df["copy_gbps"].dropna().median() if "copy_gbps" in df and df["copy_gbps"].notna().any() else None
    paired = "paired" in df and bool(df["paired"].eq(True).any())
    notes.append(
        "A row: one optimizer step (apply_gradients of random gradients to every variable of the workload, on the "
        f"mesh), median ms of {steps or 'the'} timed steps"
        + (", dsgd and tf_keras' DTensor SGD interleaved in one process" if paired else "")
        + "; mode eager: dsgd called eagerly, tf_keras in a tf.function (its faster mode); graph: both inside a "
        "tf.function; train_step / fit: a whole training step of the model (forward, backward, update: a custom "
        "tf.function, or model.fit's), floor = the same step applying nothing, share speed-up = (tf_keras - floor) / "
        "(dsgd - floor); speed-up = tf_keras ms / dsgd ms; spread = (p90 - p10) / median; roofline = the update's "
        "ideal memory traffic at the copy bandwidth" + (f" measured in this run ({bw:.1f} GB/s)" if bw else "")
        + " / the update's time (the step, or in whole steps the share; 1 = memory-bound); first step = trace + "
        "compile + one step.")
    if "clients" in df and df["clients"].notna().any():
        n = int(df["clients"].max())
        b = df["barrier_ms"].dropna().median() if "barrier_ms" in df else float("nan")
        notes.append(f"Multi-client ({n} clients): a step's time is the whole mesh's: the timed region ends with a "
                     f"barrier of all {n} clients, so it ends when the slowest client's step is done (the barrier "
                     f"alone: {_num(b)} ms, included).")
    if "build_s" in df and df["build_s"].fillna(0).max() > 0.5:
        notes.append(f"One-time C++ kernel build/load: {df['build_s'].max():.1f} s before the first step, not counted "
                     "in first-step times (cached for later runs).")
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


def merge_external(df, paths: Sequence[str]):
    """Add rows measured by another tool in the same column format (e.g. scripts/bench_jax.py
    --format csv) so they sit beside dsgd and the reference, with speed-ups vs the reference."""
    import pandas as pd

    frames = [df]
    for p in paths:
        try:
            ext = pd.read_csv(p)
        except (OSError, ValueError) as e:
            raise ValueError(f"--compare file {p}: {e}") from None
        missing = [c for c in ("workload", "mesh", "layout", "dtype", "options", "implementation", "median_ms")
                   if c not in ext.columns]
        if missing:
            raise ValueError(f"--compare file {p} lacks columns {missing}")
        ext = ext.copy()
        ext["xla"] = False  # compared against the reference with XLA off
        for f in fields(Case):  # the configuration fields it lacks take Case's defaults (e.g. device CPU)
            if f.name not in ext.columns:
                ext[f.name] = f.default
        ext["status"] = ext.get("status", "ok")
        frames.append(ext)
    return add_ratios(pd.concat(frames, ignore_index=True))


def main(args) -> int:
    """``dsgd bench``: check every value, run the sweep, print the table (and write what was asked)."""
    from dsgd import argcheck, meshspec, multiclient

    argcheck.check_bench(args)  # before any worker starts or any file is written
    meshes = args.mesh or DEFAULT_MESHES
    client = multiclient.config_from_env() if multiclient.is_client() else None
    if client is not None and not args.mesh:  # multi-client: the default meshes that span all clients' devices
        n = client.global_devices
        meshes = [m for m in DEFAULT_MESHES if meshspec.mesh_size(meshspec.parse_mesh_spec(m)) == n] or [f"batch={n}"]
    lead = client is None or client.client_id == 0  # only client 0 reports
    cases = cases_from_args(args, workloads=DEFAULT_WORKLOADS, meshes=meshes, implementations=DEFAULT_IMPLEMENTATIONS,
                            modes=args.mode or DEFAULT_MODES, models=args.model or DEFAULT_MODELS)
    t0 = time.perf_counter()
    df = run(cases, steps=args.steps, devices=args.devices, isolate=not args.no_isolate,
             progress=not args.quiet and lead, paired=not args.sequential)
    run_s = time.perf_counter() - t0
    if args.compare:
        df = merge_external(df, args.compare)
    code = 0 if (df["status"] == "ok").all() else 3
    if not lead:
        return code
    out = render(df, args.format, run_s=run_s)
    if args.output:
        with open(args.output, "w") as f:
            f.write(out if args.format in ("csv", "json") else render(df, "csv"))
    print(out)
    if args.plot:
        plot(df, args.plot)
        print(f"\nplot written to {args.plot}")
    return code


def add_arguments(p) -> None:
    """``dsgd bench``'s options; ``--help`` shows each one's default and meaning."""
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Time one optimizer step (apply_gradients of random gradients to every variable of a workload) with dsgd and\n"
        "with tf_keras' DTensor SGD (the reference, run in a tf.function), for every combination of the values\n"
        "given, in a worker process with --devices logical CPU devices. The implementations of one configuration\n"
        "are measured side by side (their steps interleaved), so the speed-up holds on a busy machine.")
    p.epilog = (
        "output (--format table): one row per configuration: dsgd's median step ms and spread, tf_keras' median,\n"
        "the speed-up (tf_keras ms / dsgd ms), the fraction of the memory roofline each reaches and the first\n"
        "step's time (trace + compile + step); values that are the same on every row are printed once above\n"
        "the table; then the verdict (geometric-mean speed-up, worst case, run time).\n\n"
        "examples:\n"
        "  dsgd bench                                        # the defaults: 3 workloads x 3 meshes, ~3 min\n"
        "  dsgd bench --workload bert-mini --mesh batch=2,model=4 --options full --steps 20\n"
        "  dsgd bench --implementation auto --implementation fused --implementation reference --xla both\n"
        "  dsgd bench --format csv -o results.csv --quiet\n\n"
        "exit status: 0 all measured; 2 a bad value (nothing run); 3 a case failed (the others are reported)")
    add_grid_arguments(p, workloads=DEFAULT_WORKLOADS, meshes=DEFAULT_MESHES,
                       implementations=DEFAULT_IMPLEMENTATIONS, xla="off")
    p.add_argument("--mode", action="append", choices=list(MODES),
                   help="where the step runs (repeatable; default: eager, graph, fit): eager = apply_gradients called eagerly "
                        "(tf_keras' reference in a tf.function, its faster mode); graph = apply_gradients inside a "
                        "tf.function for both; train_step = a whole custom tf.function training step of --model; "
                        "fit = one model.fit step of --model (both with a no-update floor row)")
    p.add_argument("--model", action="append",
                   help=f"model of the train_step and fit modes (repeatable; default {DEFAULT_MODELS[0]}: a residual "
                        "MLP, 8.7M parameters, global batch 16; resmlp-small: a tiny one)")
    p.add_argument("--steps", type=int, default=10, metavar="N",
                   help="timed steps per case, after one untimed warm-up step; more steadies the median "
                        "(default: 10)")
    p.add_argument("--format", choices=list(FORMATS), default="table",
                   help="table: compact, fits 120 columns, with the verdict; wide: every measured column; csv, "
                        "json: every field of every row (default: table)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="also write the results here (csv for table/wide, else the --format) (default: none)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw a bar chart of step times with the roofline (default: none)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run the cases in this process instead of a worker (it must have the devices already)")
    p.add_argument("--sequential", action="store_true",
                   help="measure each case on its own (default: the implementations of one configuration "
                        "side by side, their steps interleaved; needs all of them in memory at once)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compare", action="append", metavar="CSV",
                   help="merge rows measured elsewhere (same columns), e.g. `python scripts/bench_jax.py "
                        "--format csv -o jax.csv` (repeatable; default: none)")
