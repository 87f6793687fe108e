"""The whole-step advisor as a library call: :func:`advise_step` reads the user's model, builds the
candidate plans, measures each one's whole ``model.fit`` step here (dsgd and the floor), reads what DTensor
ran, predicts every candidate from its parts, ranks them and predicts a target mesh; :class:`StepAdvice`
holds the result (what ``dsgd layouts`` prints, :mod:`dsgd.advisor.step_report`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from dsgd import meshspec
from dsgd.advisor import dtensor_program as dp
from dsgd.advisor import step_memory, step_model, step_plans
from dsgd.harness import model_data
from dsgd.advisor.model_graph import ModelGraph, read_graph
from dsgd.advisor.progress import Bar, Tracker
from dsgd.advisor.step_measure import MIN_TIMED_S, ROUNDS
from dsgd.advisor.step_ranking import rank
from dsgd.names import OPTION_PRESETS

DEFAULT_BATCH = 16


class StepAdviceError(ValueError):
    """A request the whole-step advisor cannot serve; the message names the argument."""


@dataclass
class StepAdvice:
    """What the whole-step advisor found (plain data; the renderers read it)."""

    model: str
    devices: int
    batch_size: int
    loss: str
    options: str
    implementation: str
    graph: ModelGraph
    search: Any  # step_plans.StepPlanSearch
    table: Any  # DataFrame: one row per candidate, ranked
    calibration: dict  # mesh -> the microbenchmarks of step_calibrate
    host: Any  # step_model.Hardware: this host's rates (medians over the meshes measured)
    spearman: float = float("nan")
    measured_spearman: float = float("nan")  # the measured ranking's own repeatability (split_half_spearman)
    elapsed_s: float = 0.0
    memory_budget: Optional[int] = None
    scaling_checks: list = field(default_factory=list)  # programs of one mesh predicting another's, exactly?
    target_mesh: Optional[str] = None
    target_batch: Optional[int] = None
    target_devices: int = 0
    hardware: Any = None
    target: Any = None  # DataFrame of the target mesh's plans, predicted
    target_search: Any = None
    rows: list = field(default_factory=list)  # the raw worker rows
    statistic: str = "median"  # of the timed steps, what step_ms is
    estimates: list = field(default_factory=list)  # (seconds spent, estimated total seconds) as the run went

    def plan(self, name: str):
        return next(p for p in self.search.plans if p.name == name)

    def recommended(self):
        df = self.table
        if df is None or df.empty or not df["recommended"].any():
            return None
        return df[df["recommended"]].iloc[0]


def _host_hardware(cals: dict) -> step_model.Hardware:
    """This host's rates: the median over the meshes' microbenchmarks (they are the host's, whichever
    mesh ran them); collectives per mesh, by axis."""
    good = [c for c in cals.values() if c and "error" not in c]
    if not good:
        return step_model.Hardware("this host (not calibrated)", 1e11, 2e10, 2.0, 1.0, True)

    def med(k):
        return float(np.median([c[k] for c in good]))

    hw = step_model.Hardware("this host (measured)", med("flops_per_s"), med("bytes_per_s"), med("op_us"),
                             med("call_ms"), True)
    hw.source = {"measured": f"dsgd.advisor.step_calibrate on {len(good)} mesh(es), medians",
                 "date": time.strftime("%Y-%m-%d")}
    return hw


def _mesh_hardware(host: step_model.Hardware, cal: Optional[dict]) -> step_model.Hardware:
    links = {a: step_model.link_of(v) for a, v in ((cal or {}).get("axes") or {}).items()}
    return step_model.Hardware(host.name, host.flops_per_s, host.bytes_per_s, host.op_us, host.call_ms, True, 0,
                               links, host.source)


def _stats(r: Optional[dict], statistic: str = "median") -> dict:
    if not r or r.get("status") != "ok" or "median_ms" not in r:
        return {}
    return {"ms": r[f"{statistic}_ms"], "p25": r["p25_ms"], "p75": r["p75_ms"],
            "spread": (r["p75_ms"] - r["p25_ms"]) / r["median_ms"]}


def _collective_text(prog: dp.ProgramSummary) -> str:
    parts = []
    issued = {tuple(c.axes): (c.count, c.bytes) for c in prog.issued}
    for axes, (count, b) in sorted(issued.items()):
        kinds = [c for c in prog.collectives if tuple(c.axes) == axes]
        what = ", ".join(f"{c.count} {c.kind}" for c in kinds)
        # on CPU every collective but an all-to-all runs as an all-reduce
        noun = "collective" if any(c.kind == "all-to-all" for c in kinds) else "all-reduce"
        parts.append(f"{'+'.join(axes)}: {count} {noun}{'s' if count != 1 else ''} {b / 2**20:.2f} MiB"
                     + (f" ({what})" if what else ""))
    return "; ".join(parts) if parts else "none"


def build_rows(graph: ModelGraph, plans: list, raw: list, cals: dict, host: step_model.Hardware, *,
               batch: int, opts: dict, statistic: str = "median") -> list:
    """One row per plan: measured (dsgd, floor), the program, memory and the prediction."""
    out = []
    for p in plans:
        mine = next((r for r in raw if r["plan"] == p.name and r["job"] == "dsgd"), None)
        floor = next((r for r in raw if r["plan"] == p.name and r["job"] == "floor"), None)
        s, f = _stats(mine, statistic), _stats(floor, statistic)
        mem = step_memory.state_bytes(graph, p, opts)
        n_dev = meshspec.mesh_size(p.mesh)
        prog_d = (mine or {}).get("program")
        summary = dp.ProgramSummary.from_dict(prog_d) if prog_d else None
        peak = summary.peak_bytes if summary else float("nan")
        seen = summary.peak_seen_bytes if summary else None  # its tensors the CPU allocator counts
        row: dict[str, Any] = {
            "plan": p.name, "mesh": p.mesh_spec, "mesh_label": p.mesh_label, "rule": p.rule,
            "description": p.description, "status": (mine or {}).get("status", "failed"),
            "error": (mine or {}).get("error") or (floor or {}).get("error"),
            "step_ms": s.get("ms", np.nan), "p25_ms": s.get("p25", np.nan), "p75_ms": s.get("p75", np.nan),
            "spread": s.get("spread", np.nan), "floor_ms": f.get("ms", np.nan), "floor_spread": f.get("spread", np.nan),
            "first_step_s": (mine or {}).get("first_step_s", np.nan),
            "params_bytes": mem["params"], "grads_bytes": mem["grads"], "slots_bytes": mem["slots"],
            "transient_bytes": peak, "mem_bytes": mem["params"] + mem["slots"] + peak,
            "params_measured": (mine or {}).get("params_bytes"), "slots_measured": (mine or {}).get("state_bytes"),
        }
        row["share_ms"] = row["step_ms"] - row["floor_ms"]
        row["state_exact"] = (row["params_measured"] == mem["params"] and row["slots_measured"] == mem["slots"]) \
            if row["params_measured"] is not None else None
        alloc = (mine or {}).get("alloc_step_peak")
        row["alloc_step_per_device"] = alloc / n_dev if alloc else None
        row["transient_seen_bytes"] = seen
        row["transient_check"] = step_memory.check_ratio(seen, row["alloc_step_per_device"])
        row["program"] = prog_d
        if summary:
            prog = summary
            issued = {tuple(c.axes): (c.count, c.bytes) for c in prog.issued}
            row["coll_bytes"] = sum(b for _, b in issued.values())
            row["coll_count"] = sum(c for c, _ in issued.values())
            row["coll_by_axis"] = {"+".join(a): {"count": c, "bytes": b} for a, (c, b) in issued.items()}
            row["collectives"] = _collective_text(prog)
            row["program_consistent"] = prog.consistent
            row["flops"] = prog.flops
            hw = _mesh_hardware(host, cals.get(p.mesh_spec))
            pred = step_model.predict(prog, hw, list(p.mesh), param_bytes=mem["params"], opts=opts)
            row["pred"] = pred
            row["pred_ms"] = pred["total"] if pred else np.nan
            row["pred_floor_ms"] = pred["total"] - pred["update"] if pred else np.nan
        else:
            row.update(coll_bytes=np.nan, coll_count=np.nan, coll_by_axis={}, collectives="-", pred=None,
                       pred_ms=np.nan, pred_floor_ms=np.nan, program_consistent=None, flops=np.nan)
        out.append(row)
    return out


def split_half_spearman(raw: list) -> float:
    """How well the measurement agrees with itself: the Spearman correlation of the plans' dsgd steps
    timed in the even rounds with those timed in the odd rounds (medians of each half).  Plans closer than
    the machine's noise swap places between the halves, and a predicted ranking cannot be expected to
    agree with the measured one better than this."""
    a, b = [], []
    for r in raw:
        rm = r.get("round_medians") or []
        if r.get("job") == "dsgd" and r.get("status") == "ok" and len(rm) >= 2:
            a.append(float(np.median(rm[0::2])))
            b.append(float(np.median(rm[1::2])))
    return step_model.spearman(a, b)


def scaling_checks(rows: list, search, batch: int) -> list:
    """Each program predicting the collective bytes (per mesh axis), their count and the FLOPs of the same
    rule's plan with the same layouts on every other measured mesh whose axes it covers (each axis > 1 where
    the other's is): exact, or how far off.  (An fsdp plan on ``8x1`` is not the ``2x4`` one's layouts: the
    latter is also tensor parallel.)"""
    out = []
    by_rule: dict[str, list] = {}
    layouts = {p.name: p.layouts for p in getattr(search, "plans", ())}
    impls = {p.name: p.implementation for p in getattr(search, "plans", ())}
    for r in rows:
        if r.get("program"):
            by_rule.setdefault(r["rule"], []).append(r)
    for rule, rs in by_rule.items():
        for src in rs:
            sdims = meshspec.parse_mesh_spec(src["mesh"])
            for dst in rs:
                if dst is src or layouts.get(dst["plan"]) != layouts.get(src["plan"]) or \
                        impls.get(dst["plan"]) != impls.get(src["plan"]):
                    continue
                ddims = meshspec.parse_mesh_spec(dst["mesh"])
                if any(n > 1 and dict(sdims).get(a, 1) < 2 for a, n in ddims):
                    continue  # the source never saw that axis split
                prog = dp.ProgramSummary.from_dict(src["program"])
                got = dp.issued_bytes(prog, ddims, 1.0)
                comp = dp.scaled_compute(prog, ddims, 1.0)
                real = {tuple(c.axes): (c.count, c.bytes) for c in dp.ProgramSummary.from_dict(dst["program"]).issued}
                pred_b = sum(b for _, b in got.values()) if got else None
                real_b = sum(b for _, b in real.values())
                # bytes per axis; the count apart: DTensor merges an activation's all-reduce into a gradient
                # buffer on one mesh and not on another (the transformer's 1x8 tp, not its 2x4 tp)
                out.append({"rule": rule, "from": src["plan"], "to": dst["plan"], "pred_bytes": pred_b,
                            "real_bytes": real_b,
                            "bytes_exact": got is not None and {a: b for a, (_, b) in got.items()} ==
                            {a: b for a, (_, b) in real.items()},
                            "count_exact": got is not None and {a: c for a, (c, _) in got.items()} ==
                            {a: c for a, (c, _) in real.items()},
                            "pred_flops": comp[0] if comp else None, "real_flops": dst.get("flops"),
                            "flops_exact": bool(comp) and abs(comp[0] - (dst.get("flops") or 0)) < 0.5})
    return out


def _source_for(plan: step_plans.StepPlan, rows: list, local_plans: list) -> Optional[dict]:
    """The measured plan whose program can be scaled to ``plan``: the same layout for every variable and the
    same implementation, and every axis that is > 1 on ``plan``'s mesh > 1 on its own; of those, the one with the most devices on the
    model axis."""
    tdims = dict(plan.mesh)
    same = {p.name for p in local_plans if p.layouts == plan.layouts and p.implementation == plan.implementation}
    best = None
    for r in rows:
        if r["plan"] not in same or not r.get("program"):
            continue
        sd = dict(meshspec.parse_mesh_spec(r["mesh"]))
        if any(n > 1 and sd.get(a, 1) < 2 for a, n in tdims.items()):
            continue
        if best is None or sd.get("model", 1) > dict(meshspec.parse_mesh_spec(best["mesh"])).get("model", 1):
            best = r
    return best


def predict_target(graph: ModelGraph, rows: list, tsearch, hw: step_model.Hardware, *, batch: int,
                   target_batch: int, opts: dict, local_plans: Sequence = ()) -> list:
    """Each target plan predicted from the program of the same rule measured here, scaled to the target
    mesh and batch, with its breakdown; what the prediction rests on, in words."""
    out = []
    for p in tsearch.plans:
        src = _source_for(p, rows, list(local_plans))
        mem = step_memory.state_bytes(graph, p, opts)
        row = {"plan": p.name, "mesh": p.mesh_spec, "rule": p.rule, "description": p.description,
               "params_bytes": mem["params"], "grads_bytes": mem["grads"], "slots_bytes": mem["slots"],
               "transient_bytes": np.nan, "mem_bytes": np.nan, "source": src["plan"] if src else None}
        pred = None
        if src is not None:
            prog = dp.ProgramSummary.from_dict(src["program"])
            pred = step_model.predict(prog, hw, meshspec.parse_mesh_spec(src["mesh"]), param_bytes=mem["params"],
                                      opts=opts, target=list(p.mesh), batch_ratio=target_batch / batch)
            peak = dp.scaled_peak(prog, list(p.mesh), target_batch / batch, grads_bytes=mem["grads"])
            if peak is not None:
                row["transient_bytes"] = peak
                row["mem_bytes"] = mem["params"] + mem["slots"] + peak
        row["pred"] = pred
        row["pred_ms"] = pred["total"] if pred else np.nan
        row["coll_bytes"] = sum(v for k, v in (pred or {}).items() if k.startswith("coll_bytes:")) if pred else np.nan
        if src is None:
            why = "; ".join(p.notes)
            row["note"] = ("no plan with these layouts was measured here with every axis this mesh splits"
                           + (f" ({why})" if why else ""))
        elif pred is None:
            row["note"] = f"a tensor of {src['plan']}'s program does not divide on {p.mesh_spec}"
        else:
            row["note"] = f"scaled from {src['plan']}'s program"
        out.append(row)
    return out


def plan_payload(plan: step_plans.StepPlan, graph: ModelGraph, implementation: str = "auto") -> dict:
    """A plan as the measuring worker takes it (:func:`dsgd.advisor.step_measure.measure_plans`)."""
    return {"name": plan.name, "mesh": plan.mesh_spec, "layout_map": plan.layout_map(graph),
            "implementation": plan.implementation or implementation}


def worker_payload(model: str, graph: ModelGraph, batch: int, loss: str, *, data: Optional[str] = None,
                   options: str = "momentum", implementation: str = "auto", cwd: Optional[str] = None) -> dict:
    """What the measuring worker needs of the model to build it and feed it (every plan alike)."""
    import os

    return {"target": model, "cwd": cwd or os.getcwd(), "batch_size": batch, "inputs": [vars(i) for i in graph.inputs],
            "outputs": [vars(o) for o in graph.outputs], "vocab": graph.embedding_vocab(), "loss": loss, "data": data,
            "options": options, "implementation": implementation}


def advise_step(model: str, *, devices: int = 8, meshes: Sequence[str] = (), batch_size: Optional[int] = None,
                loss: Optional[str] = None, data: Optional[str] = None, options: str = "momentum",
                implementation: str = "auto", force: Optional[Sequence[str]] = None,
                memory_budget: Optional[int] = None, target_mesh: Optional[str] = None,
                target_batch: Optional[int] = None, hardware: Optional[str] = None, rounds: int = ROUNDS,
                min_time: float = MIN_TIMED_S, progress: bool = True, timeout: Optional[float] = None,
                cwd: Optional[str] = None, rules: Sequence[str] = step_plans.DEFAULT_RULES,
                statistic: str = "median") -> StepAdvice:
    """The whole-step advisor as a library call (``dsgd layouts --model module:function`` prints it)."""
    import pandas as pd

    from dsgd.advisor.step_run import measure_all

    t0 = time.perf_counter()
    if options not in OPTION_PRESETS:
        raise StepAdviceError(f"--options {options!r}: choose one of {sorted(OPTION_PRESETS)}")
    opts = OPTION_PRESETS[options]
    tracker = Tracker()
    tracker.add("describe", "model")
    bar = Bar(tracker, enabled=progress)
    try:
        t_desc = time.perf_counter()
        graph = read_graph(model)
        tracker.finish("describe", "model", time.perf_counter() - t_desc)
        # a plan's build (trace, DTensor's expansion, compile) grows with the model's layers: 2.5-9 s here for
        # the MLP (10 layers) to the transformer (17, two of them attention); the guess until one has finished
        weight = len(graph.layers) + 3 * sum(ly.cls == "MultiHeadAttention" for ly in graph.layers)
        tracker.guesses["build"] = 1.0 + 0.3 * weight
        tracker.guesses["rewarm"] = 0.1 * weight
        bar.refresh("model read")
        fixed = graph.inputs[0].batch if graph.inputs else None
        if batch_size and fixed and batch_size != fixed:
            raise StepAdviceError(f"--batch-size {batch_size}: the model's Input fixes the batch at {fixed}; give "
                                  f"--batch-size {fixed} or leave it out")
        batch = int(batch_size or fixed or DEFAULT_BATCH)
        outputs = [vars(o) for o in graph.outputs]
        if loss is None and len(outputs) != 1 and not data:
            raise StepAdviceError(f"the model has {len(outputs)} outputs: give --loss (one of "
                                  f"{', '.join(sorted(model_data.LOSSES))}) and --data module:function")
        loss_name = loss or model_data.infer_loss(outputs)
        search = step_plans.search(graph, devices, global_batch=batch, meshes=meshes, force=force, rules=rules)
        if not search.plans:
            raise StepAdviceError("no candidate plan is feasible: " + "; ".join(
                f"{e.name}: {e.reason}" for e in search.excluded[:6]))
        plans = [plan_payload(p, graph, implementation) for p in search.plans]
        common = dict(worker_payload(model, graph, batch, loss_name, data=data, options=options,
                                     implementation=implementation, cwd=cwd), rounds=rounds, min_time=min_time)
        raw, cals = measure_all(plans, common, devices=devices, progress=progress, timeout=timeout,
                                tracker=tracker, bar=bar)
    finally:
        bar.close()
    host = _host_hardware(cals)
    if statistic not in ("median", "p25", "min"):
        raise StepAdviceError(f"--statistic {statistic!r}: choose one of median, p25, min")
    rows = build_rows(graph, search.plans, raw, cals, host, batch=batch, opts=opts, statistic=statistic)
    table = rank(pd.DataFrame(rows), memory_budget=memory_budget)
    ok = table[table["status"] == "ok"]
    advice = StepAdvice(model, devices, batch, loss_name, options, implementation, graph, search, table, cals, host,
                        spearman=step_model.spearman(list(ok["pred_ms"]), list(ok["step_ms"])),
                        measured_spearman=split_half_spearman(raw), memory_budget=memory_budget,
                        scaling_checks=scaling_checks(rows, search, batch), rows=raw)
    if target_mesh:
        count = target_mesh.strip().isdigit() and int(target_mesh) > 1  # a device count: every factoring of it
        tdims = None if count else step_plans.normalize_mesh(target_mesh)
        tdev = int(target_mesh) if count else meshspec.mesh_size(tdims)
        tb = int(target_batch or batch * max(1, tdev // devices))
        tsearch = step_plans.search(graph, tdev, global_batch=tb, meshes=[] if count else [target_mesh], force=force,
                                    factor=bool(count), rules=rules)
        hw = step_model.load_hardware(hardware) if hardware else host
        if not hardware:  # this host's rates, and its measured links (by axis name)
            for r in (cals or {}).values():
                for a, v in (r or {}).get("axes", {}).items():
                    if a not in hw.links or v["group"] > 2:
                        hw.links[a] = step_model.link_of(v)
        trows = predict_target(graph, rows, tsearch, hw, batch=batch, target_batch=tb, opts=opts,
                               local_plans=search.plans)
        advice.target_mesh = f"{tdev} devices" if count else meshspec.format_mesh_spec(tdims)
        advice.target_batch, advice.target_devices, advice.hardware = tb, tdev, hw
        advice.target_search = tsearch
        advice.target = rank(pd.DataFrame(trows), memory_budget=memory_budget, time_col="pred_ms") if trows else None
    advice.elapsed_s = time.perf_counter() - t0
    advice.estimates = list(bar.history)
    advice.statistic = statistic
    return advice


def host_hardware_doc(advice: StepAdvice, command: str = "") -> dict:
    """This host's rates as a hardware file (``--save-hardware``): the microbenchmarks' medians, and one link
    for its logical devices (the medians of the measured axes' alpha and beta), with where they come from."""
    h = advice.host
    axes = [v for c in advice.calibration.values() for v in (c or {}).get("axes", {}).values()]
    def med(k):
        vals = [a[k] for a in axes if a.get(k) is not None]
        return float(np.median(vals)) if vals else 0.0

    return {"name": f"this host: {advice.devices} logical CPU devices sharing its cores", "flops_per_s": h.flops_per_s,
            "bytes_per_s": h.bytes_per_s, "op_us": h.op_us, "call_ms": h.call_ms, "shared": True,
            "devices_per_node": advice.devices,
            "links": {"intra_node": {k: med(k) for k in ("alpha_us", "beta_s_per_byte", "merged_alpha_us",
                                                          "merged_beta_s_per_byte")}},
            "source": {"measured": f"dsgd.advisor.step_calibrate on {len(advice.calibration)} meshes of "
                                   f"{advice.devices} logical CPU devices, {time.strftime('%Y-%m-%d')}, every round's calls "
                                   "pooled: medians of a 256x512x512 matmul per device, a 4 MiB elementwise op per "
                                   "device and a chain of 128 small ops; trimmed means of all-reduces of 4 KiB / 64 KiB "
                                   "/ 1 MiB / 8 MiB per device over each mesh axis, and of 1 / 8 MiB in 8 tensors "
                                   "DTensor merges",
                       "command": command}}


__all__ = ["StepAdvice", "StepAdviceError", "advise_step", "plan_payload", "worker_payload", "build_rows", "scaling_checks",
           "split_half_spearman", "predict_target", "host_hardware_doc", "DEFAULT_BATCH"]
