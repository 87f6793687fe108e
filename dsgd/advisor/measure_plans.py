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

MIN_TIMED_S = 1.0  # timed seconds per job at least, over all its rounds (short steps get more samples)
ROUNDS = 4  # a mesh's jobs are timed in this many interleaved rounds (see measure_plans)
MAX_STEPS_PER_ROUND = 250  # a bound on one round's samples (a 1 ms step: 0.25 s)
PROBE_S = 0.05  # timed seconds of the probe per round (payload "probe")


def _build(payload: dict):
    from dsgd.harness import measure

    case = measure.Case(workload=payload["workload"], mesh=payload["mesh"], layout=payload["layout"], dtype=None,
                        implementation=payload["implementation"], options=payload["options"])
    measure.prepare_kernels([case.implementation])  # the one-time kernel build is not the first step's time
    built = measure.build_case(case)
    first = measure.time_first_step(built)
    built.step()  # untimed: the next job's build left the caches full of its own buffers
    measure.sync()
    return built, first


def _time_round(built, steps: int, rounds: int):
    """One round of a job: an untimed step (the caches held another job's buffers), then at least
    ``steps / rounds`` timed ones, for at least ``MIN_TIMED_S / rounds`` seconds."""
    from dsgd.harness import measure

    per = max(1, -(-steps // rounds))
    return measure.time_steps(built.step, steps=per, warmup=1, min_time=MIN_TIMED_S / rounds,
                              max_steps=max(per, MAX_STEPS_PER_ROUND)) * 1e3


def _make_probe():
    """The probe: a fixed piece of work, the same in every worker whatever its mesh -- 32 small eager ops
    on the first CPU device and a 16 MiB copy -- timed in every round next to the jobs, so that each row
    says how fast the machine was while its job ran (``probe_ms``).

    Why: on the shared 2-core VMs this was built on, the jobs measured together in one worker sped up and
    slowed down together by 10-21% (SD) from pass to pass, in spells of minutes, and whole sessions
    differed (``dsgd layouts --validate``'s pass-to-pass line).  Recorded, not used: on the first grid
    with it, step times divided by it predicted worse (README, grid G).
    """
    import numpy as np
    import tensorflow as tf

    src = np.ones(4 << 20, np.float32)
    dst = np.empty_like(src)
    with tf.device("/CPU:0"):
        x = tf.constant(np.ones(64, np.float32))

    def step():
        with tf.device("/CPU:0"):
            y = x
            for _ in range(32):
                y = y + 1.0
        np.copyto(dst, src)
        return y.numpy()  # waits for the ops

    return step


def _result(built, first: float, t_ms, rounds: int) -> dict:
    """A job's row: its step statistics and the bytes its devices really hold (every device's
    components of the variables and of the rank >= 1 optimizer variables)."""
    from tensorflow.experimental import dtensor

    from dsgd.harness import measure

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
        **measure.step_stats(t_ms, (25, 75)),
        "rounds": rounds,
        "measured_params_bytes_per_device": max(per_dev.values()),
        "measured_state_bytes_per_device": max(state_dev.values()) if state_dev else 0,
        "measured_bytes_per_device": max(total.values()),
        "measured_bytes_uneven": len(set(total.values())) > 1,
    }


def measure_plan(payload: dict) -> dict:
    """Worker: one plan, one implementation, one mesh -- time the step and count the real bytes
    (the job alone: what :func:`run_jobs` falls back to when a mesh's worker fails)."""
    p = dict(payload)
    steps = int(p.pop("steps", 8))
    built, first = _build(p)
    import numpy as np

    t = np.concatenate([_time_round(built, steps, ROUNDS) for _ in range(ROUNDS)])
    return _result(built, first, t, ROUNDS)


def measure_plans(payload: dict) -> dict:
    """Worker: every job of one model on one mesh, their steps interleaved.

    ``payload``: ``{"jobs": [job payloads], "steps": n}``.  Each job is built and its first step
    timed, then the jobs are timed in :data:`ROUNDS` rounds (every job once per round, in reverse
    order on odd rounds; :func:`_time_round`), as ``dsgd bench`` pairs its implementations.  Why:
    on the shared 2-core VMs this was built on, the same job timed in consecutive 0.4 s windows of
    one process read 32 to 64 ms (dsgd's replicated one-big on 8 devices, median 49), and a short
    step's three passes 0.95, 1.19 and 2.26 ms; the copy bandwidth measured around each window did
    not follow.  Timed in one block each, the plans of a mesh (which the advisor ranks against each
    other) met different spells of the machine; interleaved, a spell falls on all of them alike,
    and each job's samples span the worker's life, not one spell.

    Returns ``{"rows": [one result per job, in order]}``; a job that fails is a failed result and
    the others are still measured.
    """
    import numpy as np

    from dsgd.harness import measure

    steps = int(payload.get("steps", 8))
    jobs = list(payload["jobs"])
    built: dict[int, tuple] = {}
    rows: list = [None] * len(jobs)
    for k, job in enumerate(jobs):
        try:
            built[k] = _build(job)
        except Exception as e:  # noqa: BLE001 - recorded as failed; the others go on
            rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:600]}"}
    times: dict[int, list] = {k: [] for k in built}
    probe, probe_t = None, []
    if payload.get("probe"):
        try:
            probe = _make_probe()
        except Exception:  # noqa: BLE001 - the jobs are measured without it
            probe = None
    for r in range(ROUNDS):
        if probe is not None:
            try:
                probe_t.append(measure.time_steps(probe, steps=3, warmup=1, min_time=PROBE_S, max_steps=500) * 1e3)
            except Exception:  # noqa: BLE001 - the jobs are measured without it
                probe, probe_t = None, []
        for k in (list(built) if r % 2 == 0 else list(built)[::-1]):
            if k not in times:
                continue
            try:
                times[k].append(_time_round(built[k][0], steps, ROUNDS))
            except Exception as e:  # noqa: BLE001
                rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:600]}"}
                del times[k]
    for k, t in times.items():
        try:
            rows[k] = _result(built[k][0], built[k][1], np.concatenate(t), ROUNDS)
        except Exception as e:  # noqa: BLE001
            rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:600]}"}
    if probe_t:
        t = np.concatenate(probe_t)
        for row in rows:
            if row and row.get("status") == "ok":
                row.update(probe_ms=float(np.median(t)), probe_min_ms=float(t.min()))
    return {"rows": rows}


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
             timeout: Optional[float] = None, desc: str = "dsgd layouts", on_row=None,
             probe: bool = False) -> list[dict]:
    """Measure jobs in isolated worker processes: a fresh worker for each workload and mesh, which
    times its jobs interleaved (:func:`measure_plans`); a job that fails there is measured again
    alone in a fresh worker (:func:`measure_plan`).

    Why a worker per mesh: in one long-lived worker, the same replicated work measured on meshes
    of the same size differed by up to 1.5x (dsgd's one-big on 4 devices: 15-26 ms; on 8: 34-57),
    depending on what the worker had run before, at up to 80 GB/s against a copy bandwidth of 50.
    In a fresh worker per mesh the same jobs measured 27-30 and 53 ms, i.e. bytes over the copy
    bandwidth, as a training process that holds its variables for its whole life sees them.  (A
    whole grid measured so still had one such outlier in one pass, which the median of passes
    leaves out: :func:`dsgd.advisor.measurements.combine_repeats`.)

    Each returned row holds the job's identity, the cost-model features (exact bytes and
    collectives included) and the measurements; with ``probe``, also how long the probe took in the
    same worker's rounds (``probe_ms``, ``probe_min_ms``: :func:`_make_probe`).
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
            (res,) = run_isolated("dsgd.advisor.measure_plans:measure_plans",
                                  [{"jobs": [payloads[k] for k in idx], "steps": steps, "probe": probe}],
                                  devices=devices, timeout=timeout)
            part = res.get("rows") if res.get("status", "ok") == "ok" else None
            part = part if part is not None else [res] * len(idx)
            # a job that failed (or whose worker died) may have failed for another's sake: an eager
            # DTensor error poisons the process.  Each such job again, alone in a fresh worker.
            again = [n for n, r in enumerate(part) if r.get("status") != "ok"]
            if again:
                alone = run_isolated("dsgd.advisor.measure_plans:measure_plan", [payloads[idx[n]] for n in again],
                                     devices=devices, timeout=timeout)
                part = list(part)
                for n, r in zip(again, alone):
                    part[n] = r
            for k, r in zip(idx, part):
                results[k] = r
                got(k, r)
        bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [r if r is not None else _row(j, res) for j, r, res in zip(jobs, rows, results)]


def _row(j: Job, res: dict) -> dict:
    dims = meshspec.parse_mesh_spec(j.mesh)
    f = costmodel.features(j.specs, j.plan.layouts, dims, OPTION_PRESETS[j.options], j.implementation)
    return {"workload": j.workload, "mesh": j.mesh, "plan": j.plan.name, "implementation": j.implementation,
            "options": j.options, **f, **j.row, **res, "layouts": [list(lay) for lay in j.plan.layouts]}
