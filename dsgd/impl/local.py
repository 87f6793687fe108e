"""Helpers for the local domain: each device's shards of variables, slots and gradients.

``dtensor.unpack`` of a DVariable's handle gives one resource handle per local device;
ops on those handles update the DVariable's buffers in place at plain-TensorFlow speed
(DTensor's own updates allocate fresh buffers every step on CPU).  In a multi-client
mesh only this client's devices are local; everything here works on those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import tensorflow as tf
from tensorflow.experimental import dtensor

from dsgd import eager_dtensor, meshspec
from dsgd.plan import Entry


@dataclass
class LocalEntry:
    """Per-device handles of one variable and its slots, and where each shard sits."""

    entry: Entry
    devices: list[str]
    var: list[tf.Tensor]
    momentum: Optional[list[tf.Tensor]]
    average: Optional[list[tf.Tensor]]
    offsets: list[list[int]]  # per device, the global start index of its block in each dimension
    local_shape: list[int]
    inv_replication: float
    # per device: it holds its shard's first replica (coordinate 0 on every mesh axis the
    # layout does not shard), so a per-shard quantity summed over primaries counts each
    # element exactly once, over all clients of the mesh
    primary: list[bool]


def _handles(v) -> list[tf.Tensor]:
    if v is None:
        return None
    try:
        return list(dtensor.unpack(v.handle))
    except Exception:  # a plain variable: its own handle is its only shard
        return [v.handle]


def local_entry(entry: Entry) -> LocalEntry:
    var_h = _handles(entry.var)
    devices = [h.device for h in var_h]
    shape = list(entry.var.shape)
    if entry.layout is None:
        offsets = [[0] * len(shape)]
        lshape = shape
        primary = [True]
    else:
        layout = entry.layout
        mesh = layout.mesh
        lshape = meshspec.local_shape(layout, shape)
        replicated_axes = [a for a in mesh.dim_names if a not in layout.sharding_specs]
        offsets, primary = [], []
        for loc in mesh.local_device_locations():
            off = []
            for d, spec in enumerate(layout.sharding_specs):
                off.append(0 if spec == meshspec.UNSHARDED else loc[spec] * lshape[d])
            offsets.append(off)
            primary.append(all(loc[a] == 0 for a in replicated_axes))
    return LocalEntry(
        entry=entry, devices=devices, var=var_h,
        momentum=_handles(entry.momentum), average=_handles(entry.average),
        offsets=offsets, local_shape=lshape, inv_replication=1.0 / entry.replication, primary=primary,
    )


def unpack_dense(g, le: LocalEntry) -> list[tf.Tensor]:
    """A dense gradient's per-device components, in the order of ``le.devices``."""
    if le.entry.layout is None:
        return [g]
    return eager_dtensor.components(g)


def unpack_sparse(g: tf.IndexedSlices, le: LocalEntry) -> list[tf.IndexedSlices]:
    """An IndexedSlices gradient cut into each device's block (rows re-based, others dropped).

    Indices that fall outside a device's rows become -1, which ``unsorted_segment_sum``
    (used by :func:`densify_local`) drops.
    """
    values, indices = g.values, g.indices
    if le.entry.layout is None:
        return [g]
    mesh = le.entry.layout.mesh
    values = dtensor.relayout(values, dtensor.Layout.replicated(mesh, values.shape.rank))
    indices = dtensor.relayout(indices, dtensor.Layout.replicated(mesh, indices.shape.rank))
    vals, idxs = dtensor.unpack(values), dtensor.unpack(indices)
    out = []
    rows = le.local_shape[0]
    for k, dev in enumerate(le.devices):
        with tf.device(dev):
            off = le.offsets[k]
            v = vals[k]
            if len(off) > 1 and any(off[1:]) or (len(le.local_shape) > 1 and le.local_shape[1:] != list(le.entry.var.shape[1:])):
                begin = [0] + off[1:]
                size = [-1] + le.local_shape[1:]
                v = tf.slice(v, begin, size)
            i = tf.cast(idxs[k], tf.int64) - off[0]
            i = tf.where((i >= 0) & (i < rows), i, -tf.ones_like(i))
            out.append(tf.IndexedSlices(v, i, tf.constant([rows] + le.local_shape[1:], tf.int64)))
    return out


def densify_local(g, rows: int) -> tf.Tensor:
    if isinstance(g, tf.IndexedSlices):
        return tf.math.unsorted_segment_sum(g.values, g.indices, rows)
    return g


class PerDeviceCounter:
    """Adds 1 to every local copy of a replicated variable, one ``AssignAddVariableOp`` per
    device (where the grouped kernels' one-op :class:`dsgd.impl.multi_tensor.Counter` is not loaded)."""

    def __init__(self, handles: list[tf.Tensor], dtype: tf.DType) -> None:
        self._handles = list(handles)
        with tf.init_scope():
            self._one = tf.constant(1, dtype)

    def __call__(self) -> None:
        one = self._one
        for h in self._handles:
            tf.raw_ops.AssignAddVariableOp(resource=h, value=one)
