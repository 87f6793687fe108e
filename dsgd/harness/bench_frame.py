"""``dsgd bench``'s results frame: speed-ups over the reference and the optimizer's share of a whole
step (:func:`add_ratios`), the compact view of one row per configuration (:func:`compact`), and rows
measured by other tools merged in (:func:`merge_external`)."""
from __future__ import annotations

from dataclasses import fields
from typing import Sequence

import numpy as np

from dsgd.harness.measure import Case
from dsgd.names import NO_UPDATE, REFERENCE

KEY = ["workload", "mesh", "layout", "dtype", "xla", "options", "mode"]
#: what a row measured elsewhere (``--compare``) must have to sit beside dsgd's
COMPARE_COLUMNS = ("workload", "mesh", "layout", "dtype", "options", "implementation", "median_ms")


def add_ratios(df):
    """``speedup`` = reference median / this median, for the same configuration (:data:`KEY`).

    The modes with a floor (``graph``, ``train_step``, ``fit``) also get the optimizer's *share*:
    ``share_ms`` = this median - the :data:`NO_UPDATE` median of the same configuration (the
    forward and backward pass alone; in ``graph`` the call of a function taking the same gradients
    and variables), and ``share_speedup`` = the reference's share / this share.
    """
    import pandas as pd

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
    floors = ok_all[ok_all["implementation"] == NO_UPDATE].set_index(KEY)
    floor = floors["median_ms"].to_dict()
    if floor:
        se = [_median_se(r) for _, r in df.iterrows()]
        floor_se = {k: _median_se(r) for k, r in floors.iterrows()}
        ref_se = {k: _median_se(r) for k, r in ok.set_index(KEY).iterrows()}
        df["floor_ms"] = [floor.get(k, np.nan) for k in keys]
        df["share_ms"] = df["median_ms"] - df["floor_ms"]
        # a share is reported where it is clearly above zero (:func:`_noise`)
        noise = [_noise(s, floor_se.get(k, 0.0)) for k, s in zip(keys, se)]
        df["share_speedup"] = [_share_ratio(ref.get(k, np.nan), m, floor.get(k, np.nan), n,
                                            _noise(ref_se.get(k, 0.0), floor_se.get(k, 0.0)))
                               for k, m, n in zip(keys, df["median_ms"], noise)]
        df.loc[df["implementation"] == NO_UPDATE, ["speedup", "share_ms", "share_speedup"]] = np.nan
        # the roofline is the update's: where there is a floor, compare it with the optimizer's share
        # (none where the share is not clearly above zero; the floor's own share is NaN)
        if "roofline_ms" in df:
            floored = df["floor_ms"].notna()
            clear = floored & (df["share_ms"] > pd.Series(noise, index=df.index))
            df.loc[floored, "roofline_frac"] = np.nan
            df.loc[clear, "roofline_frac"] = df.loc[clear, "roofline_ms"] / df.loc[clear, "share_ms"]
    return df


def floor_violations(df) -> list[dict]:
    """Configurations whose floor is clearly slower than a real optimizer's whole step (beyond twice the
    standard error of the difference of the two medians): such a floor does more than an optimizer
    needs, and a share over it means nothing.  One dict per (configuration, optimizer) with ``floor_ms``,
    ``step_ms`` and the configuration's fields; empty when every floor holds."""
    if df.empty or "mode" not in df or NO_UPDATE not in set(df["implementation"]):
        return []
    ok = df[df["status"] == "ok"]
    floors = {tuple(r[k] for k in KEY): r for _, r in ok[ok["implementation"] == NO_UPDATE].iterrows()}
    out = []
    for _, r in ok[ok["implementation"] != NO_UPDATE].iterrows():
        f = floors.get(tuple(r[k] for k in KEY))
        if f is None:
            continue
        if f["median_ms"] - r["median_ms"] > _noise(_median_se(r), _median_se(f)):
            out.append(dict({k: r[k] for k in KEY}, implementation=r["implementation"], floor_ms=float(f["median_ms"]),
                            step_ms=float(r["median_ms"])))
    return out


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
    modes with a floor ``floor_ms`` (the no-update step) and ``share_speedup`` (the reference's share
    of the step over dsgd's).  A configuration with only the reference measured is one row with the
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
        floor_se = _median_se(floor.iloc[0]) if len(floor) else 0.0
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
                floor_ms=floor_ms,
                share_speedup=_share_ratio(ref_med, med, floor_ms, _noise(_median_se(r), floor_se),
                                           _noise(_median_se(ref), floor_se))
                if ok and ref_ok else np.nan)
            bad = [x for x in (r, ref) if x is not None and get(x, "status") != "ok"]
            row["status"] = "ok" if not bad else "failed"
            row["error"] = str(get(bad[0], "error")) if bad else ""
            if bad and bad[0] is ref:
                row["error"] = "reference: " + row["error"]
            out.append(row)
    return pd.DataFrame(out)


def _share_ratio(ref_ms: float, ms: float, floor_ms: float, noise_ms: float = 0.0, ref_noise_ms: float = 0.0) -> float:
    """(reference - floor) / (dsgd - floor); NaN when a share is not clearly above zero
    (:func:`_noise`): many-small's graph step is nearly all floor, and two noisy medians 1 ms
    apart gave a share speed-up of 82x, or a negative share."""
    mine, ref = ms - floor_ms, ref_ms - floor_ms
    return ref / mine if mine > max(noise_ms, 0.0) and ref > max(ref_noise_ms, 0.0) else np.nan


def _median_se(row) -> float:
    """The standard error of a row's median step time, from its p10-p90 spread over its timed
    steps (sigma ~ (p90 - p10) / 2.56; the median's error ~ 1.25 sigma / sqrt(steps)); 0 where
    the row has no spread or step count."""
    try:
        spread, n = float(row["p90_ms"]) - float(row["p10_ms"]), float(row["steps"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    if not (spread == spread and n == n and n > 0):
        return 0.0
    return 1.2533 * spread / 2.563 / np.sqrt(n)


def _noise(se_step: float, se_floor: float) -> float:
    """What a share (step median - floor median) must exceed to count: twice the standard error of
    the difference of the two medians."""
    return 2.0 * float(np.hypot(se_step, se_floor))


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
        missing = [c for c in COMPARE_COLUMNS if c not in ext.columns]
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
