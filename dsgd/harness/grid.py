"""The case grid: the command-line options that name what to measure, and their product.

``dsgd bench`` and ``dsgd profile`` sweep the same grid (workload x mesh x layout x dtype x
options x XLA x implementation), so they take its options from here: the names in the help
come from the registries (workloads, implementations, option presets, dtypes, layout
policies), and a value outside them is refused by :func:`check_grid` before anything runs.
"""
from __future__ import annotations

import itertools
from typing import Sequence

from dsgd import argcheck, meshspec
from dsgd.harness.measure import Case
from dsgd.names import (DTYPE_BYTES, FLOOR_MODES, IMPLEMENTATIONS, MODEL_MODES, MODES, NO_UPDATE, OPTION_PRESETS,
                        REFERENCE)
from dsgd.workloads import LAYOUT_POLICIES, WORKLOADS

DEFAULT_MODELS = ("resmlp",)  # the train_step and fit modes' models (dsgd.harness.models)
XLA_CHOICES = {"on": [True], "off": [False], "both": [False, True]}


def add_grid_arguments(p, *, workloads: Sequence[str], meshes: Sequence[str], implementations: Sequence[str],
                       xla: str) -> None:
    """Add ``--workload --mesh --layout --dtype --implementation --options --xla --devices --device``
    to parser ``p``, with these defaults shown in the help."""
    p.add_argument("--workload", action="append", metavar="NAME|FILE",
                   help=f"the variables to update: {', '.join(WORKLOADS)}, or a JSON list of "
                        "{\"name\", \"shape\", \"dtype\"} (repeatable; default: " f"{' '.join(workloads)})")
    p.add_argument("--mesh", action="append", metavar="SPEC",
                   help="a DTensor mesh as NAME=SIZE,...: 1, batch=8, batch=2,model=4; needs at most --devices "
                        f"devices (repeatable; default: {' '.join(meshes)}; multi-client: the ones "
                        "that use every client's devices)")
    p.add_argument("--layout", action="append", metavar="POLICY|FILE",
                   help=f"how variables are laid out on the mesh: {' | '.join(LAYOUT_POLICIES)} (sharded: each "
                        "variable's largest dimension that divides by the last mesh axis), or a layout-map JSON "
                        "{\"regex\": \"model,unsharded\", ...}, keys matched as tf_keras' LayoutMap does "
                        "(re.match) (repeatable; default: sharded)")
    p.add_argument("--dtype", action="append", choices=list(DTYPE_BYTES),
                   help="dtype of variables and gradients (repeatable; default: float32)")
    p.add_argument("--implementation", action="append", metavar="NAME",
                   help=f"how dsgd runs the step: {', '.join(IMPLEMENTATIONS)} -- or {REFERENCE}, tf_keras' "
                        "DTensor SGD, the baseline of the speed-up "
                        f"(repeatable; default: {' '.join(implementations)})")
    p.add_argument("--options", action="append", choices=sorted(OPTION_PRESETS),
                   help="optimizer options: momentum (lr 0.01, momentum 0.9), sgd (no momentum), full (momentum + "
                        "weight_decay 1e-4 + global_clipnorm 1.0 + EMA) (repeatable; default: momentum; "
                        "dsgd.names.OPTION_PRESETS)")
    p.add_argument("--xla", choices=list(XLA_CHOICES), default=xla,
                   help="jit_compile=True for both optimizers: on, off, or both as separate rows; dsgd's auto then "
                        f"runs its xla implementation, tf_keras on CPU ignores it (default: {xla})")
    p.add_argument("--devices", type=int, default=8, metavar="N",
                   help="logical CPU devices a worker splits the CPU into; every --mesh must fit (default: 8)")
    p.add_argument("--device", default="CPU", choices=["CPU", "GPU"],
                   help="where the mesh lives: CPU (logical devices) or GPU (the visible GPUs) (default: CPU)")


def parse_xla(value: str) -> list[bool]:
    """``--xla on|off|both`` -> the jit_compile values to sweep."""
    return XLA_CHOICES[value]


def make_cases(workloads: Sequence[str], meshes: Sequence[str], layouts: Sequence[str], dtypes: Sequence[str],
               implementations: Sequence[str], xla: Sequence[bool], options: Sequence[str],
               device: str = "CPU", modes: Sequence[str] = ("eager",),
               models: Sequence[str] = DEFAULT_MODELS) -> list[Case]:
    """The grid.  ``eager``/``graph`` modes run the workloads; ``train_step``/``fit`` run the
    models (:mod:`dsgd.harness.models`).  The ``graph``, ``train_step`` and ``fit`` modes each get a
    :data:`NO_UPDATE` row beside the implementations: the same function with nothing applied (in
    ``graph`` it takes the same gradients and variables), the floor of the optimizer's share."""
    cases = []
    for mode in modes:
        names, impls = workloads, list(implementations)
        if mode in MODEL_MODES:
            names = models
        if mode in FLOOR_MODES:
            impls = impls + ([NO_UPDATE] if NO_UPDATE not in impls else [])
        for w, m, l, d, o, x, i in itertools.product(names, meshes, layouts, dtypes, options, xla, impls):
            cases.append(Case(workload=w, mesh=m, layout=l, dtype=d, implementation=i, xla=x, options=o,
                              device=device, mode=mode))
    return cases


def cases_from_args(args, *, workloads: Sequence[str], meshes: Sequence[str], implementations: Sequence[str],
                    modes: Sequence[str] = ("eager",), models: Sequence[str] = DEFAULT_MODELS) -> list[Case]:
    """The grid the options of :func:`add_grid_arguments` ask for (the given defaults where absent)."""
    return make_cases(args.workload or workloads, args.mesh or meshes, args.layout or ["sharded"],
                      args.dtype or ["float32"], args.implementation or implementations, parse_xla(args.xla),
                      args.options or ["momentum"], device=args.device, modes=modes, models=models)


# ------------------------------------------------------------------------------- checking the options
def check_grid(args, *, workloads: Sequence[str], meshes: Sequence[str], implementations: Sequence[str],
               modes: Sequence[str], devices: argcheck.Devices) -> None:
    """The values of :func:`add_grid_arguments`' options and of ``--mode``/``--model`` where the
    command has them, the given defaults where absent; raises :class:`dsgd.argcheck.UsageError`.

    The workloads (and layouts against them) are checked where an ``eager``/``graph`` mode is asked,
    the models where a ``train_step``/``fit`` mode is (:func:`check_models`); a named workload or model
    that is given is checked whatever the modes.
    """
    argcheck.check_counts(args)
    modes = getattr(args, "mode", None) or modes
    for m in modes:
        argcheck.check_choice(m, MODES, "--mode")
    step_modes = [m for m in modes if m not in MODEL_MODES]
    given = args.workload or []
    argcheck.check_sweep(workloads=(given or workloads) if step_modes else given, meshes=args.mesh or meshes,
                         layouts=(args.layout or ["sharded"]) if step_modes else [],
                         implementations=args.implementation or implementations, devices=devices)
    check_models(args, modes, args.mesh or meshes)


def check_models(args, modes: Sequence[str], meshes: Sequence[str] = ()) -> None:
    """``--model`` names (the train_step/fit modes' models: a named one, or a user's ``module:function``),
    and layouts those of ``modes`` can give them: a policy, or a layout-map ``.json`` file whose axes are
    those of every mesh in ``meshes``."""
    from dsgd import layoutmap
    from dsgd.harness import models

    names = getattr(args, "model", None) or ()
    for m in names:
        if m not in models.MODELS and not models.is_user_model(m):
            raise argcheck.UsageError(f"--model {m!r} is not a model of the train_step/fit modes; choose one of "
                                      f"{argcheck.listed(sorted(models.MODELS))}, or give module:function")
        if models.is_user_model(m):
            argcheck.check_function(m, "--model")
    whole = [m for m in modes if m in MODEL_MODES]
    if not whole:
        return
    for lay in args.layout or ["sharded"]:
        if lay in models.LAYOUT_POLICIES:
            if lay == "sharded" and any(models.is_user_model(m) for m in names):
                raise argcheck.UsageError(
                    "--layout sharded: a module:function model has no sharding rules of its own; give --layout FILE "
                    "(a layout map, e.g. written by dsgd layouts --emit-layout-map) or --layout replicated")
            continue
        if not lay.endswith(".json"):
            raise argcheck.UsageError(
                f"--layout {lay!r}: mode {'/'.join(whole)} lays its model out by a policy "
                f"({argcheck.listed(models.LAYOUT_POLICIES)}) or a layout-map .json file")
        try:
            specs = layoutmap.read(lay)
        except ValueError as e:
            raise argcheck.UsageError(f"--layout {lay!r}: {e}") from None
        for mesh in meshes:
            axes = set(meshspec.MeshSpec.of(mesh).names)
            for key, spec in specs.items():
                odd = [a for a in spec.split(",") if a.strip() not in axes | {meshspec.UNSHARDED}]
                if odd:
                    raise argcheck.UsageError(
                        f"--layout {lay!r}: {key!r} -> {spec!r} names axis {odd[0].strip()!r}, which mesh {mesh!r} "
                        f"does not have (axes {argcheck.listed(sorted(axes))}, or unsharded)")