"""Cross-device (and cross-client) reductions for the local domain, done by DTensor.

Local-domain implementations (:mod:`dsgd.impl.local`) work on this process's devices
only: in a multi-client run ``dtensor.unpack`` returns the local components.  A value
that must be summed over *every* device of the mesh (the per-variable sums of squares
behind ``clipnorm``/``global_clipnorm``) is packed into a DTensor sharded over all
devices of all clients and reduced by DTensor, which inserts the all-reduce across
clients; the local component of the replicated result is what this client uses.

In a single process the same sum is a plain ``add_n`` over the local devices, which is
several times cheaper than a DTensor dispatch (see :func:`sum_over_devices`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.experimental import dtensor

REDUCE_AXIS = "dsgd_all_devices"
_MESHES: dict[tuple[str, ...], dtensor.Mesh] = {}


def _multi_client() -> bool:
    from tensorflow.dtensor.python import config

    return not config.is_local_mode()


def reduction_mesh(devices: Sequence[str]) -> dtensor.Mesh:
    """A 1-D mesh over ``devices`` on every client (cached): ``len(devices) x clients`` devices."""
    key = tuple(devices)
    mesh = _MESHES.get(key)
    if mesh is None:
        specs = [tf.DeviceSpec.from_string(d) for d in devices]
        kinds = {s.device_type for s in specs}
        if len(kinds) != 1:
            raise ValueError(f"per-device values must all live on one device type, got devices {list(devices)}")
        local = [f"{s.device_type}:{s.device_index}" for s in specs]
        device_type = kinds.pop()
        if _multi_client():
            from tensorflow.dtensor.python import config

            n = len(local) * config.num_clients()
            mesh = dtensor.create_distributed_mesh([(REDUCE_AXIS, n)], local_devices=local, device_type=device_type)
        else:
            mesh = dtensor.create_mesh([(REDUCE_AXIS, len(local))], devices=local, device_type=device_type)
        _MESHES[key] = mesh
    return mesh


def dtensor_sum(per_device: Sequence[tf.Tensor]) -> tf.Tensor:
    """Sum over every device of every client, by DTensor: ``per_device[k]`` lives on local device ``k``.

    The components are packed into one DTensor ``[devices, *shape]`` sharded over a 1-D mesh
    of all devices, summed over the first axis (DTensor all-reduces across clients), and
    this client's first local component of the replicated result is returned.
    """
    mesh = reduction_mesh([t.device for t in per_device])
    rank = per_device[0].shape.rank
    layout = dtensor.Layout([REDUCE_AXIS] + [dtensor.UNSHARDED] * rank, mesh)
    packed = dtensor.pack([tf.expand_dims(t, 0) for t in per_device], layout)
    return dtensor.unpack(tf.reduce_sum(packed, axis=0))[0]


def local_sum(per_device: Sequence[tf.Tensor]) -> tf.Tensor:
    """Sum over this process's devices only, on the first one."""
    if len(per_device) == 1:
        return per_device[0]
    with tf.device(per_device[0].device):
        return tf.add_n(list(per_device))


def sum_over_devices(per_device: Sequence[tf.Tensor], method: Optional[str] = None) -> tf.Tensor:
    """Sum same-shape tensors, one per local device, over all devices of the run.

    ``method``: ``"dtensor"`` (:func:`dtensor_sum`), ``"local"`` (:func:`local_sum`), or None:
    DTensor in a multi-client run (the only correct choice there), ``add_n`` in one process.
    """
    if method is None:
        method = "dtensor" if _multi_client() else "local"
    if method == "local":
        if _multi_client():
            raise ValueError("a local sum in a multi-client run would miss the other clients' devices")
        return local_sum(per_device)
    if method == "dtensor":
        return dtensor_sum(per_device)
    raise ValueError(f"method must be 'dtensor', 'local' or None, got {method!r}")


__all__ = ["sum_over_devices", "dtensor_sum", "local_sum", "reduction_mesh"]
