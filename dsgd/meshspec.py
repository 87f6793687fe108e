"""The mesh vocabulary: mesh specs (``batch=2,model=4``), layout strings (``model,unsharded``),
and the ``dtensor.Mesh`` / ``dtensor.Layout`` objects built from them.

Importing it imports no TensorFlow (the JAX comparison and the argument checks use the specs
without starting it): only :func:`make_mesh`, :func:`parse_layout_spec` and
:func:`distributed_mesh` import TensorFlow, when called.  Every front end (CLI, benchmarks,
advisor, tests) goes through these, so a spec means the same thing everywhere and a bad one gets
the same clear error.  The layout helpers read any object with ``sharding_specs`` and ``mesh``
(a ``dtensor.Layout``) without importing TensorFlow.  :mod:`dsgd.mesh` gives the builders under
their own module name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

UNSHARDED = "unsharded"
_AXIS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """A mesh or layout spec that is malformed or does not fit."""


def parse_mesh_spec(spec: str) -> list[tuple[str, int]]:
    """``"batch=2,model=4"`` -> ``[("batch", 2), ("model", 4)]``.

    ``"1"`` or ``""`` means a one-device mesh with a single axis ``batch``.
    """
    spec = (spec or "").strip()
    if spec in ("", "1"):
        return [("batch", 1)]
    dims: list[tuple[str, int]] = []
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        name = name.strip()
        if not sep or not _AXIS_RE.match(name):
            raise SpecError(
                f"mesh spec {spec!r}: expected comma-separated NAME=SIZE items such as "
                f"'batch=2,model=4', got {part!r}"
            )
        try:
            n = int(size)
        except ValueError:
            raise SpecError(f"mesh spec {spec!r}: size of axis {name!r} must be an integer, got {size!r}") from None
        if n < 1:
            raise SpecError(f"mesh spec {spec!r}: size of axis {name!r} must be >= 1, got {n}")
        if name in (d for d, _ in dims):
            raise SpecError(f"mesh spec {spec!r}: axis {name!r} appears twice")
        if name == UNSHARDED:
            raise SpecError(f"mesh spec {spec!r}: {UNSHARDED!r} is reserved and cannot name an axis")
        dims.append((name, n))
    return dims


def mesh_size(dims: Sequence[tuple[str, int]]) -> int:
    """Devices a mesh of these axes spans."""
    return math.prod(n for _, n in dims)


def format_mesh_spec(dims: Sequence[tuple[str, int]]) -> str:
    """``[("batch", 2), ("model", 4)]`` -> ``"batch=2,model=4"`` (read back by :func:`parse_mesh_spec`)."""
    return ",".join(f"{k}={v}" for k, v in dims)


def mesh_dims(mesh) -> list[tuple[str, int]]:
    """A ``dtensor.Mesh``'s axes as ``[(name, size), ...]``."""
    return [(n, mesh.dim_size(n)) for n in mesh.dim_names]


@dataclass(frozen=True)
class MeshSpec:
    """An immutable mesh shape: axis names and sizes, in order.  Iterates as ``(name, size)``
    pairs, so it goes wherever a list of pairs does."""

    dims: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, mesh: Union[str, Sequence[tuple[str, int]], "MeshSpec"]) -> "MeshSpec":
        """From a spec string, a list of pairs, a MeshSpec or a ``dtensor.Mesh``."""
        if isinstance(mesh, MeshSpec):
            return mesh
        if isinstance(mesh, str):
            return cls(tuple(parse_mesh_spec(mesh)))
        if hasattr(mesh, "dim_names"):
            return cls(tuple(mesh_dims(mesh)))
        return cls(tuple((str(n), int(k)) for n, k in mesh))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.dims)

    @property
    def size(self) -> int:
        return mesh_size(self.dims)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.dims)

    def __len__(self) -> int:
        return len(self.dims)

    def __str__(self) -> str:
        return format_mesh_spec(self.dims)


def zero1_entries(entries: Sequence[str], mesh_dims: Sequence[tuple[str, int]], shape: Sequence[int]) -> list[str]:
    """A ZeRO-1 slot's layout for a variable laid out as ``entries``: one more mesh axis -- the largest the
    variable does not use, of size > 1 -- on its first unsharded dimension that divides by it; ``entries``
    itself when none fits.  (``dsgd.impl.sharded_state`` keeps its slots so; the byte counts use it too.)"""
    specs = list(entries)
    used = {e for e in specs if e != UNSHARDED}
    free = sorted((a for a, n in mesh_dims if a not in used and n > 1), key=lambda a: -dict(mesh_dims)[a])
    for axis in free:
        k = dict(mesh_dims)[axis]
        for d, e in enumerate(specs):
            if e == UNSHARDED and shape[d] % k == 0:
                return specs[:d] + [axis] + specs[d + 1:]
    return specs


def layout_str(entries: Sequence[str]) -> str:
    """``('unsharded', 'model')`` -> ``'unsharded,model'``; all unsharded (or rank 0) -> ``'replicated'``.

    The one way a layout is written: :func:`parse_layout_spec` reads it back for any rank.
    """
    if all(e == UNSHARDED for e in entries):
        return "replicated"
    return ",".join(entries)


def parse_layout_str(spec: str, rank: int) -> list[str]:
    """A layout string as one entry per dimension (``"replicated"``/``""``: ``rank`` x unsharded).

    The inverse of :func:`layout_str`; the rank is the caller's to check.
    """
    s = spec.strip()
    if s in ("replicated", ""):
        return [UNSHARDED] * rank
    return [e.strip() for e in s.split(",")]


def layout_to_spec(layout) -> str:
    """A ``dtensor.Layout``'s entries, rank kept (``'unsharded,unsharded'``; ``'replicated'`` for rank 0).

    An identity, not a display form: ``plan.group_entries`` keys the step's groups on it, so a
    replicated vector and a replicated matrix stay in separate groups.  Layout maps, reports and
    messages write layouts with :func:`layout_str`; both read back with ``parse_layout_spec``.
    """
    specs = list(layout.sharding_specs)
    return ",".join(specs) if specs else "replicated"


def replication_factor(layout) -> int:
    """How many devices hold each element of a tensor with this layout."""
    mesh = layout.mesh
    sharded = {s for s in layout.sharding_specs if s != UNSHARDED}
    return math.prod(mesh.dim_size(n) for n in mesh.dim_names if n not in sharded)


def shards_per_dim(layout) -> list[int]:
    mesh = layout.mesh
    return [1 if s == UNSHARDED else mesh.dim_size(s) for s in layout.sharding_specs]


def local_shape(layout, shape: Sequence[int]) -> list[int]:
    return [d // k for d, k in zip(shape, shards_per_dim(layout))]


# ------------------------------------------------------------------ TensorFlow objects from specs
def make_mesh(spec: str | Sequence[tuple[str, int]] | MeshSpec, device_type: str = "CPU", *,
              available: int | None = None):
    """Build a DTensor mesh from a spec, on the first ``size`` logical devices.

    Fewer devices than configured may be used (e.g. a 1-device mesh in an 8-device
    process); more raises :class:`SpecError`.  In a DTensor multi-client run
    (``DTENSOR_JOBS`` set, see :mod:`dsgd.multiclient`) the mesh spans every device of
    every client (``dtensor.create_distributed_mesh``) and must use them all.
    """
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    from dsgd import multiclient  # here, not at the top: importing the specs starts nothing

    dims = list(MeshSpec.of(spec))
    if multiclient.is_client():
        return distributed_mesh(dims, device_type)
    need = mesh_size(dims)
    if available is None:
        available = len(tf.config.list_logical_devices(device_type.upper()))
    if need > available:
        raise SpecError(
            f"mesh spec {format_mesh_spec(dims)!r} needs {need} {device_type} devices, "
            f"but only {available} are configured"
        )
    devices = [f"{device_type.upper()}:{i}" for i in range(need)]
    return dtensor.create_mesh(dims, devices=devices, device_type=device_type.upper())


def parse_layout_spec(spec: str | Sequence[str], mesh, rank: int, shape: Sequence[int] | None = None):
    """``"model,unsharded"`` (or a list of entries) -> ``dtensor.Layout(["model", UNSHARDED], mesh)``.

    ``"replicated"`` means every dimension unsharded.  With ``shape`` the split is checked:
    every sharded dimension must divide by its axis size.
    """
    from tensorflow.experimental import dtensor

    entries = parse_layout_str(spec, rank) if isinstance(spec, str) else list(spec)
    if len(entries) != rank:
        raise SpecError(f"layout spec {spec!r} has {len(entries)} entries but the tensor has rank {rank}")
    axes = dict(mesh_dims(mesh))
    used: set[str] = set()
    for i, e in enumerate(entries):
        if e == UNSHARDED:
            continue
        if e not in axes:
            raise SpecError(
                f"layout spec {spec!r}: {e!r} is not an axis of the mesh; allowed: "
                f"{sorted(axes) + [UNSHARDED]}"
            )
        if e in used:
            raise SpecError(f"layout spec {spec!r}: mesh axis {e!r} is used twice")
        used.add(e)
        if shape is not None and shape[i] % axes[e] != 0:
            raise SpecError(
                f"layout spec {spec!r}: dimension {i} of size {shape[i]} does not divide by "
                f"mesh axis {e!r} of size {axes[e]}"
            )
    return dtensor.Layout(entries, mesh)


def distributed_mesh(dims: Sequence[tuple[str, int]], device_type: Optional[str] = None):
    """A mesh spanning all clients (``dtensor.create_distributed_mesh``); joins the cluster first."""
    from tensorflow.experimental import dtensor

    from dsgd import multiclient

    cfg = multiclient.initialize()
    device_type = (device_type or cfg.device_type).upper()
    if mesh_size(dims) != cfg.global_devices:
        raise SpecError(
            f"mesh spec {format_mesh_spec(dims)!r} needs {mesh_size(dims)} devices, but this multi-client run "
            f"has {cfg.global_devices} ({cfg.num_clients} clients x {cfg.local_devices} devices); a mesh must "
            "span every device of every client")
    local = [f"{device_type}:{i}" for i in range(cfg.local_devices)]
    return dtensor.create_distributed_mesh(list(dims), local_devices=local, device_type=device_type)
