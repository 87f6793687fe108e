"""Running the measuring worker of the whole-step advisor (:func:`dsgd.advisor.step_measure.measure_plans`):
every plan of every mesh in one worker process, with DTensor dumping its programs and the progress bar fed by
the worker as it goes (:mod:`dsgd.advisor.progress`).  A plan whose jobs failed is measured again, alone, in
a fresh worker (an eager DTensor error poisons its process, so it may have failed for another plan's sake);
so is every plan when the worker died."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

from dsgd.advisor import dtensor_program
from dsgd.advisor.progress import Bar, Tracker, run_polling
from dsgd.advisor.step_measure import JOBS, MIN_STEPS, MIN_TIMED_S, ROUNDS

WORKER = "dsgd.advisor.step_measure:measure_plans"


def plan_units(tracker: Tracker, plans: Sequence[dict], rounds: int = ROUNDS, jobs: Sequence[str] = JOBS,
               calibrate: bool = True) -> None:
    """Add one worker's units of work to ``tracker``."""
    meshes = list(dict.fromkeys(p["mesh"] for p in plans))
    tracker.add("start")
    for kind in ("build", "rewarm"):
        for p in plans:
            for j in jobs:
                tracker.add(kind, f"{p['name']}/{j}")
    for _ in range(rounds):
        if calibrate:
            for m in meshes:
                tracker.add("calibrate", m)
        for p in plans:
            for j in jobs:
                tracker.add("round", f"{p['name']}/{j}")


def run_worker(plans: Sequence[dict], common: dict, *, devices: int, tracker: Tracker, bar: Bar,
               timeout: Optional[float] = None) -> dict:
    """Measure ``plans`` (``{"name", "mesh", "layout_map"}``) in one worker; its result (``{"rows",
    "calibration"}``, or ``{"status": "failed", "error"}`` when the worker died)."""
    from dsgd.harness.isolate import run_isolated

    d = tempfile.mkdtemp(prefix="dsgd-step-")
    path = os.path.join(d, "progress.jsonl")
    payload = dict(common, plans=list(plans), dump_dir=d, progress=path)
    launched = time.perf_counter()
    state = {"t": None}

    def on_line(ev: dict) -> None:
        kind = ev.get("unit", "")
        dur = time.perf_counter() - launched if state["t"] is None else float(ev.get("t", 0.0)) - state["t"]
        state["t"] = float(ev.get("t", 0.0))
        key = "" if kind == "start" else ev.get("mesh") if kind == "calibrate" else f"{ev.get('plan')}/{ev.get('job')}"
        tracker.finish(kind, key, dur)
        if kind == "build" and ev.get("step_s"):  # a round: a warm-up step, then MIN_STEPS or min_time of them
            step = float(ev["step_s"])
            per_round = float(common.get("min_time", MIN_TIMED_S)) / int(common.get("rounds", ROUNDS))
            tracker.hint("round", key, step + max(MIN_STEPS * step, per_round))
        bar.refresh(f"{kind} {ev.get('plan') or ev.get('mesh') or ''}")

    try:
        (res,) = run_polling(lambda: run_isolated(WORKER, [payload], devices=devices, timeout=timeout,
                                                  env=dtensor_program.dump_env(d)),
                             path, on_line, bar.refresh)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    names = {p["name"] for p in plans}
    meshes = {p["mesh"] for p in plans}
    for u in tracker.units:  # a worker that died leaves its units undone: they will not run
        if not u.done and (u.kind == "start" or u.key in meshes or u.key.split("/")[0] in names):
            u.done = True
    bar.refresh()
    return res


def measure_all(plans: Sequence[dict], common: dict, *, devices: int, progress: bool = True,
                timeout: Optional[float] = None, tracker: Optional[Tracker] = None,
                bar: Optional[Bar] = None) -> tuple[list, dict]:
    """Every plan (``{"name", "mesh", "layout_map"}``) in one worker, then the failed ones again alone.

    Returns ``(rows, calibrations)``: one row per (plan, job) -- failed ones included -- and each mesh's
    microbenchmarks.
    """
    rounds = int(common.get("rounds", ROUNDS))
    tracker = tracker if tracker is not None else Tracker()
    plan_units(tracker, plans, rounds)
    own_bar = bar is None
    bar = bar if bar is not None else Bar(tracker, enabled=progress)
    try:
        res = run_worker(plans, dict(common, calibrate=True), devices=devices, tracker=tracker, bar=bar,
                         timeout=timeout)
        rows = res.get("rows") if res.get("status", "ok") == "ok" else None
        cals = res.get("calibration") or {}
        if rows is None:
            rows = [{"plan": p["name"], "job": j, "mesh": p["mesh"], "status": "failed",
                     "error": res.get("error", "the worker failed")} for p in plans for j in JOBS]
        for name in sorted({r["plan"] for r in rows if r.get("status") != "ok"}):
            plan = next(p for p in plans if p["name"] == name)
            plan_units(tracker, [plan], rounds, calibrate=plan["mesh"] not in cals)
            again = run_worker([plan], dict(common, calibrate=plan["mesh"] not in cals), devices=devices,
                               tracker=tracker, bar=bar, timeout=timeout)
            if again.get("status", "ok") == "ok" and again.get("rows"):
                rows = [r for r in rows if r["plan"] != name] + [dict(r, retried=True) for r in again["rows"]]
                for m, c in (again.get("calibration") or {}).items():
                    cals.setdefault(m, c)
            else:
                for r in rows:
                    if r["plan"] == name and r.get("status") != "ok":
                        r["retry_error"] = again.get("error")
    finally:
        if own_bar:
            bar.close()
    return rows, cals


__all__ = ["measure_all", "run_worker", "plan_units"]
