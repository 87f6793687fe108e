"""``per_shard``: fused training ops on each device's local shards, eagerly.

For every variable and every local device: one ``ResourceApplyKerasMomentum`` (or
``ResourceApplyGradientDescent``) on the unpacked handles, in place.  Weight decay and
EMA are one extra op each.  No DTensor expansion, no tracing: the first step costs what
every step costs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from tensorflow.python.framework.ops import EagerTensor

from dsgd import eager_dtensor, rules
from dsgd.impl.base import Implementation, Items
from dsgd.impl.local import LocalEntry, densify_local, local_entry, unpack_dense, unpack_sparse
from dsgd.plan import Group, StepArgs


def split_gradient(g, le: LocalEntry) -> list:
    return unpack_sparse(g, le) if isinstance(g, tf.IndexedSlices) else unpack_dense(g, le)


def local_sumsq(g) -> tf.Tensor:
    if isinstance(g, tf.IndexedSlices):
        keep = tf.cast(tf.reshape(g.indices >= 0, [-1] + [1] * (g.values.shape.rank - 1)), tf.float32)
        v = tf.cast(g.values, tf.float32) * keep
    else:
        v = tf.cast(g, tf.float32)
    return tf.reduce_sum(v * v)


class LocalImplementation(Implementation):
    """Shared set-up for implementations in the local domain."""

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


class PerShard(LocalImplementation):
    name = "per_shard"
    description = "one fused training op per variable per device on the unpacked local shards (eager)"

    def apply(self, split, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        dtype = self.group.dtype
        for k, dev in enumerate(self.devices):
            with tf.device(dev):
                lr = tf.cast(args.lr, dtype)  # args.lr is a plain host scalar in the local domain
                mu = tf.constant(args.momentum, dtype)
                wd = tf.constant(args.weight_decay or 0.0, dtype) * lr
                for i, (le, parts) in enumerate(split):
                    g = parts[k]
                    g = rules.scale_and_clip(g, None if scales is None else scales[i], args.clipvalue, dtype)
                    if isinstance(g, tf.IndexedSlices):
                        g = densify_local(g, le.local_shape[0])
                    h = le.var[k]
                    if args.weight_decay and le.entry.decay:
                        w = tf.raw_ops.ReadVariableOp(resource=h, dtype=dtype)
                        tf.raw_ops.ResourceApplyGradientDescent(var=h, alpha=wd, delta=w)
                    if le.momentum is not None:
                        tf.raw_ops.ResourceApplyKerasMomentum(
                            var=h, accum=le.momentum[k], lr=lr, grad=g, momentum=mu,
                            use_nesterov=args.nesterov)
                    else:
                        tf.raw_ops.ResourceApplyGradientDescent(var=h, alpha=lr, delta=g)
                if args.ema_momentum is not None:
                    self._ema(split, k, args, dtype)

    @staticmethod
    def _ema(split, k, args: StepArgs, dtype) -> None:
        overwrite = bool(args.ema_overwrite)
        for le, _ in split:
            a = le.average[k]
            w = tf.raw_ops.ReadVariableOp(resource=le.var[k], dtype=dtype)
            avg = tf.raw_ops.ReadVariableOp(resource=a, dtype=dtype)
            new = rules.ema(avg, w, tf.cast(args.ema_momentum, dtype))
            tf.raw_ops.AssignVariableOp(resource=a, value=new)
            if overwrite:
                tf.raw_ops.AssignVariableOp(resource=le.var[k], value=new)


def _same_dtype_slots(group: Group, options) -> Optional[str]:
    md = getattr(options, "momentum_dtype", None)
    if md is not None and md != group.dtype.name and getattr(options, "momentum", 0):
        return f"momentum_dtype={md} differs from the variables' dtype {group.dtype.name}"
    return None


PerShard.supports = classmethod(lambda cls, group, options: _same_dtype_slots(group, options))
