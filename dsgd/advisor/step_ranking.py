"""Ranking whole-step plans, with the reason for each place in a few words (the table's "why" column).

The sort key is the step time (measured here, or predicted for a target mesh).  The recommendation: of
the eligible plans (they ran, within ``--memory-budget``), those within :data:`TOLERANCE` of the fastest
count as equally fast, and of those the one with the least memory per device is recommended.  Every
other plan's "why" says how much slower it is and which part of the step makes the difference: the part
of the predicted breakdown (:mod:`dsgd.advisor.step_model`) that grows most against the recommended plan.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

TOLERANCE = 0.05  # plans this close to the fastest count as equally fast: the smaller memory wins

_PART_TEXT = {"compute": "compute", "update": "update", "fixed": "per-op overhead"}


def _mib(b) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 / 10 else f"{b / 1024:.0f} KiB"


def dominant_part(row: dict, best: dict) -> Optional[str]:
    """The part of ``row``'s predicted step that grows most against ``best``'s, in words."""
    p, q = row.get("pred"), best.get("pred")
    if not p or not q:
        return None
    parts = [k for k in p if k in ("compute", "update", "fixed") or k.startswith("coll:")]
    diffs = {k: p.get(k, 0.0) - q.get(k, 0.0) for k in parts}
    k = max(diffs, key=lambda x: diffs[x]) if diffs else None
    if k is None or diffs[k] <= 0:
        return None
    if k.startswith("coll:"):
        axes = k[5:]
        return f"{axes} collectives {_mib(p.get('coll_bytes:' + axes, 0))} (+{diffs[k]:.0f} ms pred)"
    if k == "compute" and q.get("flops") and p.get("flops"):
        return f"compute {p['flops'] / q['flops']:.1f}x FLOPs/device (+{diffs[k]:.0f} ms pred)"
    if k == "update":
        return f"update of {_mib(row.get('params_bytes', 0))}/device (+{diffs[k]:.0f} ms pred)"
    return f"{_PART_TEXT.get(k, k)} (+{diffs[k]:.0f} ms pred)"


def rank(df, *, memory_budget: Optional[int] = None, time_col: str = "step_ms", tolerance: float = TOLERANCE):
    """Add ``rank``, ``eligible``, ``recommended`` and ``why`` to a plan table, ranked."""
    df = df.copy()
    status = df["status"] if "status" in df else ["ok"] * len(df)
    t = df[time_col].astype(float)
    ok = np.array([s == "ok" for s in status]) & t.notna().to_numpy()
    over = np.array([memory_budget is not None and m > memory_budget for m in df["mem_bytes"]])
    df["eligible"] = ok & ~over
    df["recommended"] = False
    best_i = None
    if df["eligible"].any():
        elig = df[df["eligible"]]
        fastest = float(elig[time_col].min())
        band = elig[elig[time_col] <= fastest * (1 + tolerance)]
        best_i = band.sort_values(["mem_bytes", time_col]).index[0]
        df.loc[best_i, "recommended"] = True
    order = df.assign(_r=~df["recommended"], _e=~df["eligible"], _ok=~ok, _t=t.fillna(np.inf)) \
              .sort_values(["_r", "_ok", "_e", "_t"]).index
    best = df.loc[best_i].to_dict() if best_i is not None else None
    why = []
    for i in order:
        r = df.loc[i].to_dict()
        tv = float(r[time_col]) if r[time_col] == r[time_col] else float("nan")
        if not ok[df.index.get_loc(i)]:
            why.append("failed: " + str(r.get("error") or "not measured")[:160])
            continue
        if r["recommended"]:
            fastest = float(df.loc[df["eligible"], time_col].min())
            why.append("fastest" if tv <= fastest else
                       f"{100 * (tv / fastest - 1):.0f}% off the fastest (within {tolerance:.0%}), least memory")
            continue
        bits = []
        if best is not None:
            bits.append(f"{100 * (tv / float(best[time_col]) - 1):+.0f}%")
            dom = dominant_part(r, best)
            if dom:
                bits.append(dom)
        if over[df.index.get_loc(i)]:
            bits.append(f"over --memory-budget ({_mib(r['mem_bytes'])})")
        why.append(": ".join(bits[:2]) + ("; " + "; ".join(bits[2:]) if len(bits) > 2 else ""))
    df = df.loc[order].reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    df["why"] = why
    return df


__all__ = ["rank", "dominant_part", "TOLERANCE"]
