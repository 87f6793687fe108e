"""``dsgd layouts``' output: the table with the reasons, the plans considered and the meshes
measured, JSON and CSV."""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from dsgd import layoutmap, meshspec
from dsgd.advisor import plans as plans_mod
from dsgd.advisor.advice import Advice
from dsgd.advisor.measurements import records


def _mib(x) -> str:
    return "-" if x is None or x != x else f"{x / 2**20:.2f}"


def render_table(advice: Advice, *, reasons: bool = True) -> str:
    lines = [f"dsgd layouts: {advice.model} ({len(advice.specs)} variables, "
             f"{sum(s.size for s in advice.specs):,} parameters), options {advice.options!r}"]
    lines += render_considered(advice)
    lines.append(f"\nstep times measured on mesh {advice.mesh} (implementation {advice.implementation!r} vs tf_keras reference; "
                 f"{advice.statistic} of the timed steps; 'spread': their interquartile range / median; "
                 "'model ms': the cost model's fit):")
    df = advice.local
    view = df[["rank", "plan", "axes", "sharded_vars", "bytes_per_device", "state_bytes_per_device", "step_ms",
               "spread", "reference_ms", "speedup", "model_ms", "n_collectives"]].copy()
    view["params+state MiB/dev"] = view.pop("bytes_per_device").map(_mib)
    view["state MiB/dev"] = view.pop("state_bytes_per_device").map(_mib)
    view = view.rename(columns={"step_ms": f"{advice.implementation} ms", "reference_ms": "reference ms",
                                "model_ms": "model ms", "n_collectives": "collectives", "sharded_vars": "sharded"})
    view.insert(1, " ", ["*" if r else "" for r in df["recommended"]])
    lines.append(view.to_string(index=False, float_format=lambda x: f"{x:.3g}", na_rep="-"))
    rec = advice.recommended("local")
    if rec is not None:
        lines.append(f"\nrecommended on {advice.mesh}: {rec['plan']} -- {rec['description']}")
    if reasons:
        lines.append("reasons:")
        for r in df.itertuples():
            lines.append(f"  {r.rank}. {r.plan}: {r.reasons}")
    errs = [r for r in df.itertuples() if isinstance(r.error, str) and r.error]
    for r in errs:
        lines.append(f"  failed: {r.plan}: {r.error[:200]}")
    if advice.target is not None:
        t = advice.target
        lines.append(f"\npredicted on target mesh {advice.target_mesh} ({int(np.prod([n for _, n in meshspec.parse_mesh_spec(advice.target_mesh)]))} "
                     f"devices, one host driving {min(advice.devices_per_host, meshspec.mesh_size(meshspec.parse_mesh_spec(advice.target_mesh)))} "
                     "of them; bytes exact, time from the cost model fitted on the meshes measured here -- "
                     "how far it is off on this machine: `dsgd layouts --validate`):")
        tv = t[["rank", "plan", "axes", "sharded_vars", "bytes_per_device", "state_bytes_per_device", "predicted_ms",
                "reference_predicted_ms", "speedup", "n_collectives"]].copy()
        tv["params+state MiB/dev"] = tv.pop("bytes_per_device").map(_mib)
        tv["state MiB/dev"] = tv.pop("state_bytes_per_device").map(_mib)
        tv = tv.rename(columns={"predicted_ms": f"{advice.implementation} ms (pred)",
                                "reference_predicted_ms": "reference ms (pred)", "n_collectives": "collectives",
                                "sharded_vars": "sharded"})
        tv.insert(1, " ", ["*" if r else "" for r in t["recommended"]])
        lines.append(tv.to_string(index=False, float_format=lambda x: f"{x:.3g}", na_rep="-"))
        if advice.target_plan_search is not None and advice.target_plan_search.left_out():
            lines.append(f"not candidates on {advice.target_mesh}:")
            lines += [f"  - {n.name}: {n.why}" for n in advice.target_plan_search.left_out()]
        trec = advice.recommended("target")
        if trec is not None:
            lines.append(f"\nrecommended on {advice.target_mesh}: {trec['plan']} -- {trec['description']}")
            lines.append(f"  {trec['reasons']}")
    coef = advice.cost_model.coefficients_table()
    if not coef.empty:
        lines.append("\ncost model (fitted here by non-negative least squares on relative error):")
        lines.append(coef.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    return "\n".join(lines)


def render_considered(advice: Advice) -> list[str]:
    """Which plans were candidates and why others were not; which meshes were measured and why."""
    lines = []
    search = advice.plan_search
    if search is not None:
        names = [p.name for p in search.plans]
        lines.append(f"\ncandidate plans on {advice.mesh} ({len(names)}, built by rules; see `dsgd layouts --help`): "
                     + ", ".join(names))
        lines += [f"  - {g}" for g in search.general]
        left = search.left_out()
        if left:
            lines.append("not candidates:")
            lines += [f"  - {n.name}: {n.why}" for n in left]
    if advice.measured_meshes:
        lines.append("meshes measured:")
        for m in advice.measured_meshes:
            plans_txt = f" [{', '.join(m['plans'])}]" if m["plans"] else ""
            lines.append(f"  - {m['mesh']}{plans_txt}: {m['why']}")
    return lines


def _search_dict(search) -> Optional[dict]:
    if search is None:
        return None
    return {"plans": [p.name for p in search.plans], "general": list(search.general),
            "considered": [{"plan": n.name, "status": n.status, "why": n.why} for n in search.notes]}


def advice_dict(advice: Advice) -> dict:
    def plan_map(where):
        p = advice.recommended_plan(where)
        return None if p is None else {"plan": p.name,
                                       "layouts": layoutmap.emit(advice.specs, p.layouts, groups=plans_mod.tie_groups(advice.specs))}

    return {
        "model": advice.model, "mesh": advice.mesh, "options": advice.options,
        "implementation": advice.implementation, "variables": len(advice.specs),
        "parameters": sum(s.size for s in advice.specs),
        "local": records(advice.local), "recommended": plan_map("local"),
        "target_mesh": advice.target_mesh, "target": records(advice.target),
        "target_recommended": plan_map("target") if advice.target is not None else None,
        "devices_per_host": advice.devices_per_host,
        "candidates": _search_dict(advice.plan_search),
        "target_candidates": _search_dict(advice.target_plan_search),
        "measured_meshes": advice.measured_meshes,
        "cost_model": records(advice.cost_model.coefficients_table()),
    }


def render(advice: Advice, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(advice_dict(advice), indent=1)
    if fmt == "csv":
        import pandas as pd

        a = advice.local.assign(mesh=advice.mesh, where="measured")
        parts = [a]
        if advice.target is not None:
            parts.append(advice.target.assign(mesh=advice.target_mesh, where="predicted"))
        df = pd.concat(parts, ignore_index=True)
        for c in ("collectives", "reference_collectives"):
            if c in df:
                df[c] = df[c].map(lambda cs: " | ".join(x["text"] if isinstance(x, dict) else x.describe() for x in cs)
                                  if isinstance(cs, list) else cs)
        return df.to_csv(index=False)
    return render_table(advice)
