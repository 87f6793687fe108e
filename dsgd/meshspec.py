"""Parsing mesh specs (``batch=2,model=4``) and layout specs (``model,unsharded``).

Every front end (CLI, benchmarks, advisor, tests) goes through these, so a spec means
the same thing everywhere and a bad one gets the same clear error.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

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
    return math.prod(n for _, n in dims)


def format_mesh_spec(dims: Sequence[tuple[str, int]]) -> str:
    return ",".join(f"{k}={v}" for k, v in dims)


def check_fits(dims: Sequence[tuple[str, int]], available: int, spec: str | None = None) -> None:
    need = mesh_size(dims)
    if need != available:
        raise SpecError(
            f"mesh spec {spec or format_mesh_spec(dims)!r} needs {need} devices, "
            f"but {available} are configured; give a mesh whose sizes multiply to {available} "
            f"or run with --devices {need}"
        )


def make_mesh(spec: str | Sequence[tuple[str, int]], device_type: str = "CPU", *, available: int | None = None):
    """Build a DTensor mesh from a spec, on the first ``size`` logical devices.

    Fewer devices than configured may be used (e.g. a 1-device mesh in an 8-device
    process); more raises :class:`SpecError`.  In a DTensor multi-client run
    (``DTENSOR_JOBS`` set, see :mod:`dsgd.multiclient`) the mesh spans every device of
    every client (``dtensor.create_distributed_mesh``) and must use them all.
    """
    from tensorflow.experimental import dtensor
    import tensorflow as tf

    from dsgd import multiclient

    dims = parse_mesh_spec(spec) if isinstance(spec, str) else list(spec)
    if multiclient.is_client():
        return multiclient.create_mesh(dims, device_type)
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
    """``"model,unsharded"`` -> ``dtensor.Layout(["model", UNSHARDED], mesh)``.

    Also accepts ``"replicated"`` (all dimensions unsharded), ``"shard0:model"`` style is
    not needed: give one entry per dimension.  With ``shape`` the split is checked:
    every sharded dimension must divide by its axis size.
    """
    from tensorflow.experimental import dtensor

    if isinstance(spec, str):
        s = spec.strip()
        entries = [UNSHARDED] * rank if s in ("replicated", "") else [e.strip() for e in s.split(",")]
    else:
        entries = list(spec)
    if len(entries) != rank:
        raise SpecError(f"layout spec {spec!r} has {len(entries)} entries but the tensor has rank {rank}")
    axes = dict(zip(mesh.dim_names, [mesh.dim_size(n) for n in mesh.dim_names]))
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


def layout_str(entries: Sequence[str]) -> str:
    """``('unsharded', 'model')`` -> ``'unsharded,model'``; all unsharded (or rank 0) -> ``'replicated'``.

    The one way a layout is written: :func:`parse_layout_spec` reads it back for any rank.
    """
    if all(e == UNSHARDED for e in entries):
        return "replicated"
    return ",".join(entries)


def layout_to_spec(layout) -> str:
    """A ``dtensor.Layout`` as :func:`layout_str` writes it; :func:`parse_layout_spec` reads it back."""
    return layout_str(list(layout.sharding_specs))


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
