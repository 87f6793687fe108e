"""Running ``dsgd bench``'s cases: the worker functions (one case, or the implementations of one
configuration side by side, their steps interleaved) and the sweep that hands them to worker
processes (:mod:`dsgd.harness.isolate`), or runs them here as a DTensor client, with a progress
bar whose estimate holds (:func:`job_cost`)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np

from dsgd.harness import measure
from dsgd.harness.bench_frame import add_ratios
from dsgd.harness.measure import Case, prepare_kernels, resolved_implementations
from dsgd.meshspec import MeshSpec
from dsgd.names import MODEL_MODES, NO_UPDATE, REFERENCE

_COPY_GBPS: Optional[float] = None


def copy_gbps() -> float:
    """This process's copy bandwidth (GB/s), measured once: the roofline's denominator."""
    global _COPY_GBPS
    if _COPY_GBPS is None:
        _COPY_GBPS = measure.copy_bandwidth_gbps()
    return _COPY_GBPS


def _row(built, t_ms: np.ndarray) -> dict:
    """The result row of one built case from its per-step times (ms)."""
    row = asdict(built.case)
    b = measure.bytes_for_case(built)
    bw = copy_gbps()
    stats = measure.step_stats(t_ms, (10, 90))
    roof = measure.roofline(b.step_traffic_total, stats["median_ms"], bw)
    row.update(
        status="ok",
        first_step_s=built.first_step_s,
        impl_used=NO_UPDATE if built.case.implementation == NO_UPDATE else resolved_implementations(built.optimizer),
        **stats,
        params=b.params_total,
        param_bytes_per_device=b.params_per_device,
        state_bytes_per_device=measure.optimizer_state_bytes(built.optimizer),  # what the slots hold (ZeRO-1 too)
        traffic_bytes=b.step_traffic_total,
        achieved_gbps=roof["achieved_gbps"],
        copy_gbps=bw,
        roofline_ms=roof["roofline_ms"],
    )
    row["roofline_frac"] = roof["roofline_frac"]
    return row


def run_case(payload: dict) -> dict:
    """Measure one case (a :class:`Case` as a dict plus ``steps``); returns a result row."""
    steps = int(payload.pop("steps", 10))
    case = Case(**payload)
    measure.warm_up(case)
    built = measure.build_case(case)
    measure.time_first_step(built)
    return _row(built, measure.time_steps(built.step, steps=steps, warmup=1) * 1e3)


BLOCK = 4  # timed steps per implementation per round of run_paired


def run_paired(payload: dict) -> dict:
    """Measure several implementations of one configuration side by side, in one process.

    ``payload``: a :class:`Case` as a dict whose ``implementation`` is a list, plus ``steps``.
    After a warm-up (:func:`dsgd.harness.measure.warm_up`), each implementation is built and its
    first step timed on its own (the :data:`NO_UPDATE` floor first, where there is one); then their steps are
    interleaved in rounds (every implementation once per round, in reverse order on odd
    rounds), so a slow spell of the machine falls on all of them alike and their ratio holds.
    In a round an implementation runs one untimed step, then :data:`BLOCK` timed ones: every
    timed step follows a step of its own, as in a loop of steps (and as when measured alone),
    not a step of another implementation that left the caches full of its own buffers.
    Returns ``{"rows": [one row per implementation, in order]}``; an implementation that
    fails is a failed row and the others are still measured.
    """
    steps = int(payload.pop("steps", 10))
    impls = list(payload.pop("implementation"))
    built: dict[int, measure.Built] = {}
    rows: list[Optional[dict]] = [None] * len(impls)
    try:  # so that no implementation's first step pays the process's or the mesh's first use
        measure.warm_up(Case(**payload, implementation=impls[0]))
    except Exception:  # noqa: BLE001 - each implementation's build below reports what is wrong
        pass
    # the floor first: DTensor's first expansion of these layouts and shapes then goes to it, not
    # to whichever optimizer would have come first
    for k in sorted(range(len(impls)), key=lambda k: impls[k] != NO_UPDATE):
        impl = impls[k]
        try:
            b = measure.build_case(Case(**payload, implementation=impl))
            measure.time_first_step(b)
            b.step()  # warm-up
            measure.sync()
            built[k] = b
        except Exception as e:  # noqa: BLE001 - recorded as failed; the others go on
            rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    times: dict[int, list[float]] = {k: [] for k in built}
    rounds = -(-steps // BLOCK)
    for r in range(rounds):
        for k in (list(built) if r % 2 == 0 else list(built)[::-1]):
            if k not in times:
                continue
            try:  # the warm-up step is untimed: the caches were the other implementation's
                n = min(BLOCK, steps - len(times[k]))
                times[k].extend(measure.time_steps(built[k].step, steps=n, warmup=1) * 1e3)
            except Exception as e:  # noqa: BLE001
                rows[k] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                del times[k]
    for k, t in times.items():
        rows[k] = _row(built[k], np.asarray(t))
        rows[k]["paired"] = True
    return {"rows": rows}


def _jobs(cases: Sequence[Case], steps: int, paired: bool) -> list[tuple[str, dict, list[int]]]:
    """(worker function, payload, indices of the cases it measures) for each unit of work."""
    if not paired:
        return [("run_case", dict(asdict(c), steps=steps), [i]) for i, c in enumerate(cases)]
    by_config: dict[tuple, list[int]] = {}
    for i, c in enumerate(cases):
        config = tuple((k, v) for k, v in asdict(c).items() if k != "implementation")
        by_config.setdefault(config, []).append(i)
    jobs = []
    for config, idx in by_config.items():
        if len(idx) == 1:
            jobs.append(("run_case", dict(asdict(cases[idx[0]]), steps=steps), idx))
        else:
            jobs.append(("run_paired", dict(config, implementation=[cases[i].implementation for i in idx],
                                            steps=steps), idx))
    return jobs


def _split(res: dict, n: int) -> list[dict]:
    """A job's result as one result per case (a failed job fails each of its cases)."""
    if "rows" in res:
        return [r if r is not None else {"status": "failed", "error": "not measured"} for r in res["rows"]]
    return [res] * n if n > 1 else [res]


MODEL_VARIABLES = 20  # about what a whole-step model of dsgd.harness.models has (resmlp: 20)


def job_cost(cases: Sequence[Case], steps: int) -> float:
    """A job's rough cost in seconds on an idle 2-core machine, for the progress bar's estimate only.

    What dominates is each implementation's first step, which traces and expands every variable on
    every device: about 20 ms per variable x (1 + devices / 6) for tf_keras' DTensor SGD (many-small's
    400 variables on 8 devices: ~19 s; bert-mini's 71 on 1 device: ~1.2 s), a sixth of that for dsgd
    and the floor; then creating the variables, and the timed steps.  Counting cases instead made the
    first estimate of a default run 48 minutes for a 4-minute run: a cheap case and a many-small
    reference case weighed alike.
    """
    from dsgd.workloads import get_workload

    total = 0.0
    for c in cases:
        try:
            n_vars = MODEL_VARIABLES if c.mode in MODEL_MODES else len(get_workload(c.workload, c.dtype))
            devices = MeshSpec.of(c.mesh).size
        except Exception:  # noqa: BLE001 - a bad case fails in its job; its cost only moves the bar
            n_vars, devices = 1, 1
        first = 0.02 * n_vars * (1 + devices / 6) / (1 if c.implementation == REFERENCE else 6)
        build = 0.005 * n_vars * 2 + (1.0 if c.mode in MODEL_MODES else 0.1)  # variables and gradients, or a model
        total += first + build + 0.01 * devices * (steps + 4)
    return total + 0.5  # the configuration's warm-up


def start(payload: dict) -> dict:
    """A worker's first job: what the whole sweep needs once per process, before anything is timed (the
    kernels built/loaded, the copy bandwidth measured), so that neither a case nor the progress bar's
    estimate carries it.  ``payload["implementations"]``: the sweep's."""
    return {"status": "ok", "build_s": prepare_kernels(payload.get("implementations", [])), "copy_gbps": copy_gbps()}


def run(cases: Sequence[Case], *, steps: int = 10, devices: int = 8, isolate: bool = True,
        progress: bool = True, paired: bool = True):
    """Run cases; returns a pandas DataFrame with one row per case (failed ones included).

    ``paired`` (the default): the implementations of one configuration are measured side by
    side in one process, their steps interleaved (:func:`run_paired`), so the speed-up is a
    ratio of times taken in the same moments; otherwise each case runs on its own.

    As a DTensor client (:mod:`dsgd.multiclient`) the cases run in this process, whatever
    ``isolate`` says: every client runs the same cases in the same order, each case's mesh
    spanning all clients (the cluster cannot be re-formed in a worker process).

    The progress bar advances by each job's :func:`job_cost` and starts its clock once the worker
    is up (:func:`start`), so its estimate of the time left holds from the first job on.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from dsgd import multiclient

    client = multiclient.is_client()
    if client:
        isolate = False
    jobs = _jobs(cases, steps, paired)
    costs = [job_cost([cases[i] for i in idx], steps) for _, _, idx in jobs]
    rows: list[Optional[dict]] = [None] * len(cases)
    started: dict = {}
    n_configs = len(jobs)
    bar = tqdm(total=sum(costs), desc="dsgd bench", disable=not progress, leave=False, smoothing=0,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
    bar.set_postfix_str("starting a worker: TensorFlow, the kernels, the copy bandwidth")
    done = [0]

    def got(j, res):
        if j == 0:  # the start job: the clock starts now (tqdm.reset restarts it)
            started.update(res if res.get("status") == "ok" else {})
            bar.reset(total=sum(costs))
            bar.set_postfix_str(f"0/{n_configs} configurations")
            return
        j -= 1
        idx = jobs[j][2]
        for i, r in zip(idx, _split(res, len(idx))):
            row = dict(asdict(cases[i]))
            row.update(r)
            rows[i] = row
        done[0] += 1
        bar.update(costs[j])
        c = cases[idx[0]]
        bar.set_postfix_str(f"{done[0]}/{n_configs} configurations, last: {c.mode} {c.workload[-30:]} {c.mesh}")

    impls = sorted({c.implementation for c in cases})
    payloads = [dict(_func="start", implementations=impls)] + [dict(p, _func=func) for func, p, _ in jobs]
    if isolate:
        from dsgd.harness.isolate import run_isolated

        # one worker function per sweep keeps run_isolated's one-func interface
        run_isolated("dsgd.harness.bench_run:run_job", payloads, devices=devices, on_result=got,
                     device_type=cases[0].device if cases else "CPU")
    else:
        for j, p in enumerate(payloads):
            idx = jobs[j - 1][2] if j else []
            try:
                res = run_job(dict(p))
            except Exception as e:  # noqa: BLE001 - recorded as failed; the sweep goes on
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if client and j:  # a case failed on some clients only: the others may be stuck in it, stop all
                ok = all(r.get("status", "ok") == "ok" for r in _split(res, len(idx)))
                oks = multiclient.agree(f"bench-job-{j - 1}", ok)
                if len(set(oks)) > 1:
                    bad = [k for k, o in enumerate(oks) if not o]
                    msg = f"case {cases[idx[0]].label} failed on client(s) {bad} only: {res.get('error', '')}"
                    multiclient.report_error(msg)
                    raise RuntimeError(msg)
            got(j, res)
    bar.close()
    df = add_ratios(pd.DataFrame(rows))
    if started.get("build_s") and jobs:  # the one-time kernel build, reported as the first job's rows were
        first = df.index.isin(jobs[0][2])
        df.loc[first, "build_s"] = df.loc[first, "build_s"].fillna(0) + started["build_s"]
    if client:  # every client gets here together (the jobs agreed)
        cfg = multiclient.config_from_env()
        df["clients"] = cfg.num_clients
        df["barrier_ms"] = multiclient.barrier_ms()  # included in every step time: say how much
    return df


def run_job(payload: dict) -> dict:
    """A worker's entry point: ``payload["_func"]`` is ``start``, ``run_case`` or ``run_paired``.

    The kernels are built/loaded first; every row of the job gets that time as ``build_s``.
    """
    func = payload.pop("_func", "run_case")
    if func == "start":
        return start(payload)
    impl = payload.get("implementation", "auto")
    build_s = prepare_kernels([impl] if isinstance(impl, str) else impl)
    res = {"run_case": run_case, "run_paired": run_paired}[func](payload)
    for r in res["rows"] if "rows" in res else [res]:
        if r is not None:
            r["build_s"] = build_s
    return res
