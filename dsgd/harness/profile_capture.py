"""``dsgd profile``'s worker: one configuration captured in a fresh process into its run directory
(the trace, HLO, TensorBoard scalars and text, ``summary.json``), and the per-commit history
scalars under ``<out>/history/<config>/``; :func:`capture_config` returns the run's summary row."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict

from dsgd.harness.measure import Case

HISTORY = "history"  # <out>/history/<config>/: step time per commit (TensorBoard's Scalars tab)


def _xla_dump_files(dump: str) -> list[str]:
    if not os.path.isdir(dump):
        return []
    return [os.path.join(dump, f) for f in sorted(os.listdir(dump))]


def _prune_dump(dump: str) -> None:
    """Keep only the HLO text (before/after optimisation) of XLA's dump."""
    for f in _xla_dump_files(dump):
        base = os.path.basename(f)
        if not (base.endswith("before_optimizations.txt") or re.search(r"after_optimizations\.txt$", base)):
            try:
                os.remove(f) if os.path.isfile(f) else shutil.rmtree(f)
            except OSError:
                pass


def _uses_xla(impl_used: str) -> bool:
    return "xla" in impl_used.split("+")


def capture_config(payload: dict) -> dict:
    """Worker side: capture one configuration into ``payload["run_dir"]``; returns its summary.

    Runs in a fresh process with 8 (or ``--devices``) logical devices and ``XLA_FLAGS`` dumping
    into ``<run_dir>/hlo/xla_dump``.
    """
    import resource

    import tensorflow as tf

    from dsgd.harness import measure, profile_summary as ps

    run_dir = payload["run_dir"]
    case = Case(**payload["case"])
    steps, time_steps = int(payload["steps"]), int(payload["time_steps"])
    os.makedirs(run_dir, exist_ok=True)
    row = dict(asdict(case), config=payload["config"], commit=payload["commit"],
               commit_order=payload.get("commit_order"), commit_date=payload.get("commit_date"),
               captured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), steps=steps)
    phases = {}
    clock = [time.perf_counter()]

    def phase(name):
        now = time.perf_counter()
        phases[name] = round(now - clock[0], 2)
        clock[0] = now

    row["build_s"] = measure.prepare_kernels([case.implementation])  # the one-time kernel build: not the first step's
    phase("kernels")
    built = measure.build_case(case)
    measure.sync()
    phase("build")
    row["first_step_s"] = measure.time_first_step(built)
    t = measure.time_steps(built.step, steps=time_steps, warmup=2) * 1e3
    stats = measure.step_stats(t, (10, 90), with_min=False)
    row.update(median_ms=stats["median_ms"], p10_ms=stats["p10_ms"], p90_ms=stats["p90_ms"])
    row["impl_used"] = measure.resolved_implementations(built.optimizer)
    phase("time")

    opts = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2, python_tracer_level=0, device_tracer_level=1)
    tf.profiler.experimental.start(run_dir, options=opts)
    try:
        for i in range(steps):
            with tf.profiler.experimental.Trace("train", step_num=i, _r=1):
                built.step()
                measure.sync()
    finally:
        tf.profiler.experimental.stop()
    # xprof counts only TensorFlow ops: label the eager op executions so that framework op stats
    # and the overview see dsgd's custom-kernel calls (profile_summary.annotate_eager_ops)
    ps.annotate_eager_ops(ps.find_xplanes(run_dir))
    phase("profile")

    hlo_dir = os.path.join(run_dir, "hlo")
    dump = os.path.join(hlo_dir, "xla_dump")
    _prune_dump(dump)
    dumped_files = set(_xla_dump_files(dump))
    dumped = ps.hlo_text_stats(dumped_files)  # what XLA compiled for the steps themselves
    hlo_files: list[str] = []
    if _uses_xla(row["impl_used"]):
        from dsgd.impl.xla import capture_hlo

        hlo_files = capture_hlo(built.optimizer, hlo_dir)  # raises NoHLOError if there is none
        for f in set(_xla_dump_files(dump)) - dumped_files:  # capture_hlo's own compilations
            os.remove(f) if os.path.isfile(f) else shutil.rmtree(f, ignore_errors=True)
    phase("capture_hlo")
    xplanes = ps.find_xplanes(run_dir)
    if not xplanes:
        raise RuntimeError(f"the profiler wrote no .xplane.pb under {run_dir}")
    row.update(ps.summarize_xplane(xplanes, steps))
    row["op_types_table"] = ps.op_type_rows(xplanes, steps)
    phase("summarize")
    row["phases_s"] = phases
    row.update(hlo_modules_dumped=dumped["modules"], hlo_files=len(hlo_files),
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
               trace=os.path.relpath(xplanes[0], payload["out"]))
    if (case.xla or _uses_xla(row["impl_used"])) and row["hlo_modules"] == 0:
        row.update(status="failed", error=(
            f"claims XLA (xla={'on' if case.xla else 'off'}, ran {row['impl_used']}) but no HLO module ran in "
            f"the trace and {dumped['modules']} were dumped: "
            f"implementation {case.implementation!r} ran {row['impl_used']!r}, which is not XLA here"))
    else:
        row["status"] = "ok"

    # XLA on CPU: xprof's HLO op stats / op profile stay empty (they read device planes only), so
    # the same table from the host-thread events goes next to the trace and into the Text tab
    import pandas as pd

    pd.DataFrame(row["op_types_table"]).to_csv(os.path.join(run_dir, "op_stats.csv"), index=False)
    hlo_ops = ps.hlo_op_rows(xplanes)
    if hlo_ops:
        pd.DataFrame(hlo_ops).to_csv(os.path.join(run_dir, "hlo_op_stats.csv"), index=False)

    # TensorBoard scalars: this run's step times, and the per-commit history of each config
    with tf.summary.create_file_writer(run_dir).as_default():
        for i, ms in enumerate(t):
            tf.summary.scalar("step_ms", float(ms), step=i)
        tf.summary.scalar("first_step_s", row["first_step_s"], step=0)
        tf.summary.text("framework_ops", ps.markdown_table(
            row["top_ops"], ["type", "name", "self_us_per_step", "pct"]), step=0)
        tf.summary.text("op_types", ps.markdown_table(
            row["op_types_table"][:25], ["type", "self_ms_per_step", "per_step", "pct"]), step=0)
        if hlo_ops:
            tf.summary.text("hlo_op_stats", ps.markdown_table(
                [dict(r, us_per_step=round(r["total_us"] / steps, 1)) for r in hlo_ops[:25]],
                ["module", "hlo_op", "occurrences", "us_per_step", "avg_us", "pct"]), step=0)
    order = row["commit_order"] if row["commit_order"] is not None else int(time.time())
    hist = os.path.join(payload["out"], HISTORY, payload["config"])
    os.makedirs(hist, exist_ok=True)
    for f in os.listdir(hist):
        if f.endswith("." + payload["commit"]):
            os.remove(os.path.join(hist, f))  # --force re-capture of the same commit
    if row["status"] == "ok":
        with tf.summary.create_file_writer(hist, filename_suffix="." + payload["commit"]).as_default():
            tf.summary.scalar("step_ms/median", row["median_ms"], step=order)
            tf.summary.scalar("step_ms/p10", row["p10_ms"], step=order)
            tf.summary.scalar("step_ms/p90", row["p90_ms"], step=order)
            tf.summary.scalar("first_step_s", row["first_step_s"], step=order)
            tf.summary.scalar("ops_per_step", row["ops_per_step"], step=order)
            tf.summary.scalar("hlo_modules", row["hlo_modules"], step=order)
            tf.summary.text("commit", f"{payload['commit']} ({row.get('commit_date') or 'no date'})", step=order)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(row, f, indent=1, default=str)
    return row
