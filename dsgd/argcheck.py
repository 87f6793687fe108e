"""Checking command-line values before anything starts: the value checkers every command uses.

Every ``dsgd`` command validates all its values first -- workloads, meshes against the devices
there will be, layouts against every workload and mesh, dtypes, implementations, option
presets, models and the paths it will write -- without TensorFlow (so in well under a second)
and before any worker process starts or any file is written.  A bad value raises
:class:`UsageError`: one line naming the value, the allowed ones and the fix, which the CLI
prints on stderr with exit status 2.

This module holds the checkers of single values and of a sweep; each command's own checks sit
beside the command (:mod:`dsgd.harness.bench_args`, :mod:`dsgd.harness.profile_args`,
:mod:`dsgd.harness.launch_args`, :mod:`dsgd.advisor.layouts_args`) and call these.  It imports
neither the harness nor the advisor.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from dsgd import meshspec
from dsgd.layoutmap import layout_entries
from dsgd.names import IMPLEMENTATIONS, REFERENCE
from dsgd.workloads import LAYOUT_POLICIES, WORKLOADS, VarSpec, WorkloadError, get_workload


class UsageError(ValueError):
    """A command-line value that cannot work; the message is one line: the value, what is allowed, the fix."""


def listed(values: Iterable[str]) -> str:
    """``a, b, c``: allowed values as a message lists them."""
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class Devices:
    """The devices meshes must fit: a worker's logical devices (a mesh may use fewer), or a
    multi-client cluster (a mesh must use exactly all of them)."""

    count: int
    exact: bool = False
    what: str = ""  # how the count came about, for messages: "--devices 8", "2 clients x 4 devices"


def worker_devices(n: int) -> Devices:
    """The devices of a worker started with ``--devices n`` (a mesh may use fewer)."""
    return Devices(int(n), False, f"--devices {n}")


# ------------------------------------------------------------------------------- single values
def check_choice(value: str, allowed: Sequence[str], flag: str) -> str:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise UsageError(f"{flag} {value!r} is not one of: {listed(allowed)}; give one of those")
    return value


def check_int(value: Optional[int], flag: str, minimum: int = 1) -> None:
    """An integer option, when given, is at least ``minimum``."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value} is too small; give an integer >= {minimum}")


def check_workload(name: str, flag: str = "--workload") -> list[VarSpec]:
    """The variables of a named workload or a JSON workload file."""
    if name not in WORKLOADS and not (name.endswith(".json") or os.path.exists(name)):
        raise UsageError(f"{flag} {name!r} is neither a named workload ({listed(sorted(WORKLOADS))}) nor an existing "
                         "JSON file; give one of those names or a JSON list of {\"name\", \"shape\", \"dtype\"}")
    try:
        return get_workload(name)
    except WorkloadError as e:
        raise UsageError(f"{flag} {name!r}: {e}; fix the file or give one of {listed(sorted(WORKLOADS))}") from None


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
        raise UsageError(f"{flag} {policy!r} is neither one of {listed(LAYOUT_POLICIES)} nor an existing layout-map "
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
                            f"{mesh!r} has no axis {axis!r} (axes: {listed(sizes)}); name only axes every --mesh has")
                    if s.shape[d] % sizes[axis]:
                        raise UsageError(
                            f"{flag} {policy}: variable {s.name!r} of {wname} (shape {list(s.shape)}) gets "
                            f"{meshspec.layout_str(entries)!r}, but its dimension {d} ({s.shape[d]}) does not divide by axis "
                            f"{axis!r} of size {sizes[axis]} on mesh {mesh!r}; shard another dimension or another mesh")


def check_implementation(name: str, flag: str = "--implementation", reference: bool = True) -> str:
    """A dsgd implementation's name (or, with ``reference``, tf_keras' baseline)."""
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
                         f"{listed('.' + k for k in kinds)}")


def check_input_file(path: Optional[str], flag: str) -> None:
    """A file this command reads: it exists and is readable."""
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


def check_counts(args) -> None:
    """``--steps`` and ``--devices``, where the command has them (the values bench and profile share
    that the parser does not restrict with choices)."""
    check_int(getattr(args, "steps", None), "--steps")
    check_int(getattr(args, "devices", None), "--devices")


def multiclient_devices() -> Optional[Devices]:
    """The cluster's devices when this process is a DTensor client, else None."""
    from dsgd import multiclient

    if not multiclient.is_client():
        return None
    cfg = multiclient.config_from_env()
    return Devices(cfg.global_devices, True, f"{cfg.num_clients} clients x {cfg.local_devices} devices")


def check_function(spec: str, flag: str) -> None:
    """``module:function`` or ``file.py:function`` whose module can be found."""
    mod, sep, fn = spec.rpartition(":")
    if not sep or not mod or not fn or not fn.isidentifier():
        raise UsageError(f"{flag} {spec!r} is not module:function (or path/file.py:function); give e.g. "
                         "examples.models:convnet")
    if mod.endswith(".py"):
        if not os.path.isfile(mod):
            raise UsageError(f"{flag} {spec!r}: file {mod!r} does not exist; give the path of the file that defines "
                             f"{fn}()")
        return
    import sys

    added = os.getcwd() not in sys.path  # the workers import it from here (the console script's path lacks it)
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        found = None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if found is None:
        raise UsageError(f"{flag} {spec!r}: module {mod!r} cannot be found; check the name, or run from the directory "
                         "that holds it (or give path/to/file.py:function)")
