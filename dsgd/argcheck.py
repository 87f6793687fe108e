"""Checking command-line values before anything starts.

Every ``dsgd`` command validates all its values here first -- workloads, meshes against the
devices there will be, layouts against every workload and mesh, dtypes, implementations,
option presets, models and the paths it will write -- without TensorFlow (so in well under
a second) and before any worker process starts or any file is written.  A bad value raises
:class:`UsageError`: one line naming the value, the allowed ones and the fix, which the CLI
prints on stderr with exit status 2.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from dsgd import meshspec
from dsgd.layoutmap import layout_entries
from dsgd.workloads import LAYOUT_POLICIES, WORKLOADS, VarSpec, WorkloadError, get_workload

# dsgd's implementations by name, kept here so that checking a name does not import TensorFlow
# (``dsgd.impl``'s registry does); tests/test_argcheck.py checks it equals ``dsgd.impl.CHOICES``.
IMPLEMENTATIONS = ("auto", "ops", "fused", "per_shard", "grouped", "xla", "sharded_state")
REFERENCE = "reference"  # tf_keras' DTensor SGD (dsgd.harness.measure.REFERENCE)
DTYPES = ("float32", "bfloat16", "float16", "float64")
OPTION_PRESETS = ("momentum", "sgd", "full")  # dsgd.harness.measure.OPTION_PRESETS' keys (checked by the same test)


class UsageError(ValueError):
    """A command-line value that cannot work; the message is one line: the value, what is allowed, the fix."""


def _names(values: Iterable[str]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class Devices:
    """The devices meshes must fit: a worker's logical devices (a mesh may use fewer), or a
    multi-client cluster (a mesh must use exactly all of them)."""

    count: int
    exact: bool = False
    what: str = ""  # how the count came about, for messages: "--devices 8", "2 clients x 4 devices"


def worker_devices(n: int) -> Devices:
    return Devices(int(n), False, f"--devices {n}")


# ------------------------------------------------------------------------------- single values
def check_choice(value: str, allowed: Sequence[str], flag: str) -> str:
    if value not in allowed:
        raise UsageError(f"{flag} {value!r} is not one of: {_names(allowed)}; give one of those")
    return value


def check_int(value: Optional[int], flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value} is too small; give an integer >= {minimum}")


def check_workload(name: str, flag: str = "--workload") -> list[VarSpec]:
    """The variables of a named workload or a JSON workload file."""
    if name not in WORKLOADS and not (name.endswith(".json") or os.path.exists(name)):
        raise UsageError(f"{flag} {name!r} is neither a named workload ({_names(sorted(WORKLOADS))}) nor an existing "
                         "JSON file; give one of those names or a JSON list of {\"name\", \"shape\", \"dtype\"}")
    try:
        return get_workload(name)
    except WorkloadError as e:
        raise UsageError(f"{flag} {name!r}: {e}; fix the file or give one of {_names(sorted(WORKLOADS))}") from None


def check_mesh(spec: str, devices: Devices, flag: str = "--mesh") -> list[tuple[str, int]]:
    """Parse a mesh spec and check it fits ``devices``."""
    try:
        dims = meshspec.parse_mesh_spec(spec)
    except meshspec.SpecError as e:
        raise UsageError(f"{flag} {spec!r}: {str(e).split(': ', 1)[-1]}; give NAME=SIZE items, sizes >= 1, "
                         f"e.g. {flag} batch=2,model=4 (or 1 for one device)") from None
    need = meshspec.mesh_size(dims)
    if devices.exact and need != devices.count:
        raise UsageError(f"{flag} {spec!r} needs {need} devices, but this multi-client run has {devices.count} "
                         f"({devices.what}); a mesh must use all {devices.count} (e.g. --mesh batch={devices.count}), "
                         "or change --clients / --devices-per-client")
    if not devices.exact and need > devices.count:
        raise UsageError(f"{flag} {spec!r} needs {need} devices, but the worker has {devices.count} "
                         f"({devices.what}); give a mesh of at most {devices.count} devices or add --devices {need}")
    return dims


def check_layout(policy: str, workloads: dict[str, list[VarSpec]], meshes: Sequence[Sequence[tuple[str, int]]],
                 flag: str = "--layout") -> None:
    """``replicated``, ``sharded``, or a layout-map file that fits every workload on every mesh."""
    if policy in LAYOUT_POLICIES:
        return
    if not os.path.isfile(policy):
        raise UsageError(f"{flag} {policy!r} is neither one of {_names(LAYOUT_POLICIES)} nor an existing layout-map "
                         "file; give one of those or a JSON file {\"regex\": \"model,unsharded\", ...}")
    for wname, specs in workloads.items():
        for dims in meshes:
            sizes = dict(dims)
            mesh = meshspec.format_mesh_spec(dims)
            for s in specs:
                try:
                    entries = layout_entries(s, dims, policy)
                except WorkloadError as e:
                    raise UsageError(f"{flag} {policy}: {e}; fix the layout map") from None
                for d, axis in enumerate(entries):
                    if axis == meshspec.UNSHARDED:
                        continue
                    if axis not in sizes:
                        raise UsageError(
                            f"{flag} {policy}: variable {s.name!r} of {wname} gets {meshspec.layout_str(entries)!r}, but mesh "
                            f"{mesh!r} has no axis {axis!r} (axes: {_names(sizes)}); name only axes every --mesh has")
                    if s.shape[d] % sizes[axis]:
                        raise UsageError(
                            f"{flag} {policy}: variable {s.name!r} of {wname} (shape {list(s.shape)}) gets "
                            f"{meshspec.layout_str(entries)!r}, but its dimension {d} ({s.shape[d]}) does not divide by axis "
                            f"{axis!r} of size {sizes[axis]} on mesh {mesh!r}; shard another dimension or another mesh")


def check_implementation(name: str, flag: str = "--implementation", reference: bool = True) -> str:
    allowed = IMPLEMENTATIONS + ((REFERENCE,) if reference else ())
    return check_choice(name, allowed, flag)


# ------------------------------------------------------------------------------- paths
def _nearest_dir(path: Path) -> Path:
    p = path.resolve().parent
    while not p.exists():
        p = p.parent
    return p


def check_output_file(path: Optional[str], flag: str, *, create_dirs: bool = False) -> None:
    """A file this command will write: not a directory, in a writable directory (that exists,
    unless the command creates it: ``create_dirs``)."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path!r} is a directory; give a file name (e.g. {os.path.join(path, 'out')})")
    parent = p.resolve().parent
    if not parent.exists() and not create_dirs:
        raise UsageError(f"{flag} {path!r}: directory {str(parent)!r} does not exist; create it (mkdir -p) or "
                         "give another path")
    where = parent if parent.exists() else _nearest_dir(p)
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: cannot write in {str(where)!r}; give a path in a writable directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {path!r} is not writable; give another path")


def check_output_dir(path: Optional[str], flag: str) -> None:
    """A directory this command writes into (created with its parents when missing)."""
    if not path:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path!r} exists and is not a directory; give a directory")
    where = p if p.exists() else _nearest_dir(p / "x")
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: cannot write in {str(where)!r}; give a writable directory")


def check_plot_file(path: Optional[str], flag: str = "--plot") -> None:
    """An image file matplotlib can write (by its extension)."""
    if not path:
        return
    check_output_file(path, flag)
    ext = Path(path).suffix.lower().lstrip(".")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = sorted(FigureCanvasBase.get_supported_filetypes())
    if ext not in kinds:
        what = f".{ext} files" if ext else "a file without an extension"
        raise UsageError(f"{flag} {path!r}: matplotlib cannot write {what}; end the name with one of: "
                         f"{_names('.' + k for k in kinds)}")


def check_input_file(path: Optional[str], flag: str) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} does not exist or is not a file; give the path of an existing file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path!r} is not readable; fix its permissions or give another file")


# ------------------------------------------------------------------------------- a sweep
def check_sweep(*, workloads: Sequence[str], meshes: Sequence[str], layouts: Sequence[str],
                implementations: Sequence[str], devices: Devices) -> None:
    """Every value of a bench/profile sweep, and every layout against every workload and mesh."""
    specs = {w: check_workload(w) for w in workloads}
    dims = [check_mesh(m, devices) for m in meshes]
    for i in implementations:
        check_implementation(i)
    for lay in layouts:
        check_layout(lay, specs, dims)


def _common(args) -> None:
    """The values bench and profile share (those the parser does not restrict with choices)."""
    check_int(getattr(args, "steps", None), "--steps")
    check_int(getattr(args, "devices", None), "--devices")


def multiclient_devices() -> Optional[Devices]:
    """The cluster's devices when this process is a DTensor client, else None."""
    from dsgd import multiclient

    if not multiclient.is_client():
        return None
    cfg = multiclient.config_from_env()
    return Devices(cfg.global_devices, True, f"{cfg.num_clients} clients x {cfg.local_devices} devices")


# ------------------------------------------------------------------------------- per command
def check_bench(args, devices: Optional[Devices] = None) -> None:
    """``dsgd bench``'s values.  ``devices``: the cluster when run as (or for) multi-client clients."""
    from dsgd.harness import bench

    _common(args)
    devices = devices or multiclient_devices() or worker_devices(args.devices)
    meshes = args.mesh or ([] if devices.exact else list(bench.DEFAULT_MESHES))  # multi-client: defaults adapt
    check_sweep(workloads=args.workload or bench.DEFAULT_WORKLOADS, meshes=meshes,
                layouts=args.layout or ["sharded"],
                implementations=args.implementation or bench.DEFAULT_IMPLEMENTATIONS, devices=devices)
    check_models(args)
    check_output_file(args.output, "--output")
    check_plot_file(args.plot)
    for f in args.compare or ():
        check_compare_file(f)


def check_models(args) -> None:
    """``--model`` names (the train_step/fit modes' models), and layouts those modes can give them."""
    from dsgd.harness import measure, models

    for m in args.model or ():
        if m not in models.MODELS:
            raise UsageError(f"--model {m!r} is not a model of the train_step/fit modes; choose one of "
                             f"{_names(sorted(models.MODELS))}")
    whole = [m for m in (getattr(args, "mode", None) or measure.MODES) if m in measure.MODEL_MODES]
    odd = [lay for lay in (args.layout or ["sharded"]) if lay not in models.LAYOUT_POLICIES]
    if whole and odd:
        raise UsageError(f"--layout {odd[0]!r}: the {'/'.join(whole)} modes lay their model out by a policy, "
                         f"{_names(models.LAYOUT_POLICIES)}; give --mode eager/graph for a layout map")


def check_compare_file(path: str) -> None:
    """A ``--compare`` CSV: readable, with the columns it is merged on."""
    check_input_file(path, "--compare")
    import pandas as pd

    try:
        cols = pd.read_csv(path, nrows=1).columns
    except (OSError, ValueError) as e:
        raise UsageError(f"--compare {path!r} is not a readable CSV ({e}); give a file written with --format csv") \
            from None
    need = ("workload", "mesh", "layout", "dtype", "options", "implementation", "median_ms")
    missing = [c for c in need if c not in cols]
    if missing:
        raise UsageError(f"--compare {path!r} lacks columns {_names(missing)}; give a file written with --format csv "
                         "(e.g. by scripts/bench_jax.py)")


def check_profile(args) -> None:
    """``dsgd profile``'s values (``--diff`` only needs its ledger)."""
    from dsgd.harness import profile

    if args.diff:
        ledger = args.ledger or os.path.join(args.out, "ledger.csv")
        if not os.path.isfile(ledger):
            raise UsageError(f"--diff: no ledger at {ledger!r}; capture profiles first (dsgd profile), or give "
                             "--ledger FILE / --out DIR")
        return
    _common(args)
    check_int(args.time_steps, "--time-steps")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout} must be > 0 seconds")
    check_sweep(workloads=args.workload or profile.DEFAULT_WORKLOADS, meshes=args.mesh or profile.DEFAULT_MESHES,
                layouts=args.layout or ["sharded"],
                implementations=args.implementation or profile.DEFAULT_IMPLEMENTATIONS,
                devices=worker_devices(args.devices))
    check_output_dir(args.out, "--out")
    check_output_file(args.ledger, "--ledger", create_dirs=True)
    if args.commit is not None and not re.fullmatch(r"[A-Za-z0-9._+-]+", args.commit):
        raise UsageError(f"--commit {args.commit!r} may hold only letters, digits and . _ + -; give e.g. a short SHA")


def check_model(spec: str, flag: str = "--model") -> None:
    """A named workload, a JSON variable list, or ``module:function`` / ``file.py:function``."""
    if spec in WORKLOADS or spec.endswith(".json") or os.path.isfile(spec):
        check_workload(spec, flag)
        return
    mod, sep, fn = spec.rpartition(":")
    if not sep or not mod or not fn or not fn.isidentifier():
        raise UsageError(f"{flag} {spec!r} is not a named workload ({_names(sorted(WORKLOADS))}), not an existing "
                         "JSON file, and not module:function; give one of those")
    if mod.endswith(".py"):
        if not os.path.isfile(mod):
            raise UsageError(f"{flag} {spec!r}: file {mod!r} does not exist; give the path of the file that defines "
                             f"{fn}()")
        return
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UsageError(f"{flag} {spec!r}: module {mod!r} cannot be found; check the name, or run from the directory "
                         "that holds it (or give path/to/file.py:function)")


def check_layouts(args) -> None:
    """``dsgd layouts``' values."""
    check_int(args.devices, "--devices")
    check_int(args.steps, "--steps")
    check_int(args.top, "--top")
    check_int(args.max_plans, "--max-plans")
    check_int(args.devices_per_host, "--devices-per-host")
    check_int(args.min_shard_bytes, "--min-shard-bytes", 0)
    check_int(args.memory_budget, "--memory-budget")
    if not 0 < args.coverage <= 1:
        raise UsageError(f"--coverage {args.coverage} must be in (0, 1]; give e.g. 0.9")
    check_implementation(args.implementation)
    devices = worker_devices(args.devices)
    if args.validate:
        for w in args.validate_workloads or ():
            check_choice(w, sorted(WORKLOADS), "--validate-workloads")
        for path in args.from_measurements or ():  # repeatable: several saved grids re-fit together
            check_input_file(path, "--from-measurements")
        check_output_file(args.save_measurements, "--save-measurements")
        if not args.from_measurements and args.devices < 8:
            raise UsageError(f"--validate measures the 8-device meshes but --devices is {args.devices}; "
                             "give --devices 8 (or --from-measurements FILE)")
        return
    if not args.model:
        raise UsageError("--model is missing; give a named workload (" + _names(sorted(WORKLOADS)) + "), a JSON "
                         "variable list or module:function (or use --validate)")
    check_model(args.model)
    check_mesh(args.mesh, devices)
    if args.target_mesh:
        check_mesh(args.target_mesh, Devices(1 << 62, False, ""), "--target-mesh")
    for m in (args.calibration_meshes or "").split(";"):
        if m.strip():
            check_mesh(m, devices, "--calibration-meshes")
    for f in args.force or ():
        rx, sep, lay = f.partition("=")
        if not sep or not rx or not lay:
            raise UsageError(f"--force {f!r}: expected REGEX=LAYOUT, e.g. 'word_embeddings=unsharded,model'")
        try:
            re.compile(rx)
        except re.error as e:
            raise UsageError(f"--force {f!r}: bad regex {rx!r} ({e}); fix the pattern") from None
    check_input_file(args.calibration, "--calibration")
    check_output_file(args.emit_layout_map, "--emit-layout-map")
    check_plot_file(args.plot)


def check_launch(args, command: Sequence[str]) -> None:
    """``dsgd launch``'s values and, for a dsgd command, that command's values as the clients
    will see them (meshes against the cluster's devices); ``command``: :func:`dsgd.harness.launch.client_command`'s."""
    check_int(args.clients, "--clients")
    check_int(args.devices_per_client, "--devices-per-client")
    for flag, v in (("--start-timeout", args.start_timeout), ("--grace", args.grace), ("--timeout", args.timeout)):
        if v is not None and v <= 0:
            raise UsageError(f"{flag} {v} must be > 0 seconds")
    check_output_dir(args.log_dir, "--log-dir")
    if command[:1] == ["--script"]:
        check_input_file(command[1] if len(command) > 1 else None, "the script")
        return
    if command[:1] == ["--module"]:
        if importlib.util.find_spec(command[1]) is None:
            raise UsageError(f"module {command[1]!r} cannot be found; check the name or the working directory")
        return
    from dsgd.cli import build_parser

    # a bad option: argparse's one-line error ("dsgd launch -- dsgd bench: error: ..."), exit 2
    sub = build_parser("dsgd launch -- dsgd").parse_args(list(command))
    devices = Devices(args.clients * args.devices_per_client, True,
                      f"--clients {args.clients} x --devices-per-client {args.devices_per_client}")
    if sub.command == "bench":
        check_bench(sub, devices)
    else:
        CHECKS[sub.command](sub)


CHECKS = {"bench": check_bench, "profile": check_profile, "layouts": check_layouts}
