"""Ranking layout plans, with the reasons in words: which plan to recommend (the fewest bytes per
device among the equally fast eligible ones) and why each plan stands where it does."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dsgd import meshspec
from dsgd.advisor import plans as plans_mod

NOISE_TOLERANCE = 0.10  # plans within this of the fastest count as equally fast (shared-machine noise)
DEFAULT_DATA_AXES = ("batch", "data")


def data_axes_of(mesh_dims, data_axes: Optional[Sequence[str]]) -> set[str]:
    names = {a for a, _ in mesh_dims}
    if data_axes is None:
        data_axes = DEFAULT_DATA_AXES
    return {a for a in data_axes if a in names}


def plan_summary(specs, plan, mesh_dims) -> dict:
    """Sharing statistics of a plan: how much of the model is sharded, and on what."""
    total = sum(plans_mod.var_bytes(s) for s in specs)
    sharded = sum(plans_mod.var_bytes(s) for s, lay in zip(specs, plan.layouts)
                  if any(e != meshspec.UNSHARDED for e in lay))
    return {"sharded_vars": plan.sharded_count(), "vars": len(specs),
            "sharded_bytes_frac": sharded / total if total else 0.0,
            "axes": "+".join(plan.axes) if plan.axes else "-", "description": plan.description}


def rank(df, time_col: str, *, data_axes: set[str], allow_fsdp: bool = False,
         memory_budget: Optional[int] = None, tolerance: float = NOISE_TOLERANCE):
    """Add ``rank``, ``recommended``, ``eligible`` and ``reasons`` to a plan table.

    The recommendation: among eligible plans (not sharding parameters over a data axis unless
    ``allow_fsdp``, within ``memory_budget``), those whose step time is within ``tolerance``
    of the fastest count as equally fast; of those, the one with the fewest bytes per device
    (then the fewest collectives, then the fastest).  The rest follow by step time.
    """
    df = df.copy()
    fsdp = [bool(set(str(a).split("+")) & data_axes) for a in df["axes"]]
    over = [memory_budget is not None and b > memory_budget for b in df["bytes_per_device"]]
    df["fsdp"] = fsdp
    df["eligible"] = [not ((f and not allow_fsdp) or o) for f, o in zip(fsdp, over)]
    t = df[time_col].astype(float)
    elig = df[df["eligible"] & t.notna()]
    df["recommended"] = False
    best_t = float(elig[time_col].min()) if len(elig) else float("nan")
    rec_idx = None
    if len(elig):
        if "spread" in elig:  # measured: the band is at least the fastest plan's own interquartile spread
            s = elig.loc[elig[time_col].idxmin(), "spread"]
            if s == s and s is not None:
                tolerance = max(tolerance, float(s))
        band = elig[elig[time_col] <= best_t * (1 + tolerance)]
        rec_idx = band.sort_values(["bytes_per_device", "n_collectives", time_col]).index[0]
        df.loc[rec_idx, "recommended"] = True
    order = df.assign(_r=~df["recommended"], _e=~df["eligible"], _t=t.fillna(np.inf)) \
              .sort_values(["_r", "_e", "_t", "bytes_per_device"]).index
    df = df.loc[order].reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    repl = df.loc[df["plan"] == "replicated", "bytes_per_device"]
    repl_bytes = int(repl.iloc[0]) if len(repl) else None
    min_bytes = int(df["bytes_per_device"].min())
    reasons = []
    for r in df.itertuples():
        why = []
        tv = getattr(r, time_col)
        if r.recommended:
            why.append(f"recommended: within {tolerance:.0%} of the fastest eligible step (the tolerance: 10% or the fastest plan's measured spread) and the "
                       "fewest bytes per device among those")
        if tv == tv and best_t == best_t:
            why.append("fastest eligible step" if abs(tv - best_t) < 1e-12
                       else f"step {100 * (tv / best_t - 1):+.0f}% vs the fastest eligible")
        if repl_bytes and r.plan != "replicated":
            why.append(f"{repl_bytes / r.bytes_per_device:.1f}x fewer bytes/device than replicated")
        if r.bytes_per_device == min_bytes:
            why.append("fewest bytes/device")
        why.append(f"shards {r.sharded_vars}/{r.vars} variables ({r.sharded_bytes_frac:.0%} of the bytes)")
        if r.n_collectives:
            why.append("collectives: " + "; ".join(c["text"] for c in r.collectives))
        else:
            why.append("no collectives in the step")
        refc = getattr(r, "reference_collectives", None)
        if isinstance(refc, list) and sum(c.count for c in refc) != r.n_collectives:
            n = sum(c.count for c in refc)
            why.append(f"the reference needs {n} collective{'s' if n != 1 else ''}"
                       + (": " + "; ".join(c.describe() for c in refc) if refc else ""))
        if r.fsdp:
            why.append(f"parameters sharded over data axis {sorted(set(str(r.axes).split('+')) & data_axes)}: "
                       "forward/backward must all-gather them (FSDP/ZeRO-3, not in the optimizer step)"
                       + ("" if allow_fsdp else "; not recommended without --allow-fsdp"))
        if memory_budget is not None and r.bytes_per_device > memory_budget:
            why.append(f"over the memory budget of {memory_budget} B")
        if isinstance(getattr(r, "speedup", None), float) and r.speedup == r.speedup:
            why.append(f"dsgd {r.speedup:.1f}x the reference")
        reasons.append("; ".join(why))
    df["reasons"] = reasons
    return df
