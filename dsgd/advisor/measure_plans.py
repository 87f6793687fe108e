"""Measuring layout plans: each plan of a model on a mesh, with one implementation, timed in a worker
process (through :mod:`dsgd.harness.measure`) next to the bytes its devices really hold; each row
carries the cost model's features (:func:`dsgd.advisor.costmodel.features`)."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from dsgd import layoutmap, meshspec
from dsgd.advisor import costmodel
from dsgd.harness.measure import OPTION_PRESETS

MIN_TIMED_S = 0.25  # timed seconds per measurement at least (up to 10x --steps steps)


def measure_plan(payload: dict) -> dict:
    """Worker: one plan, one implementation, one mesh -- time the step and count the real bytes."""
    from tensorflow.experimental import dtensor

    from dsgd.harness import measure

    p = dict(payload)
    steps = int(p.pop("steps", 8))
    case = measure.Case(workload=p["workload"], mesh=p["mesh"], layout=p["layout"], dtype=None,
                        implementation=p["implementation"], options=p["options"])
    measure.prepare_kernels([case.implementation])  # the one-time kernel build is not the first step's time
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
        "impl_used": measure.resolved_implementations(built.optimizer),
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
    """Measure jobs in isolated worker processes: a fresh worker for each workload and mesh (and
    a fresh one after a failure).

    Why a worker per mesh: in one long-lived worker, the same replicated work measured on meshes
    of the same size differed by up to 1.5x (dsgd's one-big on 4 devices: 15-26 ms; on 8: 34-57),
    depending on what the worker had run before, at up to 80 GB/s against a copy bandwidth of 50.
    In a fresh worker per mesh the same jobs measured 27-30 and 53 ms, i.e. bytes over the copy
    bandwidth, as a training process that holds its variables for its whole life sees them.  (A
    whole grid measured so still had one such outlier in one pass, which the median of passes
    leaves out: :func:`dsgd.advisor.measurements.combine_repeats`.)

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

        groups: dict[tuple, list[int]] = {}
        for k, j in enumerate(jobs):
            groups.setdefault((id(j.specs), j.mesh), []).append(k)
        results: list[dict] = [{}] * len(jobs)
        for idx in groups.values():
            part = run_isolated("dsgd.advisor.measure_plans:measure_plan", [payloads[k] for k in idx],
                                devices=devices, on_result=lambda i, res, idx=idx: got(idx[i], res), timeout=timeout)
            for k, res in zip(idx, part):
                results[k] = res
        bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [r if r is not None else _row(j, res) for j, r, res in zip(jobs, rows, results)]


def _row(j: Job, res: dict) -> dict:
    dims = meshspec.parse_mesh_spec(j.mesh)
    f = costmodel.features(j.specs, j.plan.layouts, dims, OPTION_PRESETS[j.options], j.implementation)
    return {"workload": j.workload, "mesh": j.mesh, "plan": j.plan.name, "implementation": j.implementation,
            "options": j.options, **f, **j.row, **res, "layouts": [list(lay) for lay in j.plan.layouts]}
