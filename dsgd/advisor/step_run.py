"""Running the measuring workers of the whole-step advisor: one worker process per mesh
(:func:`dsgd.advisor.step_measure.measure_mesh`), with DTensor dumping its programs and the progress bar
fed by the worker as it goes (:mod:`dsgd.advisor.progress`); plans whose jobs failed are measured again,
alone, in a fresh worker (an eager DTensor error poisons its process, so they may have failed for
another plan's sake)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

from dsgd.advisor import dtensor_program
from dsgd.advisor.progress import Bar, Tracker, run_polling
from dsgd.advisor.step_measure import JOBS, ROUNDS


def plan_units(tracker: Tracker, mesh: str, plan_names: Sequence[str], rounds: int = ROUNDS,
               jobs: Sequence[str] = JOBS) -> None:
    """Add one worker's units of work to ``tracker``."""
    tracker.add("start", mesh)
    for p in plan_names:
        for j in jobs:
            tracker.add("build", f"{p}/{j}")
    tracker.add("calibrate", mesh)
    for _ in range(rounds):
        for p in plan_names:
            for j in jobs:
                tracker.add("round", f"{p}/{j}")


def run_mesh(mesh: str, plans: Sequence[dict], common: dict, *, devices: int, tracker: Tracker, bar: Bar,
             timeout: Optional[float] = None) -> dict:
    """Measure ``plans`` (``{"name", "layout_map"}``) on ``mesh`` in one worker; returns its result
    (``{"rows", "calibration"}``, or ``{"status": "failed", "error"}`` when the worker died)."""
    from dsgd.harness.isolate import run_isolated

    d = tempfile.mkdtemp(prefix="dsgd-step-")
    path = os.path.join(d, "progress.jsonl")
    payload = dict(common, mesh=mesh, plans=list(plans), dump_dir=d, progress=path)
    launched = time.perf_counter()
    state = {"t": None}

    def on_line(ev: dict) -> None:
        kind = ev.get("unit", "")
        if state["t"] is None:
            dur = time.perf_counter() - launched
        else:
            dur = float(ev.get("t", 0.0)) - state["t"]
        state["t"] = float(ev.get("t", 0.0))
        key = mesh if kind in ("start", "calibrate") else f"{ev.get('plan')}/{ev.get('job')}"
        tracker.finish(kind, key, dur)
        bar.refresh(f"{kind} {ev.get('plan') or mesh}")

    try:
        (res,) = run_polling(lambda: run_isolated("dsgd.advisor.step_measure:measure_mesh", [payload],
                                                  devices=devices, timeout=timeout,
                                                  env=dtensor_program.dump_env(d)),
                             path, on_line, bar.refresh)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    names = {p["name"] for p in plans}
    for u in tracker.units:  # a worker that died leaves its units undone: they will not run
        if not u.done and (u.key == mesh or u.key.split("/")[0] in names):
            u.done = True
    bar.refresh()
    return res


def measure_all(by_mesh: dict, common: dict, *, devices: int, progress: bool = True,
                timeout: Optional[float] = None, tracker: Optional[Tracker] = None,
                bar: Optional[Bar] = None) -> tuple[list, dict]:
    """Every mesh's plans (``{mesh: [{"name", "layout_map"}]}``), each mesh in its own worker.

    Returns ``(rows, calibrations)``: one row per (plan, job) -- failed ones included -- and each mesh's
    calibration.  Plans with a failed job get one more try, alone in a fresh worker.
    """
    rounds = int(common.get("rounds", ROUNDS))
    tracker = tracker if tracker is not None else Tracker()
    for mesh, plans in by_mesh.items():
        plan_units(tracker, mesh, [p["name"] for p in plans], rounds)
    own_bar = bar is None
    bar = bar if bar is not None else Bar(tracker, enabled=progress)
    rows: list = []
    cals: dict = {}
    try:
        for mesh, plans in by_mesh.items():
            res = run_mesh(mesh, plans, dict(common, calibrate=True), devices=devices, tracker=tracker, bar=bar,
                           timeout=timeout)
            got = res.get("rows") if res.get("status", "ok") == "ok" else None
            if got is None:
                got = [{"plan": p["name"], "job": j, "mesh": mesh, "status": "failed",
                        "error": res.get("error", "the worker failed")} for p in plans for j in JOBS]
            elif res.get("calibration"):
                cals[mesh] = res["calibration"]
            bad = sorted({r["plan"] for r in got if r.get("status") != "ok"})
            for name in bad:
                plan = next(p for p in plans if p["name"] == name)
                plan_units(tracker, mesh, [name], rounds)
                again = run_mesh(mesh, [plan], dict(common, calibrate=False), devices=devices, tracker=tracker,
                                 bar=bar, timeout=timeout)
                if again.get("status", "ok") == "ok" and again.get("rows"):
                    got = [r for r in got if r["plan"] != name] + [dict(r, retried=True) for r in again["rows"]]
                else:
                    for r in got:
                        if r["plan"] == name and r.get("status") != "ok":
                            r["retry_error"] = again.get("error")
            rows += got
    finally:
        if own_bar:
            bar.close()
    return rows, cals


__all__ = ["measure_all", "run_mesh", "plan_units"]
