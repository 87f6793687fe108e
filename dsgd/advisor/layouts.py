"""``dsgd layouts``: which layout to give each variable, measured here and predicted at scale.

For a model (a named workload, a JSON variable list, or ``module:function`` returning a
tf_keras model) and a mesh:

1. candidate whole-model plans are built by rules (:mod:`dsgd.advisor.plans`);
2. each plan's optimizer step is measured on the local mesh -- dsgd's tuned default and
   the tf_keras reference -- in a worker process (:mod:`dsgd.harness.isolate`, through
   :mod:`dsgd.harness.measure`), next to its exact bytes per device and the collectives it needs;
3. a cost model (:mod:`dsgd.advisor.costmodel`) is calibrated on those measurements and predicts
   the plans of ``--target-mesh``;
4. plans are ranked with their reasons, the recommendation can be written as a layout map
   (``--emit-layout-map``) that :func:`dsgd.layoutmap.load_layout_map` turns into a tf_keras ``LayoutMap``
   in one call, and ``--plot`` draws step time against bytes per device.

``dsgd layouts --validate`` measures the validation grid (fit on 1-, 2-, 4-device meshes,
predict the 8-device ones) and prints the cost model's error per workload.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dsgd import layoutmap, meshspec
from dsgd.advisor import costmodel, plans as plans_mod
from dsgd.harness.measure import OPTION_PRESETS, REFERENCE
from dsgd.workloads import WORKLOADS, VarSpec, WorkloadError, get_workload, load_json_workload

MIN_TIMED_S = 0.25  # timed seconds per measurement at least (up to 10x --steps steps)
NOISE_TOLERANCE = 0.10  # plans within this of the fastest count as equally fast (shared-machine noise)
DEFAULT_DATA_AXES = ("batch", "data")


# ------------------------------------------------------------------------------- model specs
def load_model(spec: str, *, timeout: float = 300.0) -> list[VarSpec]:
    """The trainable variables of SPEC: a named workload, a JSON file, or ``module:function``."""
    if spec in WORKLOADS:
        return get_workload(spec)
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        return load_json_workload(path)
    if ":" in spec:
        return read_keras_model(spec, timeout=timeout)
    raise WorkloadError(f"--model {spec!r}: not a named workload ({', '.join(sorted(WORKLOADS))}), "
                        "not a JSON file, and not module:function")


def read_keras_model(target: str, *, timeout: float = 300.0) -> list[VarSpec]:
    """Build ``module:function``'s tf_keras model in a worker process and read its trainable variables.

    Names are the keys tf_keras' ``LayoutMap`` looks layouts up by (``dense_1.kernel``), so an
    emitted layout map applies to the model as it is.  Nothing is trained.
    """
    from dsgd.harness.isolate import run_isolated

    res = run_isolated("dsgd.advisor.layouts:read_model_variables", [{"target": target, "cwd": os.getcwd()}],
                       devices=1, timeout=timeout)[0]
    if res.get("status") != "ok":
        raise WorkloadError(f"--model {target!r}: could not build the model: {res.get('error')}")
    return [VarSpec(v["name"], tuple(v["shape"]), v["dtype"]) for v in res["variables"]]


def _resolve_function(target: str, cwd: Optional[str] = None):
    import importlib
    import importlib.util

    mod, sep, fn = target.rpartition(":")
    if not sep or not mod or not fn:
        raise WorkloadError(f"--model {target!r}: expected module:function")
    if cwd and cwd not in sys.path:
        sys.path.insert(0, cwd)
    if mod.endswith(".py"):
        p = Path(mod) if Path(mod).is_absolute() or not cwd else Path(cwd) / mod
        if not p.is_file():
            raise WorkloadError(f"--model {target!r}: file {p} does not exist")
        s = importlib.util.spec_from_file_location(p.stem, p)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(mod)
    if not hasattr(module, fn):
        raise WorkloadError(f"--model {target!r}: module {mod!r} has no attribute {fn!r}")
    return getattr(module, fn)


def read_model_variables(payload: dict) -> dict:
    """Worker: build the model under a recording ``LayoutMap`` (everything replicated on one device)."""
    import tf_keras
    from tensorflow.experimental import dtensor
    from tf_keras.src.dtensor import layout_map as lm

    fn = _resolve_function(payload["target"], payload.get("cwd"))
    mesh = dtensor.create_mesh([("batch", 1)], devices=["CPU:0"])
    paths: dict[int, str] = {}
    original = lm._create_dvariable

    def recording(layout_map, object_path, variable):
        new = original(layout_map, object_path, variable)
        paths[id(new)] = object_path
        return new

    lm._create_dvariable = recording
    try:
        with lm.layout_map_scope(tf_keras.dtensor.experimental.LayoutMap(mesh)):
            model = fn()
    finally:
        lm._create_dvariable = original
    if not isinstance(model, tf_keras.layers.Layer):
        raise TypeError(f"{payload['target']} returned {type(model).__name__}, not a tf_keras model")
    variables = model.trainable_variables
    if not variables:
        raise ValueError(f"{payload['target']}: the model has no trainable variables; build it "
                         "(give it an Input or call model.build(input_shape)) inside the function")
    out = []
    for v in variables:
        name = paths.get(id(v)) or v.name.split(":")[0]
        out.append({"name": name, "shape": [int(d) for d in v.shape], "dtype": v.dtype.name})
    return {"variables": out}


# ------------------------------------------------------------------------------- measuring
def measure_plan(payload: dict) -> dict:
    """Worker: one plan, one implementation, one mesh -- time the step and count the real bytes."""
    from tensorflow.experimental import dtensor

    from dsgd.harness import measure
    from dsgd.harness.bench import resolved_implementations

    p = dict(payload)
    steps = int(p.pop("steps", 8))
    case = measure.Case(workload=p["workload"], mesh=p["mesh"], layout=p["layout"], dtype=None,
                        implementation=p["implementation"], options=p["options"])
    from dsgd.harness.bench import prepare_kernels

    prepare_kernels([case.implementation])  # the one-time kernel build is not the first step's time
    built = measure.build_case(case)
    first = measure.time_first_step(built)
    # short steps get more samples (up to 10x steps, for MIN_TIMED_S): a burst of other work on a
    # shared machine then moves their median and minimum less (8 samples of a 1.5 ms step are 12 ms)
    t = measure.time_steps(built.step, steps=steps, warmup=1, min_time=MIN_TIMED_S) * 1e3
    # bytes actually held: every device's components of variables and (rank >= 1) optimizer variables
    per_dev: dict[str, int] = {}
    state_dev: dict[str, int] = {}

    def add(v, into):
        for comp in dtensor.unpack(v.read_value()):
            into[comp.device] = into.get(comp.device, 0) + comp.shape.num_elements() * comp.dtype.size

    for v in built.variables:
        add(v, per_dev)
    for v in built.optimizer.variables:
        if v.shape.rank:
            add(v, state_dev)
    total = {d: per_dev.get(d, 0) + state_dev.get(d, 0) for d in set(per_dev) | set(state_dev)}
    return {
        "status": "ok",
        "impl_used": resolved_implementations(built.optimizer),
        "first_step_s": first,
        **measure.step_stats(t, (25, 75)),
        "measured_params_bytes_per_device": max(per_dev.values()),
        "measured_state_bytes_per_device": max(state_dev.values()) if state_dev else 0,
        "measured_bytes_per_device": max(total.values()),
        "measured_bytes_uneven": len(set(total.values())) > 1,
    }


@dataclass
class Job:
    """One measurement to make: a plan of a model on a mesh with one implementation."""

    workload: str  # label
    mesh: str
    plan: Any  # plans.Plan
    specs: list
    implementation: str
    options: str
    row: dict = field(default_factory=dict)


def run_jobs(jobs: Sequence[Job], *, devices: int = 8, steps: int = 8, progress: bool = True,
             timeout: Optional[float] = None, desc: str = "dsgd layouts", on_row=None) -> list[dict]:
    """Measure jobs in isolated worker processes (one worker, a fresh one after a failure).

    Each returned row holds the job's identity, the cost-model features (exact bytes and
    collectives included) and the measurements.
    """
    from tqdm.auto import tqdm

    from dsgd.harness.isolate import run_isolated

    tmp = Path(tempfile.mkdtemp(prefix="dsgd-layouts-"))
    try:
        payloads = []
        model_files: dict[int, str] = {}
        for k, j in enumerate(jobs):
            key = id(j.specs)
            if key not in model_files:
                f = tmp / f"model{len(model_files)}.json"
                f.write_text(json.dumps([{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in j.specs]))
                model_files[key] = str(f)
            lm = tmp / f"plan{k}.json"
            lm.write_text(json.dumps(layoutmap.emit(j.specs, j.plan.layouts)))
            payloads.append({"workload": model_files[key], "mesh": j.mesh, "layout": str(lm),
                             "implementation": j.implementation, "options": j.options, "steps": steps})
        bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress, leave=False, file=sys.stderr)
        rows: list[Optional[dict]] = [None] * len(jobs)

        def got(i, res):
            rows[i] = _row(jobs[i], res)
            bar.update(1)
            bar.set_postfix_str(f"{jobs[i].mesh} {jobs[i].plan.name} {jobs[i].implementation}"[:60])
            if on_row:
                on_row(rows[i])

        results = run_isolated("dsgd.advisor.layouts:measure_plan", payloads, devices=devices, on_result=got,
                               timeout=timeout)
        bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [r if r is not None else _row(j, res) for j, r, res in zip(jobs, rows, results)]


def _row(j: Job, res: dict) -> dict:
    dims = meshspec.parse_mesh_spec(j.mesh)
    f = costmodel.features(j.specs, j.plan.layouts, dims, OPTION_PRESETS[j.options], j.implementation)
    return {"workload": j.workload, "mesh": j.mesh, "plan": j.plan.name, "implementation": j.implementation,
            "options": j.options, **f, **j.row, **res, "layouts": [list(lay) for lay in j.plan.layouts]}


# ------------------------------------------------------------------------------- advice
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


# ------------------------------------------------------------------------------- rendering
def _mib(x) -> str:
    return "-" if x is None or x != x else f"{x / 2**20:.2f}"


def _ms(x) -> str:
    return "-" if x is None or x != x else f"{x:.3g}"


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
                     "of them; bytes exact, time from the cost model):")
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


def _records(df) -> list[dict]:
    if df is None:
        return []
    out = []
    for r in df.to_dict(orient="records"):
        out.append({k: (_jsonable(v)) for k, v in r.items()})
    return out


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if v != v else float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, costmodel.Collective):
        return v.describe()
    return v


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
        "local": _records(advice.local), "recommended": plan_map("local"),
        "target_mesh": advice.target_mesh, "target": _records(advice.target),
        "target_recommended": plan_map("target") if advice.target is not None else None,
        "devices_per_host": advice.devices_per_host,
        "candidates": _search_dict(advice.plan_search),
        "target_candidates": _search_dict(advice.target_plan_search),
        "measured_meshes": advice.measured_meshes,
        "cost_model": _records(advice.cost_model.coefficients_table()),
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


def plot(advice: Advice, path: str) -> None:
    """Step time vs bytes per device for every candidate plan; the recommendation starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("measured", advice.local, advice.mesh, "step_ms", "reference_ms")]
    if advice.target is not None:
        panels.append(("predicted", advice.target, advice.target_mesh, "predicted_ms", "reference_predicted_ms"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (kind, df, mesh, tcol, rcol) in zip(axes[0], panels):
        x = df["bytes_per_device"] / 2**20
        ax.scatter(x, df[tcol], s=40, label=f"dsgd {advice.implementation}", zorder=3)
        if rcol in df and df[rcol].notna().any():
            ax.scatter(x, df[rcol], s=40, marker="s", facecolors="none", edgecolors="tab:red",
                       label="tf_keras reference", zorder=2)
            for xi, a, b in zip(x, df[tcol], df[rcol]):
                if a == a and b == b:
                    ax.plot([xi, xi], [a, b], color="0.8", lw=0.8, zorder=1)
        for xi, yi, name in zip(x, df[tcol], df["plan"]):
            if yi == yi:
                ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        rec = df[df["recommended"]]
        if len(rec):
            ax.scatter(rec["bytes_per_device"] / 2**20, rec[tcol], marker="*", s=320, color="gold",
                       edgecolors="k", label=f"recommended: {rec['plan'].iloc[0]}", zorder=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("params + optimizer state per device (MiB, log)")
        ax.set_ylabel("optimizer step (ms, log)")
        ax.set_title(f"{advice.model} on {mesh} ({kind})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- validation
def validation_jobs(workloads: Sequence[str], options: Sequence[str], implementations: Sequence[str],
                    meshes: Sequence[str]) -> list[Job]:
    jobs = []
    for w in workloads:
        specs = load_model(w)
        for m in meshes:
            dims = meshspec.parse_mesh_spec(m)
            for p in costmodel.validation_plans(specs, dims):
                for o in options:
                    for i in implementations:
                        jobs.append(Job(w, meshspec.format_mesh_spec(dims), p, specs, i, o))
    return jobs


def load_measurements(path: str) -> list[dict]:
    """Rows saved by ``--save-measurements`` (any dsgd version; ``.gz`` files are decompressed)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise WorkloadError(f"measurements file {path} does not exist") from None
    if raw[:2] == b"\x1f\x8b":
        import gzip

        raw = gzip.decompress(raw)
    out = []
    for i, line in enumerate(raw.decode().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise WorkloadError(f"measurements file {path}: line {i} is not valid JSON: {e.msg}") from None
    return out


def refresh_features(rows: Sequence[dict]) -> list[dict]:
    """Recompute the cost-model features of saved rows (named workloads) with this version's model.

    Rows saved by older versions (no ``host_cores``) are taken as measured on this host's cores.
    """
    cache: dict[str, list] = {}
    out = []
    for r in rows:
        if r.get("workload") in WORKLOADS and "layouts" in r:
            specs = cache.setdefault(r["workload"], get_workload(r["workload"]))
            f = costmodel.features(specs, [tuple(x) for x in r["layouts"]], meshspec.parse_mesh_spec(r["mesh"]),
                                   OPTION_PRESETS[r["options"]], r["implementation"], cores=r.get("host_cores"))
            r = {**r, **f}
        out.append(r)
    return out


def job_key(r: dict) -> tuple:
    return (r.get("workload"), r.get("mesh"), r.get("plan"), r.get("implementation"), r.get("options"))


def combine_repeats(rows: Sequence[dict], y: str = "median_ms") -> list[dict]:
    """One row per measured job: of its repeated measurements (passes over the grid, or several
    files), the one with the smallest ``y``.

    Another job on a shared machine only ever slows a step down, so the quietest pass is the
    closest to an idle machine.  Each row gets ``repeats`` and ``repeat_spread_pct`` (how far
    its slowest pass was above it).
    """
    groups: dict[tuple, list[dict]] = {}
    failed: dict[tuple, dict] = {}
    for r in rows:
        if r.get("status", "ok") == "ok" and (r.get(y) or 0) > 0:
            groups.setdefault(job_key(r), []).append(r)
        else:
            failed.setdefault(job_key(r), r)
    out = []
    for key, rs in groups.items():
        best = min(rs, key=lambda r: float(r[y]))
        worst = max(float(r[y]) for r in rs)
        out.append({**best, "repeats": len(rs), "repeat_spread_pct": 100.0 * (worst / float(best[y]) - 1)})
    out += [r for k, r in failed.items() if k not in groups]
    return out


def render_validation(per_row, summary, model, statistic: str = "median") -> str:
    lines = ["cost-model validation: fitted on the 1-, 2- and 4-device meshes, predicting the 8-device meshes",
             f"(step time: {statistic} of the timed steps; bytes: predicted vs counted on the devices)", ""]
    if summary.empty:
        return "\n".join(lines + ["no successful measurements"])
    lines.append(summary.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    lines.append("noise_pct: mean distance of a measurement from the median of the same work measured on the other "
                 "8-device meshes (the noise floor); vs_consensus_pct: the prediction's error against that median")
    lines.append("\nper case:")
    cols = ["workload", "mesh", "plan", "implementation", "options", "measured_ms", "predicted_ms", "error_pct",
            "noise_pct", "bytes_predicted", "bytes_measured"]
    lines.append(per_row[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    lines.append("\ncoefficients:")
    lines.append(model.coefficients_table().to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    return "\n".join(lines)


def run_validation(args) -> int:
    workloads = args.validate_workloads or list(costmodel.VALIDATION_WORKLOADS)
    options = args.validate_options or [args.options]
    impls = [args.implementation] + ([REFERENCE] if args.implementation != REFERENCE else [])
    y = f"{args.statistic}_ms"
    if args.from_measurements:
        rows = []
        for path in args.from_measurements:
            rows += refresh_features(load_measurements(path))
    else:
        if args.devices < 8:
            raise meshspec.SpecError("--validate needs --devices 8 (it predicts the 8-device meshes)")
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats}: give 1 or more")
        jobs = validation_jobs(workloads, options, impls, list(costmodel.FIT_MESHES) + list(costmodel.TEST_MESHES))
        sink = None
        if args.save_measurements:
            import gzip

            path = args.save_measurements
            sink = gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w")

        def on_row(row):  # written as they come: an interrupted run keeps what it measured
            if sink:
                sink.write(json.dumps(_jsonable(row), default=str) + "\n")
                sink.flush()

        rows = []
        try:
            for k in range(args.repeats):  # whole passes: a slow spell of the machine hits one pass of a job
                rows += run_jobs(jobs, devices=args.devices, steps=args.steps, progress=not args.quiet,
                                 desc=f"dsgd validate (pass {k + 1}/{args.repeats})", on_row=on_row)
        finally:
            if sink:
                sink.close()
    rows = combine_repeats(rows, y)
    per_row, summary, model = costmodel.validate(rows, y=y)
    if args.format == "json":
        print(json.dumps({"summary": _records(summary), "cases": _records(per_row),
                          "coefficients": _records(model.coefficients_table())}, indent=1))
    elif args.format == "csv":
        print(per_row.to_csv(index=False))
    else:
        print(render_validation(per_row, summary, model, args.statistic))
    failed = [r for r in rows if r.get("status") != "ok"]
    for r in failed:
        print(f"failed: {r['workload']} {r['mesh']} {r['plan']} {r['implementation']}: {str(r.get('error'))[:200]}",
              file=sys.stderr)
    return 0 if not failed else 3


# ------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--model", help="named workload (" + ", ".join(sorted(WORKLOADS)) + "), a JSON variable list "
                   "([{name, shape, dtype}]), or module:function returning a tf_keras model")
    p.add_argument("--mesh", default="batch=2,model=4", help="the local mesh to measure on (default batch=2,model=4)")
    p.add_argument("--target-mesh", help="a mesh to predict for with the cost model, e.g. batch=16,model=64")
    p.add_argument("--options", default="momentum", choices=sorted(OPTION_PRESETS), help="optimizer options preset")
    p.add_argument("--implementation", default="auto", help="dsgd implementation to measure (default auto)")
    p.add_argument("--no-reference", action="store_true", help="do not measure the tf_keras reference")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--plot", help="write step time vs bytes per device (PNG) here")
    p.add_argument("--emit-layout-map", metavar="FILE",
                   help="write the recommended plan (the target mesh's when given) as a layout map JSON")
    p.add_argument("--devices", type=int, default=8, help="logical devices in the measuring worker (default 8)")
    p.add_argument("--devices-per-host", type=int,
                   help="devices one host drives on the target mesh (default: the local mesh size)")
    p.add_argument("--top", type=int, help="show only the K best plans")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default 8)")
    p.add_argument("--max-plans", type=int, default=8, help="at most this many candidate plans (default 8)")
    p.add_argument("--min-shard-bytes", type=int, default=plans_mod.DEFAULT_MIN_SHARD_BYTES,
                   help="variables smaller than this stay replicated (default 64 KiB)")
    p.add_argument("--coverage", type=float, default=plans_mod.DEFAULT_COVERAGE,
                   help="share of bytes the 'top' plans shard, largest variables first (default 0.9)")
    p.add_argument("--force", action="append", metavar="REGEX=LAYOUT",
                   help="force a layout on matching variables: a full spec (unsharded,model), 'replicated', or an "
                        "axis name (repeatable)")
    p.add_argument("--allow-fsdp", action="store_true",
                   help="allow recommending plans that shard parameters over a data axis")
    p.add_argument("--data-axis", action="append", help="mesh axes that carry the batch (default: batch, data)")
    p.add_argument("--memory-budget", type=int, help="bytes per device a plan may use")
    p.add_argument("--calibration-meshes", default="1",
                   help="extra smaller meshes measured for the cost model, comma-free list separated by ';' "
                        "(default '1'; '' for none)")
    p.add_argument("--calibration", help="more measurements (JSON lines from --save-measurements) for the cost model")
    p.add_argument("--validate", action="store_true",
                   help="measure the validation grid and print the cost model's prediction errors")
    p.add_argument("--validate-workloads", action="append", help="workloads for --validate (repeatable)")
    p.add_argument("--validate-options", action="append", choices=sorted(OPTION_PRESETS),
                   help="options presets for --validate (repeatable; default --options)")
    p.add_argument("--save-measurements", help="with --validate: write the raw measurements (JSON lines) here")
    p.add_argument("--from-measurements", action="append", metavar="FILE",
                   help="with --validate: re-fit from saved measurements (repeatable; files of any dsgd version), "
                        "measure nothing")
    p.add_argument("--repeats", type=int, default=1,
                   help="with --validate: measure the grid this many times, in whole passes, and keep each job's "
                        "fastest pass (other work on the machine only slows steps down; default 1)")
    p.add_argument("--statistic", choices=["median", "p25", "min"], default="median",
                   help="which per-step statistic the cost model is fitted to and validated on (default median; "
                        "min or p25 are steadier on a shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from dsgd import argcheck

    argcheck.check_layouts(args)  # before any worker starts or anything is written
    if args.validate:
        return run_validation(args)
    if not args.model:
        raise ValueError("--model is required (or give --validate)")
    cal = [m for m in (args.calibration_meshes or "").split(";") if m.strip()]
    advice = advise(args.model, args.mesh, target_mesh=args.target_mesh, options=args.options,
                    implementation=args.implementation, devices=args.devices, steps=args.steps, top=args.top,
                    min_shard_bytes=args.min_shard_bytes, coverage=args.coverage, force=args.force,
                    max_plans=args.max_plans, allow_fsdp=args.allow_fsdp, data_axes=args.data_axis,
                    memory_budget=args.memory_budget, devices_per_host=args.devices_per_host,
                    calibration_meshes=cal, calibration_file=args.calibration, reference=not args.no_reference,
                    progress=not args.quiet, statistic=args.statistic)
    print(render(advice, args.format))
    if args.emit_layout_map:
        where = "target" if advice.target is not None else "local"
        p = advice.recommended_plan(where)
        if p is None:
            print("no plan could be recommended; no layout map written", file=sys.stderr)
            return 3
        mesh = advice.target_mesh if where == "target" else advice.mesh
        layoutmap.write(args.emit_layout_map, advice.specs, p.layouts, mesh=mesh, plan=p.name,
                        groups=plans_mod.tie_groups(advice.specs))
        print(f"\nlayout map of {p.name!r} for {mesh} written to {args.emit_layout_map}; load it with "
              f"dsgd.layoutmap.load_layout_map({args.emit_layout_map!r}, mesh)", file=sys.stderr if args.format != "table" else sys.stdout)
    if args.plot:
        plot(advice, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.format != "table" else sys.stdout)
    return 0 if not advice.failed else 3
