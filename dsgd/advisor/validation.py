"""``dsgd layouts --validate``: the cost model fitted on the 1-, 2- and 4-device meshes and checked
against the 8-device ones, measured here or read from saved measurements (any dsgd version)."""
from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from dsgd import meshspec
from dsgd.advisor import costmodel
from dsgd.advisor.measure_plans import Job, run_jobs
from dsgd.advisor.measurements import (combine_repeats, jsonable, load_measurements, pass_noise, records,
                                        refresh_features)
from dsgd.advisor.read_model import load_model
from dsgd.harness.measure import REFERENCE


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


def render_validation(per_row, summary, model, statistic: str = "median", noise: Optional[dict] = None) -> str:
    lines = ["cost-model validation: fitted on the 1-, 2- and 4-device meshes, predicting the 8-device meshes",
             f"(step time: {statistic} of the timed steps; bytes: predicted vs counted on the devices)", ""]
    if summary.empty:
        return "\n".join(lines + ["no successful measurements"])
    lines.append(summary.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    lines.append("noise_pct: mean distance of a measurement from the median of the same work measured on the other "
                 "8-device meshes, which are measured minutes apart (the noise floor); vs_consensus_pct: the "
                 "prediction's error against that median")
    if noise:
        lines.append(
            f"pass to pass ({noise['passes']} passes per job): the jobs of a workload measured together on one mesh "
            f"moved together by {noise['block_pct']:.0f}% (SD) and against each other by {noise['within_pct']:.0f}%; a job's "
            f"median pass lies about {noise['target_pct']:.0f}% (SD) from its long-run value, so the 8-device errors "
            "above carry that much noise (--repeats N: it falls as 1/sqrt(N))")
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
        sources = [refresh_features(load_measurements(path)) for path in args.from_measurements]
        rows = [r for src in sources for r in src]
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
                sink.write(json.dumps(jsonable(row), default=str) + "\n")
                sink.flush()

        rows = []
        try:
            for k in range(args.repeats):  # whole passes: a slow spell of the machine hits one pass of a job
                rows += run_jobs(jobs, devices=args.devices, steps=args.steps, progress=not args.quiet,
                                 desc=f"dsgd validate (pass {k + 1}/{args.repeats})", on_row=on_row, probe=True)
        finally:
            if sink:
                sink.close()
        sources = [rows]
    noise = pass_noise(sources, y)
    rows = combine_repeats(rows, y)
    per_row, summary, model = costmodel.validate(rows, y=y)
    if args.format == "json":
        print(json.dumps({"summary": records(summary), "cases": records(per_row),
                          "coefficients": records(model.coefficients_table()), "pass_noise": noise}, indent=1))
    elif args.format == "csv":
        print(per_row.to_csv(index=False))
    else:
        print(render_validation(per_row, summary, model, args.statistic, noise))
    failed = [r for r in rows if r.get("status") != "ok"]
    for r in failed:
        print(f"failed: {r['workload']} {r['mesh']} {r['plan']} {r['implementation']}: {str(r.get('error'))[:200]}",
              file=sys.stderr)
    return 0 if not failed else 3
