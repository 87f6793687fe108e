"""``dsgd layouts``' checks of its values, beside the command (:mod:`dsgd.advisor.layouts`)."""
from __future__ import annotations

import os

from dsgd import argcheck, layoutmap
from dsgd.argcheck import UsageError, listed
from dsgd.workloads import WORKLOADS


def check_model(spec: str, flag: str = "--model") -> None:
    """A named workload, a JSON variable list, or ``module:function`` / ``file.py:function``."""
    if spec in WORKLOADS or spec.endswith(".json") or os.path.isfile(spec):
        argcheck.check_workload(spec, flag)
        return
    if ":" not in spec:
        raise UsageError(f"{flag} {spec!r} is not a named workload ({listed(sorted(WORKLOADS))}), not an existing "
                         "JSON file, and not module:function; give one of those")
    argcheck.check_function(spec, flag)


def check_force(value: str) -> None:
    """A ``--force REGEX=LAYOUT`` item whose regex compiles."""
    try:
        layoutmap.parse_force(value)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_layouts(args) -> None:
    """``dsgd layouts``' values; raises :class:`dsgd.argcheck.UsageError`."""
    for flag in ("--devices", "--steps", "--top", "--max-plans", "--devices-per-host", "--memory-budget"):
        argcheck.check_int(getattr(args, flag[2:].replace("-", "_")), flag)
    argcheck.check_int(args.min_shard_bytes, "--min-shard-bytes", 0)
    if not 0 < args.coverage <= 1:
        raise UsageError(f"--coverage {args.coverage} must be in (0, 1]; give e.g. 0.9")
    argcheck.check_implementation(args.implementation)
    devices = argcheck.worker_devices(args.devices)
    if args.validate:
        for w in args.validate_workloads or ():
            argcheck.check_choice(w, sorted(WORKLOADS), "--validate-workloads")
        for path in args.from_measurements or ():  # repeatable: several saved grids re-fit together
            argcheck.check_input_file(path, "--from-measurements")
        argcheck.check_output_file(args.save_measurements, "--save-measurements")
        if not args.from_measurements and args.devices < 8:
            raise UsageError(f"--validate measures the 8-device meshes but --devices is {args.devices}; "
                             "give --devices 8 (or --from-measurements FILE)")
        return
    if not args.model:
        raise UsageError("--model is missing; give a named workload (" + listed(sorted(WORKLOADS)) + "), a JSON "
                         "variable list or module:function (or use --validate)")
    check_model(args.model)
    if args.mesh is not None:
        argcheck.check_mesh(args.mesh, devices)
    if args.target_mesh:
        argcheck.check_mesh(args.target_mesh, argcheck.Devices(1 << 62, False, ""), "--target-mesh")
    for m in (args.calibration_meshes or "").split(";"):
        if m.strip():
            argcheck.check_mesh(m, devices, "--calibration-meshes")
    for f in args.force or ():
        check_force(f)
    argcheck.check_input_file(args.calibration, "--calibration")
    argcheck.check_output_file(args.emit_layout_map, "--emit-layout-map")
    argcheck.check_plot_file(args.plot)


def check_command(args) -> None:
    """``dsgd layouts``' values as its ``main`` checks them: the whole-step scope's
    (:func:`dsgd.advisor.step_args.check_step`) or the optimizer scope's (:func:`check_layouts`; a
    ``--mesh`` left out takes the command's default, which needs no check)."""
    from dsgd.advisor.step_args import check_step, resolve_scope

    if not args.validate and resolve_scope(args) == "whole":
        check_step(args)
    else:
        check_layouts(args)
