"""``dsgd layouts``: which mesh and layouts to give a model, measured here and predicted at scale.

**The whole training step** (``--scope whole``, the default for ``--model module:function``): the
function's tf_keras model is built under each candidate plan's ``LayoutMap`` -- every mesh that factors
``--devices`` into ``batch`` x ``model``, with data-parallel, tensor-parallel and hybrid layouts -- and its
whole ``model.fit`` step is measured here, with the floor and the collectives DTensor ran, predicted from
its parts, ranked and emitted: :func:`dsgd.advisor.step_advice.advise_step`.

**The optimizer step** (``--scope optimizer``, the default for a named workload or a JSON variable
list, which have no model to run) -- for a model and one mesh:

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

This module is the command (its options and ``main``); each job has its own module:
:mod:`~dsgd.advisor.read_model` (the model's variables), :mod:`~dsgd.advisor.measure_plans`
(measuring plans in workers), :mod:`~dsgd.advisor.ranking` (ranking, with reasons),
:mod:`~dsgd.advisor.advice` (:func:`~dsgd.advisor.advice.advise`, the whole advisor as a call),
:mod:`~dsgd.advisor.report` (table, JSON, CSV), :mod:`~dsgd.advisor.plot`,
:mod:`~dsgd.advisor.measurements` (saved measurement files) and :mod:`~dsgd.advisor.validation`.
"""
from __future__ import annotations

import sys

from dsgd import layoutmap
from dsgd.advisor import plans as plans_mod
from dsgd.advisor.advice import advise
from dsgd.advisor.plot import plot
from dsgd.advisor.report import render
from dsgd.advisor.step_measure import ROUNDS as STEP_ROUNDS
from dsgd.advisor.step_plans import DEFAULT_RULES, RULES
from dsgd.advisor.validation import run_validation
from dsgd.harness.measure import OPTION_PRESETS
from dsgd.workloads import WORKLOADS


DEFAULT_OPTIMIZER_MESH = "batch=2,model=4"


def add_arguments(p) -> None:
    p.add_argument("--model", help="module:function returning a tf_keras model (the whole step), or a named workload ("
                   + ", ".join(sorted(WORKLOADS)) + ") or a JSON variable list ([{name, shape, dtype}]) (the optimizer)")
    p.add_argument("--scope", choices=["whole", "optimizer"],
                   help="advise on the whole model.fit step (default for module:function) or the optimizer step "
                        "alone (default for a variable list)")
    p.add_argument("--mesh", help="whole: more meshes to consider besides those that factor --devices "
                   "(';'-separated, axes batch and model); optimizer: the local mesh (default batch=2,model=4)")
    p.add_argument("--target-mesh", help="a mesh to predict for, e.g. batch=16,model=64 (whole: or a device count, "
                   "e.g. 64: every batch x model mesh of it)")
    p.add_argument("--batch-size", type=int,
                   help="whole: the global batch (default: the model's Input batch size, else 16)")
    p.add_argument("--target-batch-size", type=int,
                   help="whole: the global batch on --target-mesh (default: --batch-size times the device ratio)")
    p.add_argument("--loss", help="whole: the loss (default: sparse categorical cross-entropy of logits for a "
                   "classifier's output, else mse)")
    p.add_argument("--data", help="whole: module:function returning a tf.data.Dataset of unbatched (x, y) examples "
                   "(default: random inputs from the model's input specs)")
    p.add_argument("--hardware", help="whole: the target's description for --target-mesh: a JSON file or a shipped "
                   "name (this-host, nvidia-h100-sxm; default: this host's rates, measured)")
    p.add_argument("--rounds", type=int,
                   help=f"whole: interleaved timing rounds, over every plan of every mesh (default {STEP_ROUNDS})")
    p.add_argument("--save-hardware", metavar="FILE",
                   help="whole: write this host's measured rates as a hardware file (for --hardware)")
    p.add_argument("--rules", default=",".join(DEFAULT_RULES),
                   help=f"whole: the plan rules to build, comma-separated, of {', '.join(RULES)} (default "
                        f"{','.join(DEFAULT_RULES)})")
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
                        "median pass (a shared machine's readings stray both ways; the output's 'pass to pass' "
                        "line says by how much; default 1)")
    p.add_argument("--statistic", choices=["median", "p25", "min"], default="median",
                   help="which per-step statistic the cost model is fitted to and validated on (default median; "
                        "min or p25 are steadier on a shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_optimizer_args(args) -> None:
    """The optimizer scope's checks (``check_layouts``, in the command's argument-check module)."""
    try:
        from dsgd.advisor import layouts_args

        check = layouts_args.check_layouts
    except (ImportError, AttributeError):
        from dsgd import argcheck

        check = getattr(argcheck, "check_layouts", None)
    if check is not None:
        check(args)


def main(args) -> int:
    from dsgd.advisor.step_args import check_step, resolve_scope

    scope = "optimizer" if args.validate else resolve_scope(args)
    if scope == "whole":
        check_step(args)  # before any worker starts or anything is written
        return main_whole(args)
    if args.mesh is None:
        args.mesh = DEFAULT_OPTIMIZER_MESH
    _check_optimizer_args(args)  # before any worker starts or anything is written
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


def main_whole(args) -> int:
    """``dsgd layouts --scope whole``: :func:`dsgd.advisor.step_advice.advise_step`, printed."""
    from dsgd.advisor import step_report
    from dsgd.advisor.step_advice import advise_step
    from dsgd.advisor.step_measure import ROUNDS

    meshes = [m.strip() for m in (args.mesh or "").split(";") if m.strip()]
    advice = advise_step(args.model, devices=args.devices, meshes=meshes, batch_size=args.batch_size,
                         loss=args.loss, data=args.data, options=args.options, implementation=args.implementation,
                         force=args.force, memory_budget=args.memory_budget, target_mesh=args.target_mesh,
                         target_batch=args.target_batch_size, hardware=args.hardware,
                         rounds=args.rounds or ROUNDS, progress=not args.quiet,
                         rules=[r.strip() for r in args.rules.split(",") if r.strip()], statistic=args.statistic)
    print(step_report.render(advice, args.format))
    out = sys.stdout if args.format == "table" else sys.stderr
    if args.emit_layout_map:
        where = "target" if advice.target is not None else "local"
        try:
            doc = step_report.write_layout_map(advice, args.emit_layout_map, where=where)
        except ValueError as e:
            print(str(e), file=sys.stderr)
            return 3
        msg = (f"\nlayout map of {doc['plan']!r} ({doc['mesh']}) written to {args.emit_layout_map}; build the model "
               f"under dsgd.layoutmap.load_layout_map({args.emit_layout_map!r}, mesh).scope()")
        print("\n".join(step_report.wrap_lines([msg])), file=out)
    if args.save_hardware:
        import json

        from dsgd.advisor.step_advice import host_hardware_doc

        doc = host_hardware_doc(advice, "dsgd layouts " + " ".join(sys.argv[2:]))
        with open(args.save_hardware, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"this host's rates written to {args.save_hardware}", file=out)
    if args.plot:
        from dsgd.advisor.step_plot import plot as plot_step

        plot_step(advice, args.plot)
        print(f"plot written to {args.plot}", file=out)
    return 0 if (advice.table["status"] == "ok").all() else 3
