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
        if entry.layout is not None and not tf.executing_eagerly():
            # Inside tf.function a gradient's layout is unknown while tracing (eagerly it was
            # checked): pin it to the variable's.  A mismatched one made the fused training op
            # segfault (TF 2.21); relayout is a no-op when the layouts already agree.
            g = dtensor.relayout(g, entry.layout)
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


def ema_one(e: Entry, w: tf.Tensor, args: StepArgs) -> tf.Tensor:
    """Update ``e``'s moving average from the new weights ``w``; return the weights to store.

    Inside ``tf.function`` the overwrite is an arithmetic select ``s*avg + (1-s)*w`` with
    ``s`` in {0, 1} (exact for finite values): ``tf.where`` with the scalar DTensor predicate
    segfaults, and a ``tf.cond`` per group lost its ordering (both checked with TF 2.21).
    """
    if args.ema_momentum is None:
        return w
    new_avg = rules.ema(e.average.read_value(), w, tf.cast(args.ema_momentum, w.dtype))
    e.average.assign(new_avg)
    if isinstance(args.ema_overwrite, bool):
        return new_avg if args.ema_overwrite else w
    s = tf.cast(args.ema_overwrite, w.dtype)
    return s * new_avg + (1 - s) * w


def _ema(items: Items, args: StepArgs) -> None:
    """EMA after in-place updates (``fused``, eagerly, where ops run in order): reads each
    variable after its update.  Inside ``tf.function`` ``fused`` uses the data-flow path."""
    if args.ema_momentum is None:
        return
    for e, _ in items:
        w = e.var.read_value()
        e.var.assign(ema_one(e, w, args))


class OpsDTensor(Implementation):
    """The rules op by op on DVariables, in tf_keras' order (separate passes)."""

    name = "ops"
    domain = "dtensor"
    description = "dsgd.rules op by op on the DVariables (the readable baseline)"

    def partial_sumsq(self, items: Items) -> list[tf.Tensor]:
        return [tf.stack([_sumsq(g) for _, g in items])]

    def apply(self, items: Items, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        # Data flow, not read-after-write: each variable is read once and assigned once, so
        # no result depends on control edges between resource ops (inside tf.function on a
        # mesh DTensor did not keep them: the EMA read the weights from before the update).
        for i, (e, g) in enumerate(items):
            dtype = e.var.dtype
            lr = tf.cast(args.lr, dtype)
            g = densify(rules.scale_and_clip(g, None if scales is None else scales[i], args.clipvalue, dtype), e)
            w = e.var.read_value()
            if args.weight_decay and e.decay:
                w = rules.weight_decay(w, lr, args.weight_decay)
            if e.momentum is not None:
                mu = tf.cast(args.momentum, dtype)
                w, m_new = rules.momentum(w, e.momentum.read_value(), g, lr, mu, args.nesterov)
                e.momentum.assign(m_new)
            else:
                w = rules.sgd(w, g, lr)
            e.var.assign(ema_one(e, w, args))


class FusedDTensor(OpsDTensor):
    """One fused training op per variable (plus one for decay), dispatched through DTensor."""

    name = "fused"
    description = "one ResourceApplyKerasMomentum per variable through DTensor (graph-safe)"

    def apply(self, items: Items, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        if args.ema_momentum is not None and not tf.executing_eagerly():
            # The EMA must read each variable after its in-place update; inside tf.function
            # on a mesh DTensor dropped that ordering (4 layouts + clipnorm: the averages
            # used the weights from before the step; TF 2.21), so use the data-flow path.
            return OpsDTensor.apply(self, items, args, scales)
        for i, (e, g) in enumerate(items):
            dtype = e.var.dtype
            lr = tf.cast(args.lr, dtype)
            g = densify(rules.scale_and_clip(g, None if scales is None else scales[i], args.clipvalue, dtype), e)
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
