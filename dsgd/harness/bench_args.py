"""``dsgd bench``'s defaults and the checks of its values, beside the command (:mod:`dsgd.harness.bench`).

Two grids: the default run, sized to finish in about two minutes on an idle 2-core machine with
the kernels built, and ``--full``, the whole sweep.  Options given on the command line replace the
grid's values one by one (``--full --mesh 1`` is every workload and mode on one device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dsgd import argcheck
from dsgd.harness.bench_frame import COMPARE_COLUMNS
from dsgd.harness.grid import DEFAULT_MODELS, check_grid
from dsgd.meshspec import MeshSpec
from dsgd.names import AUTO, REFERENCE


@dataclass(frozen=True)
class Grid:
    """The workloads, meshes and modes a run sweeps where the options do not say."""

    workloads: tuple[str, ...]
    meshes: tuple[str, ...]
    modes: tuple[str, ...]
    models: tuple[str, ...] = DEFAULT_MODELS


HEADLINE_WORKLOADS = ("one-big", "bert-mini", "many-small")  # bandwidth-bound, a real model's mix, overhead-bound
#: the default run: each mode users train in (eagerly, in a tf.function, under model.fit) on the headline
#: workloads and the 8-device two-axis mesh
DEFAULT_GRID = Grid(HEADLINE_WORKLOADS, ("batch=2,model=4",), ("eager", "graph", "fit"))
#: ``--full``: the same modes on 1 device, 8 devices on one axis and 8 on two
FULL_GRID = Grid(HEADLINE_WORKLOADS, ("1", "batch=8", "batch=2,model=4"), ("eager", "graph", "fit"))
DEFAULT_IMPLEMENTATIONS = (AUTO, REFERENCE)
# the default grid's values under the names the help and older callers use
DEFAULT_WORKLOADS, DEFAULT_MESHES, DEFAULT_MODES = DEFAULT_GRID.workloads, DEFAULT_GRID.meshes, DEFAULT_GRID.modes


def grid_for(args) -> Grid:
    """The grid ``args`` leaves to the defaults: :data:`FULL_GRID` with ``--full``, else :data:`DEFAULT_GRID`."""
    return FULL_GRID if getattr(args, "full", False) else DEFAULT_GRID


def default_meshes(grid: Grid, cluster_devices: Optional[int] = None) -> list[str]:
    """The grid's meshes; for a multi-client run of ``cluster_devices`` devices, those that use them
    all (a mesh must span every client), else one ``batch`` axis over all of them."""
    if cluster_devices is None:
        return list(grid.meshes)
    return [m for m in grid.meshes if MeshSpec.of(m).size == cluster_devices] or [f"batch={cluster_devices}"]


def check_bench(args, devices: Optional[argcheck.Devices] = None) -> None:
    """``dsgd bench``'s values; raises :class:`dsgd.argcheck.UsageError`.  ``devices``: the cluster's
    when run as (or for) multi-client clients; else this process's cluster, if it is a client, or
    the worker's ``--devices``."""
    devices = devices or argcheck.multiclient_devices() or argcheck.worker_devices(args.devices)
    grid = grid_for(args)
    meshes = args.mesh or default_meshes(grid, devices.count if devices.exact else None)
    check_grid(args, workloads=grid.workloads, meshes=meshes, implementations=DEFAULT_IMPLEMENTATIONS,
               modes=grid.modes, devices=devices)
    argcheck.check_output_file(args.output, "--output")
    argcheck.check_plot_file(args.plot)
    for f in args.compare or ():
        check_compare_file(f)


def check_compare_file(path: str) -> None:
    """A ``--compare`` CSV: readable, with the columns it is merged on (:data:`COMPARE_COLUMNS`)."""
    argcheck.check_input_file(path, "--compare")
    import pandas as pd

    try:
        cols = pd.read_csv(path, nrows=1).columns
    except (OSError, ValueError) as e:
        raise argcheck.UsageError(f"--compare {path!r} is not a readable CSV ({e}); give a file written with "
                                  "--format csv") from None
    missing = [c for c in COMPARE_COLUMNS if c not in cols]
    if missing:
        raise argcheck.UsageError(f"--compare {path!r} lacks columns {argcheck.listed(missing)}; give a file written "
                                  "with --format csv (e.g. by scripts/bench_jax.py)")
