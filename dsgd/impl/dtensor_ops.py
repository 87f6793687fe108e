"""Implementations in the DTensor domain: ops on the global DVariables.

``ops`` is :mod:`dsgd.rules` executed op by op, the tf_keras way (the readable
baseline, and what runs where nothing faster is known to be correct).  ``fused`` does the
update of each variable with one fused training op (``ResourceApplyKerasMomentum``),
so DTensor expands one op per variable instead of five or six.  Both work eagerly and
inside ``tf.function`` (so under ``model.fit``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.experimental import dtensor

from dsgd import rules
from dsgd.impl.base import Implementation, Items
from dsgd.plan import Entry, StepArgs


def densify(g, entry: Entry) -> tf.Tensor:
    """An IndexedSlices gradient as a dense tensor with the variable's layout.

    Duplicated indices are summed, as tf_keras' de-duplication does.  Dense is exact for
    SGD: momentum decays every row each step, so the reference's sparse update touches
    every row of the variable anyway.
    """
    if not isinstance(g, tf.IndexedSlices):
        return g
    rows = entry.var.shape[0]
    dense = tf.math.unsorted_segment_sum(g.values, g.indices, rows)
    if entry.layout is not None:
        dense = dtensor.relayout(dense, entry.layout)
    return dense


def _sumsq(g) -> tf.Tensor:
    values = g.values if isinstance(g, tf.IndexedSlices) else g
    values = tf.cast(values, tf.float32)
    return tf.reduce_sum(values * values)


def _scaled(g, scale, clipvalue, dtype):
    """Apply the clip coefficient and clipvalue to a dense or sparse gradient's values."""
    if isinstance(g, tf.IndexedSlices):
        v = _scaled(g.values, scale, clipvalue, dtype)
        return tf.IndexedSlices(v, g.indices, g.dense_shape)
    if scale is not None:
        g = g * tf.cast(scale, dtype)
    if clipvalue:
        g = rules.clip_by_value(g, clipvalue)
    return g


def _ema(items: Items, args: StepArgs) -> None:
    if args.ema_momentum is None:
        return
    # Inside tf.function the overwrite is an arithmetic select, not a tf.cond: with a tf.cond
    # per group, clipping and 4+ groups, DTensor's passes lost the read-after-update ordering
    # and the averages were computed from the weights *before* the step; and tf.where with
    # the scalar DTensor predicate segfaults (both checked with TF 2.21).  s*a + (1-s)*w with
    # s in {0, 1} is exact for finite values.
    eager_flag = isinstance(args.ema_overwrite, bool)
    for e, _ in items:
        w = e.var.read_value()
        new_avg = rules.ema(e.average.read_value(), w, tf.cast(args.ema_momentum, e.var.dtype))
        e.average.assign(new_avg)
        if eager_flag:
            if args.ema_overwrite:
                e.var.assign(new_avg)
        else:
            s = tf.cast(args.ema_overwrite, w.dtype)
            e.var.assign(s * new_avg + (1 - s) * w)


class OpsDTensor(Implementation):
    """The rules op by op on DVariables, in tf_keras' order (separate passes)."""

    name = "ops"
    domain = "dtensor"
    description = "dsgd.rules op by op on the DVariables (the readable baseline)"

    def partial_sumsq(self, items: Items) -> list[tf.Tensor]:
        return [tf.stack([_sumsq(g) for _, g in items])]

    def apply(self, items: Items, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        for i, (e, g) in enumerate(items):
            dtype = e.var.dtype
            lr = tf.cast(args.lr, dtype)
            g = densify(_scaled(g, None if scales is None else scales[i], args.clipvalue, dtype), e)
            if args.weight_decay and e.decay:
                e.var.assign(rules.weight_decay(e.var, lr, args.weight_decay))
            if e.momentum is not None:
                mu = tf.cast(args.momentum, dtype)
                w_new, m_new = rules.momentum(e.var, e.momentum, g, lr, mu, args.nesterov)
                e.momentum.assign(m_new)
                e.var.assign(w_new)
            else:
                e.var.assign(rules.sgd(e.var, g, lr))
        _ema(items, args)


class FusedDTensor(OpsDTensor):
    """One fused training op per variable (plus one for decay), dispatched through DTensor."""

    name = "fused"
    description = "one ResourceApplyKerasMomentum per variable through DTensor (graph-safe)"

    def apply(self, items: Items, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        for i, (e, g) in enumerate(items):
            dtype = e.var.dtype
            lr = tf.cast(args.lr, dtype)
            g = densify(_scaled(g, None if scales is None else scales[i], args.clipvalue, dtype), e)
            if args.weight_decay and e.decay:
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=e.var.handle, alpha=lr * tf.cast(args.weight_decay, dtype), delta=e.var.read_value())
            if e.momentum is not None:
                tf.raw_ops.ResourceApplyKerasMomentum(
                    var=e.var.handle, accum=e.momentum.handle, lr=lr, grad=g,
                    momentum=tf.cast(args.momentum, dtype), use_nesterov=args.nesterov)
            else:
                tf.raw_ops.ResourceApplyGradientDescent(var=e.var.handle, alpha=lr, delta=g)
        _ema(items, args)
