"""``dsgd bench``: time one optimizer step across workloads, meshes, layouts, dtypes,
implementations, XLA on/off and modes (eager, in a tf.function, a whole training step), side by
side with tf_keras' reference, in one run.

Cases run in a worker process (:mod:`dsgd.harness.isolate`) with the requested logical devices;
the numbers come from :mod:`dsgd.harness.measure`; the table is rendered from a pandas frame.

This module is the command (its options and ``main``): :mod:`~dsgd.harness.bench_args` holds its
defaults (the default grid and ``--full``) and checks its values, :mod:`~dsgd.harness.bench_run`
runs the cases, :mod:`~dsgd.harness.bench_frame` derives the speed-ups and the compact view,
:mod:`~dsgd.harness.bench_render` writes the table, CSV/JSON and the chart.
"""
from __future__ import annotations

import time

from dsgd import multiclient
from dsgd.harness.bench_args import (DEFAULT_GRID, DEFAULT_IMPLEMENTATIONS, DEFAULT_MESHES, DEFAULT_MODES,
                                     DEFAULT_WORKLOADS, FULL_GRID, check_bench, default_meshes, grid_for)
from dsgd.harness.bench_frame import merge_external
from dsgd.harness.bench_render import FORMATS, plot, render
from dsgd.harness.bench_run import run
from dsgd.harness.grid import DEFAULT_MODELS, add_grid_arguments, cases_from_args
from dsgd.names import MODES

def main(args) -> int:
    """``dsgd bench``: check every value, run the sweep, print the table (and write what was asked)."""
    check_bench(args)  # before any worker starts or any file is written
    grid = grid_for(args)
    client = multiclient.config_from_env() if multiclient.is_client() else None
    # multi-client: the default meshes that span all clients' devices
    meshes = args.mesh or default_meshes(grid, client.global_devices if client else None)
    lead = client is None or client.client_id == 0  # only client 0 reports
    cases = cases_from_args(args, workloads=grid.workloads, meshes=meshes, implementations=DEFAULT_IMPLEMENTATIONS,
                            modes=args.mode or grid.modes, models=args.model or grid.models)
    t0 = time.perf_counter()
    df = run(cases, steps=args.steps, devices=args.devices, isolate=not args.no_isolate,
             progress=not args.quiet and lead, paired=not args.sequential)
    run_s = time.perf_counter() - t0
    if args.compare:
        df = merge_external(df, args.compare)
    code = 0 if (df["status"] == "ok").all() else 3
    if not lead:
        return code
    out = render(df, args.format, run_s=run_s)
    if args.output:
        with open(args.output, "w") as f:
            f.write(out if args.format in ("csv", "json") else render(df, "csv"))
    print(out)
    if args.plot:
        plot(df, args.plot)
        print(f"\nplot written to {args.plot}")
    return code


def add_arguments(p) -> None:
    """``dsgd bench``'s options; ``--help`` shows each one's default and meaning."""
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Time one optimizer step (apply_gradients of random gradients to every variable of a workload) with dsgd and\n"
        "with tf_keras' DTensor SGD (the reference, run in a tf.function), for every combination of the values\n"
        "given, in a worker process with --devices logical CPU devices. The implementations of one configuration\n"
        "are measured side by side (their steps interleaved), so the speed-up holds on a busy machine.")
    p.epilog = (
        "output (--format table): one row per configuration: dsgd's and tf_keras' median step ms, the speed-up\n"
        "(tf_keras ms / dsgd ms), in the modes with a floor the floor and the optimizer's share speed-up, the\n"
        "fraction of the memory roofline each reaches, and the first step's time (trace + compile + step) as\n"
        "width allows; values that are the same on every row are printed once above the table; then one\n"
        "verdict line per dsgd implementation, and what each column means.\n\n"
        "examples:\n"
        f"  dsgd bench                # {len(DEFAULT_GRID.workloads)} workloads on {', '.join(DEFAULT_GRID.meshes)}, "
        f"modes {', '.join(DEFAULT_GRID.modes)} (~2 min)\n"
        f"  dsgd bench --full         # the same on meshes {' '.join(FULL_GRID.meshes)} (~4-10 min)\n"
        "  dsgd bench --workload bert-mini --mesh batch=2,model=4 --options full --steps 20\n"
        "  dsgd bench --implementation auto --implementation fused --implementation reference --xla both\n"
        "  dsgd bench --format csv -o results.csv --quiet\n\n"
        "exit status: 0 all measured; 2 a bad value (nothing run); 3 a case failed (the others are reported)")
    add_grid_arguments(p, workloads=DEFAULT_WORKLOADS, meshes=DEFAULT_MESHES,
                       implementations=DEFAULT_IMPLEMENTATIONS, xla="off")
    p.add_argument("--full", action="store_true",
                   help=f"the whole grid where options do not say: meshes {' '.join(FULL_GRID.meshes)} (default: "
                        f"{' '.join(DEFAULT_GRID.meshes)}, a run of about two minutes)")
    p.add_argument("--mode", action="append", choices=list(MODES),
                   help=f"where the step runs (repeatable; default: {', '.join(DEFAULT_MODES)}): eager = "
                        "apply_gradients called eagerly (tf_keras' reference in a tf.function, its faster mode); "
                        "graph = apply_gradients inside a tf.function for both; train_step = a whole custom "
                        "tf.function training step of --model; fit = one model.fit step of --model (graph, "
                        "train_step and fit with a no-update floor row: the same step with an optimizer that hands "
                        "every gradient, in its variable's layout, to one stateful no-op)")
    p.add_argument("--model", action="append",
                   help=f"model of the train_step and fit modes (repeatable; default {DEFAULT_MODELS[0]}: a residual "
                        "MLP, 8.7M parameters, global batch 16; resmlp-small: a tiny one)")
    p.add_argument("--steps", type=int, default=10, metavar="N",
                   help="timed steps per case, after one untimed warm-up step; more steadies the median "
                        "(default: 10)")
    p.add_argument("--format", choices=list(FORMATS), default="table",
                   help="table: compact, fits 120 columns, with the verdict; wide: every measured column; csv, "
                        "json: every field of every row (default: table)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="also write the results here (csv for table/wide, else the --format) (default: none)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw a bar chart of step times with the roofline (default: none)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run the cases in this process instead of a worker (it must have the devices already)")
    p.add_argument("--sequential", action="store_true",
                   help="measure each case on its own (default: the implementations of one configuration "
                        "side by side, their steps interleaved; needs all of them in memory at once)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compare", action="append", metavar="CSV",
                   help="merge rows measured elsewhere (same columns), e.g. `python scripts/bench_jax.py "
                        "--format csv -o jax.csv` (repeatable; default: none)")
