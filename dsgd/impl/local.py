"""The local domain: each device's shards of variables, slots and gradients, and the base
class of the implementations that work on them (:class:`LocalImplementation`: ``per_shard``,
``grouped``, ``xla``).

``dtensor.unpack`` of a DVariable's handle gives one resource handle per local device;
ops on those handles update the DVariable's buffers in place at plain-TensorFlow speed
(DTensor's own updates allocate fresh buffers every step on CPU).  In a multi-client
mesh only this client's devices are local; everything here works on those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.experimental import dtensor
from tensorflow.python.framework.ops import EagerTensor

from dsgd import eager_dtensor, meshspec, rules
from dsgd.impl.base import Implementation, Items
from dsgd.plan import Entry, Group


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


def replica_sources(les: Sequence[LocalEntry]) -> Optional[list[int]]:
    """The kernels' replica map for one call over every local device (items device-major: device
    ``k``'s variable ``i`` is item ``k * n + i``): for each item, the item that computes its shard --
    the first local device holding the same block (the same offsets) -- or None when no device holds
    another's block.  The kernel then runs the rule once per block and copies the results to the
    replicas (``SgdStep`` in ``multi_momentum.cc``)."""
    n = len(les)
    out = [le.offsets.index(le.offsets[k]) * n + i for k in range(len(les[0].devices)) for i, le in enumerate(les)]
    return None if out == list(range(len(out))) else out


def unpack_dense(g, le: LocalEntry) -> list[tf.Tensor]:
    """A dense gradient's per-device components, in the order of ``le.devices``."""
    if le.entry.layout is None:
        return [g]
    return eager_dtensor.components(g)


def unpack_sparse(g: tf.IndexedSlices, le: LocalEntry) -> list[tf.IndexedSlices]:
    """An IndexedSlices gradient cut into each device's block (rows re-based, others dropped).

    Indices that fall outside a device's rows become -1, which ``unsorted_segment_sum``
    (:func:`dsgd.impl.gradients.densify`) drops.
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
            if len(off) > 1 and any(off[1:]) or (len(le.local_shape) > 1
                                                 and le.local_shape[1:] != list(le.entry.var.shape[1:])):
                begin = [0] + off[1:]
                size = [-1] + le.local_shape[1:]
                v = tf.slice(v, begin, size)
            i = tf.cast(idxs[k], tf.int64) - off[0]
            i = tf.where((i >= 0) & (i < rows), i, -tf.ones_like(i))
            out.append(tf.IndexedSlices(v, i, tf.constant([rows] + le.local_shape[1:], tf.int64)))
    return out


def split_gradient(g, le: LocalEntry) -> list:
    """A gradient's per-device pieces (dense components, or each device's block of the slices)."""
    return unpack_sparse(g, le) if isinstance(g, tf.IndexedSlices) else unpack_dense(g, le)


def local_sumsq(g) -> tf.Tensor:
    """One device's piece's sum of squares, the rows on other devices (index -1) left out."""
    if isinstance(g, tf.IndexedSlices):
        keep = tf.cast(tf.reshape(g.indices >= 0, [-1] + [1] * (g.values.shape.rank - 1)), tf.float32)
        return rules.sum_of_squares(tf.cast(g.values, tf.float32) * keep)
    return rules.sum_of_squares(g)


class LocalImplementation(Implementation):
    """Shared set-up for implementations in the local domain: each entry's per-device handles
    (:class:`LocalEntry`), each step's gradients split per device, the sums of squares per device."""

    domain = "local"

    def __init__(self, group: Group, options, locals_: Optional[dict] = None) -> None:
        """``locals_``: the entries' :class:`LocalEntry` by ``id(entry)``, when another instance
        already unpacked them (see ``Grouped.combine``); else unpacked here."""
        super().__init__(group, options)
        self.locals = locals_ if locals_ is not None else {id(e): local_entry(e) for e in group.entries}
        self.devices = self.locals[id(group.entries[0])].devices if group.entries else []

    def prepare(self, items: Items) -> list[tuple[LocalEntry, list]]:
        """Each item's gradient split into its per-device pieces."""
        locs = self.locals
        if all(type(g) is EagerTensor for _, g in items) and all(e.layout is not None for e, _ in items):
            parts = eager_dtensor.components_many([g for _, g in items])  # the common case, batched
            return [(locs[id(e)], p) for (e, _), p in zip(items, parts)]
        return [(locs[id(e)], split_gradient(g, locs[id(e)])) for e, g in items]

    def partial_sumsq(self, split) -> list[tf.Tensor]:
        out = []
        for k, dev in enumerate(self.devices):
            with tf.device(dev):
                out.append(tf.stack([local_sumsq(parts[k]) * le.inv_replication for le, parts in split]))
        return out


class PerDeviceCounter:
    """Adds 1 to every local copy of a replicated variable, one ``AssignAddVariableOp`` per
    device (where the grouped kernels' one-op :class:`dsgd.impl.grouped.Counter` is not loaded)."""

    def __init__(self, handles: list[tf.Tensor], dtype: tf.DType) -> None:
        self._handles = list(handles)
        with tf.init_scope():
            self._one = tf.constant(1, dtype)

    def __call__(self) -> None:
        one = self._one
        for h in self._handles:
            tf.raw_ops.AssignAddVariableOp(resource=h, value=one)
