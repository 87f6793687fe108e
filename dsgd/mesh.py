"""Meshes and layouts as TensorFlow objects: the one place a ``dtensor.Mesh`` is created.

:func:`make_mesh` builds a mesh from a spec (:mod:`dsgd.meshspec`) on this process's logical
devices, or, in a DTensor multi-client run (:mod:`dsgd.multiclient`), across every client's;
:func:`parse_layout_spec` turns a layout string into a checked ``dtensor.Layout``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from dsgd import multiclient
from dsgd.meshspec import UNSHARDED, MeshSpec, SpecError, format_mesh_spec, mesh_dims, mesh_size, parse_layout_str


def make_mesh(spec: str | Sequence[tuple[str, int]] | MeshSpec, device_type: str = "CPU", *, available: int | None = None):
    """Build a DTensor mesh from a spec, on the first ``size`` logical devices.

    Fewer devices than configured may be used (e.g. a 1-device mesh in an 8-device
    process); more raises :class:`SpecError`.  In a DTensor multi-client run
    (``DTENSOR_JOBS`` set, see :mod:`dsgd.multiclient`) the mesh spans every device of
    every client (``dtensor.create_distributed_mesh``) and must use them all.
    """
    import tensorflow as tf
    from tensorflow.experimental import dtensor

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

    cfg = multiclient.initialize()
    device_type = (device_type or cfg.device_type).upper()
    if mesh_size(dims) != cfg.global_devices:
        raise SpecError(
            f"mesh spec {format_mesh_spec(dims)!r} needs {mesh_size(dims)} devices, but this multi-client run "
            f"has {cfg.global_devices} ({cfg.num_clients} clients x {cfg.local_devices} devices); a mesh must "
            "span every device of every client")
    local = [f"{device_type}:{i}" for i in range(cfg.local_devices)]
    return dtensor.create_distributed_mesh(list(dims), local_devices=local, device_type=device_type)
