"""``ops``: :mod:`dsgd.rules` executed op by op on the global DVariables, the tf_keras way.

The readable baseline, and what runs where nothing faster is known to be correct.  It works
in the DTensor domain (DTensor inserts the collectives), eagerly and inside ``tf.function``
(so under ``model.fit``).  ``fused`` (:mod:`dsgd.impl.fused`), ``sharded_state`` and
``grouped_graph`` build on it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from dsgd import rules
from dsgd.impl.base import Implementation, Items
from dsgd.impl.gradients import update_gradient
from dsgd.plan import Entry, StepArgs


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


class OpsDTensor(Implementation):
    """The rules op by op on DVariables, in tf_keras' order (separate passes)."""

    name = "ops"
    domain = "dtensor"
    description = "dsgd.rules op by op on the DVariables (the readable baseline)"

    def partial_sumsq(self, items: Items) -> list[tf.Tensor]:
        return [tf.stack([rules.sum_of_squares(g.values if isinstance(g, tf.IndexedSlices) else g)
                          for _, g in items])]

    def apply(self, items: Items, args: StepArgs, scales: Optional[Sequence[tf.Tensor]]) -> None:
        # Data flow, not read-after-write: each variable is read once and assigned once, so
        # no result depends on control edges between resource ops (inside tf.function on a
        # mesh DTensor did not keep them: the EMA read the weights from before the update).
        for i, (e, g) in enumerate(items):
            dtype = e.var.dtype
            lr = tf.cast(args.lr, dtype)
            g = update_gradient(g, scales, i, args.clipvalue, dtype, e.var.shape, e.layout)
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
