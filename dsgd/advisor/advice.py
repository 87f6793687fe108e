"""The advisor as a library call: :func:`advise` builds the candidate plans, measures them (and
calibration meshes), fits the cost model, ranks the local plans and predicts the target mesh's;
:class:`Advice` holds the result (what ``dsgd layouts`` prints)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from dsgd import meshspec
from dsgd.advisor import costmodel, plans as plans_mod
from dsgd.advisor.measure_plans import Job, run_jobs
from dsgd.advisor.measurements import load_measurements, refresh_features
from dsgd.advisor.ranking import data_axes_of, plan_summary, rank
from dsgd.advisor.read_model import load_model
from dsgd.harness.measure import OPTION_PRESETS, REFERENCE


@dataclass
class Advice:
    model: str
    mesh: str
    options: str
    implementation: str
    specs: list
    plans: list
    local: Any  # DataFrame: one row per plan, measured
    measurements: list  # raw rows (both implementations)
    cost_model: Any
    target_mesh: Optional[str] = None
    target_plans: list = field(default_factory=list)
    target: Any = None  # DataFrame: one row per target plan, predicted
    devices_per_host: int = 8
    failed: list = field(default_factory=list)
    statistic: str = "median"
    plan_search: Any = None  # plans.PlanSearch of the local mesh: what was considered, and why not
    target_plan_search: Any = None
    measured_meshes: list = field(default_factory=list)  # [{"mesh", "plans", "why"}]: what was measured, and why

    def recommended(self, where: str = "local"):
        df = self.local if where == "local" else self.target
        if df is None or df.empty:
            return None
        rec = df[df["recommended"]]
        return rec.iloc[0] if len(rec) else None

    def recommended_plan(self, where: str = "local"):
        r = self.recommended(where)
        if r is None:
            return None
        pl = self.plans if where == "local" else self.target_plans
        return next(p for p in pl if p.name == r["plan"])


def advise(model: str, mesh: str, *, target_mesh: Optional[str] = None, options: str = "momentum",
           implementation: str = "auto", devices: int = 8, steps: int = 8, top: Optional[int] = None,
           min_shard_bytes: int = plans_mod.DEFAULT_MIN_SHARD_BYTES, coverage: float = plans_mod.DEFAULT_COVERAGE,
           force: Optional[Sequence[str]] = None, max_plans: int = 8, allow_fsdp: bool = False,
           data_axes: Optional[Sequence[str]] = None, memory_budget: Optional[int] = None,
           devices_per_host: Optional[int] = None, calibration_meshes: Sequence[str] = ("1",),
           calibration_file: Optional[str] = None, reference: bool = True, progress: bool = True,
           specs: Optional[list] = None, statistic: str = "median") -> Advice:
    """The whole advisor as a library call (the CLI prints what this returns)."""
    import pandas as pd

    if options not in OPTION_PRESETS:
        raise ValueError(f"--options {options!r}: choose one of {sorted(OPTION_PRESETS)}")
    dims = meshspec.parse_mesh_spec(mesh)
    need = meshspec.mesh_size(dims)
    if need > devices:
        raise meshspec.SpecError(f"mesh spec {mesh!r} needs {need} devices, but only {devices} are configured "
                                 f"(--devices {devices}); give a smaller mesh or run with --devices {need}")
    tdims = meshspec.parse_mesh_spec(target_mesh) if target_mesh else None
    specs = list(specs) if specs is not None else load_model(model)
    search = plans_mod.search_plans(specs, dims, min_shard_bytes=min_shard_bytes, coverage=coverage,
                                    force=force, max_plans=max_plans)
    plan_list = search.plans
    impls = [implementation] + ([REFERENCE] if reference and implementation != REFERENCE else [])
    who = f"dsgd {implementation!r}" + (" and the tf_keras reference" if REFERENCE in impls and implementation != REFERENCE else "")
    measured = [{"mesh": meshspec.format_mesh_spec(dims), "plans": [p.name for p in plan_list],
                 "why": f"the mesh to advise on (--mesh): every candidate plan, {who}"}]
    jobs = [Job(model, meshspec.format_mesh_spec(dims), p, specs, i, options) for p in plan_list for i in impls]
    # calibration points on smaller meshes (vary the device count for the cost model)
    for cm in calibration_meshes or ():
        cdims = meshspec.parse_mesh_spec(cm)
        cname = meshspec.format_mesh_spec(cdims)
        if meshspec.mesh_size(cdims) >= need or meshspec.mesh_size(cdims) > devices:
            measured.append({"mesh": cname, "plans": [], "why": (
                f"not measured: a calibration mesh (--calibration-meshes) must have fewer devices than "
                f"{meshspec.format_mesh_spec(dims)} ({need})")})
            continue
        cplans = costmodel.validation_plans(specs, cdims)
        measured.append({"mesh": cname, "plans": [p.name for p in cplans], "why": (
            f"calibration for the cost model only (--calibration-meshes, default '1'; '' skips it): with "
            f"{meshspec.mesh_size(cdims)} device(s) next to {need}, the model can tell per-device costs from fixed "
            f"ones; its steps are not ranked")})
        jobs += [Job(model, cname, p, specs, i, options, {"calibration": True})
                 for p in cplans for i in impls]
    rows = run_jobs(jobs, devices=devices, steps=steps, progress=progress)
    failed = [r for r in rows if r.get("status") != "ok"]
    local_rows = [r for r in rows if not r.get("calibration")]
    calib = [r for r in rows if r.get("status") == "ok"]
    if calibration_file:
        calib += refresh_features(load_measurements(calibration_file))
    model_fit = costmodel.CostModel.fit(calib, y=f"{statistic}_ms")
    dph = devices_per_host or need
    # one row per plan: dsgd and reference side by side
    table = []
    for p in plan_list:
        mine = next((r for r in local_rows if r["plan"] == p.name and r["implementation"] == implementation), {})
        ref = next((r for r in local_rows if r["plan"] == p.name and r["implementation"] == REFERENCE), {})
        f = costmodel.features(specs, p.layouts, dims, OPTION_PRESETS[options], implementation)
        row = {"plan": p.name, **plan_summary(specs, p, dims),
               "bytes_per_device": f["bytes_per_device"], "params_bytes_per_device": f["params_bytes_per_device"],
               "state_bytes_per_device": f["momentum_bytes_per_device"] + f["ema_bytes_per_device"],
               "measured_bytes_per_device": mine.get("measured_bytes_per_device"),
               "step_ms": mine.get(f"{statistic}_ms", np.nan) if mine.get("status") == "ok" else np.nan,
               "spread": ((mine["p75_ms"] - mine["p25_ms"]) / mine["median_ms"])
               if mine.get("status") == "ok" and "p75_ms" in mine else np.nan,
               "reference_ms": ref.get(f"{statistic}_ms", np.nan) if ref.get("status") == "ok" else np.nan,
               "first_step_s": mine.get("first_step_s", np.nan),
               "reference_first_step_s": ref.get("first_step_s", np.nan),
               "impl_used": mine.get("impl_used"),
               "model_ms": model_fit.predict_ms(f, implementation, options),
               "n_collectives": f["n_collectives"], "collectives": f["collectives"],
               "reference_collectives": costmodel.step_collectives(specs, p.layouts, dims, OPTION_PRESETS[options],
                                                                   REFERENCE),
               "error": mine.get("error") or ref.get("error")}
        row["speedup"] = row["reference_ms"] / row["step_ms"] if row["step_ms"] == row["step_ms"] else np.nan
        table.append(row)
    daxes = data_axes_of(dims, data_axes)
    local = rank(pd.DataFrame(table), "step_ms", data_axes=daxes, allow_fsdp=allow_fsdp, memory_budget=memory_budget)
    advice = Advice(model, meshspec.format_mesh_spec(dims), options, implementation, specs, plan_list, local, rows,
                    model_fit, devices_per_host=dph, statistic=statistic, plan_search=search,
                    measured_meshes=measured)
    if tdims:
        tsearch = plans_mod.search_plans(specs, tdims, min_shard_bytes=min_shard_bytes, coverage=coverage,
                                         force=force, max_plans=max_plans)
        advice.target_plan_search = tsearch
        tplans = tsearch.plans
        trows = []
        for p in tplans:
            f = costmodel.features(specs, p.layouts, tdims, OPTION_PRESETS[options], implementation, dph)
            fr = costmodel.features(specs, p.layouts, tdims, OPTION_PRESETS[options], REFERENCE, dph)
            trows.append({"plan": p.name, **plan_summary(specs, p, tdims),
                          "bytes_per_device": f["bytes_per_device"], "params_bytes_per_device": f["params_bytes_per_device"],
                          "state_bytes_per_device": f["momentum_bytes_per_device"] + f["ema_bytes_per_device"],
                          "predicted_ms": model_fit.predict_ms(f, implementation, options),
                          "reference_predicted_ms": model_fit.predict_ms(fr, REFERENCE, options),
                          "n_collectives": f["n_collectives"], "collectives": f["collectives"],
                          "reference_collectives": costmodel.step_collectives(specs, p.layouts, tdims,
                                                                              OPTION_PRESETS[options], REFERENCE)})
            trows[-1]["speedup"] = trows[-1]["reference_predicted_ms"] / trows[-1]["predicted_ms"] \
                if trows[-1]["predicted_ms"] > 0 else np.nan
        advice.target_mesh = meshspec.format_mesh_spec(tdims)
        advice.target_plans = tplans
        advice.target = rank(pd.DataFrame(trows), "predicted_ms", data_axes=data_axes_of(tdims, data_axes),
                             allow_fsdp=allow_fsdp, memory_budget=memory_budget)
    if top:
        advice.local = advice.local.head(top)
        if advice.target is not None:
            advice.target = advice.target.head(top)
    advice.failed = failed
    return advice
