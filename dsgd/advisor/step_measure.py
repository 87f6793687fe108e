"""The worker that measures whole training steps: every candidate plan, of every mesh, in one process.

For each plan the user's model is built under the plan's ``LayoutMap``, compiled with dsgd (``--options``,
``--implementation``) and the loss, and its ``make_train_function()`` -- one ``model.fit`` step -- run on
a ``DTensorDataset``; then the same with the honest floor, :func:`dsgd.harness.models.no_update_optimizer`
(the gradients in their variables' layouts handed to one stateful no-op: all the work any correct
optimizer needs, nothing applied).  Per job it records:

* the first step (trace, DTensor's SPMD expansion, compile) and the program DTensor ran, read from its
  MLIR dumps (:mod:`dsgd.advisor.dtensor_program`: collectives by kind and mesh axis, bytes, FLOPs);
* the bytes each device holds: parameters and optimizer slots, counted on the devices' components;
  what TensorFlow's allocator reports for a step (its peak over what was in use before, all devices);
* the step times, in :data:`ROUNDS` interleaved rounds over all jobs (reversed on odd rounds), as ``dsgd
  bench`` pairs its implementations: a slow spell of this shared machine falls on every plan;
* each mesh's microbenchmarks for the step model, once a round (their medians).

Progress goes to ``payload["progress"]`` (one JSON line per finished unit of work) so the parent's bar
moves while the worker runs (:mod:`dsgd.advisor.progress`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

ROUNDS = 6  # interleaved rounds: on this shared VM a spell of load falls on some jobs' rounds, not all
MIN_TIMED_S = 1.2  # timed seconds per job, over all its rounds
MIN_STEPS = 2  # timed steps per job per round at least
JOBS = ("dsgd", "floor")


class _Progress:
    def __init__(self, path: Optional[str]):
        self.path = path
        self.t0 = time.perf_counter()

    def __call__(self, unit: str, **extra) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"unit": unit, "t": round(time.perf_counter() - self.t0, 3), **extra}) + "\n")


def _device_bytes(variables) -> int:
    """Bytes of ``variables`` on the busiest device (their components, as DTensor placed them)."""
    from tensorflow.experimental import dtensor

    per: dict[str, int] = {}
    for v in variables:
        for comp in dtensor.unpack(v.read_value()):
            per[comp.device] = per.get(comp.device, 0) + comp.shape.num_elements() * comp.dtype.size
    return max(per.values()) if per else 0


def _allocator() -> Optional[dict]:
    import tensorflow as tf

    try:
        return tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        return None


def _build_job(payload: dict, plan: dict, which: str, mesh, dataset_fn, dump_dir: Optional[str], seen: set) -> dict:
    import tensorflow as tf

    import dsgd
    from dsgd import layoutmap
    from dsgd.advisor import dtensor_program
    from dsgd.harness import model_data
    from dsgd.advisor.model_graph import build_under
    from dsgd.harness import measure, models
    from dsgd.names import OPTION_PRESETS

    lmap = layoutmap.to_keras(plan["layout_map"], mesh, f"plan {plan['name']}")
    model = build_under(payload["target"], lmap, payload.get("cwd"))
    if which == "floor":
        opt = models.no_update_optimizer(mesh)
    else:
        opts = dict(OPTION_PRESETS[payload.get("options", "momentum")])
        impl = plan.get("implementation") or payload.get("implementation", "auto")
        opt = dsgd.SGD(mesh=mesh, implementation=impl, **opts)
    model.compile(optimizer=opt, loss=model_data.make_loss(payload["loss"]))
    train = model.make_train_function()
    it = iter(dataset_fn())
    t0 = time.perf_counter()
    train(it)
    measure.sync()
    first = time.perf_counter() - t0
    job: dict[str, Any] = {"model": model, "optimizer": opt, "step": lambda: train(it), "first_step_s": first}
    if dump_dir:
        fns = dtensor_program.function_files(dump_dir, seen)
        names = sorted((n for n in fns if "train_function" in n), key=lambda n: -len(fns[n]))
        if names:
            summary = dtensor_program.summarize(fns[names[0]], [(a, mesh.dim_size(a)) for a in mesh.dim_names])
            job["program"] = summary.to_dict()
        keep = os.environ.get("DSGD_LAYOUTS_KEEP_PROGRAMS")  # a directory: keep DTensor's dumps there
        for fs in fns.values():
            for f in fs:
                try:
                    if keep:
                        dst = os.path.join(keep, plan["name"].replace(" ", "_") + "-" + which)
                        os.makedirs(dst, exist_ok=True)
                        os.replace(f, os.path.join(dst, os.path.basename(f)))
                    else:
                        os.remove(f)
                except OSError:
                    pass
    job["params_bytes"] = _device_bytes(model.trainable_variables)
    job["state_bytes"] = _device_bytes([v for v in opt.variables if v.shape.rank]) if which == "dsgd" else 0
    del tf
    return job


def _memory_step(job: dict) -> dict:
    """One step with the allocator's peak reset: its peak over what was in use before (all devices)."""
    import tensorflow as tf

    from dsgd.harness import measure

    before = _allocator()
    if before is None:
        return {}
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError):
        return {}
    job["step"]()
    measure.sync()
    after = _allocator()
    return {"alloc_before": before["current"], "alloc_peak": after["peak"],
            "alloc_step_peak": max(0, after["peak"] - before["current"])}


def measure_plans(payload: dict) -> dict:
    """Worker: every plan of ``payload["plans"]`` (each ``{"name", "mesh", "layout_map"}``), dsgd and the
    floor, all interleaved -- the plans of every mesh in one process, so that a slow spell of the machine
    falls on all of them alike, whichever mesh they run on (meshes over the same logical devices coexist).

    With ``payload["calibrate"]`` each mesh's microbenchmarks (:mod:`dsgd.advisor.step_calibrate`) run in
    every round too, their medians kept.  Returns ``{"rows": [one row per (plan, job)], "calibration":
    {mesh: {...}}}``; a job that fails is a failed row and the others go on.
    """
    import numpy as np

    from dsgd import meshspec
    from dsgd.harness import model_data
    from dsgd.harness import measure

    progress = _Progress(payload.get("progress"))
    batch = int(payload["batch_size"])
    measure.prepare_kernels([payload.get("implementation", "auto")] + [p.get("implementation", "") for p in payload["plans"]])
    meshes = {}
    for plan in payload["plans"]:
        if plan["mesh"] not in meshes:
            meshes[plan["mesh"]] = meshspec.make_mesh(plan["mesh"])
    ds = model_data.user_dataset(payload["data"], payload.get("cwd")) if payload.get("data") else None
    examples = None if ds is not None else model_data.synthetic_examples(
        payload["inputs"], payload["outputs"], payload["loss"], batch, payload.get("vocab"))

    def dataset_fn_for(mesh):
        return lambda: model_data.dtensor_dataset(mesh, batch, examples=examples, dataset=ds)

    progress("start")
    dump_dir = payload.get("dump_dir")
    seen: set = set()
    jobs: list = []
    rows: list = []
    for plan in payload["plans"]:
        mesh = meshes[plan["mesh"]]
        for which in payload.get("jobs", JOBS):
            row = {"plan": plan["name"], "job": which, "mesh": plan["mesh"]}
            try:
                job = _build_job(payload, plan, which, mesh, dataset_fn_for(mesh), dump_dir, seen)
                t0 = time.perf_counter()
                job["step"]()  # not timed as a step: the next build left the caches full of its own buffers
                measure.sync()
                row["step_s"] = time.perf_counter() - t0  # for the progress bar's estimate of a round
                row.update(status="ok", first_step_s=job["first_step_s"], params_bytes=job["params_bytes"],
                           state_bytes=job["state_bytes"], program=job.get("program"))
                if which == "dsgd":
                    row.update(_memory_step(job))
                jobs.append((len(rows), job))
            except Exception as e:  # noqa: BLE001 - recorded as failed; the others go on
                row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:800]}")
            rows.append(row)
            progress("build", plan=plan["name"], job=which, ok=row["status"] == "ok",
                     first_step_s=row.get("first_step_s"), step_s=row.get("step_s"))
    # Each job's first call after other jobs were built takes seconds more (TF 2.21: 0.5 s for the MLP,
    # 3-6 s for the transformer, no new DTensor expansion dumped); paid here, untimed, not in round 0.
    for k, job in jobs:
        try:
            job["step"]()
            measure.sync()
        except Exception as e:  # noqa: BLE001
            rows[k].update(status="failed", error=f"{type(e).__name__}: {str(e)[:800]}")
        progress("rewarm", plan=rows[k]["plan"], job=rows[k]["job"])
    jobs = [(k, job) for k, job in jobs if rows[k]["status"] == "ok"]
    rounds = int(payload.get("rounds", ROUNDS))
    min_time = float(payload.get("min_time", MIN_TIMED_S))
    times: dict[int, list] = {k: [] for k, _ in jobs}
    cals: dict[str, list] = {m: [] for m in meshes}
    calibrators: dict = {}
    for r in range(rounds):
        if payload.get("calibrate"):
            from dsgd.advisor import step_calibrate

            for spec, mesh in meshes.items():
                try:
                    if spec not in calibrators:
                        calibrators[spec] = step_calibrate.Calibrator(mesh)
                    cals[spec].append(calibrators[spec].run(3))
                except Exception as e:  # noqa: BLE001 - the measurements stand without it
                    cals[spec].append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
                progress("calibrate", mesh=spec)
        order = jobs if r % 2 == 0 else jobs[::-1]
        for k, job in order:
            if k not in times:
                continue
            try:
                t = measure.time_steps(job["step"], steps=MIN_STEPS, warmup=1, min_time=min_time / rounds,
                                       max_steps=200) * 1e3
                times[k].append(t)
            except Exception as e:  # noqa: BLE001
                rows[k].update(status="failed", error=f"{type(e).__name__}: {str(e)[:800]}")
                del times[k]
            progress("round", round=r, plan=rows[k]["plan"], job=rows[k]["job"])
    for k, ts in times.items():
        t = np.concatenate(ts)
        rows[k].update(measure.step_stats(t, (25, 75)), rounds=rounds,
                       round_medians=[float(np.median(x)) for x in ts])
    from dsgd.advisor.step_calibrate import combine

    return {"rows": rows, "calibration": {m: combine(c) for m, c in cals.items() if c}}


__all__ = ["measure_plans", "ROUNDS", "MIN_TIMED_S", "JOBS"]
