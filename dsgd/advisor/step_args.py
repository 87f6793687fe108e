"""Argument checks of ``dsgd layouts`` for the whole step (``--scope whole``), before any worker starts.

Each bad value raises :class:`dsgd.argcheck.UsageError` (exit status 2) naming the argument and what is
allowed.  No TensorFlow: the checks run in well under a second.  (The optimizer scope's checks are
``check_layouts``, kept beside the command's other argument checks.)
"""
from __future__ import annotations

import os
from typing import Optional

from dsgd import argcheck, layoutmap, meshspec
from dsgd.advisor import plans
from dsgd.argcheck import UsageError

SCOPES = ("whole", "optimizer")


def is_model_function(spec: Optional[str]) -> bool:
    """``module:function`` or ``path/file.py:function`` (not a named workload or a JSON variable list)."""
    if not spec or spec.endswith(".json") or os.path.isfile(spec):
        return False
    mod, sep, fn = spec.rpartition(":")
    return bool(sep and mod and fn)


def resolve_scope(args) -> str:
    """``--scope``, defaulting to ``whole`` for a ``module:function`` model and ``optimizer`` for a variable
    list (a named workload or a JSON file has no model to run)."""
    if getattr(args, "scope", None):
        return args.scope
    return "whole" if is_model_function(getattr(args, "model", None)) else "optimizer"


def check_step_mesh(spec: str, flag: str, devices: Optional[int]) -> None:
    """A mesh over the axes ``batch`` and ``model`` (and, for ``--mesh``, at most ``devices`` devices)."""
    try:
        dims = meshspec.parse_mesh_spec(spec)
    except meshspec.SpecError as e:
        raise UsageError(f"{flag} {spec!r}: {e}") from None
    bad = [a for a, _ in dims if a not in ("batch", "model")]
    if bad:
        raise UsageError(f"{flag} {spec!r}: axis {bad[0]!r} is not one the whole-step advisor lays out; name the axes "
                         "'batch' (the data) and 'model' (tensor parallel), e.g. batch=2,model=4")
    n = meshspec.mesh_size(dims)
    if devices is not None and n > devices:
        raise UsageError(f"{flag} {spec!r} needs {n} devices, but --devices is {devices}; give a smaller mesh or "
                         f"--devices {n}")


#: options of the optimizer scope alone: (attribute, its default, the flag), refused with --scope whole
OPTIMIZER_ONLY = (("no_reference", False, "--no-reference"), ("top", None, "--top"), ("steps", 8, "--steps"),
                  ("max_plans", 8, "--max-plans"), ("min_shard_bytes", plans.DEFAULT_MIN_SHARD_BYTES,
                                                    "--min-shard-bytes"),
                  ("coverage", plans.DEFAULT_COVERAGE, "--coverage"), ("allow_fsdp", False, "--allow-fsdp"),
                  ("data_axis", None, "--data-axis"), ("calibration_meshes", "1", "--calibration-meshes"),
                  ("calibration", None, "--calibration"), ("devices_per_host", None, "--devices-per-host"))


def check_step(args) -> None:
    """Every value ``dsgd layouts --scope whole`` uses (and none it would ignore)."""
    for attr, default, flag in OPTIMIZER_ONLY:
        if getattr(args, attr, default) != default:
            raise UsageError(f"{flag} applies to --scope optimizer only; the whole step (--model module:function) "
                             "does not use it (see dsgd layouts --help: the options marked 'whole')")
    from dsgd.harness.model_data import LOSSES
    from dsgd.names import OPTION_PRESETS

    if not args.model:
        raise UsageError("--model is missing; give module:function returning a tf_keras model (e.g. "
                         "examples.models:convnet), a named workload or a JSON variable list (--scope optimizer)")
    if not is_model_function(args.model):
        raise UsageError(f"--scope whole needs --model module:function (a function returning a tf_keras model), "
                         f"got {args.model!r}, a variable list: give --scope optimizer for it")
    argcheck.check_function(args.model, "--model")
    argcheck.check_int(args.devices, "--devices")
    for flag in ("batch_size", "memory_budget", "target_batch_size", "rounds"):
        argcheck.check_int(getattr(args, flag, None), "--" + flag.replace("_", "-"))
    if args.options not in OPTION_PRESETS:
        raise UsageError(f"--options {args.options!r} is not one of: {', '.join(sorted(OPTION_PRESETS))}")
    argcheck.check_implementation(args.implementation)
    if args.loss is not None and args.loss not in LOSSES:
        raise UsageError(f"--loss {args.loss!r} is not one of: {', '.join(sorted(LOSSES))}; give one of those (or "
                         "leave it out: logits of a classifier or mean squared error, from the model's output)")
    if args.data:
        argcheck.check_function(args.data, "--data")
    from dsgd.advisor.step_plans import RULES

    rules = [r.strip() for r in (args.rules or "").split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if not rules or bad:
        raise UsageError(f"--rules {args.rules!r}: {'unknown rule ' + repr(bad[0]) if bad else 'no rule'}; give a "
                         f"comma-separated list of {', '.join(RULES)}")
    for m in (args.mesh or "").split(";"):
        if m.strip():
            check_step_mesh(m.strip(), "--mesh", args.devices)
    if args.target_mesh and not (args.target_mesh.strip().isdigit() and int(args.target_mesh) > 1):
        check_step_mesh(args.target_mesh, "--target-mesh", None)  # (a device count: every factoring of it)
    if args.hardware:
        from dsgd.advisor.step_model import HARDWARE_DIR

        shipped = sorted(p.stem for p in HARDWARE_DIR.glob("*.json"))
        if not os.path.isfile(args.hardware) and args.hardware not in shipped:
            raise UsageError(f"--hardware {args.hardware!r} is neither a file nor one of the shipped descriptions "
                             f"({', '.join(shipped)}); give one of those or a JSON file like them")
        if not args.target_mesh:
            raise UsageError("--hardware describes the target of --target-mesh; give --target-mesh too")
    for f in args.force or ():
        try:
            layoutmap.parse_force(f)
        except ValueError as e:
            raise UsageError(str(e)) from None
    argcheck.check_output_file(args.emit_layout_map, "--emit-layout-map")
    argcheck.check_output_file(getattr(args, "save_hardware", None), "--save-hardware")
    argcheck.check_plot_file(args.plot)


__all__ = ["check_step", "resolve_scope", "is_model_function", "check_step_mesh", "SCOPES"]
